"""The suite's result does not depend on the user's shell (docs/pipeline.md "Offline"): a CHARLM_DATA_FILE left
exported for an offline run, or a forced CPU class, must not leak into the tests' stages."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # stage and training subprocesses: seconds each



def test_stage_tests_pass_with_a_hostile_shell_environment(tmp_path):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the test corpus\n")
    hostile = {
        "CHARLM_DATA_FILE": str(wrong),  # the `prepared` fixture's download stage would read it
        "CHARLM_CPU_BF16": "not-a-number",  # would fail every training stage
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "bad_input and params0",
         "tests/test_stages.py"],
        cwd=ROOT, env=os.environ | hostile, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed" in proc.stdout
