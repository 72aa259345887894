"""Generation measurements, on random weights (speed does not depend on what the weights learned).

- The lecture-size model (6x384, block 256): the lecture's loop, which re-runs the whole cropped
  context for every new token, against the KV cache with float32 and with int8 weights.
- The default model (`params.yaml`): one stream through the model's own forward with a KV cache and
  `torch.multinomial` (generation before the decode step, kept here as its baseline), through the
  decode step (`charlm.models.gpt.decode`) with float32 and int8
  weights and compiled (`sample.compile`), and 64 streams as one batch, eager and compiled; each
  against its FLOP limit at the machine's measured peak.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import LECTURE_GPT, ROOT
from charlm.hardware import resolve_runtime
from charlm.models import build_model, config_for
from charlm.models.gpt.config import layer_windows
from charlm.params import load_params
from charlm.quantize import quantize_int8
from charlm.sampling import KVCache, faster_weights, generate

BATCH = 64  # streams generated together in the batched measurement


def lecture_generate(model, idx, max_new_tokens: int, block_size: int):
    """The lecture's loop: re-run the whole cropped context for every new token."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -block_size:])
        probs = torch.softmax(logits[:, -1, :], dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    return idx


@torch.inference_mode()
def forward_generate(model, idx, max_new_tokens: int):
    """Generation before the decode step: the model's forward with a KV cache for each new token,
    `torch.multinomial` for the draw, the text grown with `torch.cat`."""
    cache = KVCache(model.config, idx.size(0), idx.device, torch.float32)
    logits, _ = model(idx, kv_cache=cache)
    generator = torch.Generator().manual_seed(0)
    for _ in range(max_new_tokens):
        next_id = torch.multinomial(torch.softmax(logits[:, -1, :], dim=-1), 1, generator=generator)
        idx = torch.cat([idx, next_id], dim=1)
        logits, _ = model(next_id, kv_cache=cache)
    return idx


def flops_per_token(config: dict) -> float:
    """Multiply-adds x 2 of one decode step: every linear layer's weights once, and attention over
    the keys a token sees (the window, or the whole block in a full-attention layer)."""
    C, L, T = config["n_embd"], config["n_layer"], config["block_size"]
    windows = layer_windows(L, config.get("attention_window", 0), config.get("full_attention_layers", 0))
    keys = sum(w if 0 < w < T else T for w in windows)  # summed over the layers
    linear = L * (3 * C * C + C * C + 8 * C * C) + C * config["vocab_size"]
    attention = 2 * keys * C
    return 2.0 * (linear + attention)


def rate(model, streams: int, tokens: int, step=None) -> float:
    """Characters per second (all streams together) of `tokens` new tokens per stream, through `step`
    (a decode step made before, e.g. a compiled one) or the model's own."""
    start = torch.zeros((streams, 1), dtype=torch.long)
    generators = [torch.Generator().manual_seed(i) for i in range(streams)]
    generate(model, start, 10, generator=generators, decode_step=step)  # warm-up
    t0 = time.perf_counter()
    generate(model, start, tokens, generator=generators, decode_step=step)
    return streams * tokens / (time.perf_counter() - t0)


def compiled_step(model, streams: int):
    """The model's decode step compiled for `streams` streams, and the seconds compiling took with
    TorchInductor's on-disk caches off (a new checkpoint's cost; a repeated one's is lower)."""
    import torch._inductor.config as inductor_config

    t0 = time.perf_counter()
    with inductor_config.patch(force_disable_caches=True):
        step = model.decode_step().compiled(KVCache(model.config, streams, torch.device("cpu"), torch.float32))
    return step, time.perf_counter() - t0


def best_of_alternating(runs: dict, rounds: int = 3) -> dict:
    """The best rate of each of several measurements, run A B A B: a noisy machine slows rounds, not one side."""
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = max(best[name], run())
    return best


def random_model(config: dict, runtime):
    torch.manual_seed(0)
    model = build_model("gpt", config, runtime).eval()
    with torch.no_grad():
        for p in model.parameters():  # not zero-initialised projections: every op does real work
            p.normal_(0.0, 0.05)
    return model


def worker_sample(tokens: int) -> dict:
    params = load_params(ROOT / "params.yaml")
    runtime = resolve_runtime(torch.device("cpu"), sample_precision=params.sample.precision)

    lecture_config = dict(vocab_size=65, **{k: LECTURE_GPT[k] for k in ("n_layer", "n_head", "n_embd", "block_size")})
    model = random_model(lecture_config, runtime)
    int8_model = quantize_int8(model, runtime.int8_activations)
    with torch.no_grad():
        start = torch.zeros((1, 1), dtype=torch.long)
        t0 = time.perf_counter()
        lecture_generate(model, start, tokens, lecture_config["block_size"])
        lecture = tokens / (time.perf_counter() - t0)
    lecture_results = {
        "lecture_tokens_per_second": lecture,
        "cached_tokens_per_second": rate(model, 1, tokens),
        "cached_int8_tokens_per_second": rate(int8_model, 1, tokens),
        "auto_weights": faster_weights(model, runtime, 1),
        "flops_per_token": flops_per_token(lecture_config),
    }

    default_config = config_for("gpt", params.gpt, 65)
    model = random_model(default_config, runtime)
    int8_model = quantize_int8(model, runtime.int8_activations)
    auto_single, auto_batched = faster_weights(model, runtime, 1), faster_weights(model, runtime, BATCH)
    start = torch.zeros((1, 1), dtype=torch.long)

    def forward_rate() -> float:
        t0 = time.perf_counter()
        forward_generate(model, start, tokens)
        return tokens / (time.perf_counter() - t0)

    single_compiled, compile_seconds = compiled_step(model, 1)
    batched_compiled, _ = compiled_step(model, BATCH)
    single = best_of_alternating(
        {
            "forward": forward_rate,
            "float32": lambda: rate(model, 1, tokens),
            "int8": lambda: rate(int8_model, 1, tokens),
            "compiled": lambda: rate(model, 1, tokens, single_compiled),
        }
    )
    batched_model = int8_model if auto_batched == "int8" else model
    batched = best_of_alternating(
        {
            "auto": lambda: rate(batched_model, BATCH, tokens // 2),
            "compiled": lambda: rate(model, BATCH, tokens // 2, batched_compiled),
        }
    )
    default_results = {
        "forward_tokens_per_second": single["forward"],
        "float32_tokens_per_second": single["float32"],
        "int8_tokens_per_second": single["int8"],
        "auto_weights": auto_single,
        "batched_streams": BATCH,
        "batched_weights": auto_batched,
        "batched_tokens_per_second": batched["auto"],
        "compiled_tokens_per_second": single["compiled"],
        "batched_compiled_tokens_per_second": batched["compiled"],
        "compile_seconds": compile_seconds,
        "flops_per_token": flops_per_token(default_config),
    }
    return {"tokens": tokens, "lecture": lecture_results, "default": default_results}
