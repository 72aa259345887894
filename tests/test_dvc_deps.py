"""dvc.yaml's code deps are exactly what each stage imports: none missing (a stale cache), none extra
(needless re-runs). The imports are read from a real interpreter that loaded the stage, so a lazy
or indirect import counts as it does at run time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.helpers import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
if sys.argv[2]:
    # the model the stage builds or loads, imported by name at run time
    importlib.import_module(f"charlm.models.{sys.argv[2]}.model")
root = sys.argv[3]
files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
code = (root + "/charlm/", root + "/stages/")
print(json.dumps(sorted(f[len(root) + 1:] for f in files if f and f.startswith(code))))
"""


def _instances() -> list[tuple[str, str]]:
    out = []
    for name, stage in STAGES.items():
        items = stage.get("matrix", {}).get("model", [""])
        out += [(name, item) for item in items]
    return out


def _listed_code(name: str, item: str) -> set[str]:
    deps = [d.replace("${item.model}", item) for d in STAGES[name]["deps"]]
    code = set()
    for dep in deps:
        if not dep.startswith(("charlm/", "stages/")):
            continue
        if (ROOT / dep).is_dir():  # a directory stands for every source file in it
            code |= {str(p.relative_to(ROOT)) for p in (ROOT / dep).rglob("*.py")}
        else:
            code.add(dep)
    return code


def _imported(name: str, item: str) -> set[str]:
    module = STAGES[name]["cmd"].split()[2]  # python -m stages.<name> ...
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, module, item, str(ROOT)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )
    # stages/__init__.py is empty by design (a package marker): nothing a stage computes can depend on it.
    return set(json.loads(proc.stdout)) - {"stages/__init__.py"}


@pytest.mark.parametrize(("name", "item"), _instances(), ids=lambda v: v or "-")
def test_stage_deps_are_exactly_its_imports(name, item):
    imported, listed = _imported(name, item), _listed_code(name, item)
    assert not imported - listed, f"dvc.yaml stage {name}: imported but not listed (stale cache): {imported - listed}"
    extra = listed - imported
    assert not extra, f"dvc.yaml stage {name}: listed but not imported (needless re-runs): {extra}"


def test_no_hidden_lazy_imports():
    # The probe above sees what importing a stage loads; an import inside a function would escape it.
    # Allowed: the `charlm` command (no stage runs it), typing-only imports, and evaluate's bigram
    # floor (the bigram module, which the probe loads for the bigram stages by the model's name).
    import ast

    allowed = {("charlm/cli.py", None), ("stages/evaluate.py", "charlm.models.bigram")}
    found = []
    for path in sorted([*ROOT.glob("charlm/**/*.py"), *ROOT.glob("stages/*.py")]):
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        typing_only = {
            id(inner)
            for n in tree.body
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
            for inner in ast.walk(n)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("charlm", "stages")):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith(("charlm", "stages"))]
            else:
                continue
            if id(node) in top or id(node) in typing_only or not names:
                continue
            if (rel, None) in allowed or any((rel, name) in allowed for name in names):
                continue
            found.append(f"{rel}:{node.lineno} imports {names} inside a function")
    assert not found, found


def test_every_matrix_lists_the_models_the_library_knows():
    from charlm.params import MODEL_NAMES

    matrices = {name: stage["matrix"]["model"] for name, stage in STAGES.items() if "matrix" in stage}
    assert set(matrices) == {"train", "evaluate", "sample"}
    assert all(tuple(models) == MODEL_NAMES for models in matrices.values()), matrices


def test_python_caches_are_not_code_deps():
    # Directory deps (charlm/models/<model>) would otherwise change whenever Python rewrites bytecode.
    ignored = (ROOT / ".dvcignore").read_text(encoding="utf-8").splitlines()
    assert "__pycache__/" in ignored and "*.pyc" in ignored
