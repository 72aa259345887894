"""The stage scripts as DVC runs them: exit codes, one-line errors, nothing half-written on a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY_GPT, TRAIN_ARGS, stage, write_params

pytestmark = pytest.mark.slow  # stage and training subprocesses: seconds each


def start_training(
    params: Path, work: Path, env: dict[str, str] | None = None, quiet: bool = False
) -> subprocess.Popen:
    """The GPT's train stage in the background, its output one text pipe (or discarded when `quiet`)."""
    env = (os.environ if env is None else env) | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", "gpt", *TRAIN_ARGS, "--params", str(params)],
        cwd=work,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        # A suite started in the background by a non-interactive shell inherits SIGINT ignored, and
        # Python then keeps it ignored (as it should for a background job): the stage gets Ctrl-C's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def leftovers(work: Path) -> list[Path]:
    return [p for d in ("models", "curves") if (work / d).exists() for p in (work / d).iterdir()]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"gpt": {"batch_size": 0}}, "gpt.batch_size = 0: must be a positive integer"),
        ({"gpt": {"block_size": 100000}}, "gpt.block_size = 100000: must be shorter than the train split"),
        ({"device": "mps"}, "device = 'mps' is not available on this machine"),
        ({"gpt": {"n_embd": 30, "n_head": 4}}, "gpt.n_embd = 30: must be divisible by gpt.n_head (4)"),
        # a typo of 1,000: refused in seconds, before anything is allocated
        ({"gpt": {"n_embd": 10_000_000}}, "gpt.n_embd = 10000000, n_layer = 4, n_head = 4, batch_size = 32"),
        # a typo of 10: a million blocks are never built, the estimate comes from two
        ({"gpt": {"n_layer": 1_000_000}}, "gpt.n_embd = 128, n_layer = 1000000, n_head = 4, batch_size = 32"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(prepared, tmp_path, params, message):
    write_params(tmp_path / "bad.yaml", **params)
    proc = stage("train", "gpt", *TRAIN_ARGS, "--params", str(tmp_path / "bad.yaml"), cwd=prepared)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train@gpt: error: {message}")
    assert leftovers(prepared) == []


def test_sample_rejects_bad_prompt_and_top_k_and_samples_in_int8(prepared, tmp_path):
    write_params(tmp_path / "p.yaml", gpt=TINY_GPT | {"max_iters": 5})
    assert stage("train", "gpt", *TRAIN_ARGS, "--params", str(tmp_path / "p.yaml"), cwd=prepared).returncode == 0
    args = ["gpt", "--checkpoint", "models/gpt.pt", "--vocab", "data/vocab.json", "--out", str(tmp_path / "s.txt")]
    write_params(tmp_path / "q.yaml", sample={"prompt": "ROMEO€§"})
    proc = stage("sample", *args, "--params", str(tmp_path / "q.yaml"), cwd=prepared)
    assert proc.returncode == 2 and "'§' '€'" in proc.stderr
    write_params(tmp_path / "q.yaml", sample={"top_k": 500})
    proc = stage("sample", *args, "--params", str(tmp_path / "q.yaml"), cwd=prepared)
    assert proc.returncode == 2 and "sample.top_k = 500: must be <= the vocabulary size" in proc.stderr
    assert not (tmp_path / "s.txt").exists()
    write_params(tmp_path / "q.yaml", sample={"precision": "int8", "max_new_tokens": 30})
    proc = stage("sample", *args, "--params", str(tmp_path / "q.yaml"), cwd=prepared)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "s.txt").read_text(encoding="utf-8")) == 31  # the newline it starts from + 30
    for path in leftovers(prepared):
        path.unlink()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_training_leaves_nothing_half_written_and_reruns(prepared, tmp_path, sig):
    write_params(tmp_path / "long.yaml", gpt=TINY_GPT | {"max_iters": 10**6, "eval_interval": 20})
    proc = start_training(tmp_path / "long.yaml", prepared)
    deadline = time.monotonic() + 120
    seen = ""
    while "step 20:" not in seen and time.monotonic() < deadline:  # wait until it is mid-training
        seen += proc.stdout.readline()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted; no output was written" in out
    assert leftovers(prepared) == []
    write_params(tmp_path / "short.yaml", gpt=TINY_GPT | {"max_iters": 10})
    rerun = stage("train", "gpt", *TRAIN_ARGS, "--params", str(tmp_path / "short.yaml"), cwd=prepared)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in leftovers(prepared)) == ["gpt.csv", "gpt.json", "gpt.pt"]
    for path in leftovers(prepared):
        path.unlink()


def test_download_failure_leaves_nothing(tmp_path):
    write_params(tmp_path / "params.yaml", data={"url": str(tmp_path / "absent.txt"), "sha256": ""})
    proc = stage("download", "--out", "data/input.txt", cwd=tmp_path)
    assert proc.returncode == 1
    assert "download: error: download of" in proc.stderr and "cannot read" in proc.stderr
    assert not (tmp_path / "data" / "input.txt").exists()


def test_encode_rejects_non_utf8(tmp_path):
    (tmp_path / "input.txt").write_bytes(b"caf\xe9\n")
    proc = stage("encode", "--text", "input.txt", "--vocab", "v.json", "--tokens", "t.bin", cwd=tmp_path)
    assert proc.returncode == 1 and "not UTF-8 text" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a real full disk for the train stage's checkpoint (needs root and mount)."""
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]})")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def test_the_train_stage_on_a_full_disk(prepared, tmp_path, tiny_disk):
    write_params(tmp_path / "p.yaml", gpt=TINY_GPT | {"max_iters": 2, "n_embd": 64, "n_head": 2})
    args = [a if a != "models/gpt.pt" else str(tiny_disk / "gpt.pt") for a in TRAIN_ARGS]
    proc = stage("train", "gpt", *args, "--params", str(tmp_path / "p.yaml"), cwd=prepared)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("train@gpt: error: cannot write"), proc.stderr
    assert "gpt.pt: No space left on device; the disk is full" in errors[0]
    assert list(tiny_disk.iterdir()) == []
    for path in (prepared / "curves").glob("*"):
        path.unlink()


def test_a_truncated_state_is_ignored_with_a_warning(prepared, tmp_path):
    states = tmp_path / "states"
    env = os.environ | {"CHARLM_STATE_DIR": str(states)}
    write_params(tmp_path / "p.yaml", gpt=TINY_GPT | {"max_iters": 10**6}, save_state_every_seconds=0.05)
    proc = start_training(tmp_path / "p.yaml", prepared, env, quiet=True)
    deadline = time.monotonic() + 120
    while not list(states.glob("*.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait(timeout=60)
    (state,) = states.glob("*.pt")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # e.g. a disk that filled mid-copy
    # The same params (the same key): it finds the state, refuses it, starts from step 0.
    rerun = start_training(tmp_path / "p.yaml", prepared, env)
    seen = ""
    while "parameters on" not in seen or "gpt step 0:" not in seen:
        seen += rerun.stdout.readline()
    rerun.kill()
    rerun.communicate(timeout=60)
    assert f"train@gpt: warning: ignoring the saved state {state}: unreadable" in seen
    assert "resuming" not in seen
    for path in leftovers(prepared):
        path.unlink()


# --- side features never cost the run -------------------------------------------------------------


def trained_weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def train_with_states(prepared: Path, tmp_path: Path, name: str, state_dir: Path, every: float):
    write_params(tmp_path / f"{name}.yaml", gpt=TINY_GPT | {"max_iters": 30}, save_state_every_seconds=every)
    args = [a if a != "models/gpt.pt" else str(tmp_path / f"{name}.pt") for a in TRAIN_ARGS]
    env = os.environ | {"CHARLM_STATE_DIR": str(state_dir)}
    proc = stage("train", "gpt", *args, "--params", str(tmp_path / f"{name}.yaml"), cwd=prepared, env=env)
    assert proc.returncode == 0, proc.stderr
    for path in (prepared / "curves").glob("*"):
        path.unlink()  # the next test starts from a work dir without outputs
    return proc, trained_weights(tmp_path / f"{name}.pt")


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_unusable_state_directory_warns_once_and_training_ends_as_without_states(prepared, tmp_path):
    (tmp_path / "a-file").write_text("CHARLM_STATE_DIR under a file cannot be created")
    proc, weights = train_with_states(prepared, tmp_path, "warned", tmp_path / "a-file" / "states", 0.001)
    warnings = [line for line in proc.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 1, proc.stdout
    assert warnings[0].startswith(f"train@gpt: warning: cannot save resumable states in {tmp_path / 'a-file'}")
    assert "training goes on without resumable states" in warnings[0]
    _, plain = train_with_states(prepared, tmp_path, "plain", tmp_path / "unused", 0)
    assert_same_weights(weights, plain)


def test_a_state_directory_that_fills_up_warns_once_and_training_ends_as_without_states(
    prepared, tmp_path, tiny_disk
):
    # The 64 KiB disk takes the directory probe, then not one state of this model: full mid-run.
    proc, weights = train_with_states(prepared, tmp_path, "full", tiny_disk / "states", 0.001)
    warnings = [line for line in proc.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 1, proc.stdout
    assert warnings[0].startswith("train@gpt: warning: cannot save the resumable state at step 1: cannot write")
    assert "No space left on device" in warnings[0]
    assert [p.name for p in (tiny_disk / "states").iterdir()] == []  # no half-written state
    _, plain = train_with_states(prepared, tmp_path, "plain", tmp_path / "unused", 0)
    assert_same_weights(weights, plain)


def test_a_diverged_run_stops_with_one_line_writes_nothing_and_keeps_the_last_good_state(
    prepared, tmp_path, monkeypatch, capsys
):
    import torch

    from charlm import training
    from stages.train import main

    states = tmp_path / "states"
    monkeypatch.setenv("CHARLM_STATE_DIR", str(states))
    monkeypatch.chdir(prepared)
    write_params(tmp_path / "p.yaml", gpt=TINY_GPT | {"max_iters": 30}, save_state_every_seconds=0.001)
    scheduled = training.learning_rate_at
    # An absurd learning rate at step 7 (index 6): its update leaves NaN weights behind.
    monkeypatch.setattr(training, "learning_rate_at", lambda step, c: float("nan") if step == 6 else scheduled(step, c))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as e:
            main("gpt", Path("data/train.bin"), Path("data/val.bin"), Path("data/vocab.json"),
                 tmp_path / "gpt.pt", tmp_path / "gpt.csv", tmp_path / "gpt.json", tmp_path / "p.yaml")
    finally:
        torch.set_num_threads(threads)
    assert e.value.code == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.startswith("train@gpt: error: the weights are not finite (NaN or infinite) after step 7 on cpu")
    assert line.endswith("; the resumable state of step 6 is kept")
    assert not any((tmp_path / name).exists() for name in ("gpt.pt", "gpt.csv", "gpt.json"))
    (state,) = states.glob("*.pt")
    payload = torch.load(state, map_location="cpu", weights_only=True)
    assert payload["step"] == 6 and all(torch.isfinite(w).all() for w in payload["model"].values())


def test_the_evaluate_stage_scores_with_full_context_and_at_a_temperature_when_asked(prepared, tmp_path):
    import json

    import torch

    from charlm.batches import load_tokens
    from charlm.checkpoint import load_checkpoint
    from charlm.evaluation import full_context, split_loss

    windowed = TINY_GPT | {"max_iters": 5, "position": "rope", "attention_window": 4, "n_layer": 2}
    write_params(tmp_path / "p.yaml", gpt=windowed)
    assert stage("train", "gpt", *TRAIN_ARGS, "--params", str(tmp_path / "p.yaml"), cwd=prepared).returncode == 0
    ckpt = load_checkpoint(prepared / "models/gpt.pt")
    net = ckpt.build()
    val = load_tokens(prepared / "data/val.bin", ckpt.tokenizer.dtype)
    reported = []
    for on, temperature in ((False, 1.0), (True, 1.0), (False, 1.25)):
        write_params(tmp_path / "e.yaml", gpt=windowed, evaluate={"full_context": on, "temperature": temperature})
        out = tmp_path / f"m{on}{temperature}.json"
        data = ["--train", "data/train.bin", "--val", "data/val.bin", "--vocab", "data/vocab.json"]
        args = ["gpt", "--checkpoint", "models/gpt.pt", *data, "--metrics", str(out)]
        proc = stage("evaluate", *args, "--params", str(tmp_path / "e.yaml"), cwd=prepared)
        assert proc.returncode == 0, proc.stderr
        context = full_context(net, 16) if on else 0
        expected = split_loss(net, val, 16, torch.device("cpu"), context=context, temperature=temperature)
        reported.append(json.loads(out.read_text())["val_loss"])
        assert reported[-1] == round(expected, 5)
    assert len(set(reported)) == 3
    for path in leftovers(prepared):
        path.unlink()


def test_full_attention_layers_go_through_the_stages(prepared, tmp_path):
    # The checkpoint records the key, so every later stage rebuilds the full layer; generation runs
    # through its block-sized cache past block_size (here 16).
    from charlm.checkpoint import load_checkpoint

    arch = TINY_GPT | {"max_iters": 5, "position": "rope", "attention_window": 4, "n_layer": 2}
    write_params(tmp_path / "p.yaml", gpt=arch | {"full_attention_layers": 1}, sample={"max_new_tokens": 40})
    assert stage("train", "gpt", *TRAIN_ARGS, "--params", str(tmp_path / "p.yaml"), cwd=prepared).returncode == 0
    ckpt = load_checkpoint(prepared / "models/gpt.pt")
    assert ckpt.config["full_attention_layers"] == 1
    net = ckpt.build()
    assert [block.attn.window for block in net.blocks] == [4, 0] and net.receptive_field == 16
    args = ["gpt", "--checkpoint", "models/gpt.pt", "--vocab", "data/vocab.json", "--out", str(tmp_path / "s.txt")]
    proc = stage("sample", *args, "--params", str(tmp_path / "p.yaml"), cwd=prepared)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "s.txt").read_text(encoding="utf-8")) == 41
    for path in leftovers(prepared):
        path.unlink()
