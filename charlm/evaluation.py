"""Loss estimation: the lecture's `estimate_loss` on random batches (the training curve) and the
exact whole-split loss (the evaluate stage's metrics)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from charlm.batches import CONTEXT_ONLY, get_batch, sequential_blocks
from charlm.errors import NonFiniteLoss
from charlm.hardware import Runtime
from charlm.params import EvaluateParams, TrainConfig

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


def full_context(model: nn.Module, block_size: int) -> int:
    """The context `split_loss` gives each scored character for the model's best prediction: all
    that reaches it (`receptive_field` - 1), at most half a window (a full-attention model's
    windows then overlap by half, which doubles the evaluation's cost)."""
    return min(model.receptive_field - 1, block_size // 2)


@torch.inference_mode()
def split_loss(
    model: nn.Module,
    data: torch.Tensor,
    block_size: int,
    device: torch.device,
    max_tokens: int | None = None,
    context: int = 0,
    temperature: float = 1.0,
) -> float:
    """Exact mean loss over the whole split, every character scored once, in float32: a pure function
    of the checkpoint and the data, so the evaluate stage's metrics are reproducible.

    With `context` 0 the windows do not overlap, and a window's first characters are predicted from
    the few before them in the window; with `full_context(model, block_size)` every character (but
    the split's first) is predicted from all the text that can reach it. `temperature` scores the
    model's logits divided by it (`tempered_logits`).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float32, device=device)
    count = 0
    for x, y in sequential_blocks(data, block_size, eval_batch_size(block_size), max_tokens, context):
        scored = int((y != CONTEXT_ONLY).sum())  # counted on the CPU: no device sync
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        # The mean over the scored targets: CONTEXT_ONLY ones are ignored.
        loss = F.cross_entropy(tempered_logits(logits, temperature).flatten(0, -2), y.reshape(-1))
        total += loss * scored
        count += scored
    model.train(was_training)
    return (total / count).item()


def tempered_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits` in float32 divided by `temperature` (`evaluate.temperature`): above 1 a flatter
    distribution, the temperature scaling of Guo et al. (2017). At 1 the logits are left exactly as
    they are, so the default metrics are the model's own."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def dynamic_loss(
    model: nn.Module, data: torch.Tensor, block_size: int, device: torch.device, settings: EvaluateParams
) -> float:
    """Mean loss over the split under dynamic evaluation (Krause et al. 2018, 2019), in float32.

    The split is read in order, `dynamic_segment` characters at a time. Each segment is scored with
    the current weights (with up to `block_size - dynamic_segment` characters before it as context, no
    more than the model's `receptive_field` can use),
    and only then the model takes an SGD step on that segment's loss, after which every weight moves
    `dynamic_decay` of the way back to its trained value. Every character is predicted before the
    model has learned from it: a causal predictor that adapts to the text it reads (names, a play's
    style). The model's weights are restored when it returns. Segments are scored, and learned from,
    at `settings.temperature`, as `split_loss` scores them.
    """
    segment = min(settings.dynamic_segment, block_size)
    # Context past what can reach a prediction changes no score and costs a forward and backward.
    context = min(block_size - segment, model.receptive_field - 1)
    params = [p for p in model.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    total = torch.zeros((), dtype=torch.float32, device=device)
    count = 0
    tokens = data.long()
    try:
        for start in range(0, len(tokens) - 1, segment):
            end = min(start + segment, len(tokens) - 1)
            first = max(0, start - context)
            x = tokens[first:end].to(device)[None]  # (1, T)
            y = tokens[first + 1 : end + 1].to(device)[None]
            logits, _ = model(x)
            scored = start - first  # the context's positions are read, not scored
            scored_logits = tempered_logits(logits[0, scored:], settings.temperature)
            loss = F.cross_entropy(scored_logits, y[0, scored:], reduction="sum")
            total += loss.detach()
            count += end - start
            grads = torch.autograd.grad(loss / (end - start), params)
            with torch.no_grad():
                torch._foreach_add_(params, grads, alpha=-settings.dynamic_lr)
                if settings.dynamic_decay > 0:
                    torch._foreach_lerp_(params, trained, settings.dynamic_decay)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, trained)
        model.train(was_training)
    mean = (total / count).item()
    if not math.isfinite(mean):
        raise NonFiniteLoss(
            f"dynamic evaluation diverged: evaluate.dynamic_lr = {settings.dynamic_lr} makes the loss "
            f"{mean}; try a smaller dynamic_lr or a larger dynamic_decay"
        )
    return mean


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
