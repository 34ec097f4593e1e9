"""`score`: every step scored, resume after a failure or a SIGKILL, partial lines, only_missing,
config and start-up errors, and DDP over 2 CPU processes (gloo)."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stepwise_lit.data.readers import read_records
from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.prepare import prepare
from stepwise_lit.data.writers import write_rows
from stepwise_lit.rewards import ArithmeticStepVerifier
from stepwise_lit.score import ScoreStore, load_rows, main, run
from tests.helpers.paths import REPO, SHARED_DATA

GSM8K = SHARED_DATA / "gsm8k" / "example_model_solutions.jsonl"
QUIET = {"enable_progress_bar": False}


class CountingVerifier(ArithmeticStepVerifier):
    """Counts the responses it scores; raises once it has served `fail_after` calls."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.fail_after = fail_after
        self.calls = 0
        self.responses = 0

    def _score_steps(self, prompts, steps, reference_solutions):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise RuntimeError("injected failure")
        self.calls += 1
        self.responses += len(steps)
        return super()._score_steps(prompts, steps, reference_solutions)


def write_synthetic(path, num_pairs, **changes):
    rows = [{**row, **changes} for row in generate_pairs(num_pairs, seed=3)]
    write_rows(rows, path)
    return rows


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K data not present")
def test_scores_every_step_of_200_gsm8k_pairs(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    write_rows(prepare("gsm8k", tmp_path / "all.jsonl", GSM8K)[:200], pairs)
    scorer = CountingVerifier()
    out = tmp_path / "scored.jsonl"
    run(scorer, load_rows(pairs), ScoreStore(out), batch_size=16, trainer=QUIET)
    rows, source = read_records(out), read_records(pairs)
    assert [row["id"] for row in rows] == [row["id"] for row in source]
    for row, original in zip(rows, source):
        for side in ("chosen", "rejected"):
            assert row[f"{side}_steps"] == original[f"{side}_steps"]
            scores = row[f"{side}_step_scores"]
            assert len(scores) == len(row[f"{side}_steps"]) and all(-1.0 <= s <= 1.0 for s in scores)
    assert scorer.responses == 400
    assert not Path(f"{out}.parts").exists()
    # The rule verifier with the ground truth as reference: chosen = ground truth, rejected = a wrong solution.
    assert sum(min(row["rejected_step_scores"]) < 0 for row in rows) >= 190
    assert sum(min(row["chosen_step_scores"]) > 0 for row in rows) >= 195


def test_a_run_that_fails_midway_resumes_with_only_the_rest(tmp_path):
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    write_synthetic(pairs, 20, chosen_step_scores=None, rejected_step_scores=None)
    rows = load_rows(pairs)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(CountingVerifier(fail_after=3), rows, ScoreStore(out), batch_size=4, trainer=QUIET)
    assert not out.exists()
    written = read_records(tmp_path / "scored.jsonl.parts" / "rank-0.jsonl")
    assert [row["id"] for row in written] == [row["id"] for row in rows[:12]]

    second = CountingVerifier()
    final = run(second, rows, ScoreStore(out), batch_size=4, trainer=QUIET)
    assert second.responses == 2 * 8  # the 8 rows not written before the failure
    assert [row["id"] for row in read_records(out)] == [row["id"] for row in rows]
    assert final == read_records(out)
    assert all(row["chosen_step_scores"] is not None and row["rejected_step_scores"] is not None for row in final)

    third = CountingVerifier()  # everything is in the output now: nothing is scored again
    assert run(third, rows, ScoreStore(out), batch_size=4, trainer=QUIET) == final
    assert third.responses == 0


def test_a_half_written_last_line_is_dropped_and_its_row_scored_again(tmp_path, caplog):
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    write_synthetic(pairs, 6, chosen_step_scores=None, rejected_step_scores=None)
    rows = load_rows(pairs)
    store = ScoreStore(out)
    store.append(0, [{**rows[0], "chosen_step_scores": [1.0] * len(rows[0]["chosen_steps"]),
                      "rejected_step_scores": [-1.0] * len(rows[0]["rejected_steps"])}])
    with (store.parts / "rank-0.jsonl").open("a") as handle:
        handle.write(json.dumps(rows[1])[:40])  # killed mid-write
    scorer = CountingVerifier()
    with caplog.at_level(logging.INFO, logger="stepwise_lit"):
        final = run(scorer, rows, store, batch_size=2, trainer=QUIET)
    assert "half-written last line" in caplog.text
    assert "6 rows: 1 already scored, 0 need no scoring, 5 to score" in caplog.text
    assert scorer.responses == 10
    assert final[0]["rejected_step_scores"] == [-1.0] * len(rows[0]["rejected_steps"])  # kept, not rescored
    assert [row["id"] for row in final] == [row["id"] for row in rows]


def test_only_missing_keeps_existing_scores_and_passes_scored_rows_through(tmp_path):
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "scored.parquet"
    rows = write_synthetic(pairs, 6)
    rows[0]["rejected_step_scores"] = None
    rows[1]["chosen_step_scores"] = None
    del rows[2]["id"]
    write_rows(rows, pairs)
    scorer = CountingVerifier()
    final = run(scorer, load_rows(pairs), ScoreStore(out), batch_size=4, only_missing=True, trainer=QUIET)
    assert scorer.responses == 2
    assert final[0]["chosen_step_scores"] == rows[0]["chosen_step_scores"]
    assert final[1]["rejected_step_scores"] == rows[1]["rejected_step_scores"]
    assert final[2]["id"] == "row-2"
    assert [row["chosen_step_scores"] for row in final[2:]] == [row["chosen_step_scores"] for row in rows[2:]]
    assert read_records(out) == final


def test_score_tiny_config_runs_the_embedded_genrm(tmp_path):
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    rows = write_synthetic(pairs, 3, chosen_step_scores=None, rejected_step_scores=None)
    main(["--config", str(REPO / "configs" / "score_tiny.yaml"), "--input", str(pairs), "--output", str(out),
          "--trainer.enable_progress_bar", "false"])
    scored = read_records(out)
    assert [len(row["rejected_step_scores"]) for row in scored] == [len(row["rejected_steps"]) for row in rows]
    assert all(-1 < s < 1 for row in scored for side in ("chosen", "rejected") for s in row[f"{side}_step_scores"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--scorer.init_args.template", "Is {problem} right?"], "no {step} field"),
        (["--scorer.init_args.model_name_or_path", "/no/such/model"], "no such directory"),
        (["--output", "scored.txt"], "must end in .jsonl or .parquet"),
    ],
)
def test_bad_settings_are_start_up_errors(tmp_path, capsys, override, message):
    pairs = tmp_path / "pairs.jsonl"
    write_synthetic(pairs, 2)
    args = ["--config", str(REPO / "configs" / "score_tiny.yaml"), "--input", str(pairs), "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        main(args + override)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_rows_parquet_cannot_hold_are_a_start_up_error(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    rows = write_synthetic(pairs, 2)
    rows[1]["prompt"] = [{"role": "user", "content": rows[1]["prompt"]}]
    write_rows(rows, pairs)
    with pytest.raises(SystemExit):
        main(["--input", str(pairs), "--output", str(tmp_path / "o.parquet"), "--scorer", "ArithmeticStepVerifier"])
    assert "write .jsonl instead" in capsys.readouterr().err


def test_repeated_ids_are_a_start_up_error(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    write_synthetic(pairs, 2, id="same")
    with pytest.raises(SystemExit):
        main(["--input", str(pairs), "--output", str(tmp_path / "o.jsonl"), "--scorer", "ArithmeticStepVerifier"])
    assert "ids must be unique" in capsys.readouterr().err


SLOW_SCORER = '''
import time
from stepwise_lit.rewards import ArithmeticStepVerifier

class SlowVerifier(ArithmeticStepVerifier):
    def _score_steps(self, prompts, steps, reference_solutions):
        time.sleep(0.15)
        return super()._score_steps(prompts, steps, reference_solutions)
'''


def score_command(config, pairs, out):
    return [sys.executable, "-m", "stepwise_lit.score", "--config", str(config), "--input", str(pairs), "--output", str(out)]


def environment(tmp_path):
    paths = [str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def write_config(path, scorer, batch_size, trainer):
    lines = [f"batch_size: {batch_size}", "scorer:", f"  class_path: {scorer}", "trainer:", "  enable_progress_bar: false"]
    lines += [f"  {key}: {value}" for key, value in trainer.items()]
    path.write_text("\n".join(lines) + "\n")


def count_lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_killed_run_resumes_with_only_the_rest(tmp_path, caplog):
    (tmp_path / "slow_scorer.py").write_text(SLOW_SCORER)
    pairs, out, config = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl", tmp_path / "score.yaml"
    rows = [{**row, "rejected_step_scores": None} for row in generate_pairs(40, seed=5)]
    write_rows(rows, pairs)
    write_config(config, "slow_scorer.SlowVerifier", 2, {"accelerator": "cpu", "devices": 1})
    part = tmp_path / "scored.jsonl.parts" / "rank-0.jsonl"
    process = subprocess.Popen(score_command(config, pairs, out), cwd=REPO, env=environment(tmp_path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while count_lines(part) < 6 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    written = count_lines(part)
    assert 6 <= written < 40

    # The resume runs in this process (the kill above is the real one); it scores only the rest.
    scorer = CountingVerifier()
    with caplog.at_level(logging.INFO, logger="stepwise_lit"):
        scored = run(scorer, load_rows(pairs), ScoreStore(out), batch_size=2, trainer=QUIET)
    assert f"40 rows: {written} already scored, 0 need no scoring, {40 - written} to score" in caplog.text
    assert scorer.responses == 2 * (40 - written)
    assert scored == read_records(out)
    assert [row["id"] for row in scored] == [row["id"] for row in rows]
    assert all(len(row["rejected_step_scores"]) == len(row["rejected_steps"]) for row in scored)


@pytest.mark.slow
def test_ddp_over_two_processes_writes_each_row_once(tmp_path):
    pairs, out, config = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl", tmp_path / "score.yaml"
    rows = [{**row, "chosen_step_scores": None, "rejected_step_scores": None} for row in generate_pairs(25, seed=6)]
    write_rows(rows, pairs)
    write_config(config, "stepwise_lit.rewards.ArithmeticStepVerifier", 4,
                 {"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    result = subprocess.run(score_command(config, pairs, out), cwd=REPO, env=environment(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "distributed_backend=gloo" in result.stdout + result.stderr
    assert "merging part files: rank-0.jsonl 13 rows, rank-1.jsonl 12 rows" in result.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in scored] == [row["id"] for row in rows]
    assert all(row["chosen_step_scores"] and row["rejected_step_scores"] for row in scored)
    assert not (tmp_path / "scored.jsonl.parts").exists()


def test_a_half_written_last_line_of_a_previous_output_is_skipped_and_its_row_scored_again(tmp_path, caplog):
    """An output whose last line was cut mid-write (before: a DataFormatError on that line) keeps
    its complete rows: 6 rows, 3 complete in the output -> 3 rows (6 responses) scored."""
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    write_synthetic(pairs, 6, chosen_step_scores=None, rejected_step_scores=None)
    rows = load_rows(pairs)
    done = [{**row, "chosen_step_scores": [0.5] * len(row["chosen_steps"]),
             "rejected_step_scores": [-0.5] * len(row["rejected_steps"])} for row in rows[:3]]
    out.write_text("".join(json.dumps(row) + "\n" for row in done) + json.dumps(rows[3])[:30])
    scorer = CountingVerifier()
    with caplog.at_level(logging.INFO, logger="stepwise_lit"):
        final = run(scorer, rows, ScoreStore(out), batch_size=2, trainer=QUIET)
    assert "half-written last line" in caplog.text
    assert scorer.responses == 6
    assert final[:3] == done
    assert read_records(out) == final and [row["id"] for row in final] == [row["id"] for row in rows]


def test_score_help_lists_show_traceback():
    from stepwise_lit.score import build_parser

    assert "--show_traceback" in build_parser().format_help()


@pytest.mark.parametrize("config", ["score_tiny.yaml", "score_genrm.yaml", "score_implicit.yaml", "score_qwen_prm.yaml",
                                    "score_math_shepherd.yaml"])
def test_the_scoring_configs_parse_with_every_setting_known(config):
    """Each documented scoring config parses as `score` reads it (a renamed setting fails here, not on a
    user's machine); the scorer is the class the config names."""
    from stepwise_lit.score import build_parser

    parsed = build_parser().parse_args(["--config", str(REPO / "configs" / config), "--input", "a.jsonl", "--output", "b.jsonl"])
    named = yaml.safe_load((REPO / "configs" / config).read_text())["scorer"]["class_path"]
    assert parsed.scorer.class_path == named
