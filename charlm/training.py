"""The training loop, for either model.

The loop never reads a value back from the device except when it logs or evaluates: a per-step
`.item()` would stall an accelerator on every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from charlm.batches import EpochWindows, get_batch, windows_at
from charlm.curves import CurvePoint
from charlm.device import synchronize
from charlm.distributed import Distributed, rank_seed
from charlm.errors import CharlmError
from charlm.evaluation import estimate_loss
from charlm.memory import BF16_AUTOCAST, FLOAT32, TrainingMemory, available_memory, check_fits, training_memory
from charlm.models import build_model
from charlm.optim import MuonAdamW, WeightAverage, hidden_matrices, make_optimizer
from charlm.params import ParamsError, TrainConfig
from charlm.precision import attention_is_explicit, autocast_context, autocast_dtype
from charlm.resume import TrainingState, capture_randomness, restore_randomness


class NonFiniteLoss(CharlmError):
    """Training diverged: a loss that is NaN or infinite. Nothing trained after it is worth keeping."""


@dataclass(frozen=True)
class TrainResult:
    curve: list[CurvePoint]
    train_seconds: float  # optimisation only, evaluations excluded
    tokens_per_second: float
    precision: str


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
    one, two = count({**config, "n_layer": 1}), count({**config, "n_layer": 2})
    return one[0] + (n_layer - 1) * (two[0] - one[0]), one[1] + (n_layer - 1) * (two[1] - one[1])


def check_training_memory(
    section: str, cfg: TrainConfig, config: Mapping[str, Any], device: torch.device, world_size: int
) -> TrainingMemory:
    """Refuse, in one line naming the params, a training run that cannot fit; else the estimate.

    `config` is the model's config (`charlm.models.config_for`); the model is not built. On a CPU the
    `world_size` processes share the machine's memory; on CUDA each has its own GPU.
    """
    n_params, n_muon = parameter_counts(section, config)
    micro = cfg.micro_batch_size or cfg.batch_size // world_size
    amp = autocast_dtype(device, cfg.precision)
    explicit = attention_is_explicit(device.type, amp == torch.bfloat16, float(config.get("dropout", 0.0) or 0.0))
    need = training_memory(
        n_params, n_muon, config, micro, cfg.optimizer, cfg.ema_decay > 0, explicit, BF16_AUTOCAST if amp else FLOAT32
    )
    sharing = 1 if device.type == "cuda" else world_size
    sizes = ("n_embd", "n_layer", "n_head", "batch_size", "block_size")
    named = ", ".join(f"{name} = {getattr(cfg, name)}" for name in sizes if hasattr(cfg, name))
    each = f" x {sharing} processes" if sharing > 1 else ""
    check_fits(
        need.total * sharing,
        available_memory(device),
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


def train(
    model: nn.Module,
    train_data: torch.Tensor,
    val_data: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    on_progress: Callable[[int, int, torch.Tensor | None, float], None] | None = None,
    on_eval: Callable[[CurvePoint], None] | None = None,
    dist: Distributed = Distributed(),
    resume: TrainingState | None = None,
    save_state: Callable[[TrainingState], None] | None = None,
    save_every_seconds: float = 0.0,
) -> TrainResult:
    """Train in place. `on_progress(step, max_iters, loss, tokens_per_s)` gets the loss as a device
    tensor: reading it is a host sync, so callers read it only when they print.

    The curve measures the weights being trained and, with `ema_decay` > 0, also the weight average,
    which the model ends holding (the checkpoint saves it).

    Under torchrun (`dist.world_size` > 1) the model is wrapped in DDP; every process draws its own
    batches; only the main process evaluates, so only it has a curve.

    With `save_state`, the main process hands it the whole training state every `save_every_seconds`
    (every process must pass one: they all contribute their random streams); `resume` continues
    from such a state, to the same result as a run never interrupted.
    """
    amp = autocast_dtype(device, cfg.precision)
    micro, accum_steps = micro_batches(cfg, dist.world_size)  # the caller has checked it against the params
    model.to(device)
    if resume is not None:
        model.load_state_dict(resume.model)
    model.train()
    net = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg, device)
    # Only the main process evaluates and saves, so only it needs the average.
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 and dist.is_main else None
    batch_gen = torch.Generator().manual_seed(rank_seed(seed, dist.rank))  # each process its own batches
    # The epoch sampler is the same in every process (rank 0's seed): each takes its slice of a draw.
    epoch_windows = (
        EpochWindows(len(train_data), cfg.block_size, torch.Generator().manual_seed(rank_seed(seed, 0)))
        if cfg.batch_windows == "epoch"
        else None
    )
    eval_gen_seed = seed + 1  # fixed eval batches: every point of the curve is measured on the same text
    splits = {"train": train_data, "val": val_data}
    curve: list[CurvePoint] = []
    tokens_per_step = cfg.batch_size * cfg.block_size
    train_seconds = 0.0
    optimizers = optimizer.optimizers if isinstance(optimizer, MuonAdamW) else (optimizer,)
    start_step = 0
    if resume is not None:
        for opt, state in zip(optimizers, resume.optimizer, strict=True):
            opt.load_state_dict(state)
        if average is not None:
            average.model.load_state_dict(resume.average)
        restore_randomness(resume.randomness[dist.rank], batch_gen, device)
        if epoch_windows is not None:
            epoch_windows.load_state_dict(resume.windows)
        curve, train_seconds, start_step = list(resume.curve), resume.train_seconds, resume.step
    last_save = time.monotonic()
    precision = "float32" if amp is None else str(amp).removeprefix("torch.")
    # Whether every training loss so far was finite, kept on the device: reading it is a host sync, so
    # on an accelerator it is read only where the loop syncs anyway (evaluations, state saves, the end);
    # on a CPU reading it costs nothing, so every step.
    finite = torch.ones((), dtype=torch.bool, device=device)
    checked = start_step

    def check_finite(steps_done: int) -> None:
        nonlocal checked
        if not bool(finite):
            exact = steps_done - checked <= 1
            when = f"at step {steps_done:,}" if exact else f"between steps {checked:,} and {steps_done:,}"
            raise diverged(f"the training loss is not finite (NaN or infinite) {when}")
        checked = steps_done

    def diverged(what: str) -> NonFiniteLoss:
        return NonFiniteLoss(
            f"{what} on {device} in {precision}; nothing was written. "
            "Try a lower learning_rate, or precision: float32, or device: cpu to compare"
        )

    def snapshot(steps_done: int) -> None:
        # A state saved from diverged weights would resume into the same NaNs: keep the last good one.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise diverged(f"the weights are not finite (NaN or infinite) after step {steps_done:,}")
        streams = [capture_randomness(batch_gen, device)]
        if dist.world_size > 1:
            import torch.distributed as torch_dist

            mine, streams = streams[0], [None] * dist.world_size
            torch_dist.all_gather_object(streams, mine)
        if dist.is_main:
            state = TrainingState(
                step=steps_done,
                model=model.state_dict(),
                optimizer=[opt.state_dict() for opt in optimizers],
                average=average.model.state_dict() if average is not None else None,
                randomness=streams,
                curve=list(curve),
                train_seconds=train_seconds,
                windows=epoch_windows.state_dict() if epoch_windows is not None else None,
            )
            save_state(state)

    def estimate(net: nn.Module) -> dict[str, float]:
        generator = torch.Generator().manual_seed(eval_gen_seed)
        return estimate_loss(net, splits, cfg.block_size, cfg.eval_iters, cfg.batch_size, generator, device, amp)

    def evaluate(step: int) -> None:
        check_finite(step)
        trained = estimate(model)
        if average is None:
            point = CurvePoint.without_average(step, trained["train"], trained["val"])
        else:
            # At step 0 the average is the initial weights, which were just measured.
            saved = trained if step == 0 else estimate(average.model)
            point = CurvePoint(step, trained["train"], trained["val"], saved["train"], saved["val"])
        if not all(math.isfinite(loss) for loss in dataclasses.astuple(point)):
            raise diverged(f"the loss estimates at step {step:,} are not finite (NaN or infinite)")
        curve.append(point)
        if on_eval is not None:
            on_eval(point)

    synchronize(device)
    started = time.perf_counter()
    for step in range(start_step, cfg.max_iters):
        if step % cfg.eval_interval == 0 and dist.is_main:
            synchronize(device)
            train_seconds += time.perf_counter() - started
            evaluate(step)
            started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        for micro_step in range(accum_steps):
            if epoch_windows is None:
                x, y = get_batch(train_data, micro, cfg.block_size, batch_gen, device)
            else:
                starts = epoch_windows.take(micro * dist.world_size)[dist.rank * micro : (dist.rank + 1) * micro]
                x, y = windows_at(train_data, starts, cfg.block_size, device)
            # DDP all-reduces gradients on every backward; between micro-batches that is wasted work.
            last = micro_step == accum_steps - 1
            with net.no_sync() if net is not model and not last else contextlib.nullcontext():
                with autocast_context(device, amp):
                    _, loss = net(x, y)
                (loss / accum_steps if accum_steps > 1 else loss).backward()
                finite &= torch.isfinite(loss.detach())
        if device.type == "cpu":
            check_finite(step + 1)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if average is not None:
            average.update(model)
        last_step = step + 1 == cfg.max_iters
        if save_state is not None and not last_step and _save_due(step, last_save, save_every_seconds, dist, device):
            synchronize(device)
            train_seconds += time.perf_counter() - started
            check_finite(step + 1)  # a state is saved only from finite training
            snapshot(step + 1)
            last_save = time.monotonic()
            started = time.perf_counter()
        if on_progress is not None:
            elapsed = train_seconds + time.perf_counter() - started
            on_progress(step + 1, cfg.max_iters, loss, (step + 1) * tokens_per_step / max(elapsed, 1e-9))
    synchronize(device)
    train_seconds += time.perf_counter() - started
    check_finite(cfg.max_iters)
    if dist.is_main:
        evaluate(cfg.max_iters)
    if average is not None:
        model.load_state_dict(average.model.state_dict())
    return TrainResult(
        curve=curve,
        train_seconds=train_seconds,
        tokens_per_second=cfg.max_iters * tokens_per_step / max(train_seconds, 1e-9),
        precision=precision,
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
