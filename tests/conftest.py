"""Shared fixtures: tiny corpora made here, never the real tinyshakespeare."""

from __future__ import annotations

import os
import random

import pytest

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
