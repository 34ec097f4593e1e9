"""The published PRM conventions the way users run them, each on a tiny random stand-in of the real
architecture (tests/helpers/prm_models.py): `score` from YAML on real GSM8K pairs writes the step
scores of the model card's hand readout, and refuses a stand-in saved without its head;
`python -m stepwise_lit.evaluate` localises errors of real PRM800K records with the Qwen PRM; and
`train.py fit` uses a PRM whose tokenizer is not the policy's as `model.reward_model`."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from stepwise_lit import evaluate, score
from stepwise_lit.data.labelled import read_labelled
from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.data.writers import write_rows
from stepwise_lit.prepare import prepare
from tests.helpers.entry import run_entry, write_pairs
from tests.helpers.paths import REPO, SHARED_DATA
from tests.helpers.prm_models import (
    math_shepherd_readout,
    prm_folder,
    qwen_prm_readout,
    rlhflow_readout,
    skywork_readout,
)
from tests.helpers.user_path import fit, logged

GSM8K = SHARED_DATA / "gsm8k" / "example_model_solutions.jsonl"
PRM800K = SHARED_DATA / "prm800k" / "prm800k_found_records.jsonl"
CPU = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
       "--scorer.init_args.dtype=float32"]


def causal_readout(readout):
    def read(folder, tokenizer, question, steps):
        return readout(AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer, question, steps)
    return read


# convention -> (stand-in kind, the YAML (a shipped config or scorer settings), the hand readout)
CONVENTIONS = {
    "math_shepherd": ("math_shepherd", REPO / "configs" / "score_math_shepherd.yaml", causal_readout(math_shepherd_readout)),
    "rlhflow": ("rlhflow", {"class_path": "stepwise_lit.rewards.StepTagScorer",
                            "init_args": {"model_name_or_path": "?", "step_tag": "+", "read_at": "before_tag",
                                          "format": "chat"}}, causal_readout(rlhflow_readout)),
    "qwen_prm": ("qwen_prm", REPO / "configs" / "score_qwen_prm.yaml", qwen_prm_readout),
    "skywork": ("skywork", {"class_path": "stepwise_lit.rewards.ValueHeadStepScorer",
                            "init_args": {"model_name_or_path": "?"}}, skywork_readout),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rows = prepare("gsm8k", folder / "all.jsonl", GSM8K)[:3]
    for row in rows:
        row["chosen_step_scores"] = row["rejected_step_scores"] = None
    write_rows(rows, folder / "pairs.jsonl")
    return folder / "pairs.jsonl", rows


def settings_class(settings) -> str:
    """The scorer class a YAML (a file or settings) names."""
    scorer = settings if isinstance(settings, dict) else yaml.safe_load(settings.read_text())["scorer"]
    return scorer["class_path"].rsplit(".", 1)[1]


def config_file(tmp_path, settings) -> str:
    """The shipped config, or a YAML written from the scorer settings."""
    if not isinstance(settings, dict):
        return str(settings)
    path = tmp_path / "score.yaml"
    path.write_text(yaml.safe_dump({"scorer": settings, "batch_size": 2,
                                    "trainer": {"accelerator": "cpu", "devices": 1}}))
    return str(path)


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K data not present")
@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_score_from_yaml_matches_the_model_cards_readout(tmp_path, tmp_path_factory, pairs, capsys, convention):
    kind, settings, readout = CONVENTIONS[convention]
    folder, (path, rows) = prm_folder(tmp_path_factory, kind), pairs
    out = tmp_path / "scored.jsonl"
    argv = ["--config", config_file(tmp_path, settings), "--input", str(path), "--output", str(out),
            f"--scorer.init_args.model_name_or_path={folder}", "--only_missing=false", *CPU]
    outcome = run_entry(score.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for row, source in zip(written, rows):
        for side in ("chosen", "rejected"):
            expected = readout(folder, tokenizer, source["prompt"], source[f"{side}_steps"])
            assert len(expected) == len(source[f"{side}_steps"])
            # 1e-5: `score` pads batches of 2 in float32, the readout runs one unpadded row; on the
            # floor's torch 2.7 that reordering moved one score by 1.07e-6 (reading one position off
            # moves them by more than 1e-3: tests/unit/rewards/test_step_tag.py; the unit tests'
            # two responses match at 1e-6)
            assert row[f"{side}_step_scores"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("convention", ["qwen_prm", "skywork"])
def test_score_refuses_a_stand_in_saved_without_its_head(tmp_path, tmp_path_factory, pairs, capsys, convention):
    _, settings, _ = CONVENTIONS[convention]
    folder = prm_folder(tmp_path_factory, f"{convention}_headless")
    argv = ["--config", config_file(tmp_path, settings), "--input", str(pairs[0]), "--output", str(tmp_path / "o.jsonl"),
            f"--scorer.init_args.model_name_or_path={folder}", *CPU]
    outcome = run_entry(score.main, argv, capsys)
    assert outcome.code == 2
    assert f"scorer.init_args.model_name_or_path: {settings_class(settings)} cannot score with" in outcome.err
    assert "has no weights for" in outcome.err, outcome.err[-2000:]
    assert "Traceback" not in outcome.err


@pytest.mark.skipif(not PRM800K.exists(), reason="shared PRM800K records not present")
def test_processbench_evaluation_with_the_qwen_prm(tmp_path, tmp_path_factory, capsys):
    """`python -m stepwise_lit.evaluate --scorer QwenProcessRewardScorer` on the 16 real PRM800K
    records at threshold 0: error_acc and correct_acc equal a loop over the responses, each read by
    hand as the model card does, predicting its first step scored below 0."""
    folder = prm_folder(tmp_path_factory, "qwen_prm")
    argv = ["--scorer", "QwenProcessRewardScorer", f"--scorer.init_args.model_name_or_path={folder}",
            "--labelled.path", str(PRM800K), "--labelled.format", "prm800k", "--labelled.threshold", "0",
            "--output", str(tmp_path / "eval")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    values = json.loads((tmp_path / "eval" / "report.json").read_text())["processbench"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hits, totals = {True: 0, False: 0}, {True: 0, False: 0}
    for response in read_labelled(PRM800K, "prm800k"):
        scores = qwen_prm_readout(folder, tokenizer, response["prompt"], response["steps"])
        predicted = next((index for index, s in enumerate(scores) if s < 0), -1)
        erroneous = response["first_error"] >= 0
        totals[erroneous] += 1
        hits[erroneous] += predicted == response["first_error"]
    assert (values["num_responses"], values["num_erroneous"]) == (16, totals[True])
    assert values["error_acc"] == pytest.approx(hits[True] / totals[True])
    assert values["correct_acc"] == pytest.approx(hits[False] / totals[False])


def test_a_prm_with_its_own_tokenizer_scores_during_fit(tmp_path, tmp_path_factory, capsys):
    """TRL issue #2577: the policy (the embedded byte tokenizer) and the PRM (math-shepherd's stand-in,
    whose tokenizer has "ки" as one token) tokenize differently; `model.reward_model` re-tokenizes
    the step text, so unscored rows are scored during training and the step metrics are logged."""
    folder = prm_folder(tmp_path_factory, "math_shepherd")
    policy, prm = load_tokenizer(None), AutoTokenizer.from_pretrained(folder)
    assert policy.encode(" ки", add_special_tokens=False) != prm.encode(" ки", add_special_tokens=False)
    assert len(policy) != len(prm)
    data = tmp_path / "unscored.jsonl"
    write_pairs(data, 8, chosen_step_scores=None, rejected_step_scores=None)
    changes = {"data": {"path": str(data), "format": "stepwise", "val_fraction": 0.25, "require_scores": False},
               "model": {"reward_model": {"class_path": "stepwise_lit.rewards.StepTagScorer",
                                          "init_args": {"model_name_or_path": folder, "dtype": "float32"}}}}
    run = logged(fit(tmp_path, changes, tmp_path / "cache", capsys))
    assert {"train/step_accuracy", "train/first_error_accuracy"} <= run.keys()
