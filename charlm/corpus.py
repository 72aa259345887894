"""The `encode` and `split` steps on raw token buffers. Torch-free: these stages start instantly."""

from __future__ import annotations

from charlm.errors import DataError
from charlm.tokenizer import CharTokenizer


def decode_corpus(raw: bytes, source: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{source}: not UTF-8 text (byte {e.start}: {e.reason}); point data.url at a text file"
        ) from None
    if not text:
        raise DataError(f"{source}: the corpus is empty; point data.url at a text file")
    return text


def encode_text(text: str) -> tuple[CharTokenizer, bytes]:
    """Fit the vocabulary (sorted unique characters) and encode the whole text with it."""
    tokenizer = CharTokenizer.fit(text)
    return tokenizer, tokenizer.encode_bytes(text)


def split_tokens(tokens: bytes, itemsize: int, val_fraction: float) -> tuple[bytes, bytes]:
    """First (1 - val_fraction) of the tokens for training, the rest for validation (the lecture's split)."""
    if len(tokens) % itemsize:
        raise DataError(f"token buffer of {len(tokens)} bytes is not a whole number of {itemsize}-byte tokens")
    n = len(tokens) // itemsize
    n_train = int(n * (1.0 - val_fraction))
    if n_train < 2 or n - n_train < 2:
        raise DataError(
            f"{n} tokens split at val_fraction={val_fraction} leaves {n_train} train and {n - n_train} val "
            "tokens; use a larger corpus or another split.val_fraction"
        )
    cut = n_train * itemsize
    return tokens[:cut], tokens[cut:]
