"""Shared fixtures: tiny corpora made here, never the real tinyshakespeare."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from charlm.pipeline import stage_args

# Variables of the user's shell that change what charlm, DVC or torch do. The suite clears them for
# itself and for every subprocess it starts (they copy os.environ), so its result does not depend on
# the shell it runs in: e.g. the README's offline CHARLM_DATA_FILE, or a forced CPU class.
ENV_PREFIXES = ("CHARLM_", "DVC_", "TORCH_", "ATEN_", "ONEDNN_", "DNNL_", "MKL_", "OMP_", "KMP_", "CUDA_")


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """Session-wide, so it is in force before any module-scoped fixture starts a stage. Resumable
    training states go to the session's temp directory, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIXES)]:
            mp.delenv(key)
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("CHARLM_STATE_DIR", str(tmp_path_factory.mktemp("train-state")))
        yield

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


@pytest.fixture(scope="session")
def corpus() -> str:
    return make_corpus()


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
ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A work dir with the data stages done on a tiny corpus."""
    work = tmp_path_factory.mktemp("stages")
    corpus = work / "corpus.txt"
    corpus.write_text(make_corpus(300))
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    write_params(work / "params.yaml", data={"url": str(corpus), "sha256": sha})
    for name in ("download", "encode", "split"):
        args = stage_args(name, ROOT / "dvc.yaml")  # exactly what dvc.yaml runs
        proc = stage(name, *args, cwd=work)
        assert proc.returncode == 0, proc.stderr
    return work


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
