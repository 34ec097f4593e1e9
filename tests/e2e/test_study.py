"""The study command (`python -m bench.study`) on its smoke budget, and its statistics."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.study.methods import METHODS, METRICS
from bench.study.report import plateau
from bench.study.statistics import bootstrap_interval, sign_test, t_interval

REPO = Path(__file__).resolve().parents[2]
SMOKE = ["--smoke", "--sampler", "tests.helpers.study_helpers.HalfRightSampler"]


def test_sign_test_matches_hand_counts():
    """Exact two-sided sign test, p = min(1, 2 P(X <= min(up, down))), X ~ Binomial(n, 1/2):
    - 5 up: 2 * C(5,0) / 32 = 0.0625 (the smallest p five seeds can give);
    - 4 up, 1 down: 2 * (C(5,0) + C(5,1)) / 32 = 12/32 = 0.375;
    - 1 up, 1 down, 1 tie: the tie is dropped, 2 * (1 + 2) / 4 > 1, so 1.0.
    """
    assert sign_test([0.1] * 5) == {"wins": 5, "losses": 0, "ties": 0, "p": pytest.approx(0.0625)}
    assert sign_test([0.1, 0.2, -0.3, 0.1, 0.05]) == {"wins": 4, "losses": 1, "ties": 0, "p": pytest.approx(0.375)}
    assert sign_test([0.1, -0.1, 0.0]) == {"wins": 1, "losses": 1, "ties": 1, "p": 1.0}


def test_intervals_match_hand_computation():
    """Differences 0.1, 0.2, 0.3: mean 0.2, s = 0.1, t_{0.975, 2} = 4.303, half width
    4.303 * 0.1 / sqrt(3) = 0.24843, so [-0.04843, 0.44843]. Five equal differences: every
    bootstrap mean is 0.1. The bootstrap interval of 1, 2, 3 lies inside [1, 3] and holds the mean."""
    low, high = t_interval([0.1, 0.2, 0.3])
    assert low == pytest.approx(-0.04843, abs=1e-5) and high == pytest.approx(0.44843, abs=1e-5)
    assert bootstrap_interval([0.1] * 5) == pytest.approx((0.1, 0.1))
    low, high = bootstrap_interval([1.0, 2.0, 3.0])
    assert 1.0 <= low < 2.0 < high <= 3.0
    assert t_interval([0.1]) is None and bootstrap_interval([0.1]) is None


def test_plateau_reads_the_last_quarter_of_the_curve():
    """Points at 100..400 with rates 0.1, 0.3, 0.5, 0.52: the last quarter starts at 300 (3/4 of 400),
    endpoint gain 0.52 - 0.5 = 0.02, least-squares slope over (300, 0.5), (400, 0.52) is 0.0002 per
    step, times the quarter's 100 steps = 0.02."""
    curve = [{"step": step, "solve_rate": rate} for step, rate in zip((100, 200, 300, 400), (0.1, 0.3, 0.5, 0.52))]
    values = plateau(curve)
    assert values["from_step"] == 300 and values["points"] == 2
    assert values["endpoint_gain"] == pytest.approx(0.02) and values["fitted_gain"] == pytest.approx(0.02)


@pytest.mark.slow
def test_smoke_study_writes_its_tables_and_caches_the_base(tmp_path):
    """`--smoke` with a sampler that solves half the samples (sample i is right for even i, else slips):
    the pool of 8 prompts x 8 samples is half right, every prompt gives a first-error pair whose sides part
    at the rejected side's first flagged step (its slip), RFT has one
    distinct right sample per prompt; every method has every metric for seed 0 and a paired row against
    plain DPO + NLL; the sweeps choose their one point. A second run with the same cache does not
    rebuild the base (base.json untouched) and says so in its table."""
    cache, results = tmp_path / "cache", tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench.study", *SMOKE, "--out", str(tmp_path / "first"), "--results",
                           str(results), "--cache", str(cache)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "base: building in" in done.stdout
    table = json.loads((results / "table.json").read_text())
    pool = table["base"]["pool"]
    assert pool["samples"] == 64 and pool["right_answer_share"] == 0.5 and pool["right_all_steps_share"] == 0.5
    assert pool["pairs"] == {"first_error_branch": 8, "best_vs_worst": 0, "no_pair": 0, "wrong_chosen": 0,
                             "parting_at_first_error": 8} and pool["right_rows"] == 8
    assert set(table["summary"]) == set(METHODS)
    for name, metrics in table["summary"].items():
        assert set(metrics) >= set(METRICS) - {"within_response_auroc"}, name
        assert all(list(values["by_seed"]) == ["0"] for values in metrics.values())
        assert (name == "dpo_nll") != ("vs_baseline" in metrics["solve_rate"])
    assert {family: (point["lr"], point["nll_weight"]) for family, point in table["sweeps"].items()} == {
        "sft": (1e-4, 1.0), "preference": (1e-4, 1.0)}
    assert table["finished_test_runs"] == table["expected_test_runs"] == len(METHODS)
    markdown = (results / "table.md").read_text()
    assert "| 0.500 | 0.500 | 0.000 | 8 | 0 | 8 | 0 | 0 | 8 |" in markdown and "| online_nll | solve_rate |" in markdown
    assert all((results / name).stat().st_size > 0 for name in ("curve.png", "solve_rate.png", "paired.png"))
    (folder,) = cache.iterdir()
    built = (folder / "base.json").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-m", "bench.study", *SMOKE, "--methods", "dpo_nll", "--out",
                            str(tmp_path / "second"), "--cache", str(cache)], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"base: cached in {folder}" in again.stdout and (folder / "base.json").stat().st_mtime_ns == built
    assert "(the base: cached" in (tmp_path / "second" / "table.md").read_text()
    refused = subprocess.run([sys.executable, "-m", "bench.study", *SMOKE, "--out", str(tmp_path / "second"), "--cache",
                              str(cache)], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "already holds a study's runs" in refused.stderr


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
