"""The docs stay true: figures quoted from artifacts equal the artifacts, pointers into the docs
resolve, and no document speaks of how the project was made instead of what it is."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks.bench import format_table
from tests.helpers import ROOT

DOC_FILES = ["README.md", "CONTRIBUTING.md", "CHANGELOG.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]


def doc_path(name: str) -> Path:
    return ROOT / name if (ROOT / name).is_file() else ROOT / "docs" / name


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def metrics(model: str) -> dict:
    return json.loads((ROOT / "metrics" / f"{model}.json").read_text(encoding="utf-8"))


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row whose first cell is `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def number(cell: str) -> float:
    """The first number in a cell, commas and bold marks dropped."""
    match = re.search(r"-?\d[\d,]*(\.\d+)?", cell.replace("*", ""))
    assert match, f"no number in {cell!r}"
    return float(match.group().replace(",", ""))


# --- figures against artifacts ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["bigram", "gpt"])
def test_the_readmes_results_table_is_the_committed_metrics(model):
    m = metrics(model)
    cells = table_row(readme(), model)
    # | model | val_loss | val_bpc | train_loss | params | training | tokens/s |
    assert number(cells[1]) == round(m["val_loss"], 4)
    assert number(cells[2]) == round(m["val_bpc"], 3)
    assert number(cells[3]) == round(m["train_loss"], 4)
    assert number(cells[4]) == m["params"]
    assert number(cells[5]) == round(m["train_seconds"], 0 if m["train_seconds"] >= 10 else 1)
    assert m["precision"] in cells[5]
    assert number(cells[6]) == round(m["tokens_per_second"])
    if "val_loss_floor" in m:
        assert f"floor {m['val_loss_floor']:.4f}" in cells[1]


def test_the_readmes_headline_and_reference_class_row_are_the_committed_metrics():
    m = metrics("gpt")
    val = f"{m['val_loss']:.4f}"
    intro = readme().split("\n## ", 1)[0]
    assert f"**{val}**" in intro
    results = readme().split("## Results", 1)[1].split("\n## ", 1)[0]
    assert f"`val_loss_dynamic` (GPT **{m['val_loss_dynamic']:.4f}**)" in results
    # The timing table's row marked as the reference run is the committed metrics, and the Results
    # section names that row's CPU class.
    (row,) = [line for line in readme().splitlines() if line.startswith("| ") and "the reference run" in line]
    cpu_class = row.split("(")[0].strip("| ").strip()
    assert f"with {cpu_class}" in readme().split("## Results", 1)[1].split("\n|", 1)[0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == m["precision"]
    assert number(cells[3]) == round(m["tokens_per_second"])
    assert cells[4] == val


@pytest.mark.parametrize("results", ["results.json", "results-avx2.json", "results-epyc-avx512.json"])
def test_the_performance_page_quotes_the_benchmarks_json(results):
    data = json.loads((ROOT / "benchmarks" / results).read_text(encoding="utf-8"))
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert f"(`benchmarks/{results}`)" in page
    assert format_table(data) in page, f"re-paste `format_table` of benchmarks/{results} into docs/performance.md"


# --- pointers --------------------------------------------------------------------------------------


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings, and the headings themselves."""
    found = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        heading = line.lstrip("#").strip()
        found.add(heading)
        found.add("#" + re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return found


QUOTED_POINTER = re.compile(r"((?:docs/)?[\w-]+\.md) \"([^\"]+)\"")
LINK = re.compile(r"\]\(([^)#\s]+\.md)?(#[\w-]+)?\)")


def test_quoted_pointers_from_code_config_and_docs_resolve():
    sources = tracked("*.py", "*.yaml", "*.toml", "*.md", ".ci/run")
    bad = []
    for source in sources:
        for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            for page, heading in QUOTED_POINTER.findall(line):
                target = doc_path(Path(page).name) if page.startswith("docs/") or source.parent.name == "docs" else None
                target = target if target is not None else ROOT / page
                if not target.is_file() or heading not in anchors(target):
                    bad.append(f"{source.relative_to(ROOT)}:{lineno}: {page} \"{heading}\"")
    assert not bad, "pointers to no such page or heading:\n" + "\n".join(bad)


def test_no_pointer_to_a_readme_section_that_moved_to_docs():
    # The README is a newcomer's page; code and config point into docs/ instead.
    bad = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in tracked("*.py", "*.yaml", "*.toml")
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"README \"|README [A-Z][a-z]+\b", line) and p.name != "test_docs.py"
    ]
    assert not bad, bad


def test_markdown_links_resolve():
    bad = []
    for name in DOC_FILES:
        source = doc_path(name)
        for target, anchor in LINK.findall(source.read_text(encoding="utf-8")):
            page = (source.parent / target) if target else source
            if target.startswith("http") or not page.exists():
                if not target.startswith("http"):
                    bad.append(f"{name}: {target}")
                continue
            if anchor and anchor not in anchors(page):
                bad.append(f"{name}: {target}{anchor}")
    assert not bad, bad


def test_the_index_lists_every_docs_page():
    text = readme()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in text, f"README's documentation index misses docs/{page.name}"


# --- the product speaks of itself ------------------------------------------------------------------

ORDINALS = "first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth"
MAKING = re.compile(
    rf"\b(({ORDINALS}|this|next|previous|earlier|last|one|a) round)s?\b"
    r"|\bsessions?\b|\bworkplace\b|\bre-recorded\b|\bVMs?\b|where this was built|\btoday'?s\b",
    re.IGNORECASE,
)


def test_no_document_docstring_or_comment_speaks_of_how_the_project_was_made():
    sources = [
        p
        for p in tracked("*.md", "*.py", "*.yaml", "*.toml", ".ci/run")
        if p.name not in ("CHANGELOG.md", "test_docs.py")
    ]
    bad = []
    for source in sources:
        in_tests = source.parent.name == "tests"
        for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if in_tests:
                # pytest's own word: fixtures of scope "session".
                line = re.sub(r"scope=\"session\"|[Ss]ession(-wide|'s temp)", "", line)
            if MAKING.search(line):
                bad.append(f"{source.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not bad, "the product speaks of itself (history goes to CHANGELOG.md):\n" + "\n".join(bad)


def test_the_readme_stays_a_newcomers_page():
    assert len(readme().splitlines()) <= 220


TEST_POINTER = re.compile(r"(tests/test_\w+\.py)::(test_\w+)")


def test_pointers_to_the_test_that_proves_a_claim_resolve():
    bad = []
    for source in tracked("*.py", "*.md"):
        for test_file, name in TEST_POINTER.findall(source.read_text(encoding="utf-8")):
            target = ROOT / test_file
            if not target.is_file() or not re.search(rf"^def {name}\(", target.read_text(encoding="utf-8"), re.M):
                bad.append(f"{source.relative_to(ROOT)}: {test_file}::{name}")
    assert not bad, "no such test:\n" + "\n".join(bad)


def test_the_gpu_command_in_the_docs_is_the_benchmarks_gpu_recipe():
    from benchmarks.common import GPU_RECIPE
    from charlm.params import GPTParams

    page = (ROOT / "docs" / "devices.md").read_text(encoding="utf-8")
    command = page[page.index("dvc exp run -S device=cuda -S gpt.") :].split("```")[0]
    settings = dict(re.findall(r"-S gpt\.(\w+)=(\S+)", command))
    expected = GPTParams.of(**GPU_RECIPE).flat()
    assert settings.keys() == GPU_RECIPE.keys()
    assert all(str(expected[k]) == v or float(expected[k]) == float(v) for k, v in settings.items()), settings


SIZES = {"block_size", "n_layer", "n_head", "n_embd", "dropout", "bias"}


@pytest.mark.parametrize("doc", ["README.md", "models.md", "recipe.md"])
def test_the_lecture_architecture_command_undoes_every_switch_the_defaults_turn_on(doc):
    import dataclasses

    import yaml

    from charlm.models.gpt.config import GPTArchitecture

    text = doc_path(doc).read_text(encoding="utf-8")
    start = text.index("dvc exp run -n lecture-arch")
    command = re.split(r"```|`\s", text[start:])[0]
    settings = {k: yaml.safe_load(v) for k, v in re.findall(r"-S gpt\.(\w+)=([^\s`]+)", command)}
    gpt = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["gpt"] | settings
    lecture = GPTArchitecture()
    switches = [f.name for f in dataclasses.fields(GPTArchitecture) if f.name not in SIZES]
    differ = {name: gpt[name] for name in switches if gpt.get(name, getattr(lecture, name)) != getattr(lecture, name)}
    assert not differ, f"{doc}: the lecture-arch command leaves {differ} on"
