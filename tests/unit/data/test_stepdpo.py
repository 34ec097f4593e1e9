"""The Step-DPO format: shared correct steps, then a correct and a wrong next step, as a scored pair."""

import json

import pytest

from stepwise_lit.data.formats import DataFormatError, to_canonical
from stepwise_lit.data.readers import read_records
from stepwise_lit.data.tokenize import first_divergence
from stepwise_lit.prepare import main

PREFIX = "Let's think step by step.\nStep 1: 2 + 3 = 5.\nStep 2:"


def step_dpo_row(**changes) -> dict:
    """A row in Math-Step-DPO-10K's layout: the prefix ends with the header of the parting step."""
    row = {
        "dataset": "hand",
        "prompt": "What is 2 + 3 + 4?",
        "initial_reason_steps": PREFIX,
        "chosen": " 5 + 4 = 9.\nStep 3: The answer is 9.",
        "rejected": " 5 + 4 = 10.\nStep 3: The answer is 10.",
        "answer": "9",
    }
    row.update(changes)
    return row


def test_prefix_steps_score_plus_one_and_the_parting_step_on_is_chosen_plus_rejected_minus():
    """With delimiter "\\nStep" the texts split into: the preamble, step 1 (both inside the
    prefix: +1 on both sides), step 2 (the header "\\nStep 2:" from the prefix plus the
    continuation: +1 chosen, -1 rejected) and step 3 (+1 chosen, -1 rejected)."""
    (row,) = to_canonical([step_dpo_row(id=7)], "step_dpo", "steps.jsonl", "\nStep")
    assert row == {
        "prompt": "What is 2 + 3 + 4?",
        "chosen_steps": ["Let's think step by step.", "\nStep 1: 2 + 3 = 5.", "\nStep 2: 5 + 4 = 9.", "\nStep 3: The answer is 9."],
        "rejected_steps": ["Let's think step by step.", "\nStep 1: 2 + 3 = 5.", "\nStep 2: 5 + 4 = 10.", "\nStep 3: The answer is 10."],
        "chosen_step_scores": [1.0, 1.0, 1.0, 1.0],
        "rejected_step_scores": [1.0, 1.0, -1.0, -1.0],
        "chosen_score": None,
        "rejected_score": None,
        "id": "7",
        "reference_solution": "9",
    }
    assert first_divergence(row["chosen_steps"], row["rejected_steps"]) == 2


def test_an_empty_prefix_makes_every_step_the_sides_own():
    (row,) = to_canonical([step_dpo_row(initial_reason_steps="")], "step_dpo", "steps.jsonl", "\nStep")
    assert row["chosen_steps"] == [" 5 + 4 = 9.", "\nStep 3: The answer is 9."]
    assert row["chosen_step_scores"] == [1.0, 1.0]
    assert row["rejected_step_scores"] == [-1.0, -1.0]
    assert row["id"] == "steps-0"


def test_a_delimiter_absent_from_the_text_gives_one_step_per_side():
    """The default delimiter "\\n\\nStep" does not occur: each response is one step, +1 vs -1."""
    (row,) = to_canonical([step_dpo_row()], "step_dpo", "steps.jsonl")
    assert row["chosen_steps"] == [PREFIX + " 5 + 4 = 9.\nStep 3: The answer is 9."]
    assert row["chosen_step_scores"] == [1.0] and row["rejected_step_scores"] == [-1.0]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"initial_reason_steps": None}, "field 'initial_reason_steps': missing"),
        ({"rejected": " \n"}, "field 'rejected': empty step (the step after initial_reason_steps is blank)"),
        ({"chosen": ["5 + 4 = 9."]}, "field 'chosen': expected a string, got list"),
        ({"answer": 9}, "field 'answer': expected a string, got int"),
        ({"prompt": " "}, "field 'prompt': empty prompt"),
    ],
)
def test_bad_rows_name_their_line_and_field(tmp_path, changes, message):
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps(step_dpo_row()) + "\n\n" + json.dumps(step_dpo_row(**changes)) + "\n")
    with pytest.raises(DataFormatError) as error:
        to_canonical(read_records(path), "step_dpo", path.name, "\nStep")
    assert str(error.value) == f"steps.jsonl line 3: {message}"


def test_prepare_writes_the_canonical_pairs(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps(step_dpo_row()) + "\n")
    out = tmp_path / "pairs.jsonl"
    main(["--data.format", "step_dpo", "--data.path", str(raw), "--output", str(out), "--data.step_delimiter", "\nStep"])
    assert read_records(out) == to_canonical([step_dpo_row()], "step_dpo", "raw.jsonl", "\nStep")
