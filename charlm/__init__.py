"""charlm: a character-level language-model pipeline on tinyshakespeare, driven by DVC.

Importing this package has no side effects: no file I/O, no logging set-up, no device probing.
The submodules are imported on demand so that stages which do not need torch never load it.
"""

__version__ = "0.1.0"
