"""Data-parallel training: the train stage under torchrun with 2 gloo processes on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from charlm.checkpoint import load_checkpoint
from charlm.curves import read_curve
from charlm.distributed import Distributed, worker_device
from charlm.errors import UsageError
from charlm.params import ParamsError, TrainConfig
from charlm.training import micro_batches
from tests.helpers import TINY_GPT, TRAIN_ARGS, stage, write_params

pytestmark = pytest.mark.slow  # minutes: real DVC runs and stage subprocesses


def train_args(name: str) -> list[str]:
    """TRAIN_ARGS with the checkpoint and curve written to out/<name>.pt and out/<name>.csv."""
    outputs = {"models/gpt.pt": f"out/{name}.pt", "curves/gpt.csv": f"out/{name}.csv"}
    return [outputs.get(arg, arg) for arg in TRAIN_ARGS]


def run_training(prepared, tmp_path, name: str, **top) -> None:
    config = TINY_GPT | {"max_iters": 30, "eval_interval": 10, "eval_iters": 10, "batch_size": 8, "dropout": 0.0}
    write_params(tmp_path / f"{name}.yaml", gpt=config | top.pop("gpt", {}), **top)
    proc = stage("train", "gpt", *train_args(name), "--params", str(tmp_path / f"{name}.yaml"), cwd=prepared)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_gloo_processes_match_one_process(prepared, tmp_path, optimizer):
    out = prepared / "out"
    for path in out.glob("*") if out.exists() else []:
        path.unlink()
    run_training(prepared, tmp_path, "single", nproc=1, gpt={"optimizer": optimizer})
    run_training(prepared, tmp_path, "ddp", nproc=2, gpt={"optimizer": optimizer})
    assert sorted(p.name for p in out.iterdir()) == ["ddp.csv", "ddp.pt", "single.csv", "single.pt"]  # rank 0 only
    single, ddp = read_curve(out / "single.csv"), read_curve(out / "ddp.csv")
    assert [p.step for p in ddp] == [p.step for p in single] == [0, 10, 20, 30]
    assert ddp[0] == single[0]  # same initial weights, same eval batches
    # Same global batch (8 = 2 x 4) but other rows per process, so not the same steps: the curves
    # agree within 0.1 nats on this tiny corpus (the stated tolerance).
    for a, b in zip(single[1:], ddp[1:], strict=True):
        assert abs(a.val_loss - b.val_loss) < 0.1 and abs(a.train_loss - b.train_loss) < 0.1
    ckpt = load_checkpoint(out / "ddp.pt", expected_model="gpt")
    assert ckpt.train_stats["nproc"] == 2
    assert not any(k.startswith("module.") for k in ckpt.state_dict)  # the plain model, not the DDP wrapper


def test_with_epoch_windows_two_processes_train_on_the_single_process_batches(prepared, tmp_path):
    # Every process holds the same epoch sampler and takes its half of each draw: together the same
    # 8 windows a step as one process, so the same steps up to the all-reduce's rounding.
    windows = {"batch_windows": "epoch"}
    run_training(prepared, tmp_path, "single-epoch", nproc=1, gpt=windows)
    run_training(prepared, tmp_path, "ddp-epoch", nproc=2, gpt=windows)
    single, ddp = read_curve(prepared / "out" / "single-epoch.csv"), read_curve(prepared / "out" / "ddp-epoch.csv")
    for a, b in zip(single, ddp, strict=True):
        assert a.val_loss == pytest.approx(b.val_loss, abs=1e-3)
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-3)
    assert load_checkpoint(prepared / "out" / "ddp-epoch.pt").train_stats["batch_windows"] == "epoch"  # `charlm info`


@pytest.mark.parametrize("batch_windows", ["random", "epoch"])
def test_gradient_accumulation_keeps_the_global_batch(prepared, tmp_path, batch_windows):
    windows = {"batch_windows": batch_windows}
    run_training(prepared, tmp_path, "whole", nproc=1, gpt=windows)
    run_training(prepared, tmp_path, "accumulated", nproc=1, gpt=windows | {"micro_batch_size": 2})
    whole, accumulated = read_curve(prepared / "out" / "whole.csv"), read_curve(prepared / "out" / "accumulated.csv")
    for a, b in zip(whole, accumulated, strict=True):
        assert a.val_loss == pytest.approx(b.val_loss, abs=1e-3)


def test_batch_split_validation():
    assert micro_batches(TrainConfig(batch_size=32), 1) == (32, 1)
    assert micro_batches(TrainConfig(batch_size=32), 4) == (8, 1)
    assert micro_batches(TrainConfig(batch_size=32, micro_batch_size=4), 2) == (4, 4)
    with pytest.raises(ParamsError, match=r"gpt.batch_size = 30: must be divisible by nproc \(4\)"):
        micro_batches(TrainConfig(batch_size=30), 4, "gpt")
    with pytest.raises(ParamsError, match="gpt.micro_batch_size = 16: must divide the per-process batch"):
        micro_batches(TrainConfig(batch_size=32, micro_batch_size=16), 4, "gpt")


def test_worker_devices():
    assert worker_device(torch.device("cpu"), Distributed(1, 1, 2)) == torch.device("cpu")
    assert worker_device(torch.device("cuda"), Distributed(3, 1, 4)) == torch.device("cuda:1")
    assert worker_device(torch.device("mps"), Distributed()) == torch.device("mps")
    with pytest.raises(UsageError, match="mps"):
        worker_device(torch.device("mps"), Distributed(0, 0, 2))
    assert Distributed.from_env({}) == Distributed()
    assert Distributed.from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}).world_size == 2


def test_bad_nproc_split_fails_before_launch(prepared, tmp_path):
    write_params(tmp_path / "bad.yaml", nproc=3, gpt=TINY_GPT | {"batch_size": 8})
    proc = stage("train", "gpt", *train_args("bad"), "--params", str(tmp_path / "bad.yaml"), cwd=prepared)
    assert proc.returncode == 2 and "gpt.batch_size = 8: must be divisible by nproc (3)" in proc.stderr
    assert "torchrun" not in proc.stderr.lower() and torch is not None


def test_two_processes_resume_after_a_kill_to_the_uninterrupted_result(prepared, tmp_path):
    """Rank 0 writes the state with every rank's random streams; each rank restores its own (dropout
    on, so a rank with rank 0's streams would draw other masks)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = TINY_GPT | {"max_iters": 300, "eval_interval": 50, "dropout": 0.1, "optimizer": "muon"}
    write_params(tmp_path / "p.yaml", gpt=config, nproc=2, save_state_every_seconds=0.05)
    args = ["gpt", *train_args("whole"), "--params", str(tmp_path / "p.yaml")]
    whole = stage("train", *args, cwd=prepared, env=os.environ | {"CHARLM_STATE_DIR": str(tmp_path / "a")})
    assert whole.returncode == 0, whole.stdout + whole.stderr

    states = tmp_path / "b"
    env = os.environ | {"CHARLM_STATE_DIR": str(states), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    args = ["gpt", *train_args("resumed"), "--params", str(tmp_path / "p.yaml")]
    killed = subprocess.Popen(
        [sys.executable, "-m", "stages.train", *args],
        cwd=prepared,
        env=env,
        start_new_session=True,  # its own process group: torchrun and both workers
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    curve, deadline = prepared / "out/resumed.csv", time.monotonic() + 120
    while time.monotonic() < deadline and not (curve.exists() and "\n100," in curve.read_text()):
        time.sleep(0.02)
    time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert len(list(states.glob("*.pt"))) == 1

    resumed = stage("train", *args, cwd=prepared, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "train@gpt: resuming from step" in resumed.stdout
    a = load_checkpoint(prepared / "out/whole.pt", expected_model="gpt").state_dict
    b = load_checkpoint(prepared / "out/resumed.pt", expected_model="gpt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_curve(prepared / "out/whole.csv") == read_curve(prepared / "out/resumed.csv")
