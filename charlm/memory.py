"""Memory a run needs, estimated before anything is allocated, against the memory available.

A typo such as `n_embd: 10000000` would otherwise allocate for half a minute and end in the kernel's
out-of-memory killer (or swap) instead of a message. The estimate counts the parameters on torch's
`meta` device from at most two blocks (exact, nothing allocated: `charlm.training.parameter_counts`),
then adds what training keeps per parameter and the
activations one micro-batch saves for the backward pass. The calibration test compares it with the
measured peak of real runs (tests/test_memory.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.errors import UsageError
from charlm.models.gpt.config import layer_windows

FLOAT32 = 4
# Bytes per activation element under bf16 autocast: the matmuls' outputs are bf16, the residual
# stream, the norms' statistics and the loss stay float32 (measured: 0.55-0.6x float32's peak growth).
BF16_AUTOCAST = 2.3


class NotEnoughMemory(UsageError):
    """A run that cannot fit in the memory this machine (or device) has."""


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per process, by what holds them."""

    parameters: int
    gradients: int
    optimizer: int
    average: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.average + self.activations

    def breakdown(self) -> str:
        parts = {
            "weights": self.parameters,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "weight average": self.average,
            "activations": self.activations,
        }
        return ", ".join(f"{name} {human(size)}" for name, size in parts.items() if size)


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(size) < 1000 or unit == "PB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def training_memory(
    n_params: int,
    n_muon: int,
    config: Mapping[str, object],
    micro_batch: int,
    optimizer: str,
    weight_average: bool,
    attention_matrix: bool = True,
    activation_bytes: float = FLOAT32,
) -> TrainingMemory:
    """What one training process holds at its peak (float32 master weights whatever the autocast).

    Activations per layer, in widths of n_embd per token, measured as the growth of peak RSS with the
    batch (tests/test_memory.py): ~22 for the lecture's block (what its ops save for the backward,
    plus the gradients and temporaries alive at the backward's peak), and more for each switch that
    saves more. With `attention_matrix` (the explicit attention path: CPU bf16 or dropout) also two
    (T, keys) matrices per head, which SDPA's fused kernels do not keep. The logits are kept three
    times (logits, soft-cap, log-softmax). The bigram has no blocks: its logits are all it keeps.
    `activation_bytes`: FLOAT32, or BF16_AUTOCAST under bf16 autocast.
    """
    rows, tokens = micro_batch, int(config.get("block_size", 1))
    width, heads, layers = int(config.get("n_embd", 0)), int(config.get("n_head", 0)), int(config.get("n_layer", 0))
    vocab = int(config["vocab_size"])
    # Measured per switch: RoPE keeps the rotated queries and keys and their halves swapped, QK-norm
    # the normalised ones, ReLU^2 the ReLU's output besides its square (4 widths each) and its backward's
    # temporaries.
    saved = 22 + 8 * (config.get("position") == "rope") + 4 * bool(config.get("qk_norm"))
    saved += 11 * (config.get("mlp") == "relu2")
    window = int(config.get("attention_window", 0) or 0)
    windows = layer_windows(layers, window, int(config.get("full_attention_layers", 0) or 0))
    full_layers = sum(not 0 < w < tokens for w in windows)
    # A sliding window keeps each chunk's keys and values beside the one before it, and scores for
    # 2 * window keys per query instead of all of them.
    windowed = (layers - full_layers) * (
        (saved + 10) * rows * tokens * width + (2 * rows * heads * tokens * 2 * window if attention_matrix else 0)
    )
    # The explicit path's weights: the softmax's output, kept, and its gradient at the backward's peak.
    full = full_layers * (
        saved * rows * tokens * width + (2 * rows * heads * tokens * tokens if attention_matrix else 0)
    )
    activations = activation_bytes * (windowed + full + 3 * rows * tokens * vocab + 2 * rows * tokens * width)
    adam = n_params - n_muon if optimizer == "muon" else n_params
    return TrainingMemory(
        parameters=FLOAT32 * n_params,
        gradients=FLOAT32 * n_params,
        optimizer=FLOAT32 * (2 * adam + (n_muon if optimizer == "muon" else 0)),
        average=FLOAT32 * n_params if weight_average else 0,
        activations=int(activations),
    )


def mem_available_from(meminfo: str, cgroup_max: str | None = None, cgroup_current: str | None = None) -> int | None:
    """MemAvailable from /proc/meminfo text, capped by a cgroup v2 limit (a container's) if any."""
    available = None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    if cgroup_max and cgroup_max.strip().isdigit() and cgroup_current and cgroup_current.strip().isdigit():
        room = int(cgroup_max) - int(cgroup_current)
        available = room if available is None else min(available, room)
    return available


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on `device`, or None where that cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if sys.platform == "linux":
        meminfo = _read("/proc/meminfo")
        if meminfo:
            return mem_available_from(
                meminfo, _read("/sys/fs/cgroup/memory.max"), _read("/sys/fs/cgroup/memory.current")
            )
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(needed: int, available: int | None, what: str, fix: str) -> None:
    """Raise one line naming `what`, the estimate and the memory available when it cannot fit."""
    if available is not None and needed > available:
        raise NotEnoughMemory(f"{what} needs about {human(needed)} but {human(available)} is available; {fix}")

