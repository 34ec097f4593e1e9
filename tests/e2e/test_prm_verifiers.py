"""The published PRM conventions as `evaluation.verifier` and `online.verifier` of `train.py`, from
YAML, on the tiny stand-ins of tests/helpers/prm_models.py: what the run logs or writes equals the
model card's hand readout of the same completions. And a stand-in saved without its head, named as
`python -m stepwise_lit.evaluate`'s scorer or as any of train.py's scorer settings, ends with one
message naming that setting (exit 2), as `score` does."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from stepwise_lit import evaluate
from stepwise_lit.cli import main
from stepwise_lit.evaluation.rerank import split_solution
from stepwise_lit.models.generate import TransformersGenerator
from tests.helpers.entry import run_entry, write_config
from tests.helpers.paths import SHARED_DATA
from tests.helpers.prm_models import math_shepherd_readout, prm_folder, qwen_prm_readout
from tests.helpers.scripted_generation import VAL_ROWS

PRM800K = SHARED_DATA / "prm800k" / "prm800k_found_records.jsonl"
REFUSAL = "QwenProcessRewardScorer cannot score with"


def scorer(kind: str, folder: str) -> dict:
    """The YAML settings of the kind's scorer on its stand-in folder."""
    class_path = {"math_shepherd": "StepTagScorer", "qwen_prm": "QwenProcessRewardScorer"}[kind.removesuffix("_headless")]
    return {"class_path": f"stepwise_lit.rewards.{class_path}", "init_args": {"model_name_or_path": folder, "dtype": "float32"}}


def test_math_shepherd_as_evaluation_verifier_flags_the_steps_its_readout_scores_below_0(
        tmp_path, tmp_path_factory, capsys, monkeypatch):
    """`validate` with `evaluation.verifier: StepTagScorer` (math-shepherd's stand-in); the completions
    are the 4 validation rows' rejected solutions. The flag shares and the first flagged step equal
    those of the model card's readout of each completion's steps (score < 0 is flagged)."""
    folder = prm_folder(tmp_path_factory, "math_shepherd")
    completions = {row["prompt"]: "".join(row["rejected_steps"]) for row in VAL_ROWS}
    monkeypatch.setattr(TransformersGenerator, "generate", lambda self, prompts, settings: [[completions[p]] for p in prompts])
    evaluation = {"enabled": True, "max_prompts": None, "generation": {"max_new_tokens": 8},
                  "verifier": scorer("math_shepherd", folder)}
    outcome = run_entry(main, ["validate", "--config", str(write_config(tmp_path, {"evaluation": evaluation}, tmp_path / "c"))], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    metrics = json.loads((tmp_path / "run" / "report" / "val" / "report.json").read_text())["metrics"]

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    flags = [[score < 0 for score in math_shepherd_readout(model, tokenizer, prompt, split_solution(text))]
             for prompt, text in completions.items()]
    firsts = [row.index(True) + 1 for row in flags if any(row)]
    steps = [flag for row in flags for flag in row]
    assert 0 < sum(steps) < len(steps) and len(steps) > len(flags)  # a readout that flags some steps, not all
    assert metrics["flagged_step_share"] == pytest.approx(sum(steps) / len(steps), abs=1e-6)
    assert metrics["flagged_solution_share"] == pytest.approx(len(firsts) / len(flags), abs=1e-6)
    assert metrics["first_flagged_step"] == pytest.approx(sum(firsts) / len(firsts), abs=1e-6)


def test_qwen_prm_as_online_verifier_writes_its_readout_into_the_round_file(tmp_path, tmp_path_factory, capsys):
    """One online round (round 0, epoch 1: 2 prompts x 2 samples of `SolvingGenerator`) with
    `online.verifier: QwenProcessRewardScorer`: every solution's step scores in
    ``online/round-0/solutions.jsonl`` equal the Qwen PRM card's readout of its steps."""
    folder = prm_folder(tmp_path_factory, "qwen_prm")
    changes = {
        "trainer": {"max_steps": -1, "max_epochs": 2, "reload_dataloaders_every_n_epochs": 1, "val_check_interval": None},
        "online": {"enabled": True, "verifier": scorer("qwen_prm", folder), "prompts_per_round": 2, "steps_per_round": 1,
                   "generator": "tests.helpers.online_helpers.SolvingGenerator",
                   "generation": {"do_sample": True, "num_samples": 2, "max_new_tokens": 2}},
    }
    outcome = run_entry(main, ["fit", "--config", str(write_config(tmp_path, changes, tmp_path / "c"))], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    lines = (tmp_path / "run" / "online" / "round-0" / "solutions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 4
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for row in rows:
        expected = qwen_prm_readout(folder, tokenizer, row["prompt"], row["steps"])
        assert len(expected) == len(row["steps"]) > 1
        assert row["step_scores"] == pytest.approx(expected, abs=1e-6)
    assert len({score for row in rows for score in row["step_scores"]}) > 4  # model scores, not a rule's ±1


def assert_names_the_setting(outcome, setting: str) -> None:
    """Exit 2 with the one-paragraph message naming `setting`, no traceback or jsonargparse wrapper."""
    assert outcome.code == 2, outcome.err[-3000:]
    assert f"error: {setting}.init_args.model_name_or_path: {REFUSAL}" in outcome.err, outcome.err[-3000:]
    assert "has no weights for score." in outcome.err
    assert "Traceback" not in outcome.err and "Union subtypes" not in outcome.err


@pytest.mark.skipif(not PRM800K.exists(), reason="shared PRM800K records not present")
def test_evaluate_names_the_scorer_setting_of_a_stand_in_without_its_head(tmp_path, tmp_path_factory, capsys):
    folder = prm_folder(tmp_path_factory, "qwen_prm_headless")
    argv = ["--scorer", "QwenProcessRewardScorer", f"--scorer.init_args.model_name_or_path={folder}",
            "--labelled.path", str(PRM800K), "--labelled.format", "prm800k", "--output", str(tmp_path / "eval")]
    assert_names_the_setting(run_entry(evaluate.main, argv, capsys), "scorer")
    assert not (tmp_path / "eval" / "report.json").exists()


@pytest.mark.parametrize("setting", ["model.reward_model", "evaluation.verifier", "online.verifier"])
def test_train_names_the_scorer_setting_of_a_stand_in_without_its_head(tmp_path, tmp_path_factory, capsys, setting):
    """The headless stand-in as one of train.py's scorers (the others unset, or the rule verifier, so
    the message must name the one that refused)."""
    section, key = setting.split(".")
    rule = {"class_path": "stepwise_lit.rewards.ArithmeticStepVerifier"}
    changes = {"evaluation": {"verifier": rule}, "online": {"verifier": rule}}
    changes[section] = {**changes.get(section, {}), key: scorer("qwen_prm_headless", prm_folder(tmp_path_factory, "qwen_prm_headless"))}
    outcome = run_entry(main, ["fit", "--config", str(write_config(tmp_path, changes, tmp_path / "c"))], capsys)
    assert_names_the_setting(outcome, setting)
