"""Bad data input and bad data settings: one clear error each (no traceback from a library),
naming the setting as YAML writes it, or the file and the line / row as an editor counts them;
rows cut or dropped to fit are counted in the log."""

import json
import logging
from pathlib import Path

import pytest

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.data.readers import read_records
from stepwise_lit.data.formats import to_canonical
from stepwise_lit.errors import DataFormatError, SettingError

ROW = {"prompt": "What is 2 + 3?", "chosen": "Step 1: 2 + 3 = 5", "rejected": "Step 1: 2 + 3 = 6",
       "chosen_step_scores": [1.0], "rejected_step_scores": [-1.0]}


def write_jsonl(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 0}, "data.batch_size: must be at least 1"),
        ({"batch_size": -2}, "data.batch_size: must be at least 1"),
        ({"eval_batch_size": 0}, "data.eval_batch_size: must be at least 1"),
        ({"val_fraction": 1.0}, "data.val_fraction: must be in [0, 1)"),
        ({"val_fraction": -0.1}, "data.val_fraction: must be in [0, 1)"),
        ({"step_delimiter": ""}, "data.step_delimiter: must not be empty"),
        ({"max_length": 0}, "data.max_length: must be at least 1"),
        ({"max_prompt_length": 0}, "data.max_prompt_length: must be at least 1"),
        ({"max_length": 100, "max_prompt_length": 100}, "data.max_prompt_length: 100 leaves no room for a response"),
        ({"max_num_steps": 0}, "data.max_num_steps: must be at least 1"),
        ({"num_workers": -1}, "data.num_workers: must be 0 or more"),
        ({"synthetic_max_value": 5}, "data.synthetic_max_value: must be at least 10"),
        ({"format": "jsonl"}, "data.format: unknown value 'jsonl'; expected one of delimited, stepwise"),
        ({"truncation": "cut"}, "data.truncation: unknown value 'cut'; expected one of truncate, drop, error"),
    ],
)
def test_bad_setting_names_itself(tmp_path, settings, message):
    with pytest.raises(SettingError) as error:
        StepwiseDataModule(cache_dir=str(tmp_path), **settings)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("name", ["nope", "nope.jsonl", "./data/train", "../missing/train.parquet", "a/b/c"])
def test_a_missing_path_fails_at_once_without_a_hub_lookup(tmp_path, monkeypatch, name):
    """Only an ``owner/name`` id that is not on disk would be looked up on the hub."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingError, match=f"^data.path: no such file or folder: '{name}'"):
        StepwiseDataModule(path=name, cache_dir=str(tmp_path))
    with pytest.raises(SettingError, match="^data.val_path: no such file or folder"):
        StepwiseDataModule(val_path=name, cache_dir=str(tmp_path))


def test_a_file_of_an_unknown_type_names_the_setting(tmp_path):
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(SettingError, match=r"^data.path: '.*rows.txt' is a .txt file; expected .json, .jsonl"):
        StepwiseDataModule(path=str(tmp_path / "rows.txt"), cache_dir=str(tmp_path))


# ---------------------------------------------------------------- files


def prepare_error(tmp_path: Path, path: str, **options) -> str:
    datamodule = StepwiseDataModule(path=path, cache_dir=str(tmp_path / "cache"), **options)
    with pytest.raises(DataFormatError) as error:
        datamodule.prepare_data()
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv"])
def test_an_empty_file(tmp_path, name):
    (tmp_path / name).write_text("")
    assert prepare_error(tmp_path, str(tmp_path / name)) == f"{name}: no records (the source is empty)"


def test_a_file_whose_records_all_give_no_pair(tmp_path):
    record = {"question": {"problem": "p"}, "label": {"steps": [], "finish_reason": "bad_problem"}}
    path = write_jsonl(tmp_path / "labels.jsonl", json.dumps(record), json.dumps(record))
    assert prepare_error(tmp_path, path, format="prm800k") == (
        "labels.jsonl: none of the 2 records gives a pair (format prm800k; the log counts the skipped records by reason)"
    )


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(ROW).encode() + b"\n" + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    expected = "latin1.jsonl line 2: not UTF-8 text: byte 0xe9 at column 16; save the file as UTF-8"
    assert prepare_error(tmp_path, str(path)) == expected
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes(b"prompt,chosen,rejected\nq,a,b\nq,caf\xe9,b\n")
    assert prepare_error(tmp_path, str(csv_path)) == (
        "latin1.csv line 3: not UTF-8 text: byte 0xe9 at column 6; save the file as UTF-8"
    )


def test_a_corrupt_parquet_file(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    assert prepare_error(tmp_path, str(path)).startswith("rows.parquet: not a readable parquet file (")


# ---------------------------------------------------------------- places count from 1, as an editor does


def test_jsonl_errors_name_the_line_of_the_file(tmp_path):
    """Line 1 is good, line 2 blank, line 3 lacks ``rejected``: the error names line 3 and the
    user's field ``rejected`` (the delimited format's name for the rejected steps)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", json.dumps(ROW), "", json.dumps({**ROW, "rejected": ""}))
    assert prepare_error(tmp_path, path) == "pairs.jsonl line 3: field 'rejected': no steps (the list is empty)"


def test_csv_errors_name_the_line_of_the_file(tmp_path):
    """Header on line 1, a good row on line 2, a row with 2 scores for 1 step on line 3."""
    path = tmp_path / "pairs.csv"
    path.write_text(
        "prompt,chosen,rejected,chosen_step_scores,rejected_step_scores\n"
        'q,Step 1: a,Step 1: b,[1],[-1]\n'
        'q,Step 1: a,Step 1: b,"[1, 1]",[-1]\n'
    )
    assert prepare_error(tmp_path, str(path)) == (
        "pairs.csv line 3: field 'chosen_step_scores': chosen has 1 steps but chosen_step_scores has 2 values"
    )


def test_json_list_and_parquet_errors_name_the_row_from_1(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    rows = [ROW, {**ROW, "chosen_step_scores": [2.0]}]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    for name in ("pairs.json", "pairs.parquet"):
        assert prepare_error(tmp_path, str(tmp_path / name)) == (
            f"{name} row 2: field 'chosen_step_scores': score 1 is 2.0, outside [-1, 1]"
        )


def test_tokenization_errors_name_the_line_of_the_record(tmp_path):
    """The record on line 4 (after a blank line) has identical sides; ``truncation: error`` names line 4."""
    same = {**ROW, "rejected": ROW["chosen"], "rejected_step_scores": [1.0]}
    path = write_jsonl(tmp_path / "pairs.jsonl", json.dumps(ROW), json.dumps(ROW), "", json.dumps(same))
    assert prepare_error(tmp_path, path, truncation="error") == (
        "pairs.jsonl line 4: chosen and rejected are identical; raise max_length or set data.truncation to 'drop'"
    )


def test_records_read_from_a_list_count_rows_from_1():
    with pytest.raises(DataFormatError) as error:
        to_canonical([ROW, {**ROW, "prompt": " "}], "delimited", "hub/set")
    assert str(error.value) == "hub/set row 2: field 'prompt': empty prompt"
    assert (error.value.row, error.value.line) == (2, None)


def test_read_records_keeps_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", "", json.dumps(ROW), "", "", json.dumps(ROW))
    assert read_records(path).line_numbers == [2, 5]


# ---------------------------------------------------------------- responses that do not fit whole


def long_response_file(tmp_path: Path) -> str:
    """Line 1: a pair whose chosen has 10,000 steps; line 2: a pair of one step each."""
    chosen = "".join(f"Step {k}: {k} + 1 = {k + 1}\n\n" for k in range(1, 10_001))
    long_row = {**ROW, "chosen": chosen, "chosen_step_scores": [1.0] * 10_000}
    return write_jsonl(tmp_path / "long.jsonl", json.dumps(long_row), json.dumps(ROW))


def test_a_10000_step_response_with_truncation_error_names_its_line(tmp_path):
    message = prepare_error(tmp_path, long_response_file(tmp_path), step_delimiter="Step", truncation="error")
    assert message.startswith("long.jsonl line 1: does not fit whole (chosen keeps ")
    assert "of 10000 steps (max_length 1024)" in message


def test_max_num_steps_with_truncation_error_names_the_limit(tmp_path):
    message = prepare_error(
        tmp_path, long_response_file(tmp_path), step_delimiter="Step", truncation="error", max_length=None, max_num_steps=8
    )
    assert message.startswith("long.jsonl line 1: does not fit whole (chosen keeps 8 of 10000 steps (max_num_steps 8))")


@pytest.mark.parametrize(
    ("truncation", "kept_rows", "logged"),
    [
        ("truncate", 2, "long.jsonl: cut the responses of 1 of 2 rows at step boundaries"),
        ("drop", 1, "long.jsonl: dropped 1 of 2 rows (does not fit whole"),
    ],
)
def test_a_10000_step_response_is_counted_in_the_log(tmp_path, caplog, truncation, kept_rows, logged):
    datamodule = StepwiseDataModule(
        path=long_response_file(tmp_path), step_delimiter="Step", truncation=truncation, val_fraction=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    with caplog.at_level(logging.WARNING, logger="stepwise_lit"):
        datamodule.setup("fit")
    assert len(datamodule.train_dataset) == kept_rows
    assert logged in caplog.text


def test_a_source_of_which_no_pair_fits_is_an_error(tmp_path):
    """Both pairs need more than 5 tokens for their prompt alone: every row is dropped, so training would see none."""
    path = write_jsonl(tmp_path / "pairs.jsonl", json.dumps(ROW), json.dumps(ROW))
    assert prepare_error(tmp_path, path, max_length=5, val_fraction=0.0) == (
        "pairs.jsonl: none of the 2 pairs fits data.max_length 5 "
        "(truncation: truncate; the log counts the dropped rows by reason)"
    )
