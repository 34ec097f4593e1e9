"""The online loop inside `fit` (`--online.*`, `stepwise_lit.online.training.OnlineRounds`) run the
way a user runs it: `train.py fit` with a YAML file. Generation is `tests.helpers.online_helpers.SolvingGenerator`
(right and slipped solutions computed from the prompt), so rounds have pairs without a trained
policy; the rule verifier, pair building, round files, the data side and training are the package's.

The run: epoch 0 trains 4 SFT warm-up steps on 16 embedded pairs (batch 4), then every epoch is a
round: 4 prompts x 4 samples, `first_error_branch` pairs, 3 optimizer steps; three rounds, the
reference re-frozen from the policy every second round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepwise_lit.cli import main
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.data.sampling import RoundSampler
from stepwise_lit.errors import DataFormatError, SettingError
from stepwise_lit.models.generate import GenerationSettings
from stepwise_lit.online.training import OnlineRounds
from stepwise_lit.rewards import ArithmeticStepVerifier
from tests.helpers.entry import merged, run_entry, write_config, write_pairs
from tests.helpers.paths import REPO

WARMUP_STEPS, STEPS_PER_ROUND, PROMPTS_PER_ROUND, SAMPLES = 4, 3, 4, 4
VERIFIER = {"class_path": "stepwise_lit.rewards.ArithmeticStepVerifier"}
ONLINE = {
    "seed_everything": 0,
    "trainer": {"max_steps": -1, "max_epochs": 4, "reload_dataloaders_every_n_epochs": 1, "val_check_interval": None,
                "limit_val_batches": 1},
    "model": {"sft_warmup_steps": WARMUP_STEPS},
    "data": {"synthetic_train_size": 16, "synthetic_max_value": 30},
    "online": {"enabled": True, "verifier": VERIFIER, "prompts_per_round": PROMPTS_PER_ROUND,
               "steps_per_round": STEPS_PER_ROUND, "generator": "tests.helpers.online_helpers.SolvingGenerator",
               "reference_refresh_rounds": 2,
               "generation": {"do_sample": True, "num_samples": SAMPLES, "max_new_tokens": 64}},
}


def online_config(folder: Path, cache_dir: Path, **changes) -> Path:
    return write_config(folder, merged(ONLINE, changes), cache_dir)


def round_files(root: Path) -> dict[str, bytes]:
    """Every round file (relative path -> bytes), but the timing summaries."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "online").rglob("*.jsonl"))}


def final_policy(root: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {name: value for name, value in checkpoint["state_dict"].items() if name.startswith("policy.")}


def calls(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("calls-*.jsonl")) for line in path.read_text().splitlines()]


def environment(calls_dir: Path) -> dict[str, str]:
    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    inherited = {k: v for k, v in os.environ.items() if k != "PL_GLOBAL_SEED"}
    return {**inherited, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "ONLINE_CALLS_DIR": str(calls_dir)}


def train(config: Path, calls_dir: Path, *args: str) -> subprocess.CompletedProcess:
    calls_dir.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), *args],
                          cwd=config.parent, env=environment(calls_dir), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def probe(folder: Path) -> dict:
    return {"class_path": "tests.helpers.online_helpers.ReferenceProbe", "init_args": {"path": str(folder / "probe.jsonl")}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> Path:
    """Three rounds after the warm-up, the reference refreshed every second round, in one
    process, with a checkpoint after every step."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    config = online_config(folder, cache_dir, trainer={"callbacks": [EVERY_STEP, probe(folder)]})
    result = train(config, folder / "calls")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


EVERY_STEP = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"every_n_train_steps": 1, "save_last": True}}


# --------------------------------------------------------------------------- the sampler


def test_round_sampler_hands_out_every_pair_once_before_any_twice():
    """size 3, 7 positions: two whole permutations of {0, 1, 2}, then one more pair; the same
    order again for the same seed."""
    order = list(RoundSampler(3, 7, seed=5))
    assert len(order) == 7
    assert sorted(order[:3]) == sorted(order[3:6]) == [0, 1, 2]
    assert order == list(RoundSampler(3, 7, seed=5))
    assert {tuple(RoundSampler(3, 7, seed=s)) for s in range(6)} != {tuple(order)}


def test_train_on_round_gives_steps_per_round_batches_of_the_file(tmp_path, cache_dir):
    """5 pairs, batch 2, 4 batches: 8 rows drawn from the file's 5 (each once before any twice);
    an empty pairs file is refused, naming it."""
    rows = write_pairs(tmp_path / "pairs.jsonl", 5)
    data = StepwiseDataModule(path="synthetic", synthetic_train_size=8, synthetic_val_size=0, batch_size=2,
                              max_prompt_length=64, cache_dir=str(cache_dir))
    data.setup("fit")
    data.train_on_round(tmp_path / "pairs.jsonl", round_index=0, num_batches=4)
    batches = list(data.train_dataloader())
    assert len(batches) == 4
    drawn = [int(i) for batch in batches for i in batch["row_index"]]
    assert sorted(drawn[:5]) == list(range(5)) and len(drawn) == 8
    assert len(data.train_dataset) == len(rows) == 5
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFormatError, match="empty.jsonl"):
        data.train_on_round(tmp_path / "empty.jsonl", round_index=1, num_batches=4)


# ------------------------------------------------------------------------- the user's run


def test_online_fit_writes_each_round_before_training_and_logs_it(uninterrupted):
    """Rounds 0-2 (epochs 1-3): 4 prompts x 4 samples in solutions.jsonl, one first-error pair
    per prompt (samples 0/2 right, 1/3 slipped), readable as stepwise data; the run trains
    4 + 3 x 3 steps, and metrics.csv has the round figures per epoch."""
    root = uninterrupted / "run"
    for index in (0, 1, 2):
        folder = root / "online" / f"round-{index}"
        solutions = [json.loads(line) for line in (folder / "solutions.jsonl").read_text().splitlines()]
        assert len(solutions) == PROMPTS_PER_ROUND * SAMPLES
        assert [s["correct"] for s in solutions[:4]] == [True, False, True, False]
        pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
        assert len(pairs) == PROMPTS_PER_ROUND
        for pair in pairs:  # sample 0 against sample 1, which slips at step 1
            assert min(pair["rejected_step_scores"]) == -1 and min(pair["chosen_step_scores"]) == 1
        summary = json.loads((folder / "summary.json").read_text())
        assert (summary["pairs"], summary["skipped_prompts"], summary["sample_accuracy"]) == (4, 0, 0.5)
        assert summary["training_s"] > 0 and summary["steps"] == STEPS_PER_ROUND
    # round 1 samples the next prompts of the pool
    first = {json.loads(line)["prompt"] for line in (root / "online/round-0/pairs.jsonl").read_text().splitlines()}
    second = {json.loads(line)["prompt"] for line in (root / "online/round-1/pairs.jsonl").read_text().splitlines()}
    assert not first & second
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == WARMUP_STEPS + 3 * STEPS_PER_ROUND
    metrics = (root / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for name in ("online/pairs", "online/generation_s", "online/scoring_s", "online/training_s"):
        column = header.index(name)
        assert [line.split(",")[column] for line in metrics[1:] if line.split(",")[column]] != []
    assert len(calls(uninterrupted / "calls")) == 3  # one generate call per round


@pytest.mark.slow
def test_sigkill_in_a_round_then_resume_gives_the_same_pairs_and_weights(uninterrupted, tmp_path, cache_dir):
    """SIGKILL at the end of step 9 (the second step of round 1, before its checkpoint);
    `--ckpt_path last` resumes at step 8 of round 1, reads both rounds from disk (no generate
    call for them after the kill) and ends with the uninterrupted run's round files and weights
    (the reference refresh of round 2 included)."""
    kill = {"class_path": "tests.helpers.online_helpers.KillAtStep", "init_args": {"step": 9, "marker": str(tmp_path / "killed")}}
    config = online_config(tmp_path, cache_dir, trainer={"callbacks": [EVERY_STEP, probe(tmp_path), kill]})
    killed = train(config, tmp_path / "calls")
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "killed").exists()
    assert len(calls(tmp_path / "calls")) == 2  # rounds 0 and 1
    resumed = train(config, tmp_path / "calls", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(calls(tmp_path / "calls")) == 3  # round 2 only: nothing generated twice
    assert round_files(tmp_path / "run") == round_files(uninterrupted / "run")
    expected, got = final_policy(uninterrupted / "run"), final_policy(tmp_path / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_reference_refresh_every_second_round(uninterrupted):
    """`reference_refresh_rounds: 2`, at the first step of each epoch: the warm-up starts from the
    reference's weights; at round 0 the reference is the policy again (re-frozen after the
    warm-up), at round 1 it is not (the policy trained 3 steps since), at round 2 it is (refreshed)."""
    records = [json.loads(line) for line in (uninterrupted / "probe.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["reference_is_policy"]) for r in records] == [(0, True), (1, True), (2, False), (3, True)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trainer": {"reload_dataloaders_every_n_epochs": 0}}, "trainer.reload_dataloaders_every_n_epochs: 1"),
        ({"trainer": {"max_epochs": 1}}, "trainer.max_epochs"),
        ({"online": {"reference_refresh_rounds": 1}, "model": {"reference": "none", "sft_warmup_steps": 0}},
         "online.reference_refresh_rounds"),
        ({"model": {"reference": "precomputed", "sft_warmup_steps": 0}}, "model.reference: precomputed"),
    ],
    ids=["no-reload", "no-round-epoch", "refresh-without-copy", "precomputed-reference"],
)
def test_online_settings_it_cannot_run_fail_at_start_naming_the_setting(tmp_path, cache_dir, capsys, changes, message):
    config = write_config(tmp_path, merged(merged(ONLINE, changes), {}), cache_dir)
    outcome = run_entry(main, ["fit", "--config", str(config)], capsys)
    assert outcome.code != 0
    assert message in outcome.err


def test_online_settings_are_checked_when_built():
    with pytest.raises(SettingError, match="online.verifier"):
        OnlineRounds(enabled=True)
    with pytest.raises(SettingError, match="online.generator: cannot import module 'nowhere' of 'nowhere.Backend'"):
        OnlineRounds(enabled=True, verifier=ArithmeticStepVerifier(), generator="nowhere.Backend")
    with pytest.raises(SettingError, match="online.steps_per_round: must be at least 1"):
        OnlineRounds(steps_per_round=0)
    with pytest.raises(SettingError, match="online.generation.num_samples"):
        OnlineRounds(enabled=True, verifier=ArithmeticStepVerifier(), generation=GenerationSettings(num_samples=1))


def test_a_new_run_in_a_folder_with_rounds_stops_before_training(uninterrupted, tmp_path, cache_dir, capsys):
    """A fresh `fit` (no --ckpt_path) whose run folder holds rounds would read them back as its
    own: it stops, naming the folder, and leaves the rounds as they were."""
    before = round_files(uninterrupted / "run")
    config = online_config(tmp_path, cache_dir, trainer={"default_root_dir": str(uninterrupted / "run")})
    outcome = run_entry(main, ["fit", "--config", str(config)], capsys)
    assert outcome.code != 0 and "holds the rounds of an earlier run" in outcome.err
    assert round_files(uninterrupted / "run") == before


@pytest.mark.slow
def test_two_process_ddp_round_samples_each_prompt_once(tmp_path, cache_dir):
    """DDP, 2 processes, one round of 5 prompts: rank 0 samples prompts 0, 2, 4 and rank 1
    prompts 1, 3 (each exactly once), rank 0 writes all 5 x 4 solutions in prompt order, and
    each rank trains the round's 3 steps."""
    config = online_config(tmp_path, cache_dir, trainer={"devices": 2, "strategy": "ddp", "max_epochs": 2},
                           online={"prompts_per_round": 5}, data={"batch_size": 2})
    result = train(config, tmp_path / "calls")
    assert result.returncode == 0, result.stderr[-3000:]
    by_rank = {call["rank"]: call["prompts"] for call in calls(tmp_path / "calls")}
    solutions = [json.loads(line) for line in (tmp_path / "run/online/round-0/solutions.jsonl").read_text().splitlines()]
    prompts = [s["prompt"] for s in solutions[::SAMPLES]]
    assert [s["prompt_id"] for s in solutions[::SAMPLES]] == ["0", "1", "2", "3", "4"]
    assert by_rank == {0: prompts[0::2], 1: prompts[1::2]}
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 16 // 4 + STEPS_PER_ROUND  # warm-up: 16 pairs / (2 ranks x 2)


def test_reference_fallback_from_yaml_pairs_the_reference_when_no_sample_is_right(tmp_path, cache_dir):
    """A policy none of whose samples is right (`SlippingGenerator`) gives no pair; with
    `online.pairs.reference_fallback: true` every prompt of the round pairs its reference solution
    (chosen, every step scored 1) with a wrong sample, and the round's summary counts them."""
    config = online_config(tmp_path, cache_dir, trainer={"max_epochs": 2, "reload_dataloaders_every_n_epochs": 1},
                           online={"generator": "tests.helpers.online_helpers.SlippingGenerator", "reference_refresh_rounds": None,
                                   "pairs": {"reference_fallback": True}})
    result = train(config, tmp_path / "calls")
    assert result.returncode == 0, result.stderr[-3000:]
    round_0 = tmp_path / "run" / "online" / "round-0"
    pairs = [json.loads(line) for line in (round_0 / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == PROMPTS_PER_ROUND
    for row in pairs:
        assert "".join(row["chosen_steps"]) == row["reference_solution"]
        assert set(row["chosen_step_scores"]) == {1.0} and min(row["rejected_step_scores"]) < 0
        assert row["id"].split("/")[1].startswith(f"{SAMPLES}-")  # the reference is sample K
    summary = json.loads((round_0 / "summary.json").read_text())
    assert summary["reference_pairs"] == PROMPTS_PER_ROUND and summary["sample_accuracy"] == 0.0
