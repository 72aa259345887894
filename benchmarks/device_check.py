"""Checks charlm on a real accelerator, in a few minutes: what no CPU test can see.

    python -m benchmarks.device_check --device cuda            # or mps, cuda:1; --data input.txt for real text
    python -m benchmarks.device_check --device cpu --quick     # the same checks on the CPU, as the tests run it

Each check prints one line, ok or FAILED with what differed, and the JSON goes to --out:

- generation with the KV cache gives the full forward's logits on the device;
- the device's attention kernels (SDPA, with the sliding window's mask) give the CPU's numbers;
- a short training run on the device lowers the loss, with the device's precision;
- with two or more GPUs, two NCCL processes train with a state saved every few steps (each rank bound
  to its own GPU before any collective) and end like one process;
- the training throughput of the default recipe and of the GPU recipe (`GPU_RECIPE`), and generation.

docs/devices.md quotes its output; a device it has not run on is "not yet measured" there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import typer

from benchmarks.common import GPU_RECIPE, ROOT
from charlm.device import resolve_device, synchronize
from charlm.hardware import resolve_runtime
from charlm.models import build_model, config_for
from charlm.models.gpt.kernels import attend
from charlm.params import load_params
from charlm.sampling import KVCache


def _corpus(data: Path | None, n: int = 200_000) -> torch.Tensor:
    if data is not None:
        return torch.tensor(list(data.read_bytes()[:n]), dtype=torch.uint8) % 65
    g = torch.Generator().manual_seed(0)  # no corpus: a repetitive random text is still learnable
    return torch.randint(65, (n // 50,), generator=g, dtype=torch.uint8).repeat(50)


def check_kv_cache(runtime, section) -> tuple[bool, str]:
    torch.manual_seed(0)
    model = build_model("gpt", config_for("gpt", section, 65), runtime).eval()
    idx = torch.randint(65, (2, 48), generator=torch.Generator().manual_seed(1)).to(runtime.device)
    with torch.inference_mode():
        full, _ = model(idx)
        cache = KVCache(model.config, 2, runtime.device, torch.float32)
        worst = 0.0
        last, _ = model(idx[:, :16], kv_cache=cache)
        worst = max(worst, (last[:, -1] - full[:, 15]).abs().max().item())
        for t in range(16, 48):
            last, _ = model(idx[:, t : t + 1], kv_cache=cache)
            worst = max(worst, (last[:, -1] - full[:, t]).abs().max().item())
    return worst < 1e-3, f"largest logit difference {worst:.2e}"


def check_window_attention(runtime) -> tuple[bool, str]:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 96, 32, generator=g) for _ in range(3))
    cpu = attend(q, k, v, window=32, dropout_p=0.0, kernels=resolve_runtime(torch.device("cpu")).attention,
                 training=False)  # fmt: skip
    on_device = attend(
        *(t.to(runtime.device) for t in (q, k, v)), window=32, dropout_p=0.0, kernels=runtime.attention, training=False
    )
    worst = (on_device.float().cpu() - cpu).abs().max().item()
    return worst < 1e-4, f"largest difference from the CPU kernels {worst:.2e}"


def train_steps(runtime, section, data: torch.Tensor, steps: int) -> tuple[list[float], float]:
    """(the curve's val estimates, training tokens/s) of `steps` steps of `section` on the runtime."""
    from charlm.training import train

    cfg = section.train
    torch.manual_seed(1337)
    model = build_model("gpt", config_for("gpt", section, 65), runtime)
    n = int(len(data) * 0.9)
    result = train(model, data[:n], data[n:], cfg, runtime=runtime, seed=1337)
    return [p.val_loss for p in result.curve], result.tokens_per_second


def check_training(runtime, section, data) -> tuple[bool, str]:
    section = section.replace(max_iters=60, eval_interval=30, eval_iters=2, warmup_iters=5)
    losses, _ = train_steps(runtime, section, data, 60)
    return losses[-1] < losses[0] - 0.3, f"val estimate {losses[0]:.3f} -> {losses[-1]:.3f} in {runtime.precision}"


def check_nccl(device: torch.device, data_file: Path | None) -> tuple[bool | None, str]:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return None, "skipped: needs two or more GPUs"
    work = Path(tempfile.mkdtemp())
    env = os.environ | {"PYTHONPATH": str(ROOT), "CHARLM_STATE_DIR": str(work / "states")}
    tiny = {"max_iters": 200, "eval_interval": 100, "eval_iters": 2}
    params = {"device": "cuda", "nproc": 2, "save_state_every_seconds": 0.05, "gpt": tiny}
    if data_file is not None:
        params["data"] = {"url": str(data_file), "sha256": ""}
    (work / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    from charlm.pipeline import stage_args

    for stage in ("download", "encode", "split", "train@gpt"):
        cmd = [sys.executable, "-m", f"stages.{stage.split('@')[0]}", *stage_args(stage, ROOT / "dvc.yaml")]
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return False, f"{stage} failed: {proc.stderr.strip().splitlines()[-1:]}"
    return (work / "models" / "gpt.pt").is_file(), "2 NCCL processes trained with states saved every 0.05 s"


def throughput(runtime, section, data, steps: int) -> float:
    section = section.replace(max_iters=steps, eval_interval=10**9, eval_iters=1, warmup_iters=0)
    return train_steps(runtime, section, data, steps)[1]


def generation_rate(runtime, section, tokens: int) -> float:
    from charlm.sampling import generate

    torch.manual_seed(0)
    model = build_model("gpt", config_for("gpt", section, 65), runtime).eval()
    start = torch.zeros((1, 1), dtype=torch.long)
    generate(model, start, 10)
    synchronize(runtime.device)
    t0 = time.perf_counter()
    generate(model, start, tokens, generator=torch.Generator().manual_seed(0))
    synchronize(runtime.device)
    return tokens / (time.perf_counter() - t0)


def main(
    device: str = typer.Option("auto", help="cuda, cuda:N, mps, cpu or auto."),
    data: Path = typer.Option(None, help="The tinyshakespeare input.txt (default: a synthetic text)."),
    quick: bool = typer.Option(False, help="Fewer steps and tokens: a smoke run."),
    out: Path = typer.Option(Path("device_check.json"), help="Where the JSON goes."),
) -> None:
    """Check generation, attention and training on a device, and measure its throughput."""
    resolved = resolve_device(device)
    default = load_params(ROOT / "params.yaml").gpt
    if quick:
        default = default.replace(block_size=128, batch_size=4)
    runtime = resolve_runtime(resolved, default.train.precision, default.model.dropout)
    print(f"charlm device check: {runtime.describe()}, torch {torch.__version__}", flush=True)
    if resolved.type == "cuda":
        print(f"  {torch.cuda.get_device_name(resolved)}", flush=True)
    text = _corpus(data, 50_000 if quick else 400_000)
    results: dict = {"device": str(resolved), "runtime": runtime.describe(), "torch": torch.__version__}
    checks = {
        "kv_cache_equals_full_forward": lambda: check_kv_cache(runtime, default),
        "window_attention_equals_cpu": lambda: check_window_attention(runtime),
        "training_lowers_the_loss": lambda: check_training(runtime, default, text),
        "nccl_two_processes_with_states": lambda: check_nccl(resolved, data),
    }
    failed = False
    for name, check in checks.items():
        ok, detail = check()
        failed |= ok is False
        results[name] = {"ok": ok, "detail": detail}
        print(f"{'ok' if ok else 'skipped' if ok is None else 'FAILED'}  {name}: {detail}", flush=True)
    gpu = default.replace(**({k: v for k, v in GPU_RECIPE.items() if k != "max_iters"} if not quick else {}))
    gpu_runtime = resolve_runtime(resolved, gpu.train.precision, gpu.model.dropout)
    steps = 3 if quick else 20
    results["tokens_per_second"] = {
        "default": throughput(runtime, default, text, steps),
        "gpu_recipe": throughput(gpu_runtime, gpu, text, steps),
    }
    results["generation_characters_per_second"] = generation_rate(runtime, default, 50 if quick else 500)
    for name, rate in results["tokens_per_second"].items():
        print(f"  training, {name}: {rate:,.0f} tokens/s", flush=True)
    print(f"  generation, default: {results['generation_characters_per_second']:,.0f} characters/s", flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    typer.run(main)
