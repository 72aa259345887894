"""The bigram: its config here (torch-free), the lookup table in `model.py`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BigramConfig:
    vocab_size: int

    def __post_init__(self) -> None:
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size = {self.vocab_size}: must be positive")


CONFIG = BigramConfig
