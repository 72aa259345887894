"""The performance benchmark: prints a table beside the targets and writes JSON.

    python -m benchmarks.bench --quick        # about a minute
    python -m benchmarks.bench                # the full set (about ten minutes), as docs/performance.md quotes it

Needs the real corpus: --data, else $CHARLM_DATA_FILE, else data/input.txt from `dvc repro`.
Each training measurement runs in a fresh subprocess, so its peak memory (max RSS) is its own.
The lecture's generation loop is kept here, verbatim in spirit, as the baseline for the KV cache.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
# The lecture's model (its size and architecture: what nanoGPT's code and `benchmarks/reference.py`
# build) and training settings, on params.yaml's optimizer and precision. Two micro-batches of 32: the
# same optimizer step as one batch of 64, with half the activations.
LECTURE_ARCH = dict(
    position="learned",
    qk_norm=False,
    mlp="gelu",
    zero_init=False,
    logit_softcap=0.0,
    token_shift=False,
    attention_window=0,
)
LECTURE_GPT = dict(
    n_layer=6,
    n_head=6,
    n_embd=384,
    block_size=256,
    batch_size=64,
    micro_batch_size=32,
    dropout=0.2,
    learning_rate=3e-4,
    **LECTURE_ARCH,
)
NANOGPT_CPU_VAL = 1.886  # nanoGPT's documented CPU recipe: best val loss after 2000 steps, 91 s here
# A short run of the default GPT (params.yaml's architecture) for time-to-quality: the params a user
# would pass as `dvc exp run -S gpt.learning_rate=0.01 -S gpt.max_iters=400 -S gpt.warmup_iters=30
# -S gpt.weight_decay=0.1 -S gpt.ema_decay=0 -S gpt.block_size=64 -S gpt.batch_size=16
# -S gpt.attention_window=0` (evaluating every 25 steps only to read the time off the curve; evaluations
# are not counted). Over 400 steps a weight average's lag costs more than it gives; nanoGPT's CPU recipe
# trains on windows of 64 too, and at 64 the step takes ~half the time of 128 for ~1.4x the steps to
# 1.886 (docs/performance.md "How to read it"). Batch and attention are pinned to what this recipe was measured with:
# params.yaml's windows of 512 come with 8 a step and a 32-character window, which do not fit 64.
FAST_RECIPE = dict(
    optimizer="muon",
    learning_rate=1e-2,
    max_iters=400,
    warmup_iters=30,
    weight_decay=0.1,
    ema_decay=0.0,
    block_size=64,
    batch_size=16,
    attention_window=0,
)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _splits(data: Path):
    from charlm.batches import load_tokens
    from charlm.corpus import encode_text, split_tokens

    tok, encoded = encode_text(data.read_text(encoding="utf-8"))
    train, val = split_tokens(encoded, tok.itemsize, 0.1)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "train.bin").write_bytes(train)
    (tmp / "val.bin").write_bytes(val)
    return tok, load_tokens(tmp / "train.bin", tok.dtype), load_tokens(tmp / "val.bin", tok.dtype)


def worker_train(data: Path, model: str, overrides: dict, steps: int, target: float | None) -> dict:
    """Train `steps` steps of `model` with params.yaml's section plus `overrides`."""
    import dataclasses

    import torch

    from charlm.evaluation import split_loss
    from charlm.models import build_model, config_for
    from charlm.params import load_params
    from charlm.training import train

    tok, train_data, val_data = _splits(data)
    section = dataclasses.replace(load_params(ROOT / "params.yaml").model(model), **overrides)
    if target is None and steps > 0:  # throughput only: no evaluations in the way
        warmup = min(section.warmup_iters, steps - 1)
        section = dataclasses.replace(section, max_iters=steps, warmup_iters=warmup, eval_interval=10**9, eval_iters=1)
    torch.manual_seed(1337)
    net = build_model(model, config_for(model, section, tok.vocab_size))
    hit: dict = {}
    elapsed = {"train": 0.0}

    def on_progress(step, total, loss, tokens_per_s):
        elapsed["train"] = step * section.batch_size * section.block_size / tokens_per_s

    def on_eval(point):
        if target is not None and "step" not in hit and point.val_loss <= target:
            hit.update(step=point.step, seconds=elapsed["train"])

    if target is None and steps > 0:  # one untimed step first: oneDNN picks its kernels on the first call
        warm_up = dataclasses.replace(section, max_iters=1, warmup_iters=0)
        train(net, train_data, val_data, warm_up, torch.device("cpu"), 1337)
    result = train(net, train_data, val_data, section, torch.device("cpu"), 1337, on_progress, on_eval)
    out = {
        "tokens_per_second": result.tokens_per_second,
        "train_seconds": result.train_seconds,
        "precision": result.precision,
        "peak_mb": _peak_mb(),
        "curve": [dataclasses.asdict(p) for p in result.curve],
    }
    if model == "bigram":
        from charlm.models.bigram import bigram_loss_floor

        out["val_loss"] = split_loss(net, val_data, 256, torch.device("cpu"))
        out["val_loss_floor"] = bigram_loss_floor(train_data, val_data, tok.vocab_size)
    if target is not None:
        out["time_to_target"] = hit.get("seconds")
        out["step_to_target"] = hit.get("step")
    return out


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 1.0) -> float:
    """The machine's measured matmul limit in GFLOP/s for one dtype, at this process's thread count."""
    import torch

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
    chunk and the one before it."""
    C, L, T, V = config["n_embd"], config["n_layer"], config["block_size"], config["vocab_size"]
    window = config.get("attention_window", 0)
    keys = 2 * window if 0 < window < T else T
    matmul_weights = L * 12 * C * C + C * V  # per block: qkv 3C^2, proj C^2, MLP 8C^2; the head
    return 6 * matmul_weights + 12 * L * keys * C


def worker_steps(data: Path, overrides: dict, steps: int, rounds: int) -> dict:
    """Step times of one GPT size, three ways, interleaved round by round so drift hits all alike:
    the params.yaml recipe, the same charlm model with plain float32 AdamW, and the plain-PyTorch
    reference (`benchmarks.reference`, nanoGPT's way of writing the model) with float32 AdamW."""
    import dataclasses

    import torch

    from benchmarks.reference import ReferenceGPT, reference_optimizer
    from charlm.batches import get_batch
    from charlm.models import build_model, config_for
    from charlm.params import load_params
    from charlm.precision import cpu_native_bf16, describe_cpu
    from charlm.training import train

    tok, train_data, val_data = _splits(data)
    recipe = dataclasses.replace(load_params(ROOT / "params.yaml").gpt, **overrides)
    recipe = dataclasses.replace(
        recipe, max_iters=steps, warmup_iters=min(recipe.warmup_iters, steps - 1), eval_interval=10**9, eval_iters=1
    )
    plain = dataclasses.replace(recipe, optimizer="adamw", precision="float32")
    config = config_for("gpt", recipe, tok.vocab_size)

    def charlm_step(section) -> float:
        torch.manual_seed(1337)
        net = build_model("gpt", config)
        return train(net, train_data, val_data, section, torch.device("cpu"), 1337).train_seconds / steps

    def reference_step() -> float:
        torch.manual_seed(1337)
        net = ReferenceGPT(
            **{k: config[k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")},
            dropout=config["dropout"],
        )
        optimizer = reference_optimizer(net, recipe.learning_rate, recipe.weight_decay)
        gen = torch.Generator().manual_seed(1337)
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = get_batch(train_data, recipe.batch_size, recipe.block_size, gen)
            optimizer.zero_grad(set_to_none=True)
            net(x, y)[1].backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
        return (time.perf_counter() - t0) / steps

    charlm_step(dataclasses.replace(recipe, max_iters=1, warmup_iters=0))  # untimed: first-call kernel picks
    times: dict[str, list[float]] = {"recipe": [], "charlm_float32_adamw": [], "reference_float32_adamw": []}
    for _ in range(rounds):
        times["recipe"].append(charlm_step(recipe))
        times["charlm_float32_adamw"].append(charlm_step(plain))
        times["reference_float32_adamw"].append(reference_step())
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    tokens = recipe.batch_size * recipe.block_size
    flops = flops_per_token(config) * tokens
    native = cpu_native_bf16()
    peaks = {"float32": matmul_peak("float32")}
    if native:
        peaks["bfloat16"] = matmul_peak("bfloat16")
    recipe_dtype = "bfloat16" if native and recipe.precision != "float32" else "float32"
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
    import torch

    from benchmarks.reference import NANOGPT_CPU_RECIPE as R
    from benchmarks.reference import ReferenceGPT, nanogpt_lr, reference_optimizer
    from charlm.batches import get_batch
    from charlm.evaluation import estimate_loss

    tok, train_data, val_data = _splits(data)
    torch.manual_seed(1337)
    sizes = {k: R[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "dropout")}
    net = ReferenceGPT(vocab_size=tok.vocab_size, **sizes)
    optimizer = reference_optimizer(net, R["learning_rate"], R["weight_decay"])
    gen = torch.Generator().manual_seed(1337)
    seconds, hit = 0.0, None
    for step in range(R["max_iters"] + 1):
        if step % eval_interval == 0 or step == R["max_iters"]:
            batches = torch.Generator().manual_seed(1338)
            val = estimate_loss(
                net, {"val": val_data}, R["block_size"], 20, R["batch_size"], batches, torch.device("cpu")
            )["val"]
            if val <= target:
                hit = {"step": step, "seconds": seconds, "val": val}
                break
        if step == R["max_iters"]:
            break
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(step)
        x, y = get_batch(train_data, R["batch_size"], R["block_size"], gen)
        optimizer.zero_grad(set_to_none=True)
        net(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), R["grad_clip"])
        optimizer.step()
        seconds += time.perf_counter() - t0
    return {
        "time_to_target": None if hit is None else hit["seconds"],
        "step_to_target": hit and hit["step"],
        "final_seconds": seconds,
    }


def lecture_generate(model, idx, max_new_tokens: int, block_size: int):
    """The lecture's loop: re-run the whole cropped context for every new token."""
    import torch

    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -block_size:])
        probs = torch.softmax(logits[:, -1, :], dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    return idx


def worker_sample(tokens: int) -> dict:
    import torch

    from charlm.models import build_model
    from charlm.quantize import quantize_int8
    from charlm.sampling import generate

    torch.manual_seed(0)
    config = {k: LECTURE_GPT[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    model = build_model("gpt", dict(vocab_size=65, **config)).eval()
    int8_model = quantize_int8(model)
    start = torch.zeros((1, 1), dtype=torch.long)

    def cached(net) -> float:
        generate(net, start, 10)  # warm-up
        t0 = time.perf_counter()
        generate(net, start, tokens, generator=torch.Generator().manual_seed(0))
        return tokens / (time.perf_counter() - t0)

    with torch.no_grad():
        t0 = time.perf_counter()
        lecture_generate(model, start, tokens, config["block_size"])
        lecture = tokens / (time.perf_counter() - t0)
    from charlm.params import load_params
    from charlm.precision import sample_precision

    return {
        "default_precision": sample_precision("cpu", load_params(ROOT / "params.yaml").sample.precision),
        "lecture_tokens_per_second": lecture,
        "cached_tokens_per_second": cached(model),
        "cached_int8_tokens_per_second": cached(int8_model),
        "tokens": tokens,
    }


def worker_encode(data: Path) -> dict:
    import torch

    from charlm.tokenizer import CharTokenizer

    text = data.read_text(encoding="utf-8")
    tok = CharTokenizer.fit(text)
    stoi = {c: i for i, c in enumerate(tok.chars)}
    t0 = time.perf_counter()
    lecture = torch.tensor([stoi[c] for c in text], dtype=torch.long)  # the lecture's encode
    t1 = time.perf_counter()
    fast = tok.encode_bytes(text)
    t2 = time.perf_counter()
    assert list(fast[:1000]) == lecture[:1000].tolist()
    return {
        "lecture_ms": (t1 - t0) * 1000,
        "vectorised_ms": (t2 - t1) * 1000,
        "lecture_bytes": lecture.numel() * 8,
        "vectorised_bytes": len(fast),
    }


def run_worker(kind: str, **kwargs) -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.bench", "worker", kind, json.dumps(kwargs, default=str)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_data_stages(data: Path) -> dict:
    """Wall time of download/encode/split as DVC runs them (fresh interpreter each)."""
    from charlm.pipeline import stage_args
    work = Path(tempfile.mkdtemp())
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    env = os.environ | {"PYTHONPATH": str(ROOT), "CHARLM_DATA_FILE": str(data)}
    commands = {name: stage_args(name, ROOT / "dvc.yaml") for name in ("download", "encode", "split")}
    out = {}
    for name, args in commands.items():
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", f"stages.{name}", *args], cwd=work, env=env, check=True, capture_output=True
        )
        out[name] = time.perf_counter() - t0
    shutil.rmtree(work)
    return out


def time_noop_repro() -> float | None:
    """`dvc repro` when everything is cached, if this checkout's pipeline is up to date."""
    if not (ROOT / "dvc.lock").exists() or not (ROOT / "data" / "train.bin").exists():
        return None
    status = subprocess.run(["dvc", "status", "--json"], cwd=ROOT, capture_output=True, text=True)
    if status.returncode != 0 or json.loads(status.stdout or "{}"):
        return None
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro"], cwd=ROOT, capture_output=True, check=True)
    return time.perf_counter() - t0


def find_data(data: Path | None) -> Path:
    for candidate in (data, os.environ.get("CHARLM_DATA_FILE"), ROOT / "data" / "input.txt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()  # the data stages run in a temp dir
    raise SystemExit("bench: no corpus: pass --data PATH, set CHARLM_DATA_FILE, or run `dvc repro download`")


def main(
    quick: bool = typer.Option(False, help="Fewer steps and tokens, no time-to-quality runs: a few minutes."),
    data: Path = typer.Option(None, help="The tinyshakespeare input.txt."),
    out: Path = typer.Option(ROOT / "benchmarks" / "results.json", help="Where the JSON goes."),
) -> None:
    """Measure training, sampling, encoding and pipeline overhead; print a table with the targets."""
    import torch

    from charlm import io
    from charlm.precision import describe_cpu

    corpus = find_data(data)
    tokens = 300 if quick else 500
    results: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "cpu": describe_cpu(),
        "torch": torch.__version__,
        "quick": quick,
    }
    print(
        f"charlm benchmark on {results['machine']} ({results['cpu']}), torch {results['torch']}"
        f"{' (quick)' if quick else ''}",
        flush=True,
    )
    results["encode"] = run_worker("encode", data=corpus)
    results["data_stages_seconds"] = time_data_stages(corpus)
    # bigram trains with its real params (max_iters from params.yaml) so its loss is the pipeline's
    results["bigram"] = run_worker("train", data=corpus, model="bigram", overrides={}, steps=0, target=None)
    results["bigram"].pop("curve")
    results["guard_default"] = run_worker(
        "steps", data=corpus, overrides={}, steps=5 if quick else 10, rounds=2 if quick else 3
    )
    results["guard_lecture"] = run_worker(
        "steps", data=corpus, overrides=LECTURE_GPT, steps=1 if quick else 2, rounds=1 if quick else 2
    )
    # Peak memory of the lecture-size recipe alone, in a process of its own.
    results["gpt_lecture"] = run_worker("train", data=corpus, model="gpt", overrides=LECTURE_GPT, steps=2, target=None)
    results["gpt_lecture"].pop("curve")
    if not quick:
        ttt = run_worker(
            "train",
            data=corpus,
            model="gpt",
            overrides=FAST_RECIPE | {"eval_interval": 25, "eval_iters": 20},
            steps=0,
            target=NANOGPT_CPU_VAL,
        )
        results["time_to_1886"] = {k: ttt[k] for k in ("time_to_target", "step_to_target")}
        results["reference_time_to_1886"] = run_worker(
            "reference_ttt", data=corpus, target=NANOGPT_CPU_VAL, eval_interval=100
        )
    results["sampling"] = run_worker("sample", tokens=tokens)
    results["noop_repro_seconds"] = time_noop_repro()
    print(f"\nCPU: {results['cpu']}\n")
    print(format_table(results))
    io.write_json(out, results)
    print(f"\nwrote {out}")


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def format_table(r: dict) -> str:
    """The results as the markdown table docs/performance.md quotes (tests/test_docs.py compares them)."""
    s = r["sampling"]
    g, lg = r["guard_default"], r["guard_lecture"]
    ms = {k: v * 1000 for k, v in g["step_seconds"].items()}
    peaks = g["matmul_peak_gflops"]
    peak_text = ", ".join(f"{k} {v:,.0f}" for k, v in peaks.items())
    ttt = r.get("time_to_1886", {}).get("time_to_target")
    ref_ttt = r.get("reference_time_to_1886", {}).get("time_to_target")
    default_precision = s["default_precision"]
    default_rate = s["cached_int8_tokens_per_second" if default_precision == "int8" else "cached_tokens_per_second"]
    rows = [
        ("matmul peak, GFLOP/s (this machine, 2048^3)", peak_text, "the limit"),
        (
            "GPT default: step, recipe vs float32 AdamW",
            f"{ms['recipe']:.0f} vs {ms['charlm_float32_adamw']:.0f} ms ({g['recipe_over_float32_adamw']:.2f}x)",
            "<= 1.25x (< 1 with native bf16)",
        ),
        ("GPT default: training tokens/s", f"{g['tokens_per_second']['recipe']:,.0f}", ""),
        (
            f"GPT default: GFLOP/s, share of {g['recipe_dtype']} peak",
            f"{g['gflops']['recipe']:,.0f} ({g['recipe_fraction_of_peak']:.0%})",
            "",
        ),
        (
            "GPT default: vs plain-PyTorch reference",
            f"{g['speedup_over_reference']:.2f}x ({g['tokens_per_second']['reference_float32_adamw']:,.0f} tok/s)",
            "",
        ),
        (
            "GPT lecture 6x384: tokens/s vs reference",
            f"{lg['tokens_per_second']['recipe']:,.0f} vs {lg['tokens_per_second']['reference_float32_adamw']:,.0f}"
            f" ({lg['speedup_over_reference']:.2f}x)",
            ">= 1.25x",
        ),
        ("GPT lecture 6x384: peak memory", f"{r['gpt_lecture']['peak_mb']:,.0f} MB", "<= 4,096 MB"),
        (
            "time to val 1.886: FAST_RECIPE vs nanoGPT recipe",
            "skipped (--quick)"
            if "time_to_1886" not in r
            else f"{'-' if ttt is None else f'{ttt:.1f}'} vs {'-' if ref_ttt is None else f'{ref_ttt:.1f}'} s"
            f" ({_ratio(ttt, ref_ttt)})",
            "<= 0.40x",
        ),
        ("bigram: val_loss - floor", f"{r['bigram']['val_loss'] - r['bigram']['val_loss_floor']:+.4f}", "<= +0.005"),
        ("bigram: training seconds", f"{r['bigram']['train_seconds']:.2f} s", "<= 5 s"),
        ("sampling, lecture loop (6x384, block 256)", f"{s['lecture_tokens_per_second']:,.0f} tok/s", "baseline"),
        (
            "sampling, KV cache, float32",
            f"{s['cached_tokens_per_second']:,.0f} tok/s "
            f"({s['cached_tokens_per_second'] / s['lecture_tokens_per_second']:.1f}x)",
            "",
        ),
        (
            "sampling, KV cache, int8 weights",
            f"{s['cached_int8_tokens_per_second']:,.0f} tok/s "
            f"({s['cached_int8_tokens_per_second'] / s['lecture_tokens_per_second']:.1f}x)",
            "",
        ),
        (
            f"sampling, default precision ({default_precision})",
            f"{default_rate / s['lecture_tokens_per_second']:.1f}x the lecture loop",
            ">= 10x",
        ),
        ("encode: lecture list comprehension", f"{r['encode']['lecture_ms']:.1f} ms", "baseline"),
        ("encode: vectorised uint8", f"{r['encode']['vectorised_ms']:.1f} ms", ""),
    ]
    rows += [(f"stage {k} wall time", f"{v:.2f} s", "<= 3 s") for k, v in r["data_stages_seconds"].items()]
    noop = r["noop_repro_seconds"]
    rows.append(
        ("no-op dvc repro", "skipped (pipeline not up to date)" if noop is None else f"{noop:.2f} s", "<= 1.5 s")
    )
    width = max(len(a) for a, _, _ in rows)
    vwidth = max(len(b) for _, b, _ in rows)
    lines = [
        f"| {'measure':<{width}} | {'result':>{vwidth}} | target |",
        f"|{'-' * (width + 2)}|{'-' * (vwidth + 2)}|--------|",
    ]
    lines += [f"| {name:<{width}} | {value:>{vwidth}} | {target} |" for name, value, target in rows]
    return "\n".join(lines)


def worker(kind: str, kwargs: str) -> None:
    """One measurement in this fresh process (`run_worker` starts it); prints its JSON last."""
    from charlm.device import keep_freed_memory

    keep_freed_memory()  # as the pipeline's stages do (charlm.device.configure_threads)
    args = json.loads(kwargs)
    if "data" in args:
        args["data"] = Path(args["data"])
    workers = {
        "train": worker_train,
        "steps": worker_steps,
        "reference_ttt": worker_reference_ttt,
        "sample": worker_sample,
        "encode": worker_encode,
    }
    result = workers[kind](**args)
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(*sys.argv[2:4])
    else:
        typer.run(main)
