"""Faults outside the user's params: a full disk, an unwritable output, an unexpected exception.
Each is one line naming the file or the cause, a non-zero exit, and nothing half-written. (The train
stage on a real full disk is in test_stages.py, beside its fixtures.)"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from charlm import io
from charlm.errors import DEBUG_ENV, reported_errors
from charlm.io import OutputError


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*out.bin: No space left on device; the disk is full"):
        io.write_bytes(tmp_path / "out.bin", b"x" * 100)
    assert list(tmp_path.iterdir()) == []


def test_an_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "models").write_text("not a directory")
    with pytest.raises(OutputError, match=r"cannot write .*models/gpt.pt: .*; check the path"):
        io.write_bytes(tmp_path / "models" / "gpt.pt", b"x")


def test_an_unexpected_exception_is_one_line_with_a_debug_hint(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as info, reported_errors("train@gpt"):
        {}["missing"]
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train@gpt: error: unexpected KeyError: 'missing'; re-run with {DEBUG_ENV}=1 for the traceback"]
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(KeyError), reported_errors("train@gpt"):
        {}["missing"]


def test_charlm_command_reports_unexpected_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "charlm.cli", "info", str(tmp_path)],  # a directory, not a checkpoint
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
