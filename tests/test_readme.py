"""The README's commands are the ones that run: CI's `.ci/run` calls the README's test line as written."""

import re

from tests.helpers import ROOT


def fenced_commands(section: str) -> list[str]:
    """The commands (comments stripped) of the first bash block under a README `## section`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    body = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S)
    assert block, f"no bash block under ## {section}"
    return [line.split("  #", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readmes_test_command_as_written():
    (test_command,) = fenced_commands("Tests")
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text(encoding="utf-8").splitlines()]
    assert test_command in ci_lines


def test_quick_start_is_two_lines_install_and_run_then_install_and_test():
    run, test = fenced_commands("Quick start")
    assert run.startswith("pip install -e . && ") and run.endswith("dvc repro")
    assert test == fenced_commands("Tests")[0]
