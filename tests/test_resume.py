"""Resumable training: a state saved mid-run continues to exactly the uninterrupted result."""

import os
import time
from pathlib import Path

import pytest
import torch

from charlm import resume as saved
from charlm.models import build_model, config_for
from charlm.params import GPTParams
from tests.helpers import token_splits, train_on_cpu

KEY = "k" * 64


@pytest.fixture(scope="module")
def splits():
    return token_splits(300)


def gpt_params(**overrides) -> GPTParams:
    values = dict(
        batch_size=8,
        block_size=16,
        max_iters=12,
        eval_interval=4,
        eval_iters=2,
        n_layer=1,
        n_head=2,
        n_embd=16,
        dropout=0.1,  # dropout draws from torch's generator: it must be restored too
        precision="float32",
        learning_rate=3e-3,
        warmup_iters=2,
        min_lr_ratio=0.1,  # a learning rate that changes every step: the schedule must reach the restored optimizers
        weight_decay=0.1,
        grad_clip=1.0,
        optimizer="muon",
        ema_decay=0.8,
    )
    return GPTParams.of(**(values | overrides))


def run(splits, cfg, seed=5, **kwargs):
    vocab_size, tr, va = splits
    torch.manual_seed(seed)
    model = build_model("gpt", config_for("gpt", cfg, vocab_size))
    return model, train_on_cpu(model, tr, va, cfg, 5, **kwargs)


def saving_every_step(directory: Path):
    paths = []

    def save(state: saved.TrainingState) -> None:
        paths.append(directory / f"step{state.step}.pt")
        saved.save_state(paths[-1], state, KEY)

    return paths, dict(save_state=save, save_every_seconds=0.0)


@pytest.mark.parametrize(("optimizer", "batch_windows"), [("muon", "random"), ("adamw", "random"), ("muon", "epoch")])
def test_resumed_run_equals_the_uninterrupted_one(splits, tmp_path, optimizer, batch_windows):
    # With epoch windows, the stops fall mid-epoch (an epoch of this split is ~2 steps): the sampler's
    # place must come from the state.
    cfg = gpt_params(optimizer=optimizer, batch_windows=batch_windows)
    paths, saving = saving_every_step(tmp_path)
    whole, whole_result = run(splits, cfg, **saving)
    assert [int(p.stem.removeprefix("step")) for p in paths] == list(range(1, cfg.train.max_iters))
    for stop in (5, 8):  # mid-way between evaluations, and right before one
        state = saved.load_state(paths[stop - 1], KEY)
        assert state.step == stop and [p.step for p in state.curve] == [s for s in (0, 4, 8) if s < stop]
        # Another seed builds other initial weights: everything must come from the state.
        resumed, result = run(splits, cfg, seed=99, resume_from=state)
        for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b), (stop, name)
        assert result.curve == whole_result.curve


def test_a_state_for_other_params_or_a_damaged_file_is_refused(splits, tmp_path):
    paths, saving = saving_every_step(tmp_path)
    run(splits, gpt_params(max_iters=3), **saving)
    good = paths[0]
    assert saved.load_state(good, KEY).step == 1
    with pytest.raises(saved.StateError, match="other params"):
        saved.load_state(good, "x" * 64)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    for bad in (truncated, garbage):
        with pytest.raises(saved.StateError, match="unreadable"):
            saved.load_state(bad, KEY)


def test_the_key_changes_with_anything_the_result_depends_on():
    base = {"params": {"seed": 1, "gpt": {"n_embd": 128}}, "data": {"train.bin": "aa"}, "code": {"m": "c1"}}
    key = saved.state_key(base)
    assert saved.state_key(dict(base)) == key
    assert saved.state_key(base | {"params": {"seed": 1, "gpt": {"n_embd": 64}}}) != key
    assert saved.state_key(base | {"data": {"train.bin": "ab"}}) != key
    assert saved.state_key(base | {"code": {"m": "c2"}}) != key


def test_code_fingerprint_covers_the_loaded_project_modules():
    import charlm.training  # noqa: F401 - loaded on purpose

    found = saved.code_fingerprint()
    assert "charlm.training" in found and "charlm.resume" in found
    assert not any(name.startswith("torch") for name in found)
    assert found["charlm.resume"] == saved.file_sha256(saved.__file__)


def test_states_are_found_by_key_from_any_workspace_and_stale_ones_removed(tmp_path):
    here, queued = tmp_path / "project", tmp_path / "exps" / "tmp123"
    mine = saved.state_path(tmp_path, "train@gpt", here, KEY)
    mine.write_bytes(b"state")
    # A queued experiment runs in another copy of the workspace: the same key finds the state.
    assert saved.find_state(tmp_path, KEY) == mine
    assert saved.state_path(tmp_path, "train@gpt", queued, KEY) != mine
    # A new key in the same workspace and stage (a changed param) supersedes the old state...
    newer = saved.state_path(tmp_path, "train@gpt", here, "n" * 64)
    sibling = saved.state_path(tmp_path, "train@gpt", queued, "s" * 64)  # ...not another workspace's
    bigram = saved.state_path(tmp_path, "train@bigram", here, "b" * 64)
    old = saved.state_path(tmp_path, "train@gpt", tmp_path / "gone", "o" * 64)
    for path in (sibling, bigram, old):
        path.write_bytes(b"state")
    weeks_ago = time.time() - saved.STALE_AFTER_SECONDS - 60
    os.utime(old, (weeks_ago, weeks_ago))
    assert set(saved.remove_stale_states(tmp_path, newer)) == {mine, old}
    assert sibling.exists() and bigram.exists()


def test_state_dir_is_the_env_override_or_the_user_cache(tmp_path):
    assert saved.default_state_dir({"CHARLM_STATE_DIR": str(tmp_path)}) == tmp_path
    assert saved.default_state_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/charlm/train-state")
    assert saved.default_state_dir({}) == Path.home() / ".cache/charlm/train-state"


# --- a state that cannot be written never costs the run ---------------------------------------------


def test_an_unusable_state_directory_is_one_warning_and_no_state(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    warnings = []
    writer = saved.StateWriter(tmp_path / "a-file" / "states" / "s.pt", KEY, warnings.append)
    assert writer.check() is False
    (line,) = warnings
    assert line.startswith(f"warning: cannot save resumable states in {tmp_path / 'a-file' / 'states'}: ")
    assert "training goes on without resumable states" in line and "CHARLM_STATE_DIR" in line


def test_a_state_write_that_fails_mid_run_warns_once_and_the_run_ends_as_without_states(splits, tmp_path, monkeypatch):
    import errno

    from charlm import io

    warnings = []
    writer = saved.StateWriter(tmp_path / "states" / "s.pt", KEY, warnings.append)
    assert writer.check()
    real_fsync, calls = io.os.fsync, []

    def full_after_two(fd):
        calls.append(fd)
        if len(calls) > 1:  # the first state fits; then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", full_after_two)
    cfg = gpt_params()
    model_a, a = run(splits, cfg, save_state=writer, save_every_seconds=0.0)
    model_b, b = run(splits, cfg)
    assert writer.saved_step == 1 and writer.failed is not None
    (line,) = warnings
    assert "cannot save the resumable state at step 2: cannot write" in line and "No space left on device" in line
    assert [p.val_loss for p in a.curve] == [p.val_loss for p in b.curve]
    for (name, x), (_, y) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert saved.load_state(tmp_path / "states" / "s.pt", KEY).step == 1  # the good state is left whole
