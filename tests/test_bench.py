"""The benchmark's own logic: recipes are typed params, and each target reads its measure."""

import json
from pathlib import Path

import pytest

from benchmarks.bench import TARGETS, format_table
from benchmarks.common import FAST_RECIPE, LECTURE_GPT
from charlm.params import GPTParams

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results.json"


def test_the_recipes_are_params_the_loader_accepts():
    for recipe in (LECTURE_GPT, FAST_RECIPE):
        GPTParams.of(**recipe)
    with pytest.raises(TypeError, match="learning_rat"):
        GPTParams.of(**(FAST_RECIPE | {"learning_rat": 1e-2}))  # a typo fails


def test_a_measure_past_its_target_is_marked_in_the_table():
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    assert all(row.endswith("| yes |") for row in format_table(results).splitlines() if "<=" in row or ">=" in row)
    results["guard_default"]["recipe_over_float32_adamw"] = TARGETS["recipe_over_float32_adamw"].limit + 0.01
    (row,) = [line for line in format_table(results).splitlines() if "recipe vs float32 AdamW" in line]
    assert row.endswith("| **no** |")
    results["bigram"]["val_loss"] = results["bigram"]["val_loss_floor"] + 0.004
    (row,) = [line for line in format_table(results).splitlines() if "val_loss - floor" in line]
    assert "+0.0040" in row and row.endswith("| yes |")
