"""The study command (bench/study.py) on its smoke budget, and its paired sign test."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"


def load_study():
    """bench/study.py as a module (bench is no package; dataclasses need it in sys.modules)."""
    spec = importlib.util.spec_from_file_location("bench_study", REPO / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sign_test_matches_hand_counts():
    """Exact two-sided sign test, p = min(1, 2 P(X <= min(up, down))), X ~ Binomial(n, 1/2):
    - 5 up: 2 * C(5,0) / 32 = 0.0625 (the smallest p five seeds can give);
    - 4 up, 1 down: 2 * (C(5,0) + C(5,1)) / 32 = 12/32 = 0.375;
    - 1 up, 1 down, 1 tie: the tie is dropped, 2 * (1 + 2) / 4 > 1, so 1.0.
    """
    sign_test = load_study().sign_test
    assert sign_test([0.1] * 5) == {"wins": 5, "losses": 0, "ties": 0, "p": pytest.approx(0.0625)}
    assert sign_test([0.1, 0.2, -0.3, 0.1, 0.05]) == {"wins": 4, "losses": 1, "ties": 0, "p": pytest.approx(0.375)}
    assert sign_test([0.1, -0.1, 0.0]) == {"wins": 1, "losses": 1, "ties": 1, "p": 1.0}


@pytest.mark.slow
@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K data not present")
def test_smoke_study_writes_its_table_and_plots(tmp_path):
    """`--smoke` (1 seed, 4 + 4 steps, plain DPO and stepwise on both tasks, online on arithmetic) writes
    a table with every metric of every method, rates and AUROCs in [0, 1], the paired comparison, both
    plots, and the online run's rounds (2 of 2 steps; the test's backend solves half the samples, so
    each of the 8 prompts per round gives a first-error pair)."""
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, str(REPO / "bench" / "study.py"), "--smoke", "--out", str(out),
                    "--online-generator", "tests.helpers.online_helpers.SolvingGenerator"], check=True, cwd=REPO, capture_output=True,
                   env=env)
    study = load_study()
    table = json.loads((out / "table.json").read_text())
    summary = table["summary"]
    assert set(summary) == {"arithmetic", "gsm8k"}
    for task, methods in summary.items():
        assert set(methods) == {study.SFT_START, "plain_dpo", "stepwise"} | ({"online"} if task == "arithmetic" else set())
        assert set(methods[study.SFT_START]) == {"solve_rate"}
        for name in set(methods) - {study.SFT_START}:
            metrics = methods[name]
            assert set(metrics) == set(study.METRICS)
            for values in metrics.values():
                assert list(values["by_seed"]) == ["0"]
                assert 0.0 <= values["mean"] <= 1.0
        paired = methods["stepwise"]["solve_rate"]["vs_plain_dpo"]
        assert paired["wins"] + paired["losses"] + paired["ties"] == 1 and 0.0 <= paired["p"] <= 1.0
    markdown = (out / "table.md").read_text()
    assert "| method | seeds | " + " | ".join(study.METRICS) + " |" in markdown
    assert "| arithmetic | online | 0 | 8 8 | 0 | 0.500 → 0.500 |" in markdown
    assert (out / "solve_rate.png").stat().st_size > 0 and (out / "f1.png").stat().st_size > 0
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 2 * 3 + 1  # per task: the SFT policy and the two methods; online on arithmetic
    online = next(run for run in runs if run["method"] == "online")
    assert online["online"]["pairs"] == [8, 8] and online["online"]["sample_accuracy"] == [0.5, 0.5]
    assert table["finished_runs"] == table["expected_runs"] == 7
