"""Data-parallel training with PyTorch's own engine: torchrun launches the processes, DDP averages
the gradients (`nccl` on CUDA, `gloo` on the CPU). One process stays plain `python`.

The train stage re-launches itself under torchrun when `nproc` > 1 and it is not already a
torchrun worker; for several machines, start the stage under torchrun yourself (docs/pipeline.md "Several machines").
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from charlm.errors import CharlmError, UsageError


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run; the default is a single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Distributed:
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        return cls(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]))


def rank_seed(seed: int, rank: int) -> int:
    """Each process's own seed for its batches and dropout masks; rank 0 keeps `seed`, so it draws
    what a single process would."""
    return seed + 7919 * rank


def under_torchrun(env: dict[str, str] | None = None) -> bool:
    return "WORLD_SIZE" in (os.environ if env is None else env)


def relaunch_under_torchrun(nproc: int, module: str, argv: list[str]) -> None:
    """Run `python -m module argv` in `nproc` local processes via torchrun; raise if any fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "--module", module, *argv])
    except ChildFailedError as e:
        raise CharlmError(f"a training process failed under torchrun ({len(e.failures)} of {nproc})") from None


def worker_device(device: torch.device, dist: Distributed) -> torch.device:
    """Each worker's device: its own GPU on CUDA; DDP has no backend for mps."""
    if dist.world_size == 1:
        return device
    if device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    if device.type == "mps":
        raise UsageError("nproc > 1 with device = 'mps': DDP has no mps backend; use nproc: 1 on a Mac")
    return device


def init_process_group(device: torch.device) -> None:
    """Join the run's process group. On CUDA each rank first binds its own GPU: NCCL's collectives
    (`all_gather_object` of the resumable state among them) use the *current* device, which is
    cuda:0 for every rank unless set, and then fail or hang ("Duplicate GPU detected")."""
    import torch.distributed as torch_dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch_dist.init_process_group(backend="nccl", device_id=device)
    else:
        torch_dist.init_process_group(backend="gloo")


@contextlib.contextmanager
def process_group(device: torch.device, dist: Distributed) -> Iterator[None]:
    """The collective communication of a data-parallel worker, for the block's duration; nothing for
    a single process. A worker also dies with its launcher."""
    if dist.world_size == 1:
        yield
        return
    die_with_launcher()
    init_process_group(device)
    try:
        yield
    finally:
        destroy_process_group()


def destroy_process_group() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def die_with_launcher() -> None:
    """Make this worker die when its launcher does (Linux). torchrun starts each worker in a
    process group of its own, so a kill -9 of the stage would otherwise leave the workers training,
    and writing outputs after DVC has recorded the stage as failed."""
    if sys.platform != "linux":
        return
    import ctypes

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != launcher:  # it died before the line above took effect
        os._exit(1)
