"""The GPT's configuration: its shape and the switches beyond the lecture, with their rules.

Torch-free, so the params loader validates the `gpt` section's model keys with the same rules the
model is built with (`charlm.params.GPTParams` composes this with the training settings). The
defaults are the lecture's model; params.yaml's values are the default recipe (docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Position = Literal["learned", "rope"]
MLPKind = Literal["gelu", "relu2"]


class ConfigError(ValueError):
    """A value no GPT can be built with: the message names the key and what is allowed."""


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {allowed}")


def layer_windows(n_layer: int, attention_window: int, full_attention_layers: int) -> tuple[int, ...]:
    """Each layer's attention window, first to last: `attention_window`, except 0 (every earlier
    character in the block) for the last `full_attention_layers`. Also for code that holds the
    config as a dict (the memory estimate, the benchmarks)."""
    windowed = n_layer - full_attention_layers
    return tuple(attention_window if layer < windowed else 0 for layer in range(n_layer))


@dataclass(frozen=True)
class GPTArchitecture:
    """The GPT's shape and switches: the `gpt` section's model keys. `block_size` is also training's."""

    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    position: Position = "learned"  # "rope": rotary position embeddings instead of the lecture's table
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    mlp: MLPKind = "gelu"  # "relu2": ReLU squared
    zero_init: bool = False  # the blocks' output projections start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)
    token_shift: bool = False  # add a learned per-channel share of the previous character's embedding
    attention_window: int = 0  # > 0: each character attends to itself and the window - 1 before it; 0 = all
    full_attention_layers: int = 0  # with a window: the last this many layers attend to the whole block

    def layer_windows(self) -> tuple[int, ...]:
        return layer_windows(self.n_layer, self.attention_window, self.full_attention_layers)

    def check_architecture(self, prefix: str = "") -> None:
        """The one set of rules, for params.yaml (`prefix` "gpt.") and for a model's config alike."""
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            _check(value > 0, f"{prefix}{name}", value, "must be a positive integer")
        divisible = f"must be divisible by {prefix}n_head ({self.n_head})"
        _check(self.n_embd % self.n_head == 0, f"{prefix}n_embd", self.n_embd, divisible)
        _check(0.0 <= self.dropout < 1.0, f"{prefix}dropout", self.dropout, "must be in [0, 1)")
        positions = get_args(Position)
        _check(self.position in positions, f"{prefix}position", self.position, f"must be one of {positions}")
        _check(
            self.position != "rope" or (self.n_embd // self.n_head) % 2 == 0,
            f"{prefix}position",
            self.position,
            f"needs an even head size (n_embd / n_head = {self.n_embd / self.n_head:g})",
        )
        mlps = get_args(MLPKind)
        _check(self.mlp in mlps, f"{prefix}mlp", self.mlp, f"must be one of {mlps}")
        _check(self.logit_softcap >= 0.0, f"{prefix}logit_softcap", self.logit_softcap, "must be >= 0 (0 = off)")
        _check(
            self.attention_window >= 0,
            f"{prefix}attention_window",
            self.attention_window,
            "must be >= 0 (0 = every earlier character, the lecture's causal attention)",
        )
        _check(
            0 <= self.full_attention_layers <= self.n_layer,
            f"{prefix}full_attention_layers",
            self.full_attention_layers,
            f"must be between 0 and {prefix}n_layer ({self.n_layer})",
        )


@dataclass(frozen=True, kw_only=True)
class GPTConfig(GPTArchitecture):
    """What a GPT is built from (and a checkpoint stores): the architecture and the vocabulary size."""

    vocab_size: int

    def __post_init__(self) -> None:
        _check(self.vocab_size > 0, "vocab_size", self.vocab_size, "must be positive")
        self.check_architecture()
