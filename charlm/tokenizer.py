"""Character tokenizer: the lecture's `stoi`/`itos` as a class with a JSON vocabulary.

Torch-free on purpose: the `encode` stage turns the corpus into token ids with `bytes.translate`
(one C call over the whole text) whenever every character fits in a byte, which is the case for
tinyshakespeare; wider alphabets go through torch's vectorised `searchsorted`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from charlm import io
from charlm.errors import DataError, UsageError

# The smallest integer type that holds every id, by vocabulary size; names are torch dtypes.
_DTYPES = ((256, "uint8", 1), (2**15, "int16", 2), (2**31, "int32", 4))


def token_dtype(vocab_size: int) -> tuple[str, int]:
    """(dtype name, bytes per token) of the encoded corpus for a vocabulary of this size."""
    for limit, name, itemsize in _DTYPES:
        if vocab_size <= limit:
            return name, itemsize
    raise DataError(f"vocabulary of {vocab_size} characters is too large for int32 ids")


class UnknownCharactersError(UsageError, ValueError):
    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        shown = " ".join(repr(c) for c in self.missing[:20])
        more = f" and {len(self.missing) - 20} more" if len(self.missing) > 20 else ""
        super().__init__(f"characters not in the vocabulary: {shown}{more}")


@dataclass(frozen=True)
class CharTokenizer:
    chars: tuple[str, ...]

    def __post_init__(self) -> None:
        if list(self.chars) != sorted(set(self.chars)) or any(len(c) != 1 for c in self.chars):
            raise ValueError("vocabulary must be sorted unique single characters")

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        if not text:
            raise DataError("the corpus is empty: nothing to build a vocabulary from; check data.url")
        return cls(tuple(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> str:
        return token_dtype(self.vocab_size)[0]

    @property
    def itemsize(self) -> int:
        return token_dtype(self.vocab_size)[1]

    def missing_chars(self, text: str) -> list[str]:
        return sorted(set(text) - set(self.chars))

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as a list (for prompts); raises `UnknownCharactersError` naming strangers."""
        missing = self.missing_chars(text)
        if missing:
            raise UnknownCharactersError(missing)
        stoi = {c: i for i, c in enumerate(self.chars)}
        return [stoi[c] for c in text]

    def encode_bytes(self, text: str) -> bytes:
        """The whole corpus as a little-endian buffer of `self.dtype`, without a per-character loop."""
        missing = self.missing_chars(text)
        if missing:
            raise UnknownCharactersError(missing)
        if max(map(ord, self.chars)) < 256:
            table = bytearray(256)
            for i, c in enumerate(self.chars):
                table[ord(c)] = i
            return text.encode("latin-1").translate(table)
        return self._encode_wide(text)

    def _encode_wide(self, text: str) -> bytes:
        import torch

        codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
        vocab = torch.tensor([ord(c) for c in self.chars], dtype=torch.int32)
        ids = torch.searchsorted(vocab, codes).to(getattr(torch, self.dtype))
        return bytes(ids.untyped_storage())

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps(
            {"chars": "".join(self.chars), "vocab_size": self.vocab_size, "dtype": self.dtype},
            ensure_ascii=True,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "vocab") -> CharTokenizer:
        try:
            obj = json.loads(text)
            chars = obj["chars"]
            if not isinstance(chars, str):
                raise TypeError("chars must be a string")
            tok = cls(tuple(chars))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{source}: not a charlm vocabulary ({e}); re-run `dvc repro encode`") from None
        if obj.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise DataError(f"{source}: vocab_size does not match its characters; re-run `dvc repro encode`")
        return tok

    def save(self, path: str | Path) -> None:
        io.write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise DataError(f"{path}: cannot read the vocabulary ({e.strerror}); run `dvc repro encode`") from None
        return cls.from_json(text, source=str(path))
