"""The two models, behind one interface: `forward(idx, targets=None) -> (logits, loss | None)`.

Each model is a package of its own, imported only when asked for, so that the bigram's DVC stages
depend on `bigram/` alone and editing the GPT never re-runs them. A package's `__init__` holds its
config, torch-free (the params loader checks the GPT's with it); its `model.py` the `nn.Module`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from charlm.hardware import Runtime

MODEL_NAMES = ("bigram", "gpt")  # the one list (dvc.yaml's `matrix:` lists are tested against it)

__all__ = ["MODEL_NAMES", "build_model", "config_for", "count_params", "extra_metrics", "model_module", "place"]


def model_module(name: str) -> Any:
    """The model's package: its `CONFIG`, torch-free."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}: must be one of {', '.join(MODEL_NAMES)}")
    return importlib.import_module(f"charlm.models.{name}")


def build_model(name: str, config: dict[str, Any], runtime: Runtime | None = None) -> nn.Module:
    """A model from its name and `asdict(config)` (as a checkpoint stores it): on the CPU, or on
    `runtime`'s device with its attention kernels."""
    model_cls = importlib.import_module(f"charlm.models.{name}.model").MODEL
    model = model_cls(model_module(name).CONFIG(**config))
    return model if runtime is None else place(model, runtime)


def place(model: nn.Module, runtime: Runtime) -> nn.Module:
    """`model` on `runtime`'s device, computing attention with its kernels (the bigram has none)."""
    model = model.to(runtime.device)
    if hasattr(model, "use_kernels"):
        model.use_kernels(runtime.attention)
    return model


def config_for(name: str, section: Any, vocab_size: int) -> dict[str, Any]:
    """The model's config from its params section's `model` part (None for the bigram), plus vocab_size."""
    values = {} if section.model is None else dataclasses.asdict(section.model)
    return dataclasses.asdict(model_module(name).CONFIG(vocab_size=vocab_size, **values))


def extra_metrics(name: str, train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Metrics only one model has (the bigram's loss floor), from its model module's `extra_metrics`."""
    metrics = getattr(importlib.import_module(f"charlm.models.{name}.model"), "extra_metrics", None)
    return metrics(train, val, vocab_size) if metrics is not None else {}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
