"""Training measurements: throughput and time to a loss, charlm's recipe against float32 yardsticks
(the same model with plain AdamW, and `benchmarks/reference.py`), and the machine's matmul peak."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import peak_mb, recipe, splits
from benchmarks.reference import NANOGPT_CPU_RECIPE, ReferenceGPT, nanogpt_lr, reference_optimizer
from charlm.batches import get_batch
from charlm.device import resolve_device
from charlm.evaluation import estimate_loss
from charlm.hardware import describe_cpu, resolve_runtime
from charlm.models import build_model, config_for, extra_metrics
from charlm.models.gpt.config import layer_windows
from charlm.params import BigramParams, GPTParams, TrainConfig
from charlm.training import TrainResult, train


def train_charlm(net, train_data, val_data, section: BigramParams | GPTParams, **kwargs) -> TrainResult:
    """charlm's `train` with the runtime the train stage would resolve for `section` on this CPU."""
    cfg = section.train
    runtime = resolve_runtime(resolve_device("cpu"), cfg.precision, getattr(section.model, "dropout", 0.0))
    return train(net, train_data, val_data, cfg, runtime=runtime, seed=1337, **kwargs)


def reference_steps(
    net: torch.nn.Module,
    train_data: torch.Tensor,
    settings: dict,
    steps: int,
    lr_at: Callable[[int], float] | None = None,
    evaluate: Callable[[int, float], bool] | None = None,
) -> float:
    """The plain-PyTorch reference's training loop (nanoGPT's): float32 AdamW, clipping, `steps` steps
    of `settings`' batch and block size. `evaluate(step, seconds)`, when given, runs before each step
    and after the last, out of the clock, and stops the loop by returning True. Training seconds."""
    optimizer = reference_optimizer(net, settings["learning_rate"], settings["weight_decay"])
    gen = torch.Generator().manual_seed(1337)
    seconds = 0.0
    for step in range(steps + 1):
        if evaluate is not None and evaluate(step, seconds):
            break
        if step == steps:
            break
        t0 = time.perf_counter()
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        x, y = get_batch(train_data, settings["batch_size"], settings["block_size"], gen)
        optimizer.zero_grad(set_to_none=True)
        net(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), settings.get("grad_clip", 1.0))
        optimizer.step()
        seconds += time.perf_counter() - t0
    return seconds


def worker_train(data: Path, model: str, overrides: dict, steps: int, target: float | None) -> dict:
    """Train `steps` steps of `model` with params.yaml's section plus `overrides` (0: the section's own)."""
    tok, train_data, val_data = splits(data)
    section = recipe(model, overrides)
    if target is None and steps > 0:  # throughput only: no evaluations in the way
        warmup = min(section.train.warmup_iters, steps - 1)
        section = section.replace(max_iters=steps, warmup_iters=warmup, eval_interval=10**9, eval_iters=1)
    torch.manual_seed(1337)
    net = build_model(model, config_for(model, section, tok.vocab_size))
    hit: dict = {}
    elapsed = {"train": 0.0}

    def on_progress(step, total, loss, tokens_per_s):
        elapsed["train"] = step * section.train.batch_size * section.train.block_size / tokens_per_s

    def on_eval(point):
        if target is not None and "step" not in hit and point.val_loss <= target:
            hit.update(step=point.step, seconds=elapsed["train"])

    if target is None and steps > 0:  # one untimed step first: oneDNN picks its kernels on the first call
        train_charlm(net, train_data, val_data, section.replace(max_iters=1, warmup_iters=0))
    result = train_charlm(net, train_data, val_data, section, on_progress=on_progress, on_eval=on_eval)
    out = {
        "tokens_per_second": result.tokens_per_second,
        "train_seconds": result.train_seconds,
        "precision": result.precision,
        "peak_mb": peak_mb(),
        "curve": [dataclasses.asdict(p) for p in result.curve],
    }
    if model == "bigram":
        from charlm.evaluation import split_loss

        out["val_loss"] = split_loss(net, val_data, 256, torch.device("cpu"))
        out |= extra_metrics(model, train_data, val_data, tok.vocab_size)
    if target is not None:
        out["time_to_target"] = hit.get("seconds")
        out["step_to_target"] = hit.get("step")
    return out


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 1.0) -> float:
    """The machine's measured matmul limit in GFLOP/s for one dtype, at this process's thread count."""
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: oneDNN/MKL pick their kernels on the first call
    reps, t0 = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def flops_per_token(config: dict) -> float:
    """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention's QK^T and AV
    over the keys the kernels compute, masked or not: all T, or with a sliding window W the 2W of a
    chunk and the one before it (in all but the last `full_attention_layers`)."""
    C, L, T, V = config["n_embd"], config["n_layer"], config["block_size"], config["vocab_size"]
    windows = layer_windows(L, config.get("attention_window", 0), config.get("full_attention_layers", 0))
    keys = sum(2 * w if 0 < w < T else T for w in windows)  # summed over the layers
    matmul_weights = L * 12 * C * C + C * V  # per block: qkv 3C^2, proj C^2, MLP 8C^2; the head
    return 6 * matmul_weights + 12 * keys * C


def worker_steps(data: Path, overrides: dict, steps: int, rounds: int) -> dict:
    """Step times of one GPT size, three ways, interleaved round by round so drift hits all alike:
    the params.yaml recipe, the same charlm model with plain float32 AdamW, and the plain-PyTorch
    reference (nanoGPT's way of writing the model) with float32 AdamW."""
    tok, train_data, val_data = splits(data)
    section = recipe("gpt", overrides)
    warmup = min(section.train.warmup_iters, steps - 1)
    section = section.replace(max_iters=steps, warmup_iters=warmup, eval_interval=10**9, eval_iters=1)
    plain = section.replace(optimizer="adamw", precision="float32")
    config = config_for("gpt", section, tok.vocab_size)

    def charlm_step(settings: GPTParams) -> float:
        torch.manual_seed(1337)
        return train_charlm(build_model("gpt", config), train_data, val_data, settings).train_seconds / steps

    def reference_step() -> float:
        torch.manual_seed(1337)
        sizes = {k: config[k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout")}
        settings = dataclasses.asdict(section.train)
        return reference_steps(ReferenceGPT(**sizes), train_data, settings, steps) / steps

    charlm_step(section.replace(max_iters=1, warmup_iters=0))  # untimed: first-call kernel picks
    times: dict[str, list[float]] = {"recipe": [], "charlm_float32_adamw": [], "reference_float32_adamw": []}
    for _ in range(rounds):
        times["recipe"].append(charlm_step(section))
        times["charlm_float32_adamw"].append(charlm_step(plain))
        times["reference_float32_adamw"].append(reference_step())
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    tokens = section.train.batch_size * section.train.block_size
    flops = flops_per_token(config) * tokens
    runtime = resolve_runtime(torch.device("cpu"), section.train.precision)
    peaks = {"float32": matmul_peak("float32")}
    if runtime.autocast is not None or runtime.orthogonalization == torch.bfloat16:
        peaks["bfloat16"] = matmul_peak("bfloat16")
    recipe_dtype = runtime.precision
    return {
        "cpu": describe_cpu(),
        "threads": torch.get_num_threads(),
        "step_seconds": median,
        "tokens_per_second": {k: tokens / v for k, v in median.items()},
        "recipe_over_float32_adamw": median["recipe"] / median["charlm_float32_adamw"],
        "speedup_over_reference": median["reference_float32_adamw"] / median["recipe"],
        "gflops": {k: flops / v / 1e9 for k, v in median.items()},
        "matmul_peak_gflops": peaks,
        "recipe_dtype": recipe_dtype,
        "recipe_fraction_of_peak": flops / median["recipe"] / 1e9 / peaks[recipe_dtype],
    }


def worker_reference_ttt(data: Path, target: float, eval_interval: int) -> dict:
    """nanoGPT's CPU recipe on the plain-PyTorch reference model: training seconds to `target`."""
    R = NANOGPT_CPU_RECIPE
    tok, train_data, val_data = splits(data)
    torch.manual_seed(1337)
    sizes = {k: R[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "dropout")}
    net = ReferenceGPT(vocab_size=tok.vocab_size, **sizes)
    estimate = TrainConfig(block_size=R["block_size"], batch_size=R["batch_size"], eval_iters=20)
    cpu = resolve_runtime(torch.device("cpu"))
    hit: dict = {}

    def evaluate(step: int, seconds: float) -> bool:
        if step % eval_interval and step != R["max_iters"]:
            return False
        val = estimate_loss(net, {"val": val_data}, estimate, torch.Generator().manual_seed(1338), cpu)["val"]
        if val <= target:
            hit.update(step=step, seconds=seconds)
        return bool(hit)

    seconds = reference_steps(net, train_data, R, R["max_iters"], lr_at=nanogpt_lr, evaluate=evaluate)
    return {"time_to_target": hit.get("seconds"), "step_to_target": hit.get("step"), "final_seconds": seconds}
