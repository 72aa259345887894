"""Shared fixtures: tiny corpora made here, never the real tinyshakespeare."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from charlm.pipeline import stage_args
from tests.helpers import ROOT, make_corpus, stage, write_params

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


@pytest.fixture(scope="session")
def corpus() -> str:
    return make_corpus()


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
