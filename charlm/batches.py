"""Token tensors on disk and the batches drawn from them (the lecture's `get_batch`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from charlm.errors import DataError
from charlm.params import ParamsError


def load_tokens(path: str | Path, dtype: str) -> torch.Tensor:
    """Memory-map a raw token file written by the `encode`/`split` stages as a 1-D tensor.

    The pages are shared read-only with the OS cache, so a corpus larger than RAM still trains.
    """
    path = Path(path)
    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read the tokens ({e.strerror}); run `dvc repro split`") from None
    if size == 0 or size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} tokens; re-run `dvc repro split`")
    return torch.from_file(str(path), shared=False, size=size // itemsize, dtype=torch_dtype)


def load_splits(
    train: str | Path, val: str | Path, dtype: str, block_size: int, section: str
) -> dict[str, torch.Tensor]:
    """Both splits, memory-mapped; each must be longer than `block_size` (`section`.block_size)."""
    splits = {"train": load_tokens(train, dtype), "val": load_tokens(val, dtype)}
    for name, data in splits.items():
        if block_size >= len(data):
            raise ParamsError(
                f"{section}.block_size = {block_size}: must be shorter than the {name} split ({len(data)} tokens)"
            )
    return splits


def get_batch(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: torch.device = torch.device("cpu"),  # noqa: B008 - an immutable value
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks `x` (the lecture's get_batch) and their targets `y`, `x` shifted left by one token."""
    if len(data) <= block_size:
        raise ValueError(f"split of {len(data)} tokens is too short for block_size {block_size}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    return blocks_at(data, starts, block_size, device)


def blocks_at(
    data: torch.Tensor,
    starts: torch.Tensor,
    block_size: int,
    device: torch.device = torch.device("cpu"),  # noqa: B008 - an immutable value
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks `x` starting at `starts` (B,) and their targets `y`, on `device`."""
    offsets = starts[:, None] + torch.arange(block_size + 1)  # (B, T+1)
    chunk = data[offsets].long()  # (B, T+1), one gather instead of a Python loop over rows
    if torch.device(device).type == "cuda":
        # One contiguous pinned buffer, copied while the GPU still works on the previous step.
        chunk = chunk.pin_memory().to(device, non_blocking=True)
    elif torch.device(device).type != "cpu":
        chunk = chunk.to(device)
    return chunk[:, :-1], chunk[:, 1:]  # x, and y: x shifted left by one token


class EpochBlocks:
    """Training blocks drawn epoch by epoch (`batch_windows: epoch`), instead of the lecture's
    independent random starts.

    Each epoch picks a random offset below `block_size`, cuts the split from there into
    non-overlapping blocks and hands them out in a random order; the next epoch starts when they run
    out (a batch may straddle two). So every character is a target about once per epoch, where
    independent starts see some characters several times and others never (about e^-k of the split
    is missed in k epochs' worth of random blocks), and the offset moves the block boundaries
    between epochs, so no character is always at the same position.

    The generator is the sampler's own; with several processes, every process holds the same sampler
    and takes its own slice of each draw (`take`), so together they still see each block once.
    """

    def __init__(self, n_tokens: int, block_size: int, generator: torch.Generator) -> None:
        if n_tokens <= block_size:
            raise ValueError(f"split of {n_tokens} tokens is too short for block_size {block_size}")
        self.n_tokens = n_tokens
        self.block_size = block_size
        self.generator = generator
        self.queue = torch.empty(0, dtype=torch.long)  # this epoch's blocks not yet handed out
        self.epoch = 0  # epochs begun

    def _next_epoch(self) -> torch.Tensor:
        # Below n_tokens - block_size too, so even a split barely longer than a block has one.
        offsets = min(self.block_size, self.n_tokens - self.block_size)
        offset = int(torch.randint(offsets, (1,), generator=self.generator))
        n_blocks = (self.n_tokens - 1 - offset) // self.block_size  # each needs block_size + 1 tokens
        self.epoch += 1
        return offset + self.block_size * torch.randperm(n_blocks, generator=self.generator)

    def take(self, count: int) -> torch.Tensor:
        """The next `count` block starts (count,), int64."""
        while len(self.queue) < count:
            self.queue = torch.cat([self.queue, self._next_epoch()])
        starts, self.queue = self.queue[:count], self.queue[count:]
        return starts

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Enough to continue the same sequence of blocks (a resumed training run)."""
        return {
            "generator": self.generator.get_state(),
            "queue": self.queue.clone(),
            "epoch": torch.tensor(self.epoch),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.queue = state["queue"].clone()
        self.epoch = int(state["epoch"])


CONTEXT_ONLY = -100  # F.cross_entropy's default ignore_index: a target read as context, not scored


def sequential_blocks(
    data: torch.Tensor, block_size: int, batch_size: int, max_tokens: int | None = None, context: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks covering the split (or `max_tokens` spread evenly over it), in batches, every target
    token scored exactly once; the last partial block too.

    With `context` > 0 the blocks overlap by that many tokens: each block after the first reads
    `context` tokens already scored before its own, and their targets are CONTEXT_ONLY, so every
    scored token but the split's first `context` sees at least `context` tokens before it.
    Deterministic: the same data always gives the same blocks, so the loss over them is an exact
    function of the checkpoint.
    """
    if not 0 <= context < block_size:
        raise ValueError(f"context {context} must be in [0, block_size {block_size})")
    n_targets = len(data) - 1
    stride = block_size - context
    starts = torch.arange(0, max(n_targets - context, 1), stride)
    if max_tokens is not None and max_tokens < n_targets:
        keep = max(1, max_tokens // stride)
        starts = starts[torch.linspace(0, len(starts) - 1, keep).round().long().unique()]

    def masked(chunk: torch.Tensor, block_starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = chunk[:, :-1], chunk[:, 1:].clone()
        if context:
            y[block_starts > 0, :context] = CONTEXT_ONLY  # the first block has nothing before it
        return x, y

    full = starts[starts + block_size <= n_targets]
    for i in range(0, len(full), batch_size):
        offsets = full[i : i + batch_size, None] + torch.arange(block_size + 1)  # (B, T+1)
        yield masked(data[offsets].long(), full[i : i + batch_size])
    tail = starts[starts + block_size > n_targets]
    for s in tail.tolist():
        yield masked(data[s:].long()[None], torch.tensor([s]))  # (1, n)
