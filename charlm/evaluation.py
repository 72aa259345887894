"""Loss estimation: the lecture's `estimate_loss` on random batches (the training curve) and the
exact whole-split loss (the evaluate stage's metrics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm.batches import get_batch, sequential_blocks
from charlm.hardware import Runtime
from charlm.params import TrainConfig

# Tokens per forward pass. Why not more: at 32k tokens the GPT's MLP activation (64 MB) outgrows the
# 32 MB blocks glibc keeps (`charlm.device.keep_freed_memory`), and every batch page-faults its memory
# in again (docs/performance.md "What makes it fast").
EVAL_BATCH_TOKENS = 8192


def eval_batch_size(block_size: int) -> int:
    """Windows per forward pass of an evaluation: EVAL_BATCH_TOKENS worth, at least one."""
    return max(1, EVAL_BATCH_TOKENS // block_size)


@torch.inference_mode()
def estimate_loss(
    model: nn.Module,
    splits: dict[str, torch.Tensor],
    cfg: TrainConfig,
    generator: torch.Generator,
    runtime: Runtime,
) -> dict[str, float]:
    """Mean loss over `cfg.eval_iters` random batches of `cfg.batch_size` blocks per split (the
    lecture's estimate_loss), in training's autocast dtype, several batches per forward pass."""
    was_training = model.training
    model.eval()
    device = runtime.device
    out: dict[str, float] = {}
    for name, data in splits.items():
        x, y = get_batch(data, cfg.eval_iters * cfg.batch_size, cfg.block_size, generator, device)
        total = torch.zeros((), device=device)
        step = eval_batch_size(cfg.block_size)
        for i in range(0, len(x), step):
            with runtime.autocast_context():
                _, loss = model(x[i : i + step], y[i : i + step])
            total += loss.float() * len(x[i : i + step])
        out[name] = (total / len(x)).item()
    model.train(was_training)
    return out


@torch.inference_mode()
def split_loss(
    model: nn.Module, data: torch.Tensor, block_size: int, device: torch.device, max_tokens: int | None = None
) -> float:
    """Exact mean loss over the whole split in non-overlapping windows, in float32: a pure function
    of the checkpoint and the data, so the evaluate stage's metrics are reproducible."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float32, device=device)
    count = 0
    for x, y in sequential_blocks(data, block_size, eval_batch_size(block_size), max_tokens):
        x, y = x.to(device), y.to(device)
        _, loss = model(x, y)
        total += loss.float() * y.numel()
        count += y.numel()
    model.train(was_training)
    return (total / count).item()


@torch.inference_mode()
def position_losses(model: nn.Module, data: torch.Tensor, block_size: int, device: torch.device) -> torch.Tensor:
    """Mean loss (block_size,) at each position of the full windows `split_loss` averages, in float32.

    Why: `split_loss` averages over positions 0..block_size-1 of each window, and the first few
    predict from a few characters only; this shows how much of the metric that is (docs/pipeline.md
    "Metrics").
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(block_size, dtype=torch.float32, device=device)
    windows = 0
    for x, y in sequential_blocks(data, block_size, eval_batch_size(block_size)):
        if x.size(1) < block_size:  # the last, partial window: not every position is in it
            continue
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        losses = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
        total += losses.sum(0)
        windows += x.size(0)
    model.train(was_training)
    if windows == 0:
        raise ValueError(f"split of {len(data)} tokens has no full window of block_size {block_size}")
    return (total / windows).cpu()
