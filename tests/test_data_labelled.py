"""Labelled responses (error localisation): ProcessBench and TRL stepwise-supervision rows, validation."""

import json
from typing import get_args

import pytest
import torch

from stepwise_lit.data.formats import DataFormatError
from stepwise_lit.data.labelled import LABELLED_KEYS, LABELLED_READERS, LabelledFormat, labelled_responses, read_labelled
from stepwise_lit.evaluate import first_error_labels
from stepwise_lit.errors import UserError

PROCESSBENCH_ROW = {
    "id": "gsm8k-0",
    "generator": "Qwen2-7B-Instruct",
    "problem": "Sue has 3 flamingos and buys 2 more each day for 3 days. How many does she have?",
    "steps": ["She buys 2 * 3 = 6 flamingos.", "So she has 3 + 6 = 10 flamingos.", "The answer is 10."],
    "label": 1,
    "final_answer_correct": False,
}
TRL_ROW = {  # the example row of TRL's stepwise-supervision format
    "prompt": "Which number is larger, 9.8 or 9.11?",
    "completions": [
        "The fractional part of 9.8 is 0.8, while the fractional part of 9.11 is 0.11.",
        "Since 0.11 is greater than 0.8, the number 9.11 is larger than 9.8.",
    ],
    "labels": [True, False],
}


def write_jsonl(path, rows):
    """One row per line, a blank line after the first (so the second row is on line 3)."""
    lines = [json.dumps(rows[0]), ""] + [json.dumps(row) for row in rows[1:]]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_processbench_scores_plus_one_before_the_label_minus_one_at_it_zero_after(tmp_path):
    (response,) = read_labelled(write_jsonl(tmp_path / "gsm8k.jsonl", [PROCESSBENCH_ROW]), "processbench")
    assert response == {
        "prompt": PROCESSBENCH_ROW["problem"],
        "steps": ["She buys 2 * 3 = 6 flamingos.\n\n", "So she has 3 + 6 = 10 flamingos.\n\n", "The answer is 10."],
        "step_scores": [1.0, -1.0, 0.0],
        "first_error": 1,
        "id": "gsm8k-0",
        "reference_answer": None,
    }


def test_processbench_all_right_is_all_plus_one():
    (response,) = labelled_responses([{**PROCESSBENCH_ROW, "label": -1}], "processbench", "gsm8k")
    assert response["step_scores"] == [1.0, 1.0, 1.0] and response["first_error"] == -1


def test_trl_stepwise_first_error_is_the_first_false():
    (response,) = labelled_responses([TRL_ROW], "trl_stepwise", "trl.jsonl")
    assert response == {
        "prompt": TRL_ROW["prompt"],
        "steps": [TRL_ROW["completions"][0] + "\n", TRL_ROW["completions"][1]],
        "step_scores": [1.0, -1.0],
        "first_error": 1,
        "id": "trl-0",
        "reference_answer": None,
    }
    right, wrong_first = labelled_responses(
        [{**TRL_ROW, "labels": [True, True]}, {**TRL_ROW, "labels": [False, True]}], "trl_stepwise", "trl"
    )
    assert (right["first_error"], right["step_scores"]) == (-1, [1.0, 1.0])
    assert (wrong_first["first_error"], wrong_first["step_scores"]) == (0, [-1.0, 1.0])


def test_first_error_is_what_the_evaluation_reads_off_the_scores():
    """``first_error_labels`` (first score < 0, else -1) on the scores gives back each first_error:
    ProcessBench [1, -1, 0] -> 1, [1, 1, 1] -> -1; TRL [1, -1] -> 1 (padded with a masked step)."""
    responses = labelled_responses(
        [PROCESSBENCH_ROW, {**PROCESSBENCH_ROW, "label": -1}], "processbench", "pb"
    ) + labelled_responses([TRL_ROW], "trl_stepwise", "trl")
    scores = torch.tensor([r["step_scores"] + [0.0] * (3 - len(r["steps"])) for r in responses])
    mask = torch.tensor([[True] * len(r["steps"]) + [False] * (3 - len(r["steps"])) for r in responses])
    assert first_error_labels(scores, mask).tolist() == [r["first_error"] for r in responses] == [1, -1, 1]


@pytest.mark.parametrize(
    "format, changes, message",
    [
        ("processbench", {"label": 3}, "field 'label': 3 is not -1 or a step index in 0..2 (3 steps)"),
        ("processbench", {"label": "1"}, "field 'label': expected an integer step index or -1, got str '1'"),
        ("processbench", {"steps": []}, "field 'steps': no steps (the list is empty)"),
        ("processbench", {"problem": None}, "field 'problem': missing"),
        ("trl_stepwise", {"labels": [True]}, "field 'labels': completions has 2 steps but labels has 1 values"),
        ("trl_stepwise", {"labels": [1, 0]}, "field 'labels': label 1 is int 1, expected true or false"),
        ("trl_stepwise", {"labels": None}, "field 'labels': missing"),
        ("trl_stepwise", {"completions": ["a", " "]}, "field 'completions': step 2 is empty"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, format, changes, message):
    row = PROCESSBENCH_ROW if format == "processbench" else TRL_ROW
    path = write_jsonl(tmp_path / "labels.jsonl", [row, {**row, **changes}])
    with pytest.raises(DataFormatError) as error:
        read_labelled(path, format)
    assert str(error.value) == f"labels.jsonl line 3: {message}"


CANONICAL = {"prompt": "2 + 3?", "steps": ["2 + 3 = 6\n", "So 6."], "step_scores": [-1.0, -1.0], "first_error": 0}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"first_error": 1}, "field 'step_scores': the first negative score is at step index 0 but first_error is 1"),
        ({"first_error": 2}, "field 'first_error': expected -1 or a step index in 0..1, got 2"),
        ({"first_error": True}, "field 'first_error': expected -1 or a step index in 0..1, got True"),
        ({"step_scores": [-1.0]}, "field 'step_scores': steps has 2 steps but step_scores has 1 values"),
        ({"step_scores": [-1.0, -2.0]}, "field 'step_scores': score 2 is -2.0, outside [-1, 1]"),
    ],
)
def test_canonical_labelled_responses_are_checked(changes, message):
    with pytest.raises(UserError) as error:
        labelled_responses([CANONICAL, {**CANONICAL, **changes}], "labelled", "set.parquet")
    assert str(error.value) == f"set.parquet row 2: {message}"


def test_unknown_format_and_no_records():
    with pytest.raises(DataFormatError, match="unknown format 'prm'; expected one of labelled, processbench, trl_stepwise"):
        labelled_responses([CANONICAL], "prm", "x.jsonl")
    with pytest.raises(DataFormatError, match=r"x.jsonl: no records \(the source is empty\)"):
        labelled_responses([], "labelled", "x.jsonl")


def test_the_format_choices_are_the_registered_readers():
    assert set(get_args(LabelledFormat)) == set(LABELLED_READERS)
    assert list(labelled_responses([CANONICAL], "labelled", "x")[0]) == list(LABELLED_KEYS)
