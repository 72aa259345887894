"""The two models, behind one interface: `forward(idx, targets=None) -> (logits, loss | None)`.

Each model lives in its own module, imported only when asked for, so that the bigram's DVC stages
depend on `bigram.py` alone and editing the GPT never re-runs them.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from torch import nn

from charlm.params import MODEL_NAMES  # the one list (dvc.yaml's `matrix:` lists are tested against it)

__all__ = ["MODEL_NAMES", "build_model", "config_for", "count_params", "model_module"]


def model_module(name: str) -> Any:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}: must be one of {', '.join(MODEL_NAMES)}")
    return importlib.import_module(f"charlm.models.{name}")


def build_model(name: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its name and `asdict(config)` (as stored in a checkpoint)."""
    module = model_module(name)
    return module.MODEL(module.CONFIG(**config))


def config_for(name: str, section: object, vocab_size: int) -> dict[str, Any]:
    """The model's config from its params section: the section's keys the config has, plus vocab_size."""
    config_cls = model_module(name).CONFIG
    names = {f.name for f in dataclasses.fields(config_cls)} - {"vocab_size"}
    values = {k: v for k, v in dataclasses.asdict(section).items() if k in names}
    return dataclasses.asdict(config_cls(vocab_size=vocab_size, **values))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
