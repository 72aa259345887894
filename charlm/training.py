"""The training loop and the lecture's `estimate_loss`, for either model.

The loop never reads a value back from the device except when it logs or evaluates: a per-step
`.item()` would stall an accelerator on every step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from charlm.batches import get_batch, sequential_windows
from charlm.device import autocast_dtype, synchronize
from charlm.distributed import Distributed
from charlm.params import ParamsError, TrainConfig

EVAL_BATCH_SIZE = 64


@dataclass(frozen=True)
class CurvePoint:
    step: int
    train_loss: float
    val_loss: float


@dataclass(frozen=True)
class TrainResult:
    curve: list[CurvePoint]
    train_seconds: float  # optimisation only, evaluations excluded
    tokens_per_second: float
    precision: str


def micro_batches(cfg: TrainConfig, world_size: int, section: str = "gpt") -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step) on each process.

    `batch_size` is the global batch of one optimizer step: it is split over the processes and, with
    `micro_batch_size`, accumulated over several forward/backward passes, so the optimisation is
    the same whatever the process count.
    """
    if cfg.batch_size % world_size:
        raise ParamsError(f"{section}.batch_size = {cfg.batch_size}: must be divisible by nproc ({world_size})")
    per_process = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or per_process
    if micro > per_process or per_process % micro:
        raise ParamsError(
            f"{section}.micro_batch_size = {cfg.micro_batch_size}: must divide the per-process batch "
            f"({cfg.batch_size} / nproc {world_size} = {per_process})"
        )
    return micro, per_process // micro


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from `learning_rate` to `learning_rate * min_lr_ratio`."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.learning_rate - floor) * (1.0 + math.cos(math.pi * progress))


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weight matrices of the linear layers inside the model's blocks: what Muon updates.

    The embeddings and the output head stay with AdamW, as in Muon's own recipe: an embedding
    row is only touched by its own character, and the head's update should not be orthogonalised
    across the vocabulary.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return []
    return [m.weight for m in blocks.modules() if isinstance(m, nn.Linear)]


class MuonAdamW:
    """Muon for the hidden matrices plus AdamW for everything else, stepped as one optimizer.

    `param_groups` lists both optimizers' groups, so the training loop's schedule sets every
    group's lr. Muon's lr is rescaled per matrix to AdamW's update size (`match_rms_adamw`), so
    one `learning_rate` serves both.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.optimizers = (muon, adamw)
        self.param_groups = muon.param_groups + adamw.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: str) -> torch.optim.Optimizer | MuonAdamW:
    """AdamW, or with `optimizer: muon` Muon for the blocks' matrices and AdamW for the rest.

    Measured on the default GPT (README "Params"): Muon reaches in 1,000 steps the validation loss
    AdamW reaches in ~2,250, for ~9% more time per step (its Newton-Schulz iterations).
    """
    muon_params = hidden_matrices(model) if cfg.optimizer == "muon" else []
    if cfg.optimizer == "muon" and not muon_params:
        raise ParamsError(f"optimizer = 'muon': {type(model).__name__} has no hidden matrices; use adamw")
    taken = {id(p) for p in muon_params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    # Weight decay on matrices (embeddings included) only, as nanoGPT: decaying biases and LayerNorm
    # gains pulls them towards 0 rather than towards "no effect".
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is one launch per step instead of one per tensor; it exists on CPU and CUDA.
    fused = device == "cpu" or device.startswith("cuda")
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.99), fused=fused)
    if not muon_params:
        return adamw
    muon = torch.optim.Muon(
        muon_params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    return MuonAdamW(muon, adamw)


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging), `decay` per step.

    Why: the default GPT overfits its 1M-character training split, and the average of the last
    ~1/(1 - decay) steps' weights generalises better than the last weights: 0.03 nats lower exact
    val loss on the default GPT (README "Params"), for one `lerp` of 0.8M numbers per step.
    It starts from the weights it is given (the initial ones), which keep a share of decay**steps:
    measured slightly better (1.471) than a bias-corrected average that drops them (1.476).
    torch's `AveragedModel` would read a device counter back to the host on every update.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False)
        self._lerp = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self._lerp(list(self.model.parameters()), [p.detach() for p in model.parameters()], None)
        for averaged, current in zip(self.model.buffers(), model.buffers(), strict=True):
            averaged.copy_(current)


def autocast_context(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


@torch.inference_mode()
def estimate_loss(
    model: nn.Module,
    splits: dict[str, torch.Tensor],
    block_size: int,
    eval_iters: int,
    batch_size: int,
    generator: torch.Generator,
    device: str,
    amp: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss over `eval_iters` random batches per split (the lecture's estimate_loss), batched."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for name, data in splits.items():
        x, y = get_batch(data, eval_iters * batch_size, block_size, generator, device)
        total = torch.zeros((), device=device)
        for i in range(0, len(x), EVAL_BATCH_SIZE):
            with autocast_context(device, amp):
                _, loss = model(x[i : i + EVAL_BATCH_SIZE], y[i : i + EVAL_BATCH_SIZE])
            total += loss.float() * len(x[i : i + EVAL_BATCH_SIZE])
        out[name] = (total / len(x)).item()
    model.train(was_training)
    return out


@torch.inference_mode()
def split_loss(
    model: nn.Module, data: torch.Tensor, block_size: int, device: str, max_tokens: int | None = None
) -> float:
    """Exact mean loss over the whole split in non-overlapping windows, in float32: a pure function
    of the checkpoint and the data, so the evaluate stage's metrics are reproducible."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float32, device=device)
    count = 0
    for x, y in sequential_windows(data, block_size, EVAL_BATCH_SIZE, max_tokens):
        x, y = x.to(device), y.to(device)
        _, loss = model(x, y)
        total += loss.float() * y.numel()
        count += y.numel()
    model.train(was_training)
    return (total / count).item()


def train(
    model: nn.Module,
    train_data: torch.Tensor,
    val_data: torch.Tensor,
    cfg: TrainConfig,
    device: str,
    seed: int,
    on_progress: Callable[[int, int, torch.Tensor | None, float], None] | None = None,
    on_eval: Callable[[CurvePoint], None] | None = None,
    dist: Distributed = Distributed(),
    section: str = "gpt",
) -> TrainResult:
    """Train in place. `on_progress(step, max_iters, loss, tokens_per_s)` gets the loss as a device
    tensor: reading it is a host sync, so callers read it only when they print.

    With `ema_decay` > 0 the curve measures the weight average and the model ends holding it.

    Under torchrun (`dist.world_size` > 1) the model is wrapped in DDP; every process draws its own
    batches; only the main process evaluates, so only it has a curve.
    """
    amp = autocast_dtype(device, cfg.precision)
    micro, accum_steps = micro_batches(cfg, dist.world_size, section)
    model.to(device)
    model.train()
    net = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    optimizer = make_optimizer(model, cfg, device)
    # Only the main process evaluates and saves, so only it needs the average.
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 and dist.is_main else None
    evaluated = average.model if average is not None else model
    batch_gen = torch.Generator().manual_seed(seed + 7919 * dist.rank)  # each process its own batches
    eval_gen_seed = seed + 1  # fixed eval batches: every point of the curve is measured on the same text
    splits = {"train": train_data, "val": val_data}
    curve: list[CurvePoint] = []
    tokens_per_step = cfg.batch_size * cfg.block_size
    train_seconds = 0.0

    def evaluate(step: int) -> None:
        losses = estimate_loss(
            evaluated,
            splits,
            cfg.block_size,
            cfg.eval_iters,
            cfg.batch_size,
            torch.Generator().manual_seed(eval_gen_seed),
            device,
            amp,
        )
        point = CurvePoint(step, losses["train"], losses["val"])
        curve.append(point)
        if on_eval is not None:
            on_eval(point)

    synchronize(device)
    started = time.perf_counter()
    for step in range(cfg.max_iters):
        if step % cfg.eval_interval == 0 and dist.is_main:
            synchronize(device)
            train_seconds += time.perf_counter() - started
            evaluate(step)
            started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        for micro_step in range(accum_steps):
            x, y = get_batch(train_data, micro, cfg.block_size, batch_gen, device)
            # DDP all-reduces gradients on every backward; between micro-batches that is wasted work.
            last = micro_step == accum_steps - 1
            with net.no_sync() if net is not model and not last else contextlib.nullcontext():
                with autocast_context(device, amp):
                    _, loss = net(x, y)
                (loss / accum_steps if accum_steps > 1 else loss).backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if average is not None:
            average.update(model)
        if on_progress is not None:
            elapsed = train_seconds + time.perf_counter() - started
            on_progress(step + 1, cfg.max_iters, loss, (step + 1) * tokens_per_step / max(elapsed, 1e-9))
    synchronize(device)
    train_seconds += time.perf_counter() - started
    if dist.is_main:
        evaluate(cfg.max_iters)
    if average is not None:
        model.load_state_dict(average.model.state_dict())
    return TrainResult(
        curve=curve,
        train_seconds=train_seconds,
        tokens_per_second=cfg.max_iters * tokens_per_step / max(train_seconds, 1e-9),
        precision="float32" if amp is None else str(amp).removeprefix("torch."),
    )
