"""The study command (`python -m bench.study`) on its smoke budget, and its paired sign test."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import GSM8K_PATH
from bench.study.methods import METRICS, SFT_START
from bench.study.statistics import sign_test

REPO = Path(__file__).resolve().parents[2]


def test_sign_test_matches_hand_counts():
    """Exact two-sided sign test, p = min(1, 2 P(X <= min(up, down))), X ~ Binomial(n, 1/2):
    - 5 up: 2 * C(5,0) / 32 = 0.0625 (the smallest p five seeds can give);
    - 4 up, 1 down: 2 * (C(5,0) + C(5,1)) / 32 = 12/32 = 0.375;
    - 1 up, 1 down, 1 tie: the tie is dropped, 2 * (1 + 2) / 4 > 1, so 1.0.
    """
    assert sign_test([0.1] * 5) == {"wins": 5, "losses": 0, "ties": 0, "p": pytest.approx(0.0625)}
    assert sign_test([0.1, 0.2, -0.3, 0.1, 0.05]) == {"wins": 4, "losses": 1, "ties": 0, "p": pytest.approx(0.375)}
    assert sign_test([0.1, -0.1, 0.0]) == {"wins": 1, "losses": 1, "ties": 1, "p": 1.0}


@pytest.mark.slow
@pytest.mark.skipif(not GSM8K_PATH.exists(), reason="shared GSM8K data not present")
def test_smoke_study_writes_its_table_and_plots(tmp_path):
    """`--smoke` (1 seed, 2 + 2 steps, plain DPO and stepwise on both tasks, online on arithmetic) writes
    a table with every metric of every method, rates and AUROCs in [0, 1], the paired comparison, both
    plots, and the online run's rounds (2 rounds of 1 step; the test's backend solves half the samples,
    so each of the 8 prompts per round gives a first-error pair), into `--results`, the runs into `--out`."""
    out, results = tmp_path / "study", tmp_path / "results"
    subprocess.run([sys.executable, "-m", "bench.study", "--smoke", "--out", str(out), "--results", str(results),
                    "--online-generator", "tests.helpers.online_helpers.SolvingGenerator"], check=True, cwd=REPO,
                   capture_output=True)
    assert not any((out / name).exists() for name in ("table.json", "table.md", "runs.json", "f1.png"))
    assert (out / "runs" / "arithmetic-online-seed0" / "online").is_dir()
    table = json.loads((results / "table.json").read_text())
    summary = table["summary"]
    assert set(summary) == {"arithmetic", "gsm8k"}
    for task, methods in summary.items():
        assert set(methods) == {SFT_START, "plain_dpo", "stepwise"} | ({"online"} if task == "arithmetic" else set())
        assert set(methods[SFT_START]) == {"solve_rate"}
        for name in set(methods) - {SFT_START}:
            metrics = methods[name]
            assert set(metrics) == set(METRICS)
            for values in metrics.values():
                assert list(values["by_seed"]) == ["0"]
                assert 0.0 <= values["mean"] <= 1.0
        paired = methods["stepwise"]["solve_rate"]["vs_plain_dpo"]
        assert paired["wins"] + paired["losses"] + paired["ties"] == 1 and 0.0 <= paired["p"] <= 1.0
    markdown = (results / "table.md").read_text()
    assert "| method | seeds | " + " | ".join(METRICS) + " |" in markdown
    assert "| arithmetic | online | 0 | 8 8 | 0 | 0.500 → 0.500 |" in markdown
    assert (results / "solve_rate.png").stat().st_size > 0 and (results / "f1.png").stat().st_size > 0
    runs = json.loads((results / "runs.json").read_text())
    assert len(runs) == 2 * 3 + 1  # per task: the SFT policy and the two methods; online on arithmetic
    online = next(run for run in runs if run["method"] == "online")
    assert online["online"]["pairs"] == [8, 8] and online["online"]["sample_accuracy"] == [0.5, 0.5]
    assert table["finished_runs"] == table["expected_runs"] == 7


def test_bench_scripts_import_only_the_shared_module():
    """Every bench script imports `bench.common` and no other script (before: packing.py and
    profile_step.py took their fixtures from compare_trl.py, every script its helpers from harness.py);
    the study's files import only `bench.common` and the study's own modules."""
    bench = REPO / "bench"
    scripts = sorted(bench.glob("*.py"))
    names = {path.stem for path in scripts} | {"harness", "study"}
    for path in [*scripts, *sorted((bench / "study").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top not in names - {"common"}, (path.name, module)
                assert top != "tests", (path.name, module)
                if top == "bench":
                    allowed = module == "bench.common" or (path.parent.name == "study" and module.startswith("bench.study"))
                    assert allowed, (path.name, module)


def test_write_puts_the_command_seed_and_figures_into_a_results_file(tmp_path):
    """`python bench/lora_checkpoint.py --zephyr --write FILE.md`, run from another folder, writes the
    markdown under the command line and seed and the JSON summary beside it; zephyr-7b-beta's base by
    hand: embeddings and head 2 · 32,000 · 4,096, per layer q and o 4,096², k and v 4,096 · 1,024,
    the MLP 3 · 4,096 · 14,336 and two norms of 4,096, 32 layers, and the final norm."""
    layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    parameters = 2 * 32000 * 4096 + 32 * layer + 4096
    path = tmp_path / "results" / "zephyr.md"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "lora_checkpoint.py"), "--zephyr", "--write", str(path)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"zephyr_base_parameters": parameters}
    text = path.read_text()
    assert text.startswith("# What a LoRA checkpoint holds")
    assert f"Written by `python bench/lora_checkpoint.py --zephyr --write {path}` on " in text and "; seed 0 (" in text
    assert f"zephyr-7b-beta base: {parameters:,} parameters, {2 * parameters / 1e9:.2f} GB in bfloat16" in text
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["summary"] == {"zephyr_base_parameters": parameters}
    assert summary["command"] == f"python bench/lora_checkpoint.py --zephyr --write {path}" and summary["seed"].startswith("0")
