"""The `encode` and `split` steps, streamed in chunks so memory stays bounded whatever the corpus
size (a 1 GB text needs tens of MB, not gigabytes). Torch-free for ASCII/Latin-1 text, so these
stages start instantly.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from charlm.errors import DataError
from charlm.tokenizer import CharTokenizer

CHUNK_BYTES = 1 << 24  # 16 MiB per read


def iter_text(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The file's text, chunk by chunk; a multi-byte character split across reads is kept whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: not UTF-8 text (byte {offset + e.start}: {e.reason}); point data.url at a text file"
                ) from None
            if text:
                yield text
            if not raw:
                return
            offset += len(raw)


def fit_vocabulary(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> CharTokenizer:
    """Sorted unique characters of the whole file (first pass of `encode`)."""
    chars: set[str] = set()
    for text in iter_text(path, chunk_bytes):
        chars.update(text)
    if not chars:
        raise DataError(f"{path}: the corpus is empty; point data.url at a text file")
    return CharTokenizer(tuple(sorted(chars)))


def encode_file(path: str | Path, tokenizer: CharTokenizer, out: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Write every character's id to `out` (second pass of `encode`); returns the token count."""
    count = 0
    for text in iter_text(path, chunk_bytes):
        out.write(tokenizer.encode_bytes(text))
        count += len(text)
    return count


def encode_text(text: str) -> tuple[CharTokenizer, bytes]:
    """In-memory version for small texts (tests, benchmarks): vocabulary and encoded ids."""
    if not text:
        raise DataError("the corpus is empty")
    tokenizer = CharTokenizer.fit(text)
    return tokenizer, tokenizer.encode_bytes(text)


def split_counts(n_tokens: int, val_fraction: float) -> tuple[int, int]:
    """Tokens for training (the first 1 - val_fraction, as in the lecture) and for validation."""
    n_train = int(n_tokens * (1.0 - val_fraction))
    if n_train < 2 or n_tokens - n_train < 2:
        raise DataError(
            f"{n_tokens} tokens split at val_fraction={val_fraction} leaves {n_train} train and "
            f"{n_tokens - n_train} val tokens; use a larger corpus or another split.val_fraction"
        )
    return n_train, n_tokens - n_train


def split_tokens(tokens: bytes, itemsize: int, val_fraction: float) -> tuple[bytes, bytes]:
    """In-memory split of a token buffer (see `split_counts`)."""
    if len(tokens) % itemsize:
        raise DataError(f"token buffer of {len(tokens)} bytes is not a whole number of {itemsize}-byte tokens")
    n_train, _ = split_counts(len(tokens) // itemsize, val_fraction)
    return tokens[: n_train * itemsize], tokens[n_train * itemsize :]


def copy_bytes(src: BinaryIO, dst: BinaryIO, n: int, chunk_bytes: int = CHUNK_BYTES) -> None:
    while n > 0:
        block = src.read(min(chunk_bytes, n))
        if not block:
            raise DataError("token file ended early; re-run `dvc repro encode`")
        dst.write(block)
        n -= len(block)
