"""What the benchmark's workers share: the recipes they train (typed params: a typo fails on import),
the corpus split as the pipeline splits it, and the process's peak memory."""

from __future__ import annotations

import re
import resource
import tempfile
from pathlib import Path

from charlm.params import BigramParams, GPTParams, load_params

ROOT = Path(__file__).resolve().parent.parent

# The lecture's model (its size and architecture: what nanoGPT's code and `benchmarks/reference.py`
# build) and training settings, on params.yaml's optimizer and precision. Two micro-batches of 32: the
# same optimizer step as one batch of 64, with half the activations.
LECTURE_ARCH = dict(
    position="learned", qk_norm=False, mlp="gelu", zero_init=False, logit_softcap=0.0, token_shift=False,
    attention_window=0,
)  # fmt: skip
LECTURE_GPT = dict(
    n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, micro_batch_size=32, dropout=0.2,
    learning_rate=3e-4, **LECTURE_ARCH,
)  # fmt: skip
NANOGPT_CPU_VAL = 1.886  # nanoGPT's documented CPU recipe: its best val loss after 2,000 steps
# A short run of the default GPT for time-to-quality, as `dvc exp run -S gpt.learning_rate=0.01
# -S gpt.max_iters=400 -S gpt.warmup_iters=30 -S gpt.weight_decay=0.1 -S gpt.ema_decay=0
# -S gpt.block_size=64 -S gpt.batch_size=16 -S gpt.attention_window=0`. Over 400 steps a weight
# average's lag costs more than it gives; nanoGPT's CPU recipe trains on blocks of 64 too. Batch and
# attention are pinned: params.yaml's blocks of 512 come with 8 a step and a 32-character window.
FAST_RECIPE = dict(
    optimizer="muon", learning_rate=1e-2, max_iters=400, warmup_iters=30, weight_decay=0.1, ema_decay=0.0,
    block_size=64, batch_size=16, attention_window=0,
)  # fmt: skip

# The recipe docs/devices.md recommends for a GPU: the lecture's size, batch and training settings
# (its AdamW at 3e-4, dropout 0.2, full attention), which keep a GPU busier than the 128-wide default.
GPU_RECIPE = dict(
    n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000, learning_rate=3e-4,
    dropout=0.2, optimizer="adamw", eval_interval=500, eval_iters=200, attention_window=0,
)  # fmt: skip

for _recipe in (LECTURE_GPT, FAST_RECIPE, GPU_RECIPE):
    GPTParams.of(**_recipe)  # an unknown key or a bad value fails here, on import


def recipe(model: str, overrides: dict) -> BigramParams | GPTParams:
    """params.yaml's section for `model` with `overrides`, validated as the stages validate it."""
    return load_params(ROOT / "params.yaml").section(model).replace(**overrides)


def peak_mb() -> float:
    """This worker's peak memory. On Linux VmHWM, its own high-water mark: ru_maxrss would start at the
    resident size of the benchmark process that spawned it."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def splits(data: Path):
    """(tokenizer, train, val) of the corpus at `data`, split as the pipeline splits it."""
    from charlm.batches import load_tokens
    from charlm.corpus import encode_text, split_tokens

    tok, encoded = encode_text(data.read_text(encoding="utf-8"))
    train, val = split_tokens(encoded, tok.itemsize, 0.1)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "train.bin").write_bytes(train)
    (tmp / "val.bin").write_bytes(val)
    return tok, load_tokens(tmp / "train.bin", tok.dtype), load_tokens(tmp / "val.bin", tok.dtype)
