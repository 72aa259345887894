"""End to end: the real dvc.yaml on a tiny corpus in a throw-away git repo.

Checks that every stage runs, a second `dvc repro` runs nothing, each kind of change re-runs exactly
the stages that read it, metrics compare across experiments, and an absent device fails cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.helpers import ROOT, make_corpus

pytestmark = pytest.mark.slow  # minutes: real DVC runs and stage subprocesses

ALL_STAGES = {
    "download",
    "encode",
    "split",
    "train@bigram",
    "train@gpt",
    "evaluate@bigram",
    "evaluate@gpt",
    "sample@bigram",
    "sample@gpt",
    "plot",
}
README_EXP_SHOW_DROP = "charlm/|stages/|data/|models/|metrics/curves/"
TINY = {
    "bigram": {"batch_size": 16, "block_size": 8, "max_iters": 40, "eval_interval": 20, "eval_iters": 2},
    "gpt": {
        "batch_size": 8,
        "block_size": 16,
        "max_iters": 20,
        "eval_interval": 10,
        "eval_iters": 2,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 16,
        "warmup_iters": 2,
        "precision": "float32",
    },
    "sample": {"max_new_tokens": 40},
}


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(args: str, project: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args.split()], project, env, check)


def start_queue(project: Path, env: dict[str, str], jobs: int = 1) -> None:
    """`dvc queue start`, its output to a file: it forks a daemon that inherits stdout/stderr, and a
    captured pipe would then stay open for as long as that daemon lives."""
    with open(project.parent / "queue-start.log", "ab") as log:  # outside the git workspace
        cmd = [sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)]
        subprocess.run(cmd, cwd=project, env=env, stdout=log, stderr=log, timeout=120, check=True)


def stop_queue(project: Path, env: dict[str, str]) -> None:
    """`dvc queue stop`, then end any worker of this project still alive: DVC's worker can hang after
    its monitor decided to shut down while a task was still running ("monitor: shutting down due to
    empty queue" in its log, then never exiting; seen once in this suite)."""
    import psutil

    dvc("queue stop", project, env, check=False)
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["cwd"] == str(project) and ("queue-worker" in cmdline or "queue start" in cmdline):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass  # it exited on its own meanwhile


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def would_run(project: Path, env: dict[str, str]) -> set[str]:
    return ran_stages(dvc("repro --dry", project, env).stdout)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    identity = {"GIT_AUTHOR_NAME": "charlm test", "GIT_AUTHOR_EMAIL": "test@example.invalid"}
    identity |= {"GIT_COMMITTER_NAME": "charlm test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")}
    return keep | identity | {"HOME": str(home), "DVC_NO_ANALYTICS": "1", "PYTHONHASHSEED": "0"}


def make_project(base: Path, corpus_text: str, env: dict[str, str]) -> Path:
    """A copy of this project under `base`, tiny params, `corpus_text` as its corpus, git-committed."""
    project = base / "charlm"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "tmp", "cache")
    for name in ("charlm", "stages", ".dvc"):
        shutil.copytree(ROOT / name, project / name, ignore=ignore)
    # The outputs' .gitignore files too, as a clone has them: after an interrupted `dvc repro` DVC
    # had not written the entries of the stages that did finish, and git would pick those outputs up.
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "data/.gitignore", "models/.gitignore"):
        if (ROOT / name).exists():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, project / name)
    corpus = base / "corpus.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"] = {"url": str(corpus), "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()}
    for section, values in TINY.items():
        params[section] |= values
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], project, env)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "tiny project"], project, env)
    return project


@pytest.fixture(scope="module")
def project(tmp_path_factory, env) -> Path:
    """A copy of this project, tiny params, a corpus made here, committed, with one `dvc repro` done."""
    project = make_project(tmp_path_factory.mktemp("e2e"), make_corpus(300), env)
    first = dvc("repro", project, env)
    assert ran_stages(first.stdout) == ALL_STAGES, first.stdout
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "reference run"], project, env)
    return project


def _no_newline(n: int, alphabet: str, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


ODD_CORPORA = {
    # a DNA-like single line: no newline, 4 characters
    "no-newline": _no_newline(6000, "ACGT", 0),
    # 300 printable characters (past one byte: int16 tokens), no newline
    "300-characters": _no_newline(20000, "".join(chr(c) for c in range(0x100, 0x100 + 300)), 1),
    # one character repeated: a vocabulary of one
    "one-character": "a" * 5000,
}


@pytest.mark.parametrize("kind", list(ODD_CORPORA))
def test_any_corpus_runs_end_to_end_with_the_default_prompt(tmp_path, env, kind):
    text = ODD_CORPORA[kind]
    project = make_project(tmp_path, text, env)
    out = dvc("repro", project, env)
    assert ran_stages(out.stdout) == ALL_STAGES, out.stdout
    start = "\n" if "\n" in text else min(text)  # the empty prompt's rule: newline, else token 0
    for model in ("bigram", "gpt"):
        sample = (project / f"samples/{model}.txt").read_text(encoding="utf-8")
        assert len(sample) == 1 + TINY["sample"]["max_new_tokens"] and sample[0] == start
        assert set(sample) <= set(text)
    assert (project / "metrics/loss_curves.png").read_bytes().startswith(b"\x89PNG")


def test_every_stage_wrote_its_outputs(project):
    for path in ("data/input.txt", "data/vocab.json", "data/tokens.bin", "data/train.bin", "data/val.bin"):
        assert (project / path).stat().st_size > 0, path
    for model in ("bigram", "gpt"):
        metrics = json.loads((project / f"metrics/{model}.json").read_text())
        assert {"train_loss", "val_loss", "val_bpc", "params", "train_seconds", "tokens_per_second"} <= set(metrics)
        assert metrics["overfit_gap"] == pytest.approx(metrics["val_loss"] - metrics["train_loss"], abs=2e-5)
        assert metrics["device"] == "cpu"
        assert metrics["device_name"].endswith(")") and "native bf16" in metrics["device_name"]  # the CPU that trained
        assert 0 < metrics["val_loss"] < 10
        curve = (project / f"metrics/curves/{model}.csv").read_text().splitlines()
        assert curve[0] == "step,train_loss,val_loss,average_train_loss,average_val_loss" and len(curve) >= 3
        sample = (project / f"samples/{model}.txt").read_text()
        assert len(sample) == 1 + TINY["sample"]["max_new_tokens"]  # the newline it starts from plus the new text
        assert (project / f"models/{model}.pt").is_file()
    assert (project / "metrics/loss_curves.png").read_bytes().startswith(b"\x89PNG")
    # Each panel's title quotes its model's exact metrics, as `dvc metrics show` prints them.
    with Image.open(project / "metrics/loss_curves.png") as png:
        titles = png.text["Title"].split(" | ")
    for model, title in zip(("bigram", "gpt"), titles, strict=True):
        metrics = json.loads((project / f"metrics/{model}.json").read_text())
        assert title.startswith(f"{model}: val_loss {metrics['val_loss']:.4f}, train_loss {metrics['train_loss']:.4f}")
    bigram = json.loads((project / "metrics/bigram.json").read_text())
    assert bigram["val_loss_floor"] > 0


def test_second_repro_runs_nothing(project, env):
    out = dvc("repro", project, env).stdout
    assert ran_stages(out) == set(), out
    assert dvc("status", project, env).stdout.strip().endswith("Data and pipelines are up to date.")


def edited_params(project: Path, section: str, key: str | None, value) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    if key is None:
        params[section] = value
    else:
        params[section][key] = value
    return params


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("sample", "temperature", 0.8, {"sample@bigram", "sample@gpt"}),
        ("device", None, "auto", ALL_STAGES - {"download", "encode", "split", "plot"}),
        # The downstream stages of these follow from the changed outputs (test_experiment_* runs one).
        ("gpt", "max_iters", 30, {"train@gpt"}),
        ("split", "val_fraction", 0.2, {"split"}),
        ("evaluate", "full_context", True, {"evaluate@bigram", "evaluate@gpt"}),
        ("evaluate", "temperature", 1.08, {"evaluate@bigram", "evaluate@gpt"}),
    ],
)
def test_a_param_change_reruns_exactly_its_readers(project, env, section, key, value, expected):
    """`dvc repro --dry` lists the stages whose own deps changed (not yet those downstream of them)."""
    original = (project / "params.yaml").read_text()
    try:
        (project / "params.yaml").write_text(
            yaml.safe_dump(edited_params(project, section, key, value), sort_keys=False)
        )
        assert would_run(project, env) == expected
    finally:
        (project / "params.yaml").write_text(original)


def test_editing_sampling_code_reruns_only_sampling(project, env):
    path = project / "charlm" / "sampling.py"
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        assert would_run(project, env) == {"sample@bigram", "sample@gpt"}
    finally:
        path.write_text(original)


@pytest.mark.parametrize("module", ["model.py", "kernels.py"])
def test_editing_gpt_code_leaves_the_bigram_alone(project, env, module):
    path = project / "charlm" / "models" / "gpt" / module
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        assert would_run(project, env) == {"train@gpt", "evaluate@gpt", "sample@gpt"}  # all read models/gpt/
    finally:
        path.write_text(original)


def test_same_params_same_metrics(project, env):
    """Determinism: re-training from scratch reproduces every metric except the timings."""
    before = {m: json.loads((project / f"metrics/{m}.json").read_text()) for m in ("bigram", "gpt")}
    dvc("repro -f train@gpt evaluate@gpt", project, env)
    after = json.loads((project / "metrics/gpt.json").read_text())
    timing = {"train_seconds", "tokens_per_second"}
    assert {k: v for k, v in after.items() if k not in timing} == {
        k: v for k, v in before["gpt"].items() if k not in timing
    }


def test_experiment_and_metrics_diff(project, env):
    exp = dvc("exp run -S gpt.max_iters=30 -n longer", project, env)
    assert ran_stages(exp.stdout) == {"train@gpt", "evaluate@gpt", "sample@gpt", "plot"}, exp.stdout
    diff = dvc("metrics diff --json", project, env).stdout
    changed = json.loads(diff)
    assert "val_loss" in changed["metrics/gpt.json"]
    assert "metrics/bigram.json" not in changed  # the bigram stages stayed cached
    shown = dvc("exp show --no-pager --csv", project, env).stdout
    # The README's readable view: params and metrics that differ, no dependency-hash columns.
    readable = dvc(f"exp show --no-pager --csv --only-changed --drop {README_EXP_SHOW_DROP}", project, env).stdout
    header = readable.splitlines()[0].split(",")
    assert "gpt.max_iters" in header and any(h.endswith("val_loss") for h in header)
    assert not [h for h in header if h.startswith(("charlm/", "stages/", "data/", "models/"))], header
    assert "bigram.max_iters" not in header  # unchanged across the experiments: left out
    assert "longer" in shown and "val_loss" in shown
    run(["git", "checkout", "--", "."], project, env)
    dvc("checkout", project, env)


def test_absent_device_fails_naming_it(project, env):
    proc = dvc("exp run -S device=mps", project, env, check=False)
    assert proc.returncode != 0
    assert "device = 'mps' is not available on this machine (available: cpu" in proc.stdout + proc.stderr
    run(["git", "checkout", "--", "."], project, env)


def test_killed_stage_under_dvc_leaves_nothing_and_the_next_repro_completes(project, env):
    import signal
    import time

    import psutil

    original = (project / "params.yaml").read_text()
    long = edited_params(project, "gpt", "max_iters", 10**6)
    long["gpt"]["eval_interval"] = 10
    (project / "params.yaml").write_text(yaml.safe_dump(long, sort_keys=False))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "train@gpt"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen, deadline = "", time.monotonic() + 120
        while "gpt step 20:" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        children = psutil.Process(proc.pid).children(recursive=True)
        # DVC runs the cmd through a shell: signal the python process itself, not the shell.
        stage = [
            p
            for p in children
            if p.cmdline()[:3] == [sys.executable, "-m", "stages.train"]
            or (p.name().startswith("python") and "stages.train" in p.cmdline())
        ]
        assert stage, seen
        stage[0].send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        (project / "params.yaml").write_text(original)
    assert proc.returncode != 0
    assert "interrupted; no output was written" in seen + out
    leftovers = [p.name for d in ("models", "metrics/curves") for p in (project / d).iterdir() if ".tmp" in p.name]
    assert leftovers == []
    assert not (project / "models" / "gpt.pt").exists()  # DVC removed the old output; nothing half-written replaced it
    dvc("repro", project, env)
    assert dvc("status", project, env).stdout.strip().endswith("Data and pipelines are up to date.")
    assert (project / "models" / "gpt.pt").is_file()


def test_queued_sweep_runs_two_experiments_in_parallel(project, env):
    """`dvc exp run --queue` a grid, `dvc queue start -j 2`; both finish with distinct results."""
    import time

    dvc("exp run --queue -S gpt.n_embd=16,32 -S threads=1", project, env)
    start_queue(project, env, jobs=2)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = dvc("queue status", project, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    stop_queue(project, env)
    assert status.count("Success") >= 2, status
    rows = json.loads(dvc("exp show --json", project, env).stdout)
    results = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = data.get("metrics", {}).get("metrics/gpt.json", {}).get("data", {})
                if params.get("threads") == 1 and "val_loss" in metrics:
                    results[params["gpt"]["n_embd"]] = metrics
    assert set(results) == {16, 32}, results
    assert results[16]["params"] < results[32]["params"]
    assert results[16]["val_loss"] != results[32]["val_loss"]


def test_share_through_a_dvc_remote(project, env, tmp_path):
    """Push to a local-directory remote; a fresh clone pulls, has nothing to re-run and can sample;
    an experiment made in the clone travels back with `dvc exp push`; `dvc artifacts get` fetches each
    model by name."""
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    dvc(f"remote add -d shared {remote}", project, env)
    run(["git", "commit", "-qam", "add a DVC remote"], project, env)
    dvc("push", project, env)
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    dvc("pull", clone, env)
    assert ran_stages(dvc("repro", clone, env).stdout) == set()
    sample = run(
        [sys.executable, "-m", "charlm.cli", "sample", "models/gpt.pt", "-n", "20", "--temperature", "0"],
        clone,
        env | {"PYTHONPATH": str(clone)},
    )
    assert len(sample.stdout) == 1 + 20 + 1  # prompt "\n", 20 characters, final newline
    dvc("exp run -S sample.temperature=0.5 -n from-clone", clone, env)
    dvc("exp push origin from-clone", clone, env)
    assert "from-clone" in dvc("exp list", project, env).stdout
    # The model registry: a version registered as GTO does (an annotated `<name>@v<semver>` tag), then
    # each checkpoint fetched by its artifact name, from the repository and its remote.
    for name in ("gpt", "bigram"):
        run(["git", "tag", "-a", f"{name}@v0.1.0", "-m", f"Registering artifact {name} version v0.1.0"], project, env)
        got = tmp_path / f"registry-{name}.pt"
        dvc(f"artifacts get {project} {name} -o {got}", tmp_path, env)
        assert got.read_bytes() == (project / "models" / f"{name}.pt").read_bytes()


RESUMABLE = {"gpt": {"max_iters": 600, "eval_interval": 100}, "save_state_every_seconds": 0.05}


def resumable_project(base: Path, env: dict[str, str]) -> Path:
    project = make_project(base, make_corpus(300), env)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gpt"] |= RESUMABLE["gpt"]
    params["save_state_every_seconds"] = RESUMABLE["save_state_every_seconds"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "longer gpt, frequent states"], project, env)
    return project


def state_mtimes(states: Path) -> list[float]:
    found = []
    for path in states.glob("train-gpt-*.pt"):
        try:
            found.append(path.stat().st_mtime)
        except FileNotFoundError:  # replaced by a newer state between the listing and the stat
            pass
    return found


def kill_training_mid_run(project: Path, env: dict[str, str], states: Path) -> None:
    """`dvc repro` until the GPT's training has saved a state, then kill -9 its train process."""
    import psutil

    repro = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=project, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    curve = project / "metrics/curves/gpt.csv"
    # Mid-run: past the evaluation at step 200 (the live curve shows it), states saved since.
    while time.monotonic() < deadline and not (curve.exists() and "\n200," in curve.read_text()):
        time.sleep(0.02)
    # And a state saved after that evaluation: on a loaded machine the next save can take a while.
    seen = time.time()
    while time.monotonic() < deadline and not any(mtime > seen for mtime in state_mtimes(states)):
        time.sleep(0.02)
    trainers = [
        p for p in psutil.Process(repro.pid).children(recursive=True) if "stages.train" in " ".join(p.cmdline())
    ]
    assert trainers, "the GPT's training ended before it could be killed"
    for p in trainers:
        p.send_signal(signal.SIGKILL)
    assert repro.wait(timeout=120) != 0


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def without_timings(metrics_file: Path) -> dict:
    metrics = json.loads(metrics_file.read_text())
    return {k: v for k, v in metrics.items() if k not in ("train_seconds", "tokens_per_second")}


def test_training_killed_under_dvc_resumes_to_the_uninterrupted_result(tmp_path, env):
    states = tmp_path / "states"
    env = env | {"CHARLM_STATE_DIR": str(states)}
    whole = resumable_project(tmp_path / "whole", env | {"CHARLM_STATE_DIR": str(tmp_path / "other-states")})
    dvc("repro", whole, env | {"CHARLM_STATE_DIR": str(tmp_path / "other-states")})

    project = resumable_project(tmp_path / "killed", env)
    kill_training_mid_run(project, env, states)
    (state,) = states.glob("train-gpt-*.pt")
    kept = state.read_bytes()

    # A changed param does not resume the state: it starts from step 0 and supersedes it.
    params_file = project / "params.yaml"
    original = params_file.read_text()
    changed = yaml.safe_load(original)
    changed["gpt"]["learning_rate"] = 0.002
    params_file.write_text(yaml.safe_dump(changed, sort_keys=False))
    out = dvc("repro train@gpt", project, env).stdout
    assert "train@gpt: " in out and "resuming" not in out
    assert not state.exists()  # superseded: its params changed
    params_file.write_text(original)

    state.write_bytes(kept)
    out = dvc("repro", project, env).stdout
    resumed_at = int(re.search(r"train@gpt: resuming from step ([\d,]+) of 600", out).group(1).replace(",", ""))
    assert 200 < resumed_at < 600
    assert list(states.glob("*.pt")) == []  # finished: nothing left to resume
    a, b = checkpoint_tensors(whole / "models/gpt.pt"), checkpoint_tensors(project / "models/gpt.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timings(project / "metrics/gpt.json") == without_timings(whole / "metrics/gpt.json")
    assert (project / "metrics/curves/gpt.csv").read_text() == (whole / "metrics/curves/gpt.csv").read_text()

    # A queued experiment runs in a fresh copy of the workspace: it finds the state by its key. (A new
    # save interval re-runs the train stages for DVC; it is not part of the key: the result is the same.)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "resumed run"], project, env)
    state.write_bytes(kept)
    dvc("exp run --queue -n resumed -S save_state_every_seconds=0.06", project, env)
    start_queue(project, env)
    deadline = time.monotonic() + 300
    while "Success" not in (status := dvc("queue status", project, env).stdout) and time.monotonic() < deadline:
        assert "Failed" not in status, dvc("queue logs resumed", project, env, check=False).stdout
        time.sleep(1)
    stop_queue(project, env)
    assert "train@gpt: resuming from step" in dvc("queue logs resumed", project, env).stdout
    assert list(states.glob("*.pt")) == []
    dvc("exp apply resumed", project, env)
    b = checkpoint_tensors(project / "models/gpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_timings(project / "metrics/gpt.json") == without_timings(whole / "metrics/gpt.json")


def running_progress(shown: object) -> list[dict]:
    """The progress metrics of every running experiment in `dvc exp show --json` output."""
    found = []
    if isinstance(shown, dict):
        if (shown.get("executor") or {}).get("state") == "running":
            for rev in shown.get("revs", []):
                metrics = ((rev.get("data") or {}).get("metrics") or {}).get("metrics/progress/gpt.json") or {}
                if metrics.get("data"):
                    found.append(metrics["data"])
        for value in shown.values():
            found += running_progress(value)
    elif isinstance(shown, list):
        for value in shown:
            found += running_progress(value)
    return found


def test_a_queued_experiment_shows_its_step_and_losses_while_it_runs(tmp_path, env):
    env = env | {"CHARLM_STATE_DIR": str(tmp_path / "states")}
    project = resumable_project(tmp_path / "live", env)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gpt"] |= {"max_iters": 3000, "eval_interval": 50}  # long enough to be watched
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "a long run to watch"], project, env)
    dvc("exp run --queue -n watched", project, env)
    start_queue(project, env)
    try:
        deadline, seen = time.monotonic() + 300, []
        while time.monotonic() < deadline and not any(p.get("step", 0) > 0 for p in seen):
            shown = dvc("exp show --json", project, env, check=False)
            # `exp show` fails now and then while the queue worker copies its temp workspace
            # (".dvc/tmp/exps/<tmp>/.dvc does not exist"): DVC's race, not the progress file's.
            if shown.returncode == 0:
                seen = running_progress(json.loads(shown.stdout))
            time.sleep(1)
        live = [p for p in seen if p.get("step", 0) > 0]
        assert live, "no running experiment showed its progress"
        assert live[0]["max_iters"] == 3000 and live[0]["val_loss_estimate"] > 0
    finally:
        dvc("queue kill watched", project, env, check=False)
        stop_queue(project, env)
