"""Input adapters on real rows, validation messages, and file reading."""

import json
import logging
import math
import random
from pathlib import Path
from typing import get_args

import pytest

from stepwise_lit.data.formats import (
    ADAPTERS,
    DataFormatError,
    Format,
    extract_steps,
    to_canonical,
    validate_row,
)
from stepwise_lit.data.readers import read_records
from stepwise_lit.data.gsm8k import corrupt_solution
from stepwise_lit.data.records import RecordContext, split_lines
from stepwise_lit.data.synthetic import generate_pairs
from tests.helpers.paths import SHARED_DATA

SHARED_DATA = SHARED_DATA
GSM8K = SHARED_DATA / "gsm8k"
PRM800K = SHARED_DATA / "prm800k"
needs_gsm8k = pytest.mark.skipif(not GSM8K.is_dir(), reason=f"GSM8K data not found at {GSM8K}")
needs_prm800k = pytest.mark.skipif(not PRM800K.is_dir(), reason=f"PRM800K data not found at {PRM800K}")


def first_lines(path: Path, count: int) -> list[dict]:
    with path.open() as handle:
        return [json.loads(next(handle)) for _ in range(count)]


def valid_row(**changes) -> dict:
    row = {
        "prompt": "What is 2 + 3 + 4?",
        "chosen_steps": ["Step 1: 2 + 3 = 5\n", "Step 2: 5 + 4 = 9\n"],
        "rejected_steps": ["Step 1: 2 + 3 = 6\n", "Step 2: 6 + 4 = 10\n"],
        "chosen_step_scores": [1.0, 1.0],
        "rejected_step_scores": [-1.0, -1.0],
    }
    row.update(changes)
    return row


# ---------------------------------------------------------------- step splitting


def test_extract_steps_keeps_the_delimiter_with_the_next_step():
    text = "Let me think.\n\nStep 1: 2 + 3 = 5\n\nStep 2: 5 + 4 = 9"
    steps = extract_steps(text, "\n\nStep")
    assert steps == ["Let me think.", "\n\nStep 1: 2 + 3 = 5", "\n\nStep 2: 5 + 4 = 9"]
    assert "".join(steps) == text


def test_extract_steps_text_starting_with_the_delimiter_has_no_empty_first_step():
    assert extract_steps("\n\nStep 1: a\n\nStep 2: b", "\n\nStep") == ["\n\nStep 1: a", "\n\nStep 2: b"]


def test_extract_steps_joins_blank_pieces_to_the_previous_step():
    text = "a\n\nb\n"
    steps = extract_steps(text, "\n")
    # pieces: "a", "\n", "\nb", "\n" -> the blank ones join the step before them
    assert steps == ["a\n", "\nb\n"]
    assert "".join(steps) == text


def test_extract_steps_max_steps_joins_the_tail_into_the_last_step():
    text = "s1|s2|s3|s4"
    assert extract_steps(text, "|", max_steps=2) == ["s1", "|s2|s3|s4"]
    assert extract_steps(text, "|", max_steps=9) == ["s1", "|s2", "|s3", "|s4"]


def test_split_lines_keeps_newlines_and_joins_blank_lines():
    text = "\nfirst\n\nsecond\nA: 3"
    steps = split_lines(text)
    assert steps == ["\nfirst\n\n", "second\n", "A: 3"]
    assert "".join(steps) == text


# ---------------------------------------------------------------- adapters on real rows


@needs_gsm8k
def test_delimited_on_gsm8k_text():
    record = first_lines(GSM8K / "example_model_solutions.jsonl", 1)[0]
    solution = record["175b_finetuning"]["solution"]
    chosen_lines = record["ground_truth"].count("\n") + 1
    rejected_lines = solution.count("\n") + 1
    row = {
        "prompt": record["question"],
        "chosen": record["ground_truth"],
        "rejected": solution,
        "chosen_step_scores": [1] * chosen_lines,
        "rejected_step_scores": [-1] * rejected_lines,
    }
    (canonical,) = to_canonical([row], "delimited", "pairs.jsonl", step_delimiter="\n")
    assert len(canonical["chosen_steps"]) == 3 and len(canonical["rejected_steps"]) == 4
    assert canonical["chosen_steps"][1].startswith("\nShe makes 9 * 2")
    assert "".join(canonical["rejected_steps"]) == solution
    assert canonical["rejected_step_scores"] == [-1.0] * 4
    assert canonical["chosen_score"] is None and canonical["id"] is None


@needs_gsm8k
def test_preference_plain_and_conversational_on_gsm8k_text():
    record = first_lines(GSM8K / "example_model_solutions.jsonl", 1)[0]
    good, bad = record["ground_truth"], record["6b_finetuning"]["solution"]
    plain = {"prompt": record["question"], "chosen": good, "rejected": bad}
    conversational = {
        "prompt": [{"role": "user", "content": record["question"]}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }
    implicit = {
        "chosen": conversational["prompt"] + conversational["chosen"],
        "rejected": conversational["prompt"] + conversational["rejected"],
    }
    rows = to_canonical([plain, conversational, implicit], "preference", "prefs", "\n", require_scores=False)
    assert rows[0]["prompt"] == record["question"]
    assert rows[1]["prompt"] == rows[2]["prompt"] == [{"role": "user", "content": record["question"]}]
    for row in rows:
        assert "".join(row["chosen_steps"]) == good and len(row["chosen_steps"]) == 3
        assert "".join(row["rejected_steps"]) == bad and len(row["rejected_steps"]) == 3
        assert row["chosen_step_scores"] is None


def test_preference_rejects_several_messages_after_an_explicit_prompt():
    record = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    with pytest.raises(DataFormatError) as error:
        to_canonical([record], "preference", "prefs.jsonl", require_scores=False)
    assert str(error.value) == (
        "prefs.jsonl row 1: field 'chosen': expected one assistant message after an explicit prompt, got 2 messages"
    )


def test_stepwise_and_synthetic_keep_canonical_rows():
    rows = generate_pairs(4, seed=3)
    assert to_canonical(rows, "synthetic", "synthetic") == rows
    row = valid_row(id=7, extra="dropped")
    (canonical,) = to_canonical([row], "stepwise", "rows.jsonl")
    assert canonical["id"] == "7"
    assert "extra" not in canonical
    assert canonical["chosen_steps"] == row["chosen_steps"]


@needs_gsm8k
def test_gsm8k_model_solutions_give_one_pair_per_question_with_an_incorrect_solution(caplog):
    records = read_records(GSM8K / "example_model_solutions.jsonl")
    fields = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
    with_incorrect = sum(any(not record[field]["is_correct"] for field in fields) for record in records)
    with caplog.at_level(logging.WARNING, logger="stepwise_lit"):
        rows = to_canonical(records, "gsm8k", "example_model_solutions.jsonl", require_scores=False)
    assert len(rows) == with_incorrect == 1163
    assert f"skipped {1319 - 1163} of 1319 records (no incorrect model solution)" in caplog.text

    first = rows[0]  # Janet's ducks: 175b_verification is correct, 175b_finetuning is not
    assert first["chosen_steps"] == [
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n",
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n",
        "A: 18",
    ]
    assert "".join(first["rejected_steps"]) == records[0]["175b_finetuning"]["solution"]
    assert len(first["rejected_steps"]) == 4
    assert first["chosen_step_scores"] == [1.0, 1.0, 1.0]
    assert first["rejected_step_scores"] is None
    assert (first["chosen_score"], first["rejected_score"]) == (1.0, -1.0)
    assert first["reference_solution"] == records[0]["ground_truth"]
    assert first["id"] == "example_model_solutions-0"


@needs_gsm8k
def test_gsm8k_model_solutions_need_scores_unless_a_scorer_fills_them():
    records = first_lines(GSM8K / "example_model_solutions.jsonl", 1)
    with pytest.raises(DataFormatError) as error:
        to_canonical(records, "gsm8k", "example_model_solutions.jsonl")
    message = str(error.value)
    assert message.startswith("example_model_solutions.jsonl row 1: field 'rejected_step_scores': step scores are missing")
    assert "python -m stepwise_lit.score" in message


@needs_gsm8k
def test_gsm8k_train_rows_get_a_seeded_corrupted_rejected():
    records = first_lines(GSM8K / "train.jsonl", 50)
    rows = to_canonical(records, "gsm8k", "train.jsonl", seed=0)
    assert rows == to_canonical(records, "gsm8k", "train.jsonl", seed=0)
    assert rows != to_canonical(records, "gsm8k", "train.jsonl", seed=1)
    for record, row in zip(records, rows):
        assert "".join(row["chosen_steps"]) == record["answer"] == row["reference_solution"]
        assert row["chosen_step_scores"] == [1.0] * len(row["chosen_steps"])
        error_step = row["rejected_step_scores"].index(-1.0)
        scores = row["rejected_step_scores"]
        assert scores == [1.0] * error_step + [-1.0] * (len(scores) - error_step)
        assert row["rejected_steps"][:error_step] == row["chosen_steps"][:error_step]
        assert row["rejected_steps"][error_step] != row["chosen_steps"][error_step]
        assert len(row["rejected_steps"]) == len(row["chosen_steps"])


def test_corruption_propagates_through_later_calculator_annotations():
    steps = ["x is 2+3=<<2+3=5>>5\n", "y is 5*2=<<5*2=10>>10\n", "#### 10"]
    seen_error_steps = set()
    for seed in range(20):
        corrupted, error_step = corrupt_solution(steps, random.Random(seed))
        seen_error_steps.add(error_step)
        if error_step == 0:
            wrong = int(corrupted[0].split(">>")[1])
            assert wrong != 5 and corrupted[0] == f"x is 2+3=<<2+3={wrong}>>{wrong}\n"
            assert corrupted[1] == f"y is {wrong}*2=<<{wrong}*2={2 * wrong}>>{2 * wrong}\n"
            assert corrupted[2] == f"#### {2 * wrong}"
        else:
            wrong = int(corrupted[1].split(">>")[1])
            assert corrupted[0] == steps[0]
            assert wrong != 10 and corrupted[1] == f"y is 5*2=<<5*2={wrong}>>{wrong}\n"
            assert corrupted[2] == f"#### {wrong}"
    assert seen_error_steps == {0, 1}


@needs_prm800k
def test_prm800k_every_found_record_converts_or_is_skipped_with_a_reason(caplog):
    records = read_records(PRM800K / "prm800k_found_records.jsonl")
    assert len(records) == 16
    with caplog.at_level(logging.WARNING, logger="stepwise_lit"):
        rows = to_canonical(records, "prm800k", "prm800k_found_records.jsonl")
    # Pairs per record, counted by hand from the README's table of ratings:
    # a pair for each labelled step with a +1 (or human) option and a -1 completion.
    expected_pairs = {0: 1, 1: 1, 2: 1, 3: 12, 4: 3, 6: 1, 9: 1, 10: 1, 11: 1, 12: 1, 13: 1}
    pairs = {}
    for row in rows:
        record_index = next(i for i, r in enumerate(records) if row["id"].startswith(f"{r['labeler']}:{r['timestamp']}:"))
        pairs[record_index] = pairs.get(record_index, 0) + 1
    assert pairs == expected_pairs
    assert (
        "prm800k_found_records.jsonl: skipped 5 of 16 records "
        "(no labelled step has both a +1 (or human) and a -1 completion): lines 6, 8, 9, 15, 16"
    ) in caplog.text


@needs_prm800k
def test_prm800k_phase2_pair_at_the_first_error():
    record = read_records(PRM800K / "prm800k_found_records.jsonl")[6]
    (row,) = to_canonical([record], "prm800k", "prm800k_found_records.jsonl")
    steps = record["label"]["steps"]
    prefix = [step["completions"][0]["text"] + "\n" for step in steps[:6]]
    # the last step is rated [-1, 1, 1, 1] with no chosen completion
    assert row["chosen_steps"] == prefix + [steps[6]["completions"][1]["text"]]
    assert row["rejected_steps"] == prefix + [steps[6]["completions"][0]["text"]]
    assert row["chosen_step_scores"] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert row["rejected_step_scores"] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, -1.0]
    assert row["reference_solution"] == record["question"]["ground_truth_solution"]
    assert row["id"].endswith(":step7")


@needs_prm800k
def test_prm800k_human_completion_is_the_plus_one_option_and_the_trajectory_continues():
    record = read_records(PRM800K / "prm800k_found_records.jsonl")[0]
    (row,) = to_canonical([record], "prm800k", "prm800k_found_records.jsonl")
    steps = record["label"]["steps"]
    assert row["chosen_steps"][1] == steps[1]["human_completion"]["text"] + "\n"
    assert len(row["chosen_steps"]) == 6  # the whole labelled trajectory
    assert row["chosen_step_scores"] == [1.0] * 6
    assert row["rejected_steps"] == [steps[0]["completions"][0]["text"] + "\n", steps[1]["completions"][0]["text"]]
    assert row["rejected_step_scores"] == [1.0, -1.0]
    assert row["reference_solution"] == "29"  # phase 1: only the answer


@needs_prm800k
def test_prm800k_null_completions_end_the_trajectory():
    record = read_records(PRM800K / "prm800k_found_records.jsonl")[2]  # give_up, last step "completions": null
    assert record["label"]["steps"][8]["completions"] is None
    (row,) = to_canonical([record], "prm800k", "prm800k_found_records.jsonl")
    assert len(row["chosen_steps"]) == 8 and len(row["rejected_steps"]) == 8


def test_prm800k_bad_problem_is_skipped_with_its_reason(caplog):
    step = {"completions": [{"text": "a", "rating": 1, "flagged": None}], "human_completion": None, "chosen_completion": 0}
    record = {"question": {"problem": "p"}, "label": {"steps": [step], "finish_reason": "bad_problem"}}
    with caplog.at_level(logging.WARNING, logger="stepwise_lit"):
        assert to_canonical([record], "prm800k", "labels.jsonl") == []
    assert "skipped 1 of 1 records (finish_reason is bad_problem): rows 1" in caplog.text


# ---------------------------------------------------------------- bad input, one message each


def error_message(rows, format="stepwise", source="train.jsonl", **options) -> str:
    with pytest.raises(DataFormatError) as error:
        to_canonical(rows, format, source, **options)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_field():
    record = {"prompt": "q", "rejected": "Step 1: x"}
    assert error_message([record], "delimited") == "train.jsonl row 1: field 'chosen': missing"
    row = valid_row()
    del row["rejected_steps"]
    assert error_message([valid_row(), row]) == "train.jsonl row 2: field 'rejected_steps': missing"


def test_wrong_type():
    assert error_message([valid_row(chosen_steps="Step 1: 2 + 3 = 5")]) == (
        "train.jsonl row 1: field 'chosen_steps': expected a list of strings, got str"
    )
    assert error_message([valid_row(chosen_step_scores=[1, "1"])]) == (
        "train.jsonl row 1: field 'chosen_step_scores': score 2 is str '1', expected a number"
    )
    assert error_message([{"prompt": "q", "chosen": ["a"], "rejected": "b"}], "delimited") == (
        "train.jsonl row 1: field 'chosen': expected a string, got list"
    )


def test_empty_step():
    assert error_message([valid_row(rejected_steps=["Step 1: 2 + 3 = 6\n", " \n"])]) == (
        "train.jsonl row 1: field 'rejected_steps': step 2 is empty"
    )


def test_no_steps():
    assert error_message([valid_row(chosen_steps=[], chosen_step_scores=[])]) == (
        "train.jsonl row 1: field 'chosen_steps': no steps (the list is empty)"
    )
    # a delimited row's error names the user's field (chosen), not the internal one (chosen_steps)
    assert error_message([{"prompt": "q", "chosen": "", "rejected": "b"}], "delimited") == (
        "train.jsonl row 1: field 'chosen': no steps (the list is empty)"
    )


def test_score_count_differs_from_step_count():
    row = valid_row(
        chosen_steps=["s1", "s2", "s3", "s4"],
        chosen_step_scores=[1, 1, 1],
    )
    with pytest.raises(DataFormatError) as error:
        validate_row(row, RecordContext("train.jsonl", index=17, step_delimiter="", seed=0))
    assert str(error.value) == (
        "train.jsonl row 18: field 'chosen_step_scores': chosen has 4 steps but chosen_step_scores has 3 values"
    )
    assert (error.value.source, error.value.row, error.value.field) == ("train.jsonl", 18, "chosen_step_scores")


def test_nan_and_inf_scores():
    assert error_message([valid_row(rejected_step_scores=[-1.0, math.nan])]) == (
        "train.jsonl row 1: field 'rejected_step_scores': score 2 is nan, expected a finite number"
    )
    assert error_message([valid_row(chosen_step_scores=[math.inf, 1.0])]) == (
        "train.jsonl row 1: field 'chosen_step_scores': score 1 is inf, expected a finite number"
    )
    assert error_message([valid_row(chosen_score=math.nan)]) == (
        "train.jsonl row 1: field 'chosen_score': nan is not a finite number"
    )


def test_score_outside_minus_one_to_one():
    assert error_message([valid_row(chosen_step_scores=[1.0, 1.5])]) == (
        "train.jsonl row 1: field 'chosen_step_scores': score 2 is 1.5, outside [-1, 1]"
    )


def test_empty_prompt():
    assert error_message([valid_row(prompt="  \n")]) == "train.jsonl row 1: field 'prompt': empty prompt"
    assert error_message([valid_row(prompt=[])]) == "train.jsonl row 1: field 'prompt': empty prompt (no messages)"
    assert error_message([valid_row(prompt=None)]) == "train.jsonl row 1: field 'prompt': missing"


def test_unparseable_json_line_names_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(valid_row()) + "\n\n" + '{"prompt": "q", "chosen_steps": [}\n')
    with pytest.raises(DataFormatError) as error:
        read_records(path)
    assert str(error.value) == "bad.jsonl line 3: invalid JSON: Expecting value (column 34)"


def test_the_format_choices_are_the_registered_adapters():
    assert set(get_args(Format)) == set(ADAPTERS)


def test_unknown_format():
    assert error_message([valid_row()], format="xml") == (
        "train.jsonl: unknown format 'xml'; expected one of delimited, gsm8k, preference, prm800k, step_dpo, stepwise, synthetic"
    )


def test_record_that_is_not_an_object():
    assert error_message([valid_row(), ["a", "b"]]) == "train.jsonl row 2: expected a record object (dict), got list"


# ---------------------------------------------------------------- reading files


def test_read_records_json_jsonl_parquet_csv(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    rows = [valid_row(id="a"), valid_row(id="b", prompt="Other?")]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "rows.parquet")
    header = "prompt,chosen_steps,rejected_steps,chosen_step_scores,rejected_step_scores,id\n"
    csv_lines = [
        ",".join(
            ['"' + str(row[key] if isinstance(row[key], str) else json.dumps(row[key])).replace('"', '""') + '"'
             for key in ("prompt", "chosen_steps", "rejected_steps", "chosen_step_scores", "rejected_step_scores", "id")]
        )
        for row in rows
    ]
    (tmp_path / "rows.csv").write_text(header + "\n".join(csv_lines) + "\n")
    for name in ("rows.json", "lines.json", "rows.jsonl", "rows.parquet", "rows.csv"):
        records = read_records(tmp_path / name)
        assert to_canonical(records, "stepwise", name) == to_canonical(rows, "stepwise", "rows"), name


def test_read_records_unknown_extension(tmp_path):
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(DataFormatError) as error:
        read_records(tmp_path / "rows.txt")
    assert str(error.value) == "rows.txt: unknown file type '.txt'; expected .json, .jsonl, .parquet or .csv"
