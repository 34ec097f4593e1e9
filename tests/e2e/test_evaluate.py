"""`python -m stepwise_lit.evaluate` : ProcessBench localisation of a step
scorer on labelled responses, and solve rates of an exported model or of a checkpoint with its training config."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from stepwise_lit import evaluate
from stepwise_lit.cli import main as train
from stepwise_lit.data.labelled import read_labelled
from stepwise_lit.evaluation.localisation import split_by_problem
from stepwise_lit.rewards import ArithmeticStepVerifier
from tests.helpers.entry import run_entry, write_config
from tests.helpers.paths import REPO, SHARED_DATA

SHARED = SHARED_DATA
PRM800K = SHARED / "prm800k" / "prm800k_found_records.jsonl"
GSM8K_TEST = SHARED / "gsm8k" / "test.jsonl"
RULE = "stepwise_lit.rewards.ArithmeticStepVerifier"

# ProcessBench rows of one problem (2 + 3 + 4); `label` is the earliest wrong step or -1.
HAND_ROWS = [
    {"id": "r1", "steps": ["First, 2 + 3 = 5.", "Then 5 + 4 = 9.", "The answer is 9."], "label": -1},
    {"id": "r2", "steps": ["First, 2 + 3 = 6.", "Then 6 + 4 = 10.", "The answer is 10."], "label": 0},
    {"id": "r3", "steps": ["First, 2 + 3 = 5.", "Then 5 + 4 = 8.", "The answer is 8."], "label": 1},
    {"id": "r4", "steps": ["First, 2 + 3 = 5.", "Adding four more gives 10.", "The answer is 10."], "label": 1},
    {"id": "r5", "steps": ["Running total: 2 + 3 = 5 + 4 = 9.", "The answer is 9."], "label": -1},
]


def write_processbench(path: Path, rows: list[dict], problem: str = "Compute 2 + 3 + 4.") -> Path:
    path.write_text("".join(json.dumps({"problem": problem, "generator": "hand", **row}) + "\n" for row in rows))
    return path


def read_report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_processbench_f1_of_the_rule_verifier_by_hand_as_the_readme_runs_it(tmp_path):
    """`python -m stepwise_lit.evaluate --config pb.yaml`, a new process, the rule verifier at threshold 0.

    The rule flags a step whose written arithmetic is wrong: r1 [+1 +1 +1], r2 [-1 +1 +1],
    r3 [+1 -1 +1], r4 [+1 +1 +1] (its error is in words), r5 [-1 +1] (the sloppy chain
    "2 + 3 = 5 + 4 = 9" reads as 5 = 9). Predictions (first step below 0): -1, 0, 1, -1, 0.
    Erroneous r2, r3, r4 (labels 0, 1, 1): 2 hits -> error_acc 2/3. Correct r1, r5: r1 hit ->
    correct_acc 1/2. F1 = 2 (2/3)(1/2) / (2/3 + 1/2) = 4/7.
    Within-response AUROC over the labelled steps of erroneous responses (ProcessBench: +1
    before the label, -1 at it, unlabelled after): good steps r3.1, r4.1 score 1, 1; bad steps
    r2.1, r3.2, r4.2 score -1, -1, 1; of 6 pairs 4 are won and 2 tied: 5/6."""
    data = write_processbench(tmp_path / "processbench.jsonl", HAND_ROWS)
    config = tmp_path / "pb.yaml"
    config.write_text(yaml.safe_dump({
        "scorer": {"class_path": RULE},
        "labelled": {"path": str(data), "format": "processbench", "threshold": 0.0},
        "output": str(tmp_path / "eval"),
    }))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run([sys.executable, "-m", "stepwise_lit.evaluate", "--config", str(config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    values = read_report(tmp_path / "eval")["processbench"]
    assert (values["threshold"], values["threshold_source"], values["split"]) == (0.0, "labelled.threshold", None)
    assert (values["num_responses"], values["num_erroneous"], values["num_correct"]) == (5, 3, 2)
    assert values["error_acc"] == pytest.approx(2 / 3) and values["correct_acc"] == pytest.approx(1 / 2)
    assert values["processbench_f1"] == pytest.approx(4 / 7)
    assert values["within_response_auroc"] == pytest.approx(5 / 6)
    assert "processbench_f1 0.5714" in done.stdout


# Step scores are written in the steps, for `tests.helpers.stub_scorers.BracketScorer`; each problem has the same responses.
BRACKET_ROWS = [
    {"id": "c", "steps": ["[0.9] a", "[0.8] b"], "label": -1},
    {"id": "e0", "steps": ["[0.2] a", "[0.9] b"], "label": 0},
    {"id": "e1", "steps": ["[0.9] a", "[-0.5] b"], "label": 1},
    {"id": "e2", "steps": ["[0.6] a", "[0.7] b"], "label": 1},
]


def test_the_threshold_is_chosen_on_the_validation_problems_and_applied_to_the_rest(tmp_path, capsys):
    """Two problems with the same four responses; validation_fraction 0.5 puts one in each part.

    On the validation part: c is hit for t <= 0.8 (its smallest score), e0 for t > 0.2, e1 for
    -0.5 < t <= 0.9, e2 never (its first step, 0.6, is below its second). Best F1 for t in
    (0.2, 0.8]; the candidates (scores -0.5, 0.2, 0.6, 0.7, 0.8, 0.9, their midpoints, 1.9)
    in it are 0.4, 0.6, 0.65, 0.7, 0.75, 0.8: the smallest, 0.4, is chosen. On the evaluated
    problem at 0.4: error_acc 2/3 (e0, e1), correct_acc 1, F1 = 2 (2/3) / (5/3) = 0.8; the
    within-response AUROC: good steps 0.9 (e1), 0.6 (e2) vs bad 0.2 (e0), -0.5 (e1), 0.7 (e2):
    5 of 6 pairs won, 5/6."""
    data = tmp_path / "two.jsonl"
    data.write_text("".join(
        json.dumps({"problem": problem, **row, "id": f"{problem}-{row['id']}"}) + "\n"
        for problem in ("Problem A", "Problem B") for row in BRACKET_ROWS
    ))
    config = tmp_path / "pb.yaml"
    config.write_text(yaml.safe_dump({
        "scorer": {"class_path": "tests.helpers.stub_scorers.BracketScorer"},
        "labelled": {"path": str(data), "format": "processbench", "validation_fraction": 0.5, "seed": 3},
    }))
    outcome = run_entry(evaluate.main, ["--config", str(config), "--output", str(tmp_path / "eval")], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    values = read_report(tmp_path / "eval")["processbench"]
    assert values["threshold"] == pytest.approx(0.4) and values["threshold_source"] == "validation part"
    assert values["split"] == {"validation_fraction": 0.5, "seed": 3, "validation_problems": 1, "validation_responses": 4,
                               "evaluated_problems": 1, "evaluated_responses": 4}
    assert values["error_acc"] == pytest.approx(2 / 3) and values["correct_acc"] == 1.0
    assert values["processbench_f1"] == pytest.approx(0.8) and values["within_response_auroc"] == pytest.approx(5 / 6)
    assert values["validation"]["processbench_f1"] == pytest.approx(0.8)


@pytest.fixture(scope="module")
def prm800k() -> list[dict]:
    if not PRM800K.exists():
        pytest.skip("shared PRM800K records not present")
    return read_labelled(PRM800K, "prm800k")


def test_prm800k_records_scored_by_the_rule_verifier_match_a_response_by_response_count(tmp_path, prm800k, capsys):
    """The 16 real PRM800K records at threshold 0: every value equals a loop over the responses,
    each scored alone, predicting its first step scored below 0."""
    argv = ["--scorer", "ArithmeticStepVerifier", "--labelled.path", str(PRM800K), "--labelled.format", "prm800k",
            "--labelled.threshold", "0", "--labelled.batch_size", "5", "--output", str(tmp_path / "eval")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    values = read_report(tmp_path / "eval")["processbench"]
    verifier = ArithmeticStepVerifier()
    hits = {True: 0, False: 0}
    totals = {True: 0, False: 0}
    for response in prm800k:
        [scores] = verifier.score_steps([response["prompt"]], [response["steps"]])
        predicted = next((index for index, score in enumerate(scores) if score < 0), -1)
        erroneous = response["first_error"] >= 0
        totals[erroneous] += 1
        hits[erroneous] += predicted == response["first_error"]
    error_acc, correct_acc = hits[True] / totals[True], hits[False] / totals[False]
    assert (values["num_responses"], values["num_erroneous"], values["num_correct"]) == (16, totals[True], totals[False])
    assert values["error_acc"] == pytest.approx(error_acc) and values["correct_acc"] == pytest.approx(correct_acc)
    f1 = 2 * error_acc * correct_acc / (error_acc + correct_acc) if error_acc + correct_acc else 0.0
    assert values["processbench_f1"] == pytest.approx(f1)


def test_the_validation_split_keeps_each_problem_in_one_part_and_follows_the_seed(prm800k):
    """11 distinct problems: round(0.5 * 11) = 6 go to validation; the six responses to the
    "strictly increasing sequence" problem stay together; the same seed gives the same split."""
    validation, evaluated = split_by_problem(prm800k, 0.5, seed=0)
    prompts = [{response["prompt"] for response in part} for part in (validation, evaluated)]
    assert not prompts[0] & prompts[1] and len(prompts[0]) == 6 and len(prompts[1]) == 5
    assert sorted(r["id"] for r in validation + evaluated) == sorted(r["id"] for r in prm800k)
    sequence = [part for part in (validation, evaluated) if any("strictly increasing" in r["prompt"] for r in part)]
    assert len(sequence) == 1 and sum("strictly increasing" in r["prompt"] for r in sequence[0]) == 6
    assert split_by_problem(prm800k, 0.5, seed=0) == (validation, evaluated)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"labelled": {"path": "HAND", "format": "processbench"}}, "scorer: labelled.path"),
        ({"scorer": {"class_path": RULE}}, "labelled.path: a scorer is set but no labelled responses"),
        ({}, "model.model_name_or_path: nothing to evaluate"),
        ({"scorer": {"class_path": RULE}, "labelled": {"path": "HAND", "format": "processbench"}},
         "labelled.threshold: "),  # one problem: no validation part
        ({"scorer": {"class_path": RULE}, "labelled": {"path": "HAND", "format": "processbench", "validation_fraction": 1.0}},
         "labelled.validation_fraction: must be in (0, 1)"),
        ({"scorer": {"class_path": RULE}, "labelled": {"path": "BAD", "format": "processbench", "threshold": 0.0}},
         "bad.jsonl line 2: field 'label': 7 is not -1 or a step index"),
    ],
)
def test_localisation_errors_exit_2_naming_the_setting_or_line(tmp_path, capsys, changes, message):
    hand = write_processbench(tmp_path / "hand.jsonl", HAND_ROWS)
    bad = write_processbench(tmp_path / "bad.jsonl", [HAND_ROWS[0], {**HAND_ROWS[1], "label": 7}])
    if "labelled" in changes:
        changes["labelled"]["path"] = str({"HAND": hand, "BAD": bad}[changes["labelled"]["path"]])
    config = tmp_path / "pb.yaml"
    config.write_text(yaml.safe_dump(changes))
    outcome = run_entry(evaluate.main, ["--config", str(config), "--output", str(tmp_path / "eval")], capsys)
    assert outcome.code == 2 and message in outcome.err, outcome.err[-2000:]
    assert not (tmp_path / "eval" / "report.json").exists()


# ---------------------------------------------------------------- solve rates of a policy


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A short `train.py fit` of the tiny model from a YAML file (tests/entry.py's BASE: 2 steps,
    8 synthetic training pairs, 4 held out): its config and its run folder (checkpoints/last.ckpt, export/)."""
    folder = tmp_path_factory.mktemp("trained")
    config = write_config(folder, {}, tmp_path_factory.mktemp("cache"))
    train(["fit", "--config", str(config)])
    return config, folder / "run"


def test_evaluate_a_checkpoint_with_its_training_config(tmp_path, trained, capsys):
    """`--config <train.py YAML> --ckpt_path last.ckpt`: the config's model (the embedded tiny model)
    gets the checkpoint's policy weights, the config's data section gives the held-out synthetic
    problems. The same weights reach the fit's export, so both give the same completions (also
    with the config LightningCLI saved in the run), and the loaded weights equal the export's
    tensor for tensor."""
    config, root = trained
    checkpoint = root / "checkpoints" / "last.ckpt"
    short = ["--evaluation.generation.max_new_tokens", "8"]
    argv = ["--config", str(config), "--ckpt_path", str(checkpoint), *short, "--output", str(tmp_path / "ckpt")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    from_checkpoint = read_report(tmp_path / "ckpt")
    argv = ["--model.model_name_or_path", str(root / "export"), *short, "--output", str(tmp_path / "export")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    from_export = read_report(tmp_path / "export")
    assert from_checkpoint["checkpoint"] == str(checkpoint) and from_checkpoint["model"] == "embedded"
    assert from_checkpoint["data"] == from_export["data"] == "synthetic validation split (seed 0)"
    assert from_checkpoint["num_prompts"] == 4 and from_checkpoint["prompt"]["max_prompt_length"] == 32
    assert from_checkpoint["examples"] == from_export["examples"]
    assert from_checkpoint["solve_rate"] == from_export["solve_rate"]
    saved = root / "csv" / "version_0" / "config.yaml"  # the config LightningCLI saved (ckpt_path, weights_only, ...)
    argv = ["--config", str(saved), "--ckpt_path", str(checkpoint), *short, "--output", str(tmp_path / "saved")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    assert read_report(tmp_path / "saved")["examples"] == from_export["examples"]

    parser = evaluate.build_parser()
    settings = parser.instantiate(evaluate.parse_options(parser, ["--config", str(config), "--output", "x"]))
    policy, _ = evaluate.load_policy(settings.model, str(checkpoint))
    exported = AutoModelForCausalLM.from_pretrained(root / "export").state_dict()
    loaded = policy.state_dict()
    assert loaded.keys() == exported.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_a_checkpoint_that_does_not_fit_the_config_exits_2(tmp_path, trained, capsys):
    config, root = trained
    argv = ["--config", str(config), "--ckpt_path", str(root / "checkpoints" / "last.ckpt"),
            "--model.tiny_model.hidden_size", "64", "--output", str(tmp_path / "eval")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 2 and "ckpt_path: " in outcome.err and "does not fit the model" in outcome.err
    not_a_checkpoint = tmp_path / "x.ckpt"
    torch.save({"weights": torch.zeros(1)}, not_a_checkpoint)
    argv = ["--config", str(config), "--ckpt_path", str(not_a_checkpoint), "--output", str(tmp_path / "eval")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 2 and "holds no policy weights" in outcome.err


@pytest.fixture
def gsm8k_subset(tmp_path) -> Path:
    if not GSM8K_TEST.exists():
        pytest.skip("shared GSM8K data not present")
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(GSM8K_TEST.read_text().splitlines(keepends=True)[:3]))
    return path


def test_evaluate_an_exported_model_on_a_data_file(tmp_path, trained, gsm8k_subset, capsys):
    """The export's run settings are the defaults (max_prompt_length 32); the file's rows give the references."""
    _, root = trained
    argv = ["--model.model_name_or_path", str(root / "export"), "--data.path", str(gsm8k_subset), "--data.format", "gsm8k",
            "--evaluation.source", "gsm8k", "--evaluation.generation.max_new_tokens", "6", "--output", str(tmp_path / "eval")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    report = read_report(tmp_path / "eval")
    assert report["num_prompts"] == 3 and report["k"] == 1 and 0 <= report["solve_rate"] <= 1
    assert report["pass_at_k"] is None and report["maj_at_k"] is None and report["checkpoint"] is None
    assert report["prompt"]["max_prompt_length"] == 32  # the exported run's data setting
    assert [example["reference"] for example in report["examples"]] == ["18", "3", "70000"]


def test_evaluate_bad_data_exits_2_naming_file_line_and_field(tmp_path, trained, capsys):
    _, root = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "How many?", "answer": "#### 3"}\n{"question": "And now?"}\n')
    argv = ["--model.model_name_or_path", str(root / "export"), "--data.path", str(bad), "--data.format", "gsm8k",
            "--evaluation.source", "gsm8k", "--output", str(tmp_path / "eval")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 2
    assert "bad.jsonl" in outcome.err and "line 2" in outcome.err and "answer" in outcome.err
    missing = [*argv[:3], str(tmp_path / "none.jsonl"), *argv[4:]]
    outcome = run_entry(evaluate.main, missing, capsys)
    assert outcome.code == 2 and "data.path: no such file or folder" in outcome.err


def test_a_lora_checkpoint_is_loaded_into_the_adapters_and_merged(tmp_path, capsys):
    """`model.lora` in the training config: the checkpoint's adapter weights load into a LoRA model,
    merged before decoding; the completions equal those of the fit's merged export."""
    config = write_config(tmp_path / "lora", {"model": {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}},
                          tmp_path / "cache")
    train(["fit", "--config", str(config)])
    root = tmp_path / "lora" / "run"
    short = ["--evaluation.generation.max_new_tokens", "8"]
    argv = ["--config", str(config), "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), *short, "--output", str(tmp_path / "a")]
    assert run_entry(evaluate.main, argv, capsys).code == 0
    argv = ["--model.model_name_or_path", str(root / "export"), *short, "--output", str(tmp_path / "b")]
    assert run_entry(evaluate.main, argv, capsys).code == 0
    assert read_report(tmp_path / "a")["examples"] == read_report(tmp_path / "b")["examples"]


def test_evaluation_generator_picks_the_backend_of_evaluate(tmp_path, trained, capsys):
    """``--evaluation.generator`` with an import path: the scripted backend (sample 0 is the right
    solution) solves every held-out problem, where the trained tiny model's own decoding does not."""
    config, root = trained
    common = ["--config", str(config), "--ckpt_path", str(root / "checkpoints" / "last.ckpt"),
              "--evaluation.generation.max_new_tokens", "8"]
    outcome = run_entry(evaluate.main, [*common, "--output", str(tmp_path / "own")], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    argv = [*common, "--evaluation.generator", "tests.helpers.online_helpers.SolvingGenerator", "--output", str(tmp_path / "scripted")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    assert read_report(tmp_path / "scripted")["solve_rate"] == 1.0
    assert read_report(tmp_path / "own")["solve_rate"] < 1.0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_generator_vllm_without_vllm_exits_2_at_start(tmp_path, trained, capsys):
    config, root = trained
    argv = ["--config", str(config), "--ckpt_path", str(root / "checkpoints" / "last.ckpt"),
            "--evaluation.generator", "vllm", "--output", str(tmp_path / "eval")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 2
    assert "evaluation.generator: vllm is not installed" in outcome.err
    assert not (tmp_path / "eval" / "report.json").exists()
