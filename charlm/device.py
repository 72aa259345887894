"""Device selection: `auto` picks and says so; an explicit device that is absent is an error.

Never falls back silently (the lecture's scripts drop to the CPU unannounced): a run asked for
`mps` either runs on mps or stops before any work, naming the devices this machine has. Also the
per-process CPU settings every computing stage makes: threads and the allocator (`configure_threads`).
"""

from __future__ import annotations

import ctypes
import platform
import random
from dataclasses import dataclass

import torch

from charlm.errors import UsageError
from charlm.params import DEVICE_FORMS, parse_device


class DeviceError(UsageError, RuntimeError):
    """The `device` param names a device this machine does not have."""


@dataclass(frozen=True)
class Availability:
    """What the machine has; a parameter so tests can pretend to have a GPU."""

    cuda_count: int
    mps: bool

    @classmethod
    def probe(cls) -> Availability:
        mps = getattr(torch.backends, "mps", None)
        return cls(
            cuda_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
            mps=bool(mps is not None and mps.is_available()),
        )

    def names(self) -> list[str]:
        found = ["cpu"]
        found += [f"cuda:{i}" for i in range(self.cuda_count)]
        if self.mps:
            found.append("mps")
        return found


def resolve_device(requested: str, available: Availability | None = None) -> torch.device:
    """Parse the `device` param, once, into the `torch.device` every other module takes, or raise
    `DeviceError` naming the devices that exist."""
    parsed = parse_device(requested)
    if parsed is None:
        raise DeviceError(f"device = {requested!r}: must be {DEVICE_FORMS}")
    kind, index = parsed
    available = Availability.probe() if available is None else available
    if kind == "auto":
        if available.cuda_count:
            return torch.device("cuda")
        return torch.device("mps" if available.mps else "cpu")
    if kind == "cpu" or (kind == "mps" and available.mps) or (kind == "cuda" and (index or 0) < available.cuda_count):
        return torch.device(requested)
    return _absent(requested, available)


def _absent(requested: str, available: Availability) -> torch.device:
    raise DeviceError(
        f"device = {requested!r} is not available on this machine (available: {', '.join(available.names())}); "
        "set device to one of those, or auto"
    )


def seed_everything(seed: int) -> None:
    """Seed Python and torch on every device (torch.manual_seed covers CUDA and MPS too)."""
    random.seed(seed)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer read after this measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def configure_threads(threads: int) -> None:
    """Set torch's intra-op threads (0 keeps torch's default: one per core), and keep freed memory.

    Parallel experiments (`dvc queue start -j 2`) each set 1 so they do not fight over the cores.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    keep_freed_memory()


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 32 MB for reuse instead of returning them to the OS.

    Why: a training step frees and reallocates the same few-MB activation tensors every step, and
    glibc returns blocks that large to the OS (unmapped, or trimmed off the heap's top), so each step
    page-faults and the kernel zeroes its activations anew: several times the page faults, and a
    large share of a CPU step on either class (docs/performance.md "What makes it fast").
    Numerics are unchanged (torch aligns every block to 64 bytes either way; tested). True where
    applied (Linux with glibc); elsewhere the allocator is left as it is.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
