"""Labelled responses (error localisation): ProcessBench, TRL stepwise-supervision and PRM800K rows, validation."""

import json
import logging
from typing import get_args

import pytest
import torch

from stepwise_lit.data.formats import DataFormatError
from stepwise_lit.data.readers import read_records
from stepwise_lit.data.labelled import (
    LABELLED_KEYS,
    LABELLED_READERS,
    LabelledFormat,
    labelled_responses,
    read_labelled,
)
from stepwise_lit.errors import UserError
from stepwise_lit.evaluation.processbench import first_error_labels
from tests.helpers.paths import SHARED_DATA

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
    with pytest.raises(DataFormatError, match="unknown format 'prm'; expected one of labelled, prm800k, processbench, trl_stepwise"):
        labelled_responses([CANONICAL], "prm", "x.jsonl")
    with pytest.raises(DataFormatError, match=r"x.jsonl: no records \(the source is empty\)"):
        labelled_responses([], "labelled", "x.jsonl")


def test_the_format_choices_are_the_registered_readers():
    assert set(get_args(LabelledFormat)) == set(LABELLED_READERS)
    assert list(labelled_responses([CANONICAL], "labelled", "x")[0]) == list(LABELLED_KEYS)


# ---------------------------------------------------------------- PRM800K

PRM800K = SHARED_DATA / "prm800k" / "prm800k_found_records.jsonl"


def prm800k_record(finish_reason="found_error"):
    """Step 1 rated 0 and chosen; step 2 not chosen (labelling found an error): its -1 completion ends the response."""
    return {
        "labeler": "L",
        "timestamp": "T",
        "question": {"problem": "What is 1 + 1?", "ground_truth_answer": "2"},
        "label": {
            "finish_reason": finish_reason,
            "steps": [
                {"completions": [{"text": "Add the ones.", "rating": 0}], "human_completion": None, "chosen_completion": 0},
                {
                    "completions": [{"text": "So it is 2.", "rating": 1}, {"text": "So it is 3.", "rating": -1}],
                    "human_completion": None,
                    "chosen_completion": None,
                },
            ],
        },
    }


def test_prm800k_trajectory_ends_with_the_error_labelling_found():
    (response,) = labelled_responses([prm800k_record()], "prm800k", "phase2.jsonl")
    assert response == {
        "prompt": "What is 1 + 1?",
        "steps": ["Add the ones.\n", "So it is 3."],
        "step_scores": [0.0, -1.0],
        "first_error": 1,
        "id": "L:T",
        "reference_answer": "2",
    }


def test_prm800k_human_completion_is_a_right_step():
    record = prm800k_record("solution")
    record["label"]["steps"][1]["human_completion"] = {"text": "It is 2.", "rating": None, "source": "human"}
    (response,) = labelled_responses([record], "prm800k", "phase1.jsonl")
    assert (response["steps"], response["step_scores"], response["first_error"]) == (
        ["Add the ones.\n", "It is 2."], [0.0, 1.0], -1
    )


def test_prm800k_bad_problem_is_skipped_and_counted(caplog):
    records = [prm800k_record(), prm800k_record("bad_problem")]
    with caplog.at_level(logging.WARNING, logger="stepwise_lit"):
        assert len(labelled_responses(records, "prm800k", "phase2.jsonl")) == 1
    assert "phase2.jsonl: skipped 1 of 2 records (finish_reason is bad_problem)" in caplog.text


def test_prm800k_problem_that_is_not_text_names_its_field():
    record = prm800k_record()
    record["question"]["problem"] = 7
    with pytest.raises(DataFormatError, match=r"p.jsonl row 1: field 'question.problem': expected a string or a list"):
        labelled_responses([record], "prm800k", "p.jsonl")


@pytest.mark.skipif(not PRM800K.exists(), reason="shared PRM800K data not present")
def test_prm800k_found_records_end_at_their_error_exactly_when_labelling_found_one():
    records = read_records(PRM800K)
    responses = read_labelled(PRM800K, "prm800k")
    assert len(responses) == len(records) == 16
    for record, response in zip(records, responses):
        found_error = record["label"]["finish_reason"] == "found_error"
        assert response["first_error"] == (len(response["steps"]) - 1 if found_error else -1)
