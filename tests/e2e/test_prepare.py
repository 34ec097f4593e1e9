"""`prepare`: raw sources -> canonical pairs on disk (jsonl / parquet), counts in the log, clear errors."""

import json
import logging

import pytest

from stepwise_lit.data.readers import read_records
from stepwise_lit.data.formats import validate_row
from stepwise_lit.data.records import RecordContext
from stepwise_lit.prepare import main, prepare
from stepwise_lit.data.writers import write_rows
from tests.helpers.hub_folder import write_hub_folder
from tests.helpers.paths import SHARED_DATA

DATA = SHARED_DATA
GSM8K_SOLUTIONS = DATA / "gsm8k" / "example_model_solutions.jsonl"
PRM800K = DATA / "prm800k" / "prm800k_found_records.jsonl"


@pytest.mark.skipif(not GSM8K_SOLUTIONS.exists(), reason="shared GSM8K data not present")
def test_gsm8k_model_solutions_become_pairs_to_score(tmp_path, caplog):
    out = tmp_path / "pairs.jsonl"
    with caplog.at_level(logging.INFO, logger="stepwise_lit"):
        main(["--data.format", "gsm8k", "--data.path", str(GSM8K_SOLUTIONS), "--output", str(out)])
    rows = read_records(out)
    assert len(rows) > 1000
    assert f"1319 records -> {len(rows)} pairs written" in caplog.text
    assert "skipped" in caplog.text and "no incorrect model solution" in caplog.text  # rejected, with the reason
    assert f"{len(rows)} responses have no step scores yet" in caplog.text
    assert rows[0]["rejected_step_scores"] is None and rows[0]["reference_solution"]
    for index, row in enumerate(rows[:50]):
        validate_row(row, RecordContext("pairs.jsonl", index, step_delimiter="", seed=0), require_scores=False)


@pytest.mark.skipif(not PRM800K.exists(), reason="shared PRM800K data not present")
def test_prm800k_records_to_parquet(tmp_path):
    out = tmp_path / "prm.parquet"
    rows = prepare("prm800k", out, PRM800K)
    assert rows and read_records(out) == rows
    assert all(row["chosen_step_scores"] is not None for row in rows)


def test_synthetic_pairs_are_generated_without_input(tmp_path):
    out = tmp_path / "synthetic.jsonl"
    main(["--data.path", "synthetic", "--num_pairs", "12", "--data.seed", "4", "--output", str(out)])
    rows = read_records(out)
    assert len(rows) == 12 and len({row["prompt"] for row in rows}) == 12
    assert rows == prepare("synthetic", tmp_path / "again.jsonl", num_pairs=12, seed=4)


def test_delimited_with_a_delimiter_from_the_command_line(tmp_path):
    """As in train.py, the flag's value is taken as written (bash: --data.step_delimiter $'\\n\\nStep')."""
    raw = tmp_path / "raw.jsonl"
    record = {"prompt": "2 + 3 * 4?", "chosen": "Step 1: 3 * 4 = 12\n\nStep 2: 2 + 12 = 14", "rejected": "Step 1: 2 + 3 = 5\n\nStep 2: 5 * 4 = 20",
              "chosen_step_scores": [1, 1], "rejected_step_scores": [-1, -1]}
    raw.write_text(json.dumps(record) + "\n")
    out = tmp_path / "pairs.jsonl"
    main(["--data.path", str(raw), "--output", str(out), "--data.step_delimiter", "\n\nStep"])
    (row,) = read_records(out)
    assert row["chosen_steps"] == ["Step 1: 3 * 4 = 12", "\n\nStep 2: 2 + 12 = 14"]
    assert row["rejected_step_scores"] == [-1.0, -1.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.path", "synthetic", "--num_pairs", "2", "--output", "x.csv"], "output: x.csv must end in .jsonl or .parquet"),
        (["--data.path", "missing.jsonl", "--output", "x.jsonl"], "data.path: no such file or folder: 'missing.jsonl'"),
        (["--data.path", "missing", "--output", "x.jsonl"], "data.path: no such file or folder: 'missing'"),
        (["--data.path", "synthetic", "--data.step_delimiter", "", "--output", "x.jsonl"], "data.step_delimiter: must not be empty"),
    ],
)
def test_bad_arguments_exit_with_a_message(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_invalid_record_names_its_row_and_field(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_step_scores": [1, 1], "rejected_step_scores": [1]}) + "\n")
    with pytest.raises(SystemExit):
        main(["--data.format", "delimited", "--data.path", str(raw), "--output", str(tmp_path / "x.jsonl")])
    error = capsys.readouterr().err
    assert "raw.jsonl line 1: field 'chosen_step_scores'" in error


def test_parquet_cannot_mix_prompt_types(tmp_path):
    rows = [{"prompt": "q"}, {"prompt": [{"role": "user", "content": "q"}]}]
    with pytest.raises(ValueError, match="write .jsonl instead"):
        write_rows(rows, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_prepare_reads_the_data_section_of_a_train_config(tmp_path, capsys):
    """The same YAML train.py reads: its data: section is used (model:/trainer: are ignored), and a
    flag after --config overrides it, as in train.py."""
    raw = tmp_path / "raw.jsonl"
    record = {"prompt": "q", "chosen": "Step 1: a\n\nStep 2: b", "rejected": "Step 1: a\n\nStep 2: c",
              "chosen_step_scores": [1, 1], "rejected_step_scores": [1, -1]}
    raw.write_text(json.dumps(record) + "\n")
    config = tmp_path / "train.yaml"
    config.write_text(
        "trainer: {max_steps: 2}\nmodel: {tiny_model: true}\n"
        f"data:\n  path: {raw}\n  format: delimited\n  step_delimiter: \"\\n\\nStep\"\n  batch_size: 4\n"
    )
    main(["--config", str(config), "--output", str(tmp_path / "a.jsonl")])
    (row,) = read_records(tmp_path / "a.jsonl")
    assert row["chosen_steps"] == ["Step 1: a", "\n\nStep 2: b"]
    main(["--config", str(config), "--data.step_delimiter", "\n", "--output", str(tmp_path / "b.jsonl")])
    (row,) = read_records(tmp_path / "b.jsonl")
    assert row["chosen_steps"] == ["Step 1: a\n", "\nStep 2: b"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--data.batch_size", "0", "--output", str(tmp_path / "c.jsonl")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == "error: data.batch_size: must be at least 1 (or null where allowed), got 0"
    assert not (tmp_path / "c.jsonl").exists()


def test_help_lists_the_data_settings_under_train_names(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "--data.step_delimiter" in help_text and "--config" in help_text and "--output" in help_text
    assert "{delimited,stepwise,preference,gsm8k,prm800k,step_dpo,synthetic}" in help_text


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b'{"prompt": "q"}\n{"prompt": "\xff"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["--data.path", str(raw), "--output", str(tmp_path / "x.jsonl")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[0].endswith("raw.jsonl line 2: not UTF-8 text: byte 0xff at column 13; save the file as UTF-8")


@pytest.mark.parametrize("spelling", ["same", "dot_slash", "symlink", "hard_link", "inside_folder"])
def test_prepare_never_writes_over_its_input(tmp_path, monkeypatch, capsys, spelling):
    """The output is refused (exit 2, naming `output`) before the input is read: the input holds
    text no reader accepts, so reading it first would fail with another message."""
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "raw.jsonl"
    raw.write_text("not json\n")
    output, data_path = {
        "same": (str(raw), str(raw)),
        "dot_slash": ("./raw.jsonl", "raw.jsonl"),
        "symlink": (str(tmp_path / "link.jsonl"), str(raw)),
        "hard_link": (str(tmp_path / "hard.jsonl"), str(raw)),
        "inside_folder": (str(tmp_path / "pairs.jsonl"), str(tmp_path)),
    }[spelling]
    if spelling == "symlink":
        (tmp_path / "link.jsonl").symlink_to(raw)
    if spelling == "hard_link":
        (tmp_path / "hard.jsonl").hardlink_to(raw)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data.format", "gsm8k", "--data.path", data_path, "--output", output])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"output: {output}" in error and "never" in error
    assert raw.read_text() == "not json\n"
    assert not (tmp_path / "pairs.jsonl").exists()


def test_prepare_reads_a_configuration_and_split_of_a_dataset_folder(tmp_path):
    """`--data.name hard --data.split test` on a folder laid out as a hub dataset (two configurations)."""
    folder = tmp_path / "owner_name"
    files = write_hub_folder(folder)
    out = tmp_path / "pairs.jsonl"
    main(["--data.path", str(folder), "--data.name", "hard", "--data.split", "test", "--data.format", "stepwise",
          "--output", str(out)])
    assert [row["prompt"] for row in read_records(out)] == [row["prompt"] for row in files["hard/test"]]
