"""Every module of the package imports on its own, so an import circle (module A needs B while B
is still importing A) fails here whichever module a user imports first.

One fresh interpreter imports each module in turn with every `stepwise_lit` module dropped from
`sys.modules` before it: for the package that is a fresh interpreter per module, while torch and
transformers are imported once (an interpreter per module takes minutes on a small machine)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import stepwise_lit
from tests.helpers.paths import REPO

MODULES = sorted(info.name for info in pkgutil.walk_packages(stepwise_lit.__path__, "stepwise_lit."))
IMPORT_EACH_ALONE = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "stepwise_lit" or m.startswith("stepwise_lit.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def test_every_module_imports_alone():
    assert {"stepwise_lit.module", "stepwise_lit.logprobs.forward", "stepwise_lit.logprobs.reference", "stepwise_lit.objective.stepwise",
            "stepwise_lit.models.export", "stepwise_lit.data.batch"} <= set(MODULES)
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, json.dumps(MODULES)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert failures == {}, "\n".join(failures.values())


def test_an_import_circle_is_caught(tmp_path):
    """The check itself: a two-module circle through `from ... import` fails."""
    package = tmp_path / "circle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from circle.b import B\nA = 1\n")
    (package / "b.py").write_text("from circle.a import A\nB = 2\n")
    script = IMPORT_EACH_ALONE.replace('"stepwise_lit"', '"circle"').replace('"stepwise_lit."', '"circle."')
    done = subprocess.run([sys.executable, "-c", script, json.dumps(["circle.a"])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(tmp_path)})
    assert "circle.a" in json.loads(done.stdout.strip().splitlines()[-1])


STAGES = ("grading", "data", "models", "logprobs", "objective", "rewards", "evaluation", "online")
"""The stage folders in data-flow order (docs/contract.md): a module imports its own stage, lower
stages and the base modules (errors, imports, faults), never a higher stage or a top-level module."""
BASE = ("errors", "imports", "faults")


def stage_rank(module: str) -> int:
    """0 for the base modules, 1.. for the stages in order, one more for the top level (commands, module)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in BASE:
        return 0
    if len(parts) > 2 and parts[1] in STAGES:
        return 1 + STAGES.index(parts[1])
    return 1 + len(STAGES)


def import_edges(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere: at the top, inside functions, under
    ``if __name__ == "__main__"``. ``from p import m`` counts as importing module ``p.m``."""
    files = {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
             for path in (root / package).rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module
                           for alias in node.names]
            else:
                continue
            edges[name] |= {target for target in targets if target in files and target != name}
    return edges


def import_problems(root: Path, package: str) -> list[str]:
    """Imports from a higher stage to a lower one, and every import circle (a strongly connected set
    of modules, found by following the edges from each module)."""
    edges = import_edges(root, package)
    problems = [f"{source} (stage {stage_rank(source)}) imports {target} (stage {stage_rank(target)})"
                for source, targets in edges.items() for target in sorted(targets)
                if stage_rank(target) > stage_rank(source)]

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in edges[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    reach = {name: reachable(name) for name in edges}
    circles = {frozenset({name} | {other for other in reach[name] if name in reach[other]})
               for name in edges if name in reach[name]}
    problems += [f"import circle: {' <-> '.join(sorted(circle))}" for circle in circles]
    return problems


def test_no_import_goes_up_a_stage_or_closes_a_circle():
    assert import_problems(REPO, "stepwise_lit") == []


@pytest.mark.parametrize("b_source", [
    "def late():\n    from circle.a import A\n",
    "if __name__ == '__main__':\n    import circle.a\n",
])
def test_a_circle_through_a_function_or_main_is_caught(tmp_path, b_source):
    """`a` imports `b` at the top; `b` imports `a` only inside a function or under ``__main__``:
    importing either alone works, so only the static check sees the circle."""
    package = tmp_path / "circle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from circle.b import late\nA = 1\n")
    (package / "b.py").write_text(b_source)
    assert import_problems(tmp_path, "circle") == ["import circle: circle.a <-> circle.b"]


def test_an_import_up_a_stage_is_caught(tmp_path):
    """``data`` (stage 2) importing ``models`` (stage 3) inside a function is reported."""
    for folder in ("stepwise_lit", "stepwise_lit/data", "stepwise_lit/models"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "stepwise_lit/models/loading.py").write_text("X = 1\n")
    (tmp_path / "stepwise_lit/data/tokenize.py").write_text("def f():\n    from stepwise_lit.models.loading import X\n")
    assert import_problems(tmp_path, "stepwise_lit") == [
        "stepwise_lit.data.tokenize (stage 2) imports stepwise_lit.models.loading (stage 3)"]
