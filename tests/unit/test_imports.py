"""Every module of the package imports on its own, so an import circle (module A needs B while B
is still importing A) fails here whichever module a user imports first.

One fresh interpreter imports each module in turn with every `stepwise_lit` module dropped from
`sys.modules` before it: for the package that is a fresh interpreter per module, while torch and
transformers are imported once (an interpreter per module takes minutes on a small machine)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

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
