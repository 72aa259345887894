"""The GPT: `config.py` (torch-free: the params loader checks the `gpt` section with its rules),
`model.py` (the lecture's model) and `kernels.py` (attention and the fast CPU ops)."""

from charlm.models.gpt.config import GPTArchitecture, GPTConfig

CONFIG = GPTConfig
__all__ = ["CONFIG", "GPTArchitecture", "GPTConfig"]
