"""What `dvc.yaml` says, for code that needs it outside DVC: the benchmark and the tests run a stage's
command as DVC would, and `charlm info` finds a model's metrics where the evaluate stage writes them.
dvc.yaml stays the one place those commands and paths are written."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml


def _stages(dvc_yaml: Path) -> dict:
    return yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]


def stage_args(name: str, dvc_yaml: Path) -> list[str]:
    """The arguments dvc.yaml gives the stage `name` (`train@gpt` for a matrix stage's model), after
    `python -m stages.<stage>`."""
    name, _, model = name.partition("@")
    words = shlex.split(_stages(dvc_yaml)[name]["cmd"].replace("${item.model}", model))
    if words[:3] != ["python", "-m", f"stages.{name}"]:
        raise ValueError(f"{dvc_yaml}: stage {name}'s cmd does not start with python -m stages.{name}")
    return words[3:]


def evaluate_metrics_path(dvc_yaml: Path, model: str) -> Path | None:
    """Where the evaluate stage writes `model`'s metrics, relative to dvc.yaml's directory; None when
    there is no readable dvc.yaml with an evaluate stage (outside a charlm project)."""
    try:
        stage = _stages(dvc_yaml)["evaluate"]
        (template,) = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage["metrics"]]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    return dvc_yaml.parent / template.replace("${item.model}", model)
