"""Generation measurements: the KV cache (float32 and int8 weights) against the lecture's loop, which
re-runs the whole cropped context for every new token, on the same random lecture-size weights."""

from __future__ import annotations

import time

import torch

from benchmarks.common import LECTURE_GPT, ROOT
from charlm.hardware import resolve_runtime
from charlm.models import build_model
from charlm.params import load_params
from charlm.quantize import quantize_int8
from charlm.sampling import generate


def lecture_generate(model, idx, max_new_tokens: int, block_size: int):
    """The lecture's loop: re-run the whole cropped context for every new token."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -block_size:])
        probs = torch.softmax(logits[:, -1, :], dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    return idx


def worker_sample(tokens: int) -> dict:
    runtime = resolve_runtime(torch.device("cpu"), sample_precision=load_params(ROOT / "params.yaml").sample.precision)
    torch.manual_seed(0)
    config = {k: LECTURE_GPT[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    model = build_model("gpt", dict(vocab_size=65, **config), runtime).eval()
    int8_model = quantize_int8(model, runtime.int8_activations)
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
    return {
        "default_precision": runtime.sample_weights,
        "lecture_tokens_per_second": lecture,
        "cached_tokens_per_second": cached(model),
        "cached_int8_tokens_per_second": cached(int8_model),
        "tokens": tokens,
    }
