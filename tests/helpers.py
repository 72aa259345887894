"""Helpers the tests share: tiny corpora made here (never the real tinyshakespeare), the stage
scripts run as DVC runs them, a CPU runtime and a tiny GPT. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent

WORDS = (
    "the king my lord and sweet love thou art not what she would have me speak of noble heart "
    "grief death night day come go hence tell why doth fair brother sir madam good"
).split()


def make_corpus(n_lines: int = 400, seed: int = 0) -> str:
    """Play-like text: speaker names, verse lines and blank lines, deterministic for a seed."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["KING", "ROMEO", "JULIET", "First Citizen"])
        verse = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        lines.append(f"{speaker}:\n{verse.capitalize()}{rng.choice('.,;!?')}\n")
    return "\n".join(lines)


def token_splits(n_lines: int = 600):
    """(vocab_size, train, val): a corpus from `make_corpus`, encoded as uint8 tokens, split 90/10."""
    import torch

    from charlm.tokenizer import CharTokenizer

    text = make_corpus(n_lines)
    tok = CharTokenizer.fit(text)
    data = torch.frombuffer(bytearray(tok.encode_bytes(text)), dtype=torch.uint8)
    n = int(len(data) * 0.9)
    return tok.vocab_size, data[:n], data[n:]


# The stage scripts run as DVC runs them, in a work dir of their own (tests/test_stages.py,
# tests/test_distributed.py).
def stage(name: str, *args: str, cwd: Path, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    env = (os.environ if env is None else env) | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def write_params(path: Path, **sections) -> None:
    path.write_text(yaml.safe_dump(sections))


TRAIN_ARGS = [
    "--train",
    "data/train.bin",
    "--val",
    "data/val.bin",
    "--vocab",
    "data/vocab.json",
    "--checkpoint",
    "models/gpt.pt",
    "--curve",
    "curves/gpt.csv",
    "--progress",
    "curves/gpt.json",
]
TINY_GPT = {
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "block_size": 16,
    "batch_size": 8,
    "eval_interval": 5,
    "eval_iters": 2,
    "warmup_iters": 1,
    "precision": "float32",
}


def cpu_runtime(precision: str = "float32", dropout: float = 0.0, sample_precision: str = "auto"):
    """What a stage on this CPU resolves (charlm.hardware.resolve_runtime)."""
    from charlm.hardware import resolve_runtime

    return resolve_runtime(torch.device("cpu"), precision, dropout, sample_precision)


def tiny_gpt(vocab_size: int = 11, kernels=None, **overrides):
    """A 2-layer, 32-wide GPT with seeded weights, in eval mode; `kernels` as a stage would hand them."""
    from charlm.models import build_model

    torch.manual_seed(0)
    config = dict(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0) | overrides
    model = build_model("gpt", config)
    if kernels is not None:
        model.use_kernels(kernels)
    return model.eval()


def train_on_cpu(model, train_data, val_data, section, seed: int = 0, **kwargs):
    """`charlm.training.train` on this CPU, with the runtime a train stage resolves for a params
    `section` (or a bare `TrainConfig`)."""
    from charlm.training import train

    cfg = getattr(section, "train", section)
    runtime = cpu_runtime(cfg.precision, getattr(getattr(section, "model", None), "dropout", 0.0))
    return train(model, train_data, val_data, cfg, runtime=runtime, seed=seed, **kwargs)
