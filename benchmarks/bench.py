"""The performance benchmark: prints a table beside the targets and writes JSON.

    python -m benchmarks.bench --quick        # about three minutes
    python -m benchmarks.bench                # the full set (about ten minutes), as docs/performance.md quotes it

Needs the real corpus: --data, else $CHARLM_DATA_FILE, else data/input.txt from `dvc repro`.
Each measurement runs in a fresh subprocess (`python -m benchmarks.bench worker KIND ARGS`), so its
peak memory is its own. The measurements live by concern in `train_bench.py`, `sample_bench.py` and
`data_bench.py`; the targets they are read against are `TARGETS` below.
"""

from __future__ import annotations

import json
import operator
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from benchmarks.common import FAST_RECIPE, LECTURE_GPT, NANOGPT_CPU_VAL, ROOT


@dataclass(frozen=True)
class Target:
    """A bound a measure must meet: `op` is "<=" or ">=" against `limit`, shown as `text`."""

    op: str
    limit: float
    text: str

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return {"<=": operator.le, ">=": operator.ge}[self.op](value, self.limit)


# What each measure must reach, by the name its row gives it (docs/performance.md "How to read it").
TARGETS = {
    "recipe_over_float32_adamw": Target("<=", 1.25, "<= 1.25x (< 1 with native bf16)"),
    "lecture_over_reference": Target(">=", 1.25, ">= 1.25x"),
    "lecture_peak_mb": Target("<=", 4096, "<= 4,096 MB"),
    "time_to_1886_ratio": Target("<=", 0.40, "<= 0.40x"),
    "bigram_over_floor": Target("<=", 0.005, "<= +0.005"),
    "bigram_seconds": Target("<=", 5.0, "<= 5 s"),
    "sampling_over_lecture": Target(">=", 10.0, ">= 10x"),
    "generation_over_forward": Target(">=", 3.0, ">= 3x"),
    "batched_generation": Target(">=", 50_000, ">= 50,000 (AVX512-BF16 class)"),
    "data_stage_seconds": Target("<=", 3.0, "<= 3 s"),
    "noop_repro_seconds": Target("<=", 1.5, "<= 1.5 s"),
}


def worker(kind: str, kwargs: str) -> None:
    """One measurement in this fresh process (`run_worker` starts it); prints its JSON last."""
    from benchmarks import data_bench, sample_bench, train_bench
    from charlm.device import keep_freed_memory

    keep_freed_memory()  # as the pipeline's stages do (charlm.device.configure_threads)
    args = json.loads(kwargs)
    if "data" in args:
        args["data"] = Path(args["data"])
    workers: dict[str, Callable[..., dict]] = {
        "train": train_bench.worker_train,
        "steps": train_bench.worker_steps,
        "reference_ttt": train_bench.worker_reference_ttt,
        "sample": sample_bench.worker_sample,
        "encode": data_bench.worker_encode,
    }
    print(json.dumps(workers[kind](**args)))


def run_worker(kind: str, **kwargs) -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.bench", "worker", kind, json.dumps(kwargs, default=str)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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

    from benchmarks.data_bench import time_data_stages, time_noop_repro
    from charlm import io
    from charlm.hardware import describe_cpu

    corpus = find_data(data)
    results: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "cpu": describe_cpu(),
        "torch": torch.__version__,
        "quick": quick,
    }
    quick_note = " (quick)" if quick else ""
    print(f"charlm benchmark on {results['machine']} ({results['cpu']}), torch {results['torch']}{quick_note}")
    results["encode"] = run_worker("encode", data=corpus)
    results["data_stages_seconds"] = time_data_stages(corpus)
    # The bigram trains with its real params (max_iters from params.yaml), so its loss is the pipeline's.
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
        overrides = FAST_RECIPE | {"eval_interval": 25, "eval_iters": 20}
        ttt = run_worker("train", data=corpus, model="gpt", overrides=overrides, steps=0, target=NANOGPT_CPU_VAL)
        results["time_to_1886"] = {k: ttt[k] for k in ("time_to_target", "step_to_target")}
        results["reference_time_to_1886"] = run_worker(
            "reference_ttt", data=corpus, target=NANOGPT_CPU_VAL, eval_interval=100
        )
    results["sampling"] = run_worker("sample", tokens=300 if quick else 500)
    results["noop_repro_seconds"] = time_noop_repro()
    print(f"\nCPU: {results['cpu']}\n")
    print(format_table(results))
    io.write_json(out, results)
    print(f"\nwrote {out}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def rows(r: dict) -> list[tuple[str, str, str | None, float | None]]:
    """(measure, result, target name or None, the value the target reads) for each line of the table."""
    s = r["sampling"]
    g, lg = r["guard_default"], r["guard_lecture"]
    ms = {k: v * 1000 for k, v in g["step_seconds"].items()}
    peaks = ", ".join(f"{k} {v:,.0f}" for k, v in g["matmul_peak_gflops"].items())
    ttt = r.get("time_to_1886", {}).get("time_to_target")
    ref_ttt = r.get("reference_time_to_1886", {}).get("time_to_target")
    ttt_ratio = _ratio(ttt, ref_ttt)
    bigram_gap = r["bigram"]["val_loss"] - r["bigram"]["val_loss_floor"]
    noop = r["noop_repro_seconds"]
    lecture_rates = lg["tokens_per_second"]
    out = [
        ("matmul peak, GFLOP/s (this machine, 2048^3)", peaks, None, None),
        (
            "GPT default: step, recipe vs float32 AdamW",
            f"{ms['recipe']:.0f} vs {ms['charlm_float32_adamw']:.0f} ms ({g['recipe_over_float32_adamw']:.2f}x)",
            "recipe_over_float32_adamw",
            g["recipe_over_float32_adamw"],
        ),
        ("GPT default: training tokens/s", f"{g['tokens_per_second']['recipe']:,.0f}", None, None),
        (
            f"GPT default: GFLOP/s, share of {g['recipe_dtype']} peak",
            f"{g['gflops']['recipe']:,.0f} ({g['recipe_fraction_of_peak']:.0%})",
            None,
            None,
        ),
        (
            "GPT default: vs plain-PyTorch reference",
            f"{g['speedup_over_reference']:.2f}x ({g['tokens_per_second']['reference_float32_adamw']:,.0f} tok/s)",
            None,
            None,
        ),
        (
            "GPT lecture 6x384: tokens/s vs reference",
            f"{lecture_rates['recipe']:,.0f} vs {lecture_rates['reference_float32_adamw']:,.0f}"
            f" ({lg['speedup_over_reference']:.2f}x)",
            "lecture_over_reference",
            lg["speedup_over_reference"],
        ),
        (
            "GPT lecture 6x384: peak memory",
            f"{r['gpt_lecture']['peak_mb']:,.0f} MB",
            "lecture_peak_mb",
            r["gpt_lecture"]["peak_mb"],
        ),  # fmt: skip
        (
            "time to val 1.886: FAST_RECIPE vs nanoGPT recipe",
            "skipped (--quick)"
            if "time_to_1886" not in r
            else f"{'-' if ttt is None else f'{ttt:.1f}'} vs {'-' if ref_ttt is None else f'{ref_ttt:.1f}'} s"
            f" ({'n/a' if ttt_ratio is None else f'{ttt_ratio:.2f}x'})",
            "time_to_1886_ratio",
            ttt_ratio,
        ),
        ("bigram: val_loss - floor", f"{bigram_gap:+.4f}", "bigram_over_floor", bigram_gap),
        (
            "bigram: training seconds",
            f"{r['bigram']['train_seconds']:.2f} s",
            "bigram_seconds",
            r["bigram"]["train_seconds"],
        ),  # fmt: skip
        *sampling_rows(s, g["matmul_peak_gflops"]["float32"], r["cpu"]),
        ("encode: lecture list comprehension", f"{r['encode']['lecture_ms']:.1f} ms", None, None),
        ("encode: vectorised uint8", f"{r['encode']['vectorised_ms']:.1f} ms", None, None),
    ]
    out += [
        (f"stage {k} wall time", f"{v:.2f} s", "data_stage_seconds", v) for k, v in r["data_stages_seconds"].items()
    ]
    out.append(
        (
            "no-op dvc repro",
            "skipped (pipeline not up to date)" if noop is None else f"{noop:.2f} s",
            "noop_repro_seconds",
            noop,
        )
    )
    return out


def sampling_rows(s: dict | None, peak_gflops: float, cpu: str) -> list[tuple[str, str, str | None, float | None]]:
    """Generation: the lecture-size model against the lecture's loop, the default model against the
    model's own forward and against its FLOP limit (the float32 matmul peak / FLOPs per character)."""
    if s is None:
        return [("generation", "not measured with the current code on this class", None, None)]
    lec, d = s["lecture"], s["default"]
    loop = lec["lecture_tokens_per_second"]
    lec_auto = lec["cached_int8_tokens_per_second" if lec["auto_weights"] == "int8" else "cached_tokens_per_second"]
    d_auto = d[f"{d['auto_weights']}_tokens_per_second"]
    d_limit = peak_gflops * 1e9 / d["flops_per_token"]
    lec_limit = peak_gflops * 1e9 / lec["flops_per_token"]
    batched = d["batched_tokens_per_second"]
    native = "native bf16: yes" in cpu
    return [
        ("sampling 6x384: lecture loop (block 256)", f"{loop:,.0f} tok/s", None, None),
        (
            "sampling 6x384: KV cache, float32 / int8",
            f"{lec['cached_tokens_per_second']:,.0f} / {lec['cached_int8_tokens_per_second']:,.0f} tok/s",
            None,
            None,
        ),
        (
            f"sampling 6x384: auto ({lec['auto_weights']}) vs lecture loop",
            f"{lec_auto / loop:.1f}x ({lec_auto / lec_limit:.0%} of FLOP limit)",
            "sampling_over_lecture",
            lec_auto / loop,
        ),
        ("generation default: model forward per token", f"{d['forward_tokens_per_second']:,.0f} chars/s", None, None),
        (
            "generation default: decode step, float32 / int8",
            f"{d['float32_tokens_per_second']:,.0f} / {d['int8_tokens_per_second']:,.0f} chars/s",
            None,
            None,
        ),
        (
            f"generation default: auto ({d['auto_weights']}) vs model forward",
            f"{d_auto / d['forward_tokens_per_second']:.1f}x ({d_auto / d_limit:.1%} of FLOP limit)",
            "generation_over_forward",
            d_auto / d["forward_tokens_per_second"],
        ),
        (
            f"generation default: {d['batched_streams']} streams ({d['batched_weights']})",
            f"{batched:,.0f} chars/s ({batched / d_limit:.0%} of FLOP limit)",
            None if "batched_compiled_tokens_per_second" in d else "batched_generation",
            batched if native else None,  # the target is the AVX512-BF16 class's
        ),
    ] + compiled_rows(d, d_limit, native)


def compiled_rows(d: dict, limit: float, native: bool) -> list[tuple[str, str, str | None, float | None]]:
    """The compiled decode step's rows (`sample.compile`), where the results measured it."""
    if "batched_compiled_tokens_per_second" not in d:
        return []
    single, batched = d["compiled_tokens_per_second"], d["batched_compiled_tokens_per_second"]
    return [
        (
            "generation default: compiled, 1 stream",
            f"{single:,.0f} chars/s ({single / d['float32_tokens_per_second']:.1f}x eager, "
            f"{d['compile_seconds']:.0f} s to compile)",
            None,
            None,
        ),
        (
            f"generation default: compiled, {d['batched_streams']} streams",
            f"{batched:,.0f} chars/s ({batched / d['batched_tokens_per_second']:.1f}x eager, "
            f"{batched / limit:.0%} of FLOP limit)",
            "batched_generation",
            batched if native else None,  # the target is the AVX512-BF16 class's
        ),
    ]


def format_table(r: dict) -> str:
    """The results as the markdown table docs/performance.md quotes (tests/test_docs.py compares them)."""
    table = []
    for name, value, target_name, reading in rows(r):
        target = TARGETS[target_name] if target_name else None
        met = None if target is None else target.met(reading)
        table.append((name, value, target.text if target else "", {True: "yes", False: "**no**", None: ""}[met]))
    width = max(len(a) for a, *_ in table)
    vwidth = max(len(b) for _, b, *_ in table)
    twidth = max(len(c) for *_, c, _ in table)
    lines = [
        f"| {'measure':<{width}} | {'result':>{vwidth}} | {'target':<{twidth}} | met |",
        f"|{'-' * (width + 2)}|{'-' * (vwidth + 2)}|{'-' * (twidth + 2)}|-----|",
    ]
    lines += [f"| {a:<{width}} | {b:>{vwidth}} | {c:<{twidth}} | {d} |" for a, b, c, d in table]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(*sys.argv[2:4])
    else:
        typer.run(main)
