"""Generation-based evaluation (`stepwise_lit.evaluation.generation`): the `--evaluation.*` callback in
`validate`/`test` and the ProcessBench part of the report (the command: tests/e2e/test_evaluate.py)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from stepwise_lit.cli import main
from stepwise_lit.data.collate import StepwiseCollator
from stepwise_lit.data.tokenize import TokenizeSettings, tokenize_row
from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.errors import SettingError
from stepwise_lit.evaluation.generation import GenerationMetrics, refuse_fsdp1
from stepwise_lit.data.heldout import Problem, held_out_problems, reference_answer
from stepwise_lit.logprobs.forward import step_token_counts
from stepwise_lit.models.generate import TransformersGenerator
from stepwise_lit.objective.stepwise import per_token_step_rewards
from tests.helpers.entry import run_entry, write_config
from tests.helpers.scripted_generation import (
    FIVE_VAL_ROWS,
    REFERENCES,
    VAL_ROWS,
    scripted_completion,
    scripted_generate,
)
from tests.helpers.stub_scorers import BracketScorer

EVALUATION = {"enabled": True, "max_prompts": None, "generation": {"max_new_tokens": 8}}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_reference_answer_per_source():
    """Embedded and GSM8K read the reference solution's answer; a MATH answer field is the answer itself."""
    row = VAL_ROWS[0]
    assert reference_answer(row["reference_solution"], row["chosen_steps"], "embedded") == row["chosen_steps"][-1].split()[-1][:-1]
    assert reference_answer(None, ["Step 1: 2 + 2 = 4. The answer is 4.\n"], "embedded") == "4"
    assert reference_answer("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", [], "gsm8k") == "18"
    assert reference_answer("\\frac{1}{2}", [], "math") == "\\frac{1}{2}"
    assert reference_answer(None, [], "gsm8k") is None


def test_held_out_problems_are_distinct_capped_and_need_a_reference():
    prompts = ["a", "b", "a", "c", "d"]
    solutions = ["The answer is 1.", None, "The answer is 9.", "The answer is 3.", "The answer is 4."]
    problems, without = held_out_problems(prompts, solutions, [[], [], [], [], []], "embedded", max_prompts=2)
    assert [(p.prompt, p.answer) for p in problems] == [("a", "1"), ("c", "3")]
    assert without == 1


class RecordingScorer(BracketScorer):
    """The bracket scorer that keeps the steps it was given."""

    def _score_steps(self, prompts, steps, reference_solutions):
        self.seen = steps
        return super()._score_steps(prompts, steps, reference_solutions)


def test_generated_steps_are_split_as_rerank_splits_them_and_give_the_text_back():
    """The flags count steps as rerank and the online rounds do (`rerank.split_solution`): a blank
    line joins the step before it and an empty completion is one empty step (before: blank steps
    were dropped, an empty completion had none). Completions "[-1] a\\n\\n[1] b\\n" (steps
    "[-1] a\\n\\n", "[1] b\\n": scores -1, 1) and "" (one step, score 0): flagged steps 1 of 3
    (before: 1 of 2), flagged solutions 1 of 2, first flagged step 1."""
    completions = ["[-1] a\n\n[1] b\n", ""]
    problems = [Problem("q1", "1", "s1"), Problem("q2", "2", "s2")]
    metrics = GenerationMetrics("embedded", num_samples=1)
    verifier = RecordingScorer()
    metrics.update(problems, [[text] for text in completions], torch.ones(2), verifier, "\n")
    assert verifier.seen == [["[-1] a\n\n", "[1] b\n"], [""]]
    assert ["".join(steps) for steps in verifier.seen] == completions
    values = metrics.compute(with_flags=True)
    assert values["flagged_step_share"] == pytest.approx(1 / 3)
    assert values["flagged_solution_share"] == pytest.approx(1 / 2) and values["first_flagged_step"] == 1.0


def collated(pack_pairs: bool):
    tokenizer = load_tokenizer(None)
    rows = [tokenize_row(row, tokenizer, TokenizeSettings()) for row in VAL_ROWS[:2]]
    return StepwiseCollator(tokenizer.pad_token_id, pack_pairs)(rows)


@pytest.mark.parametrize("pack_pairs", [False, True])
def test_step_token_counts_by_hand(pack_pairs):
    """The byte tokenizer spends one token per byte; a response's last step also predicts EOS.
    Rows: chosen responses, then rejected ones, 0 past a response's steps."""
    batch = collated(pack_pairs)
    steps = [row["chosen_steps"] for row in VAL_ROWS[:2]] + [row["rejected_steps"] for row in VAL_ROWS[:2]]
    width = max(len(s) for s in steps)
    expected = torch.tensor([
        [len(step.encode()) + (index == len(s) - 1) for index, step in enumerate(s)] + [0] * (width - len(s)) for s in steps
    ])
    torch.testing.assert_close(step_token_counts(batch, width), expected)


def test_per_token_step_rewards_divide_by_counts_and_zero_padding():
    rewards = torch.tensor([[2.0, -3.0, 0.0]])
    counts = torch.tensor([[4, 3, 0]])
    torch.testing.assert_close(per_token_step_rewards(rewards, counts), torch.tensor([[0.5, -1.0, 0.0]]))


def expected_solve_rate() -> float:
    """By hand: the validation references are 1, 2, 5 and 8; the odd ones are solved: 2 / 4."""
    assert sorted(REFERENCES[row["prompt"]] for row in VAL_ROWS) == [1, 2, 5, 8]
    return 0.5


def read_metrics(root: Path) -> dict[str, float]:
    """The last value of every column of the run's CSVLogger metrics.csv."""
    [path] = root.glob("csv/version_*/metrics.csv")
    values = {}
    for row in csv.DictReader(path.open()):
        values.update({key: float(value) for key, value in row.items() if value})
    return values


def test_validate_reports_the_solve_rate_of_known_completions(tmp_path, cache_dir, capsys, monkeypatch):
    """The generator is scripted, so the solve rate is known (:func:`expected_solve_rate`); it lands in metrics.csv and report.json with the ProcessBench
    values, the plot and the examples."""
    monkeypatch.setattr(TransformersGenerator, "generate", scripted_generate)
    expected = expected_solve_rate()
    config = write_config(tmp_path, {"evaluation": EVALUATION}, cache_dir)
    outcome = run_entry(main, ["validate", "--config", str(config)], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    root = tmp_path / "run"
    report = json.loads((root / "report" / "val" / "report.json").read_text())
    assert report["metrics"]["solve_rate"] == pytest.approx(expected)
    assert report["metrics"]["pass_at_k"] is None and report["metrics"]["maj_at_k"] is None
    assert report["generation"]["num_prompts"] == 4 and report["generation"]["k"] == 1
    assert report["generation"]["examples"][0]["completion"] == scripted_completion(VAL_ROWS[0]["prompt"])
    for name in ("processbench_f1", "error_acc", "correct_acc", "within_response_auroc"):
        assert name in report["metrics"]
    assert report["processbench"]["threshold_source"] == "validation data"
    assert report["processbench"]["num_erroneous"] == 4 and report["processbench"]["num_correct"] == 4
    assert "solve_rate.png" in report["plots"] and (root / "report" / "val" / "solve_rate.png").is_file()
    assert read_metrics(root)["val/solve_rate"] == pytest.approx(expected)


def test_sampled_completions_give_pass_and_majority_at_k(tmp_path, cache_dir, capsys, monkeypatch):
    """k = 3 samples, the same scripted answer each: pass@3 = maj@3 = solve rate."""
    monkeypatch.setattr(TransformersGenerator, "generate", scripted_generate)
    sampled = {**EVALUATION, "generation": {"max_new_tokens": 8, "do_sample": True, "num_samples": 3}}
    config = write_config(tmp_path, {"evaluation": sampled}, cache_dir)
    outcome = run_entry(main, ["validate", "--config", str(config)], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    metrics = json.loads((tmp_path / "run" / "report" / "val" / "report.json").read_text())["metrics"]
    expected = expected_solve_rate()
    assert metrics["pass_at_k"] == pytest.approx(expected) and metrics["maj_at_k"] == pytest.approx(expected)


def test_the_verifier_flags_generated_steps(tmp_path, cache_dir, capsys, monkeypatch):
    """Completions are the rejected solutions of the validation rows, whose one slipped step the
    rule verifier flags: every solution is flagged, first at its slip (1-based mean by hand)."""
    rejected = {row["prompt"]: "".join(row["rejected_steps"]) for row in VAL_ROWS}
    monkeypatch.setattr(TransformersGenerator, "generate", lambda self, prompts, settings: [[rejected[p]] for p in prompts])
    verifier = {"class_path": "stepwise_lit.rewards.ArithmeticStepVerifier"}
    config = write_config(tmp_path, {"evaluation": {**EVALUATION, "verifier": verifier}}, cache_dir)
    outcome = run_entry(main, ["validate", "--config", str(config)], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    slips = [row["rejected_step_scores"].index(-1.0) + 1 for row in VAL_ROWS]
    metrics = json.loads((tmp_path / "run" / "report" / "val" / "report.json").read_text())["metrics"]
    assert metrics["flagged_solution_share"] == 1.0
    assert metrics["first_flagged_step"] == pytest.approx(sum(slips) / len(slips))
    assert 0 < metrics["flagged_step_share"] <= 1
    assert read_metrics(tmp_path / "run")["val/flagged_step_share"] == pytest.approx(metrics["flagged_step_share"])


def test_test_uses_the_threshold_validate_chose(tmp_path, cache_dir, capsys):
    config = write_config(tmp_path, {}, cache_dir)
    for command in ("validate", "test"):
        outcome = run_entry(main, [command, "--config", str(config)], capsys)
        assert outcome.code == 0, outcome.err[-3000:]
    reports = tmp_path / "run" / "report"
    val = json.loads((reports / "val" / "report.json").read_text())["processbench"]
    test = json.loads((reports / "test" / "report.json").read_text())["processbench"]
    assert val["threshold"] is not None
    assert test["threshold"] == val["threshold"] and test["threshold_source"] == str(reports / "val" / "report.json")


def test_the_threshold_setting_wins_and_per_token_is_recorded(tmp_path, cache_dir, capsys):
    config = write_config(tmp_path, {}, cache_dir)
    outcome = run_entry(main, ["test", "--config", str(config), "--report.threshold=-0.25", "--report.per_token=true"], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    processbench = json.loads((tmp_path / "run" / "report" / "test" / "report.json").read_text())["processbench"]
    assert processbench["threshold"] == -0.25 and processbench["threshold_source"] == "report.threshold"
    assert processbench["per_token"] is True


@pytest.mark.parametrize(
    "setting, message",
    [
        ("--evaluation.generation.num_samples=3", "generation.num_samples: must be at least 1, and 1 with greedy decoding"),
        ("--evaluation.max_prompts=0", "evaluation.max_prompts: must be at least 1 or null, got 0"),
    ],
)
def test_bad_evaluation_settings_exit_2_naming_the_setting(tmp_path, cache_dir, capsys, setting, message):
    config = write_config(tmp_path, {}, cache_dir)
    outcome = run_entry(main, ["validate", "--config", str(config), "--evaluation.enabled=true", setting], capsys)
    assert outcome.code == 2 and message in outcome.err


@pytest.mark.slow
def test_two_process_solve_rate_equals_one_process(tmp_path, cache_dir, capsys, monkeypatch):
    """5 validation prompts on 2 DDP ranks: rank 0 generates prompts 0, 2, 4 and rank 1 prompts
    1, 3 and prompt 0 again as padding (weight 0), so every prompt counts once. The solve rate
    equals one process's and the hand value: references 8, 5, 2, 1, 4; the odd ones solved, 2 / 5."""
    from tests.helpers.launch import finish, start

    assert [REFERENCES[row["prompt"]] for row in FIVE_VAL_ROWS] == [8, 5, 2, 1, 4]
    expected = 2 / 5
    reports = {}
    for devices in (1, 2):
        folder = tmp_path / f"devices{devices}"
        probe = {"class_path": "tests.helpers.scripted_generation.ScriptedGeneration", "init_args": {"out_dir": str(folder / "prompts")}}
        changes = {
            "trainer": {"devices": devices, "strategy": "ddp" if devices > 1 else "auto", "callbacks": [probe]},
            "data": {"synthetic_val_size": 5},
            "evaluation": EVALUATION,
        }
        config = write_config(folder, changes, cache_dir)
        if devices == 1:  # in this process (the callback's patch of the generator is undone after the test)
            monkeypatch.setattr(TransformersGenerator, "generate", TransformersGenerator.generate)
            outcome = run_entry(main, ["validate", "--config", str(config)], capsys)
            assert outcome.code == 0, outcome.err[-3000:]
        else:
            finish(start(config, subcommand="validate"))
        reports[devices] = json.loads((folder / "run" / "report" / "val" / "report.json").read_text())
        generated = [json.loads((folder / "prompts" / f"rank{rank}.json").read_text()) for rank in range(devices)]
        prompts = [row["prompt"] for row in FIVE_VAL_ROWS]
        assert generated == ([prompts] if devices == 1 else [prompts[0::2], prompts[1::2] + prompts[:1]])
    for report in reports.values():
        assert report["metrics"]["solve_rate"] == pytest.approx(expected)
        assert report["generation"]["num_prompts"] == 5
    assert reports[1]["metrics"]["processbench_f1"] == reports[2]["metrics"]["processbench_f1"]


@pytest.mark.parametrize("bar", [True, False], ids=["progress-bar", "no-progress-bar"])
def test_generation_and_the_reference_pass_show_progress_only_with_the_trainers_bar(tmp_path, capsys, bar):
    """`fit` with the solve-rate evaluation during fit and `reference: precomputed`: with
    `trainer.enable_progress_bar` on, stderr shows the "generate" and "reference log-probs" bars;
    with it off, neither."""
    changes = {"trainer": {"enable_progress_bar": bar}, "model": {"reference": "precomputed"},
               "evaluation": {**EVALUATION, "during_fit": True}}
    config = write_config(tmp_path, changes, tmp_path / "own_cache")  # a fresh cache: the reference pass runs
    outcome = run_entry(main, ["fit", "--config", str(config)], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    for name in ("generate", "reference log-probs"):  # a tqdm bar: "generate: 100%|..."
        assert bool(re.search(rf"{name}: +\d+%\|", outcome.err)) == bar, name


def test_generation_under_fsdp1_is_refused_naming_the_setting():
    """FSDP1's wrapped root is not gathered around `generate` (and cannot be run on the CPU to
    test): refused at start; FSDP2 (`ModelParallelStrategy`) and DDP go through."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import (
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    with pytest.raises(SettingError, match="^online.enabled: generation does not run under FSDPStrategy"):
        refuse_fsdp1(SimpleNamespace(strategy=FSDPStrategy()), "online.enabled")
    for strategy in (ModelParallelStrategy(), DDPStrategy()):
        refuse_fsdp1(SimpleNamespace(strategy=strategy), "evaluation.enabled")
