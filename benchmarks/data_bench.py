"""Data measurements: the lecture's encode against charlm's vectorised one, the data stages' wall time
as DVC runs them, and a `dvc repro` with nothing to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT
from charlm.tokenizer import CharTokenizer


def worker_encode(data: Path) -> dict:
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
