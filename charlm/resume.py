"""Saved training state, so an interrupted train stage resumes instead of starting again.

The train stage saves everything the loop needs to continue exactly (weights, optimizer state with
Muon's momentum, the weight average, each process's random generators, the epoch sampler's place,
the step, the curve so far) every `save_state_every_seconds`. A resumed run ends with the same
checkpoint and metrics as one never interrupted, on the same CPU and thread count.

Where: outside the workspace, in `$CHARLM_STATE_DIR` or `~/.cache/charlm/train-state`. DVC deletes
a stage's outputs before it runs it (a `persist` output would survive, but it disables DVC's
run-cache for the stage), and `dvc exp run --queue` runs each experiment in a throw-away copy of
the workspace; a directory of its own survives both. Each state is named by a key over everything
the result depends on (the params the stage reads, the data's hashes, the source of every project
module it imported, torch's version, the thread count and the CPU's bf16 class), so a changed param
or edited code never resumes a stale state: it simply finds none.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charlm import io
from charlm.curves import CurvePoint
from charlm.errors import CharlmError, NonFiniteLoss
from charlm.hardware import native_bf16

FORMAT = "charlm-train-state-v1"
STALE_AFTER_SECONDS = 14 * 24 * 3600  # a state nobody resumed in two weeks is removed


class StateError(CharlmError):
    """A saved state that cannot be trusted: unreadable, truncated, or for another run."""


@dataclass
class TrainingState:
    """The training loop after `step` optimizer steps: enough to continue it bit for bit."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: list[dict[str, Any]]  # one state_dict per optimizer (Muon and AdamW)
    average: dict[str, torch.Tensor] | None  # the weight average's state_dict, if one is kept
    randomness: list[dict[str, torch.Tensor]]  # one per process, by rank: see `capture_randomness`
    curve: list[CurvePoint]
    train_seconds: float
    windows: dict[str, torch.Tensor] | None = None  # the epoch sampler's state (`batch_windows: epoch`)


def capture_randomness(batch_generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random streams: its batch sampler, torch's CPU generator (dropout on the CPU)
    and the accelerator's generator (dropout there)."""
    streams = {"batches": batch_generator.get_state(), "cpu": torch.get_rng_state()}
    if device.type == "cuda":
        streams["device"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        streams["device"] = torch.mps.get_rng_state()
    return streams


def restore_randomness(
    streams: Mapping[str, torch.Tensor], batch_generator: torch.Generator, device: torch.device
) -> None:
    batch_generator.set_state(streams["batches"])
    torch.set_rng_state(streams["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(streams["device"], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(streams["device"])


def _optimizers(optimizer: Any) -> tuple[torch.optim.Optimizer, ...]:
    return tuple(getattr(optimizer, "optimizers", (optimizer,)))  # Muon + AdamW, or one optimizer


def capture(
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    average: Any,
    batch_generator: torch.Generator,
    sampler: Any,
    curve: list[CurvePoint],
    train_seconds: float,
    device: torch.device,
    dist: Any,
) -> TrainingState:
    """The training loop's state after `step` steps. Every process calls it (a data-parallel run
    gathers every process's random streams); the main process's is the one to save."""
    streams = [capture_randomness(batch_generator, device)]
    if dist.world_size > 1:
        import torch.distributed as torch_dist

        mine, streams = streams[0], [None] * dist.world_size
        torch_dist.all_gather_object(streams, mine)
    return TrainingState(
        step=step,
        model=model.state_dict(),
        optimizer=[opt.state_dict() for opt in _optimizers(optimizer)],
        average=average.model.state_dict() if average is not None else None,
        randomness=streams,
        curve=list(curve),
        train_seconds=train_seconds,
        windows=sampler.state_dict() if sampler is not None else None,
    )


def restore(
    state: TrainingState,
    optimizer: Any,
    average: Any,
    batch_generator: torch.Generator,
    sampler: Any,
    device: torch.device,
    rank: int,
) -> tuple[list[CurvePoint], float, int]:
    """Put a saved state back into the loop's optimizer, weight average, random streams and epoch
    sampler (the weights are loaded before the optimizer is made); (curve, train seconds, step)."""
    for opt, saved in zip(_optimizers(optimizer), state.optimizer, strict=True):
        opt.load_state_dict(saved)
    if average is not None:
        average.model.load_state_dict(state.average)
    restore_randomness(state.randomness[rank], batch_generator, device)
    if sampler is not None:
        sampler.load_state_dict(state.windows)
    return list(state.curve), state.train_seconds, state.step


def state_key(parts: Mapping[str, Any]) -> str:
    """A hex digest of everything a training result depends on (JSON-able values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def code_fingerprint(packages: Iterable[str] = ("charlm", "stages")) -> dict[str, str]:
    """sha256 of the source of every loaded module of these packages: the code that ran."""
    wanted = tuple(packages)
    found = {}
    for module in list(sys.modules.values()):
        # The spec's name, not the sys.modules key: `python -m stages.train` runs as `__main__`.
        spec = getattr(module, "__spec__", None)
        name, path = getattr(spec, "name", None), getattr(module, "__file__", None)
        if name and path and name.split(".", 1)[0] in wanted and path.endswith(".py"):
            found[name] = file_sha256(path)
    return dict(sorted(found.items()))


def training_key(stage: str, params: Mapping[str, Any], data_files: Iterable[Path], device: torch.device) -> str:
    """The key of a training run: the params the stage read, its data, the code that ran (call it
    once every module is imported, the model's included), torch, the thread count (float sums round
    differently per thread count) and whether the device computes bf16 natively."""
    return state_key(
        {
            "stage": stage,
            "params": params,
            "data": {Path(path).name: file_sha256(path) for path in data_files},
            "code": code_fingerprint(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "native_bf16": native_bf16(device),
        }
    )


def take_state(directory: Path, key: str) -> tuple[TrainingState | None, Path | None, str | None]:
    """(the state to resume, its file, why it was refused): a damaged state is reported, never used."""
    found = find_state(directory, key)
    if found is None:
        return None, None, None
    try:
        return load_state(found, key), found, None
    except StateError as e:
        return None, found, str(e)


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("CHARLM_STATE_DIR"):
        return Path(env["CHARLM_STATE_DIR"])
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "charlm" / "train-state"


def state_path(directory: Path, stage: str, workspace: Path, key: str) -> Path:
    """`<stage>-<workspace>-<key>.pt`: the key finds a state from any workspace (a queued experiment
    runs in a fresh copy); the workspace part lets a new run supersede its own older states."""
    where = hashlib.sha256(str(workspace.resolve()).encode()).hexdigest()[:12]
    return directory / f"{stage.replace('@', '-')}-{where}-{key}.pt"


def find_state(directory: Path, key: str) -> Path | None:
    """The newest saved state with this key, from any workspace."""
    found = sorted(directory.glob(f"*-{key}.pt"), key=lambda p: p.stat().st_mtime) if directory.is_dir() else []
    return found[-1] if found else None


def remove_stale_states(directory: Path, current: Path, now: float | None = None) -> list[Path]:
    """Remove this stage's and workspace's states for other keys (a changed param or code made them
    unreachable) and any state older than two weeks. States of other workspaces (parallel queued
    experiments) are left alone unless that old."""
    if not directory.is_dir():
        return []
    now = time.time() if now is None else now
    own_prefix = current.name.rsplit("-", 1)[0] + "-"
    removed = []
    for path in directory.glob("*.pt"):
        if path == current:
            continue
        try:
            stale = path.name.startswith(own_prefix) or now - path.stat().st_mtime > STALE_AFTER_SECONDS
            if stale:
                path.unlink()
                removed.append(path)
        except OSError:
            continue  # a sibling removed it first, or it is not ours to remove
    return removed


def save_state(path: str | Path, state: TrainingState, key: str) -> None:
    """Atomically: serialised in memory, then written to a temp file and renamed into place."""
    payload = {
        "format": FORMAT,
        "key": key,
        "step": state.step,
        "model": state.model,
        "optimizer": state.optimizer,
        "average": state.average,
        "randomness": state.randomness,
        "curve": [[p.step, p.train_loss, p.val_loss, p.average_train_loss, p.average_val_loss] for p in state.curve],
        "train_seconds": state.train_seconds,
        "windows": state.windows,
    }
    buffer = _io.BytesIO()
    torch.save(payload, buffer)
    io.write_bytes(path, buffer.getbuffer())


class StateWriter:
    """Saves one run's resumable states to `path`. A state that cannot be written is a warning
    (`warn`, once) and the run goes on without resumable states: a convenience never costs the run.
    """

    FIX = "set CHARLM_STATE_DIR to a writable directory, or save_state_every_seconds: 0 to turn them off"

    def __init__(self, path: Path, key: str, warn: Callable[[str], None]) -> None:
        self.path, self.key, self.warn = path, key, warn
        self.failed: str | None = None  # why the run stopped saving states
        self.saved_step: int | None = None  # the step of the last state written

    def check(self) -> bool:
        """Whether the directory takes a file: created if missing, probed with a small atomic write."""
        probe = self.path.parent / f".probe-{os.getpid()}"
        try:
            io.write_bytes(probe, b"charlm")
            probe.unlink()
        except (OSError, CharlmError) as e:
            self._give_up(f"cannot save resumable states in {self.path.parent}: {_reason(e)}")
        return self.failed is None

    def __call__(self, state: TrainingState) -> None:
        if self.failed is not None:
            return
        try:
            save_state(self.path, state, self.key)
        except (OSError, CharlmError) as e:
            self._give_up(f"cannot save the resumable state at step {state.step:,}: {_reason(e)}")
        else:
            self.saved_step = state.step

    def _give_up(self, why: str) -> None:
        self.failed = why
        self.warn(f"warning: {why}; training goes on without resumable states ({self.FIX})")


@dataclass
class Resumable:
    """What a train stage resumes from and saves to (`resumable`)."""

    state: TrainingState | None  # the state to continue, if one was found
    found: Path | None  # its file
    writer: StateWriter
    every_seconds: float

    @property
    def save(self) -> StateWriter | None:
        return self.writer if self.every_seconds > 0 else None


@contextlib.contextmanager
def resumable(
    stage: str,
    params: Mapping[str, Any],
    data_files: Iterable[Path],
    device: torch.device,
    every_seconds: float,
    is_main: bool,
    say: Callable[[str], None],
) -> Iterator[Resumable]:
    """A train stage's resumable states: the one to continue (a damaged one is refused with a warning),
    superseded ones removed, the directory checked, and this run's states removed when it finishes.

    Call it once every module the stage runs is imported (the model's too): they are in the key.
    An exception leaves the states in place, so the next run resumes.
    """
    key = training_key(stage, params, data_files, device)
    directory = default_state_dir()
    path = state_path(directory, stage, Path.cwd(), key)
    state, found, refused = take_state(directory, key)
    if is_main:
        if refused:
            say(f"warning: ignoring the saved state {found}: {refused}; starting from step 0")
            _discard(found)
        remove_stale_states(directory, path)
    # Only rank 0 writes states; every rank still takes part in a save (it gathers their random streams).
    writer = StateWriter(path, key, say)
    if is_main and every_seconds > 0:
        writer.check()
    try:
        yield Resumable(state, found, writer, every_seconds)
    except NonFiniteLoss as e:
        if writer.saved_step is None:
            raise
        raise NonFiniteLoss(f"{e}; the resumable state of step {writer.saved_step:,} is kept") from None
    if is_main:
        for done in {path, found}:
            _discard(done)  # finished: nothing left to resume


def _discard(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):  # gone already, or a state directory that never worked
            path.unlink(missing_ok=True)


def _reason(e: BaseException) -> str:
    # An OutputError already names the file, the cause and the fix; a bare OSError its cause.
    return str(e) if isinstance(e, CharlmError) else (e.strerror or str(e))


def load_state(path: str | Path, key: str) -> TrainingState:
    """The state saved at `path`, or `StateError` saying why it cannot be trusted."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, an unsafe pickle: never trusted
        raise StateError(f"unreadable ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StateError("not a charlm training state")
    if payload.get("key") != key:
        raise StateError("saved for other params, data or code")
    try:
        return TrainingState(
            step=int(payload["step"]),
            model=payload["model"],
            optimizer=list(payload["optimizer"]),
            average=payload["average"],
            randomness=list(payload["randomness"]),
            curve=[CurvePoint(int(row[0]), *map(float, row[1:])) for row in payload["curve"]],
            train_seconds=float(payload["train_seconds"]),
            windows=payload["windows"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"incomplete ({e})") from None
