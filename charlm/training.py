"""The training loop, for either model, in the lecture's order: learning rate, evaluation, forward and
backward per micro-batch, clipping, the optimizer's step, the weight average, progress.

The loop never reads a value back from the device except when it logs, evaluates or saves: a
per-step `.item()` would stall an accelerator on every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from charlm import resume
from charlm.batches import EpochBlocks, blocks_at, get_batch
from charlm.curves import CurvePoint
from charlm.device import synchronize
from charlm.distributed import Distributed, rank_seed
from charlm.errors import NonFiniteLoss
from charlm.evaluation import estimate_loss
from charlm.hardware import Runtime, device_name
from charlm.memory import BF16_AUTOCAST, FLOAT32, TrainingMemory, available_memory, check_fits, training_memory
from charlm.models import build_model, place
from charlm.optim import WeightAverage, hidden_matrices, make_optimizer
from charlm.params import ParamsError, TrainConfig


@dataclass(frozen=True)
class TrainResult:
    curve: list[CurvePoint]
    train_seconds: float  # optimisation only, evaluations excluded
    tokens_per_second: float
    precision: str
    device_name: str  # `charlm.hardware.device_name`: the GPU's or CPU's name

    def stats(self, cfg: TrainConfig, device: torch.device, dist: Distributed) -> dict[str, Any]:
        """What the checkpoint records of its training (the evaluate stage copies it into the metrics)."""
        return {
            "train_seconds": round(self.train_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "precision": self.precision,
            "device": str(device),
            "device_name": self.device_name,
            "nproc": dist.world_size,
            "steps": cfg.max_iters,
            "batch_windows": cfg.batch_windows,
        }


def compiled_or_eager(net: nn.Module) -> Callable[..., Any]:
    """`net` through `torch.compile`, or, if compiling fails at the first call, `net` itself from then
    on, after one line saying so: a missing compiler or an unsupported op costs speed, not the run."""
    compiled = torch.compile(net)
    state = {"call": compiled}

    def forward(*args: Any) -> Any:
        if state["call"] is compiled:
            try:
                return compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure; a real error recurs eagerly below
                first = (str(e).strip().splitlines() or [""])[0][:160]
                print(f"warning: torch.compile failed ({type(e).__name__}: {first}); training eagerly", file=sys.stderr)
                state["call"] = net
        return net(*args)

    return forward


def micro_batches(cfg: TrainConfig, world_size: int, section: str = "") -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step) on each process.

    `batch_size` is the global batch of one optimizer step: it is split over the processes and, with
    `micro_batch_size`, accumulated over several forward/backward passes, so the optimisation is
    the same whatever the process count. `section` names the params section in the error.
    """
    key = f"{section}." if section else ""
    if cfg.batch_size % world_size:
        raise ParamsError(f"{key}batch_size = {cfg.batch_size}: must be divisible by nproc ({world_size})")
    per_process = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or per_process
    if micro > per_process or per_process % micro:
        raise ParamsError(
            f"{key}micro_batch_size = {cfg.micro_batch_size}: must divide the per-process batch "
            f"({cfg.batch_size} / nproc {world_size} = {per_process})"
        )
    return micro, per_process // micro


def parameter_counts(model_name: str, config: Mapping[str, Any]) -> tuple[int, int]:
    """(all parameters, the parameters Muon would take) of the model `config` describes, nothing allocated.

    Built on torch's meta device from at most two blocks and extrapolated (every block has the same
    parameters): a typo such as `n_layer: 1000000` would otherwise build a million modules, which costs
    minutes and gigabytes whatever the device.
    """

    def count(layers: Mapping[str, Any]) -> tuple[int, int]:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = build_model(model_name, dict(layers))
        return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in hidden_matrices(model))

    n_layer = int(config.get("n_layer", 0) or 0)
    if n_layer <= 2:
        return count(config)

    def probe(n: int) -> dict[str, Any]:
        # Windowed and full-attention layers have the same parameters; the probe keeps at most n of
        # the latter, or a config with more full-attention layers than layers could not be built.
        probe_config = {**config, "n_layer": n}
        if "full_attention_layers" in config:
            probe_config["full_attention_layers"] = min(int(config["full_attention_layers"]), n)
        return probe_config

    one, two = count(probe(1)), count(probe(2))
    return one[0] + (n_layer - 1) * (two[0] - one[0]), one[1] + (n_layer - 1) * (two[1] - one[1])


def check_training_memory(
    section: str, cfg: TrainConfig, config: Mapping[str, Any], runtime: Runtime, world_size: int
) -> TrainingMemory:
    """Refuse, in one line naming the params, a training run that cannot fit; else the estimate.

    `config` is the model's config (`charlm.models.config_for`); the model is not built. On a CPU the
    `world_size` processes share the machine's memory; on CUDA each has its own GPU.
    """
    n_params, n_muon = parameter_counts(section, config)
    micro = cfg.micro_batch_size or cfg.batch_size // world_size
    need = training_memory(
        n_params,
        n_muon,
        config,
        micro,
        cfg.optimizer,
        cfg.ema_decay > 0,
        runtime.attention.full_training == "explicit",
        BF16_AUTOCAST if runtime.autocast is not None else FLOAT32,
    )
    sharing = 1 if runtime.device.type == "cuda" else world_size
    values = {**config, "batch_size": cfg.batch_size, "block_size": cfg.block_size}
    sizes = ("n_embd", "n_layer", "n_head", "batch_size", "block_size")
    named = ", ".join(f"{name} = {values[name]}" for name in sizes if name in values)
    each = f" x {sharing} processes" if sharing > 1 else ""
    check_fits(
        need.total * sharing,
        available_memory(runtime.device),
        f"{section}.{named}: training {n_params:,} parameters ({need.breakdown()}{each})",
        "make the model or the batch smaller, or set micro_batch_size",
    )
    return need


def effective_warmup(cfg: TrainConfig) -> int:
    """`warmup_iters`, but at most a tenth of the run: a short run still decays instead of only warming up."""
    return min(cfg.warmup_iters, cfg.max_iters // 10)


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from `learning_rate` to `learning_rate * min_lr_ratio`."""
    warmup = effective_warmup(cfg)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    span = max(1, cfg.max_iters - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.learning_rate - floor) * (1.0 + math.cos(math.pi * progress))


class Stopwatch:
    """Seconds of optimisation: evaluations and state saves are paused out. Reads wait for the device."""

    def __init__(self, device: torch.device, seconds: float = 0.0) -> None:
        self.device = device
        self.before = seconds  # from a resumed run
        synchronize(device)
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        synchronize(self.device)
        self.before += time.perf_counter() - self.started
        try:
            yield
        finally:
            self.started = time.perf_counter()

    def stop(self) -> float:
        synchronize(self.device)
        return self.seconds


class Divergence:
    """Whether every training loss so far was finite. The flag lives on the device: reading it is a host
    sync, so on an accelerator it is read only where the loop syncs anyway (evaluations, state saves,
    the end); on a CPU reading it costs nothing, so every step."""

    def __init__(self, runtime: Runtime, step: int) -> None:
        self.runtime = runtime
        self.finite = torch.ones((), dtype=torch.bool, device=runtime.device)
        self.checked = step

    def add(self, loss: torch.Tensor) -> None:
        self.finite &= torch.isfinite(loss.detach())

    def check(self, steps_done: int, every_step: bool = False) -> None:
        if every_step and self.runtime.device.type != "cpu":
            return
        if not bool(self.finite):
            exact = steps_done - self.checked <= 1
            when = f"at step {steps_done:,}" if exact else f"between steps {self.checked:,} and {steps_done:,}"
            raise self.error(f"the training loss is not finite (NaN or infinite) {when}")
        self.checked = steps_done

    def check_weights(self, model: nn.Module, steps_done: int) -> None:
        # A state saved from diverged weights would resume into the same NaNs: keep the last good one.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise self.error(f"the weights are not finite (NaN or infinite) after step {steps_done:,}")

    def check_point(self, point: CurvePoint) -> None:
        if not all(math.isfinite(loss) for loss in dataclasses.astuple(point)):
            raise self.error(f"the loss estimates at step {point.step:,} are not finite (NaN or infinite)")

    def error(self, what: str) -> NonFiniteLoss:
        return NonFiniteLoss(
            f"{what} on {self.runtime.device} in {self.runtime.precision}; nothing was written. "
            "Try a lower learning_rate, or precision: float32, or device: cpu to compare"
        )


def train(
    model: nn.Module,
    train_data: torch.Tensor,
    val_data: torch.Tensor,
    cfg: TrainConfig,
    *,
    runtime: Runtime,
    seed: int,
    dist: Distributed = Distributed(),
    resume_from: resume.TrainingState | None = None,
    save_state: Callable[[resume.TrainingState], None] | None = None,
    save_every_seconds: float = 0.0,
    on_progress: Callable[[int, int, torch.Tensor | None, float], None] | None = None,
    on_eval: Callable[[CurvePoint], None] | None = None,
) -> TrainResult:
    """Train `model` in place on `runtime`'s device, kernels and dtypes; it ends holding the weights the
    checkpoint saves (the weight average, with `ema_decay` > 0).

    The curve measures the weights being trained and, with a weight average, the average too.
    `on_progress(step, max_iters, loss, tokens_per_s)` gets the loss as a device tensor (reading it is
    a host sync: read it only to print). Under torchrun (`dist.world_size` > 1) the model is wrapped in
    DDP, every process draws its own batches and only the main one evaluates. With `save_state`, the
    main process hands it the whole training state every `save_every_seconds` (every process must pass
    one: they all contribute their random streams); `resume_from` continues such a state to the same
    result as a run never interrupted.
    """
    device = runtime.device
    micro, accum_steps = micro_batches(cfg, dist.world_size)  # the caller has checked it against the params
    place(model, runtime)
    if resume_from is not None:
        model.load_state_dict(resume_from.model)
    model.train()
    net = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg, runtime)
    # float16 underflows small gradients: scale the loss up, the gradients back down before clipping,
    # and skip a step whose gradients overflowed. Disabled (a pass-through) for any other precision.
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.autocast == torch.float16)
    forward = compiled_or_eager(net) if runtime.compile else net
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 and dist.is_main else None  # only rank 0 saves
    batch_gen = torch.Generator().manual_seed(rank_seed(seed, dist.rank))  # each process its own batches
    # The epoch sampler is the same in every process (rank 0's seed): each takes its slice of a draw.
    epoch_blocks = (
        EpochBlocks(len(train_data), cfg.block_size, torch.Generator().manual_seed(rank_seed(seed, 0)))
        if cfg.batch_windows == "epoch"
        else None
    )
    curve: list[CurvePoint] = []
    start_step, seconds = 0, 0.0
    if resume_from is not None:
        curve, seconds, start_step = resume.restore(
            resume_from, optimizer, average, batch_gen, epoch_blocks, device, dist.rank
        )
    splits = {"train": train_data, "val": val_data}
    tokens_per_step = cfg.batch_size * cfg.block_size
    divergence = Divergence(runtime, start_step)

    def evaluate(step: int) -> None:
        divergence.check(step)
        # The same batches at every point (seed + 1), so the curve is smooth.
        trained = estimate_loss(model, splits, cfg, torch.Generator().manual_seed(seed + 1), runtime)
        if average is None:
            point = CurvePoint.without_average(step, trained["train"], trained["val"])
        else:
            # At step 0 the average is the initial weights, which were just measured.
            averaged = trained if step == 0 else estimate_loss(
                average.model, splits, cfg, torch.Generator().manual_seed(seed + 1), runtime
            )
            point = CurvePoint(step, trained["train"], trained["val"], averaged["train"], averaged["val"])
        divergence.check_point(point)
        curve.append(point)
        if on_eval is not None:
            on_eval(point)

    stopwatch = Stopwatch(device, seconds)
    last_save = time.monotonic()
    for step in range(start_step, cfg.max_iters):
        lr = learning_rate_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if step % cfg.eval_interval == 0 and dist.is_main:
            with stopwatch.paused():
                evaluate(step)
        optimizer.zero_grad(set_to_none=True)
        for micro_step in range(accum_steps):
            if epoch_blocks is None:
                x, y = get_batch(train_data, micro, cfg.block_size, batch_gen, device)
            else:
                starts = epoch_blocks.take(micro * dist.world_size)[dist.rank * micro : (dist.rank + 1) * micro]
                x, y = blocks_at(train_data, starts, cfg.block_size, device)
            # DDP all-reduces gradients on every backward; between micro-batches that is wasted work.
            last_micro = micro_step == accum_steps - 1
            with net.no_sync() if net is not model and not last_micro else contextlib.nullcontext():
                with runtime.autocast_context():
                    _, loss = forward(x, y)
                scaler.scale(loss / accum_steps if accum_steps > 1 else loss).backward()
                divergence.add(loss)
        divergence.check(step + 1, every_step=True)
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if average is not None:
            average.update(model)
        last_step = step + 1 == cfg.max_iters
        if save_state is not None and not last_step and _save_due(step, last_save, save_every_seconds, dist, device):
            with stopwatch.paused():
                divergence.check(step + 1)  # a state is saved only from finite training
                divergence.check_weights(model, step + 1)
                state = resume.capture(
                    step + 1, model, optimizer, average, batch_gen, epoch_blocks, curve, stopwatch.before, device, dist
                )
                if dist.is_main:
                    save_state(state)
            last_save = time.monotonic()
        if on_progress is not None:
            on_progress(step + 1, cfg.max_iters, loss, (step + 1) * tokens_per_step / max(stopwatch.seconds, 1e-9))
    train_seconds = stopwatch.stop()
    divergence.check(cfg.max_iters)
    if dist.is_main:
        evaluate(cfg.max_iters)
    if average is not None:
        model.load_state_dict(average.model.state_dict())
    return TrainResult(
        curve=curve,
        train_seconds=train_seconds,
        tokens_per_second=cfg.max_iters * tokens_per_step / max(train_seconds, 1e-9),
        precision=runtime.precision,
        device_name=device_name(runtime.device),
    )


# With several processes, how many steps apart they agree on whether a state save is due.
SAVE_CHECK_STEPS = 50


def _save_due(step: int, last_save: float, every_seconds: float, dist: Distributed, device: torch.device) -> bool:
    """Whether to save the state after `step`: the main process's clock decides, for every process (a
    save is a collective step). The agreement is a broadcast read back to the host, so under DDP it
    happens every SAVE_CHECK_STEPS steps rather than on every step of the loop."""
    due = time.monotonic() - last_save >= every_seconds
    if dist.world_size == 1:
        return due
    if (step + 1) % SAVE_CHECK_STEPS:
        return False
    import torch.distributed as torch_dist

    flag = torch.tensor([int(due)], device=device if device.type == "cuda" else "cpu")  # gloo: the CPU
    torch_dist.broadcast(flag, src=0)
    return bool(flag.item())
