"""Online rounds on disk (stepwise_lit.online.rounds): what is written, read back, resumed and never overwritten.

The scripted round (tests/online_round.py) gives one pair (goats, right solution vs the slip in
its last step) and skips the hens prompt."""

from __future__ import annotations

import json

import pytest

from stepwise_lit.data.readers import read_records
from stepwise_lit.data.formats import to_canonical
from stepwise_lit.errors import UserError
from stepwise_lit.models.generate import GenerationSettings
from stepwise_lit.online.pairs import PairSettings
from stepwise_lit.online.rounds import (
    PAIRS_FILE,
    SOLUTIONS_FILE,
    last_complete_round,
    read_solutions,
    round_folder,
    round_state,
    run_round,
)
from stepwise_lit.data.writers import write_rows
from stepwise_lit.online.solutions import RoundSettings
from stepwise_lit.rewards import ArithmeticStepVerifier
from tests.helpers.online_round import PROMPTS, REFERENCES, scripted_generator

SETTINGS = RoundSettings(generation=GenerationSettings(do_sample=True, num_samples=4))


def run(root, index, generator, settings=SETTINGS):
    return run_round(root, index, generator, ArithmeticStepVerifier(), PROMPTS, REFERENCES, settings, ["goats", "hens"])


def test_round_files_read_back_as_stepwise_data(tmp_path):
    """pairs.jsonl reads through read_records + to_canonical(format stepwise) as the same rows; solutions.jsonl
    holds all 2 x 4 samples with their text, steps, scores, answer and correctness, and reads back whole."""
    record = run(tmp_path, 0, scripted_generator())
    folder = tmp_path / "online" / "round-0"
    assert round_folder(tmp_path, 0) == folder
    pairs_path = folder / PAIRS_FILE
    assert list(to_canonical(read_records(pairs_path), "stepwise", str(pairs_path))) == record.pairs.rows
    assert [row["id"] for row in record.pairs.rows] == ["goats/1-2"]
    lines = [json.loads(line) for line in (folder / SOLUTIONS_FILE).read_text().splitlines()]
    expected_places = [(prompt, sample) for prompt in ("goats", "hens") for sample in range(4)]
    assert [(line["prompt_id"], line["sample"]) for line in lines] == expected_places
    assert lines[2]["step_scores"] == [1.0, 1.0, 1.0, -1.0]
    assert lines[2]["answer"] == "66" and lines[2]["correct"] is False
    assert read_solutions(folder / SOLUTIONS_FILE) == record.prompts
    assert sorted(path.name for path in folder.iterdir()) == [PAIRS_FILE, SOLUTIONS_FILE]  # no temporary file left


def test_complete_round_is_reused_without_generating(tmp_path):
    first = run(tmp_path, 0, scripted_generator())
    generator = scripted_generator()
    again = run(tmp_path, 0, generator)
    assert generator.calls == 0
    assert again.pairs == first.pairs and again.prompts == first.prompts
    assert round_state(tmp_path, 0) == "complete" and last_complete_round(tmp_path) == 0


def test_round_killed_after_its_solutions_builds_its_pairs_from_them(tmp_path):
    """A folder with solutions.jsonl and a temporary pairs file (the kill came mid-write) is 'generated':
    resuming writes the same pairs as an uninterrupted round, generates nothing, and keeps the temporary file."""
    uninterrupted = run(tmp_path / "whole", 0, scripted_generator())
    folder = round_folder(tmp_path / "killed", 0)
    folder.mkdir(parents=True)
    (folder / SOLUTIONS_FILE).write_bytes((round_folder(tmp_path / "whole", 0) / SOLUTIONS_FILE).read_bytes())
    leftover = folder / ".pairs.jsonl.x1y2.tmp"
    leftover.write_text('{"prompt": "half a li')
    assert round_state(tmp_path / "killed", 0) == "generated" and last_complete_round(tmp_path / "killed") is None
    generator = scripted_generator()
    resumed = run(tmp_path / "killed", 0, generator)
    assert generator.calls == 0
    assert resumed.pairs == uninterrupted.pairs
    assert (folder / PAIRS_FILE).read_bytes() == (round_folder(tmp_path / "whole", 0) / PAIRS_FILE).read_bytes()
    assert leftover.read_text() == '{"prompt": "half a li'


def test_round_with_only_a_temporary_file_is_generated_again(tmp_path):
    folder = round_folder(tmp_path, 0)
    folder.mkdir(parents=True)
    (folder / ".solutions.jsonl.abc.tmp").write_text("{")
    assert round_state(tmp_path, 0) == "missing"
    generator = scripted_generator()
    run(tmp_path, 0, generator)
    assert generator.calls == 1 and round_state(tmp_path, 0) == "complete"


def test_last_complete_round_stops_at_the_first_incomplete_one(tmp_path):
    """Rounds 0 and 1 complete, round 2 only generated, round 3 complete: the run resumes at round 2."""
    assert last_complete_round(tmp_path) is None
    for index in (0, 1, 3):
        run(tmp_path, index, scripted_generator())
    run(tmp_path, 2, scripted_generator())
    (round_folder(tmp_path, 2) / PAIRS_FILE).unlink()
    assert last_complete_round(tmp_path) == 1


def test_changed_pair_settings_on_a_complete_round_are_an_error(tmp_path):
    run(tmp_path, 0, scripted_generator())
    best_vs_worst = RoundSettings(generation=SETTINGS.generation, pairs=PairSettings("best_vs_worst"))
    with pytest.raises(UserError, match="pairs.jsonl: differs from the pairs the online.pairs settings build"):
        run(tmp_path, 0, scripted_generator(), best_vs_worst)


def test_changed_prompts_on_a_written_round_are_an_error(tmp_path):
    run(tmp_path, 0, scripted_generator())
    with pytest.raises(UserError, match="the prompts changed since the round was written"):
        run_round(tmp_path, 0, scripted_generator(), ArithmeticStepVerifier(), PROMPTS, REFERENCES, SETTINGS)


def test_round_files_are_never_overwritten(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("theirs\n")
    with pytest.raises(FileExistsError):
        write_rows([{"a": 1}], path, overwrite=False)
    assert path.read_text() == "theirs\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_pairs_file_without_solutions_is_an_error(tmp_path):
    folder = round_folder(tmp_path, 0)
    folder.mkdir(parents=True)
    (folder / PAIRS_FILE).write_text("")
    with pytest.raises(UserError, match="pairs.jsonl without solutions.jsonl"):
        round_state(tmp_path, 0)
