"""``generator: vllm`` from the user's seat: ``train.py fit --config configs/online_tiny.yaml`` with
the online rounds and the solve-rate evaluation on the vLLM backend, in one process and under DDP
(2 processes, gloo), and ``python -m stepwise_lit.evaluate`` with it. The embedded model gets 2
heads (head_dim 32: vLLM's CPU kernel refuses the configs' 16). Skipped where vLLM is not
installed (CI); bench/vllm_venv.sh makes a venv where they run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (bench/vllm_venv.sh makes a venv with it)")

from tests.helpers.paths import REPO  # noqa: E402

pytestmark = pytest.mark.slow
SAMPLES, PROMPTS_PER_ROUND = 4, 8
SMALL = [  # online_tiny.yaml shrunk to seconds: 2 warm-up steps, then 2 rounds of 8 prompts x 4 samples
    "--model.tiny_model.num_heads", "2", "--trainer.max_epochs", "3", "--model.sft_warmup_steps", "2",
    "--data.synthetic_train_size", "64", "--data.synthetic_val_size", "16",
    "--online.prompts_per_round", str(PROMPTS_PER_ROUND), "--online.steps_per_round", "2",
    "--online.generation.num_samples", str(SAMPLES), "--online.generation.max_new_tokens", "64",
    "--online.pairs.reference_fallback", "true",
    "--evaluation.max_prompts", "16", "--evaluation.generation.max_new_tokens", "64",
    "--online.generation.vllm.kv_cache_memory_bytes", str(2**28), "--evaluation.generation.vllm.kv_cache_memory_bytes",
    str(2**28),
]
VLLM = ["--online.generator", "vllm", "--evaluation.generator", "vllm"]


def fit(root: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "online_tiny.yaml"),
               *SMALL, "--trainer.default_root_dir", str(root), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        return subprocess.run(command, cwd=root.parent, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as error:  # show where it stood
        tail = (error.stderr or b"")[-4000:]
        pytest.fail(f"train.py ran past 300 s; stderr ends: {tail.decode(errors='replace') if isinstance(tail, bytes) else tail}")


def metrics(root: Path) -> list[dict]:
    import csv

    return list(csv.DictReader((root / "csv" / "version_0" / "metrics.csv").open()))


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("vllm") / "run"
    result = fit(root, *VLLM)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, result


def test_online_tiny_runs_two_rounds_on_one_vllm_engine(vllm_run):
    """Both rounds are written (8 prompts x 4 samples each, pairs, summary); one engine served the
    two rounds and the three evaluations (built once), and val/solve_rate is logged per epoch."""
    root, result = vllm_run
    for index in (0, 1):
        folder = root / "online" / f"round-{index}"
        solutions = [json.loads(line) for line in (folder / "solutions.jsonl").read_text().splitlines()]
        assert len(solutions) == PROMPTS_PER_ROUND * SAMPLES
        assert len({row["prompt_id"] for row in solutions}) == PROMPTS_PER_ROUND
        assert (folder / "pairs.jsonl").stat().st_size > 0
        assert json.loads((folder / "summary.json").read_text())["round"] == index
    assert result.stderr.count("vllm: engine built") == 1
    solve_rates = [row["val/solve_rate"] for row in metrics(root) if row.get("val/solve_rate")]
    assert len(solve_rates) == 3


def test_evaluate_with_vllm_reports_what_the_transformers_backend_reports(vllm_run, tmp_path):
    """Greedy decoding of the run's last checkpoint: the two backends' reports agree on the solve
    rate and on every example completion."""
    root, _ = vllm_run
    reports = {}
    for backend in ("transformers", "vllm"):
        output = tmp_path / backend
        command = [sys.executable, "-m", "stepwise_lit.evaluate", "--config", str(REPO / "configs" / "online_tiny.yaml"),
                   *SMALL, "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--evaluation.generator", backend,
                   "--output", str(output)]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr[-4000:]
        reports[backend] = json.loads((output / "report.json").read_text())
    assert reports["vllm"]["solve_rate"] == reports["transformers"]["solve_rate"]
    assert reports["vllm"]["examples"] == reports["transformers"]["examples"]
    assert reports["vllm"]["examples"][0]["completion"]


def test_under_ddp_every_rank_generates_its_share_once(tmp_path):
    """2 processes: each builds its own engine and samples its half of the round's prompts; the
    round file holds every prompt once, with its 4 samples."""
    root = tmp_path / "ddp"
    result = fit(root, *VLLM, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    solutions = [json.loads(line) for line in (root / "online" / "round-0" / "solutions.jsonl").read_text().splitlines()]
    ids = [row["prompt_id"] for row in solutions]
    assert sorted(set(ids)) == sorted(str(i) for i in range(PROMPTS_PER_ROUND))
    assert all(ids.count(i) == SAMPLES for i in set(ids))
    assert result.stderr.count("vllm: engine built") == 2
