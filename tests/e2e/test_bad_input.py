"""Bad input through the entry points a user calls (`train.py fit`/`validate`, `prepare`, `score`):
every case ends with exit code 2 and one `error:` paragraph on stderr (no traceback) that names
the file, row or line (as an editor counts, from 1), field or setting, and the problem; and
every file that was there before the command is still there, byte for byte.

Each case is `setup(tmp, world) -> (argv, words)`: the command line (its first word picks the
entry point) and the words the message must hold (a name and a key word of the problem; a
tuple holds alternatives).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from stepwise_lit import prepare, score
from stepwise_lit.cli import main
from tests.helpers.entry import run_entry, snapshot, write_config, write_pairs

ENTRY_POINTS = {"fit": main, "validate": main, "prepare": prepare.main, "score": score.main}


@dataclass
class World:
    """What the cases share: a data cache, a good pairs file and a finished run's checkpoint."""

    cache: Path
    pairs: Path
    checkpoint: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    folder = tmp_path_factory.mktemp("world")
    cache = folder / "cache"
    pairs = folder / "pairs.jsonl"
    write_pairs(pairs, 8)
    config = write_config(folder, {}, cache)
    main(["fit", "--config", str(config)])
    return World(cache, pairs, folder / "run" / "checkpoints" / "last.ckpt")


def lines(path: Path, rows: list) -> Path:
    """Writes rows as JSON Lines (a str row is written as it is) and returns the path."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def pairs_with(world: World, index: int, **changes) -> list[dict]:
    """The world's pairs with row `index` (0-based) updated by `changes`."""
    rows = [json.loads(line) for line in world.pairs.read_text().splitlines()]
    rows[index] = {**rows[index], **changes}
    return rows


def delimited(world: World) -> list[dict]:
    rows = [json.loads(line) for line in world.pairs.read_text().splitlines()]
    return [
        {"prompt": r["prompt"], "chosen": "".join(r["chosen_steps"]), "rejected": "".join(r["rejected_steps"]),
         "chosen_step_scores": r["chosen_step_scores"], "rejected_step_scores": r["rejected_step_scores"]}
        for r in rows
    ]


def fit(tmp: Path, world: World, changes: dict, *args: str, command: str = "fit") -> list[str]:
    """The command line of `train.py <command>` with BASE + `changes` as its YAML file."""
    config = write_config(tmp, changes, world.cache)
    return [command, "--config", str(config), *args]


def data_file(tmp: Path, world: World, path: Path, **data) -> list[str]:
    return fit(tmp, world, {"data": {"path": str(path), "format": data.pop("format", "stepwise"), "val_fraction": 0.25, **data}})


def truncated_checkpoint(tmp: Path, world: World) -> Path:
    data = world.checkpoint.read_bytes()
    (tmp / "ckpt").mkdir(exist_ok=True)
    path = tmp / "ckpt" / "half.ckpt"
    path.write_bytes(data[: len(data) // 2])
    return path


def score_args(world: World, input: Path, output: Path, *args: str) -> list[str]:
    return ["score", "--input", str(input), "--output", str(output), "--scorer", "ArithmeticStepVerifier",
            "--trainer.enable_progress_bar=false", *args]


def a_file(tmp: Path, name: str = "a_file") -> Path:
    """A regular file, to stand where a folder is needed (no folder can be made under it)."""
    path = tmp / name
    path.write_text("not a folder\n")
    return path


def row_or_line(number: int) -> tuple[str, str]:
    """Row `number` (1-based) of a JSON Lines file, named as a row or as its line."""
    return (f"row {number}", f"line {number}")


Setup = Callable[[Path, World], tuple[list[str], list[str]]]
CASES: dict[str, Setup] = {
    # ---- fit: settings
    "fit-unknown-setting": lambda t, w: (fit(t, w, {}, "--model.stepbeta=0.1"), ["stepbeta"]),
    "fit-wrong-type-in-yaml": lambda t, w: (fit(t, w, {"model": {"step_beta": "abc"}}), ["step_beta", "abc"]),
    "fit-yaml-syntax-error": lambda t, w: (
        ["fit", "--config", str(lines(t / "broken.yaml", ["model: {step_beta: 0.1"]))], ["broken.yaml"]),
    "fit-config-file-missing": lambda t, w: (["fit", "--config", str(t / "nope.yaml")], ["nope.yaml"]),
    "fit-step-beta-zero": lambda t, w: (fit(t, w, {"model": {"step_beta": 0}}), ["model.step_beta"]),
    "fit-step-beta-negative": lambda t, w: (fit(t, w, {"model": {"step_beta": -1.0}}), ["model.step_beta"]),
    "fit-unknown-outcome-loss": lambda t, w: (fit(t, w, {"model": {"outcome_loss_type": "hinge"}}), ["outcome_loss_type", "hinge"]),
    "fit-unknown-step-loss": lambda t, w: (fit(t, w, {"model": {"step_loss_type": "nope"}}), ["step_loss_type", "nope"]),
    "fit-unknown-aggregation": lambda t, w: (fit(t, w, {"model": {"aggregation_strategy": "median"}}), ["aggregation_strategy", "median"]),
    "fit-weighted-sum-without-weights": lambda t, w: (
        fit(t, w, {"model": {"aggregation_strategy": "weighted_sum"}}), ["step_weights"]),
    "fit-step-reward-scale-above-1": lambda t, w: (fit(t, w, {"model": {"step_reward_scale": 2.0}}), ["step_reward_scale"]),
    "fit-adapter-reference-without-lora": lambda t, w: (fit(t, w, {"model": {"reference": "adapter"}}), ["reference", "lora"]),
    "fit-negative-learning-rate": lambda t, w: (
        fit(t, w, {"model": {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": -1.0}}}}),
        ["model.optimizer", "learning rate"]),
    "fit-model-path-missing": lambda t, w: (
        fit(t, w, {"model": {"model_name_or_path": str(t / "no_such_model")}}), ["model_name_or_path", "no_such_model"]),
    "fit-max-length-above-model-positions": lambda t, w: (
        fit(t, w, {"model": {"tiny_model": {"max_position_embeddings": 64}}, "data": {"max_length": 256}}), ["max_length", "64"]),
    "fit-batch-size-zero": lambda t, w: (fit(t, w, {"data": {"batch_size": 0}}), ["data.batch_size"]),
    "fit-eval-batch-size-zero": lambda t, w: (fit(t, w, {"data": {"eval_batch_size": 0}}), ["data.eval_batch_size"]),
    "fit-val-fraction-one": lambda t, w: (data_file(t, w, w.pairs, val_fraction=1.0), ["data.val_fraction"]),
    "fit-empty-step-delimiter": lambda t, w: (
        data_file(t, w, lines(t / "d.jsonl", delimited(w)), format="delimited", step_delimiter=""), ["step_delimiter"]),
    "fit-max-length-zero": lambda t, w: (fit(t, w, {"data": {"max_length": 0}}), ["data.max_length"]),
    "fit-file-format-without-path": lambda t, w: (fit(t, w, {"data": {"format": "stepwise"}}), ["data.path", "stepwise"]),
    "fit-max-steps-not-a-number": lambda t, w: (fit(t, w, {}, "--trainer.max_steps=abc"), ["max_steps", "abc"]),
    "fit-root-dir-under-a-file": lambda t, w: (
        fit(t, w, {"trainer": {"default_root_dir": str(a_file(t) / "run")}}), ["trainer.default_root_dir", "a_file"]),
    # ---- fit: checkpoints
    "fit-ckpt-path-missing": lambda t, w: (fit(t, w, {}, "--ckpt_path", str(t / "gone.ckpt")), ["ckpt_path", "gone.ckpt", "not exist"]),
    "fit-ckpt-path-truncated": lambda t, w: (
        fit(t, w, {}, "--ckpt_path", str(truncated_checkpoint(t, w))), ["ckpt_path", "half.ckpt", "corrupt"]),
    "fit-ckpt-path-not-a-checkpoint": lambda t, w: (
        fit(t, w, {}, "--ckpt_path", str(lines(t / "notes.ckpt", ["hello"]))), ["ckpt_path", "notes.ckpt"]),
    "fit-ckpt-path-last-with-nothing-to-resume": lambda t, w: (
        fit(t, w, {}, "--ckpt_path", "last"), ["ckpt_path", "last", str(t / "run" / "checkpoints")]),
    # ---- fit: data files
    "fit-data-file-missing": lambda t, w: (data_file(t, w, t / "missing.jsonl"), ["missing.jsonl"]),
    "fit-data-path-without-extension-missing": lambda t, w: (data_file(t, w, t / "missing_data"), ["missing_data"]),
    "fit-val-path-missing": lambda t, w: (
        fit(t, w, {"data": {"path": str(w.pairs), "format": "stepwise", "val_path": str(t / "val_missing.jsonl")}}),
        ["val_missing.jsonl"]),
    "fit-empty-data-file": lambda t, w: (data_file(t, w, lines(t / "empty.jsonl", [])), ["empty.jsonl", "empty"]),
    "fit-non-utf8-bytes": lambda t, w: (
        data_file(t, w, write_bytes(t / "latin.jsonl", w.pairs.read_bytes() + b'{"prompt": "caf\xe9"}\n')),
        ["latin.jsonl", "line 9", "UTF-8"]),
    "fit-corrupt-parquet": lambda t, w: (
        data_file(t, w, write_bytes(t / "bad.parquet", b"PAR1 this is not parquet")), ["bad.parquet"]),
    "fit-broken-json-line-in-the-middle": lambda t, w: (
        data_file(t, w, lines(t / "mid.jsonl", [*pairs_with(w, 0)[:3], "{oops", *pairs_with(w, 0)[3:]])), ["mid.jsonl", "line 4"]),
    "fit-unknown-file-type": lambda t, w: (data_file(t, w, lines(t / "pairs.txt", ["x"])), ["pairs.txt", ".txt"]),
    "fit-json-file-not-a-list": lambda t, w: (
        data_file(t, w, write_bytes(t / "object.json", b'{"prompt": "p"}')), ["object.json", "list"]),
    "fit-scores-count-mismatch-row-3": lambda t, w: (
        data_file(t, w, lines(t / "short.jsonl", pairs_with(w, 2, chosen_step_scores=[1.0]))),
        ["short.jsonl", row_or_line(3), "chosen_step_scores"]),
    "fit-nan-score": lambda t, w: (
        data_file(t, w, lines(t / "nan.jsonl", [json.dumps(r).replace("[1.0", "[NaN", 1) if i == 1 else r
                                                 for i, r in enumerate(pairs_with(w, 0))])),
        ["nan.jsonl", row_or_line(2), "finite"]),
    "fit-score-out-of-range": lambda t, w: (
        data_file(t, w, lines(t / "range.jsonl", pairs_with(w, 4, rejected_step_scores=[2.0] * len(pairs_with(w, 4)[4]["rejected_steps"])))),
        ["range.jsonl", row_or_line(5), "rejected_step_scores"]),
    "fit-missing-field-delimited-row-2": lambda t, w: (
        data_file(t, w, lines(t / "nofield.jsonl", [r if i != 1 else {k: v for k, v in r.items() if k != "rejected"}
                                                     for i, r in enumerate(delimited(w))]), format="delimited", step_delimiter="\nStep"),
        ["nofield.jsonl", row_or_line(2), "rejected"]),
    "fit-delimited-user-field-named": lambda t, w: (
        data_file(t, w, lines(t / "delim.jsonl", [r if i != 0 else {**r, "chosen": ""}
                                                   for i, r in enumerate(delimited(w))]), format="delimited", step_delimiter="\nStep"),
        ["delim.jsonl", row_or_line(1), "'chosen'"]),  # the user's field, not the internal chosen_steps
    "fit-prompt-of-wrong-type": lambda t, w: (
        data_file(t, w, lines(t / "type.jsonl", pairs_with(w, 1, prompt=42))), ["type.jsonl", row_or_line(2), "prompt"]),
    "fit-empty-step": lambda t, w: (
        data_file(t, w, lines(t / "emptystep.jsonl", pairs_with(w, 0, chosen_steps=["", *pairs_with(w, 0)[0]["chosen_steps"][1:]]))),
        ["emptystep.jsonl", row_or_line(1), "chosen_steps"]),
    "fit-scores-required": lambda t, w: (
        data_file(t, w, lines(t / "unscored.jsonl", pairs_with(w, 5, rejected_step_scores=None))),
        ["unscored.jsonl", row_or_line(6), "rejected_step_scores"]),
    "fit-unknown-format": lambda t, w: (data_file(t, w, w.pairs, format="tsv"), ["format", "tsv"]),
    "fit-truncation-error": lambda t, w: (
        data_file(t, w, w.pairs, truncation="error", max_length=40, max_prompt_length=32), ["truncation"]),
    # ---- validate
    "validate-ckpt-path-missing": lambda t, w: (
        fit(t, w, {}, "--ckpt_path", str(t / "gone.ckpt"), command="validate"), ["ckpt_path", "gone.ckpt"]),
    "validate-ckpt-path-truncated": lambda t, w: (
        fit(t, w, {}, "--ckpt_path", str(truncated_checkpoint(t, w)), command="validate"), ["ckpt_path", "half.ckpt"]),
    "validate-ckpt-path-last-with-nothing": lambda t, w: (
        fit(t, w, {}, "--ckpt_path", "last", command="validate"), ["ckpt_path", "last"]),
    "validate-broken-val-file": lambda t, w: (
        fit(t, w, {"data": {"path": str(w.pairs), "format": "stepwise", "val_path": str(lines(t / "val.jsonl", ["{"]))}},
            "--ckpt_path", str(w.checkpoint), command="validate"),
        ["val.jsonl", "line 1"]),
    # ---- prepare
    "prepare-input-missing": lambda t, w: (
        ["prepare", "--data.format", "stepwise", "--data.path", str(t / "absent.jsonl"), "--output", str(t / "out.jsonl")], ["absent.jsonl"]),
    "prepare-broken-line-2": lambda t, w: (
        ["prepare", "--data.format", "stepwise", "--data.path", str(lines(t / "in.jsonl", [pairs_with(w, 0)[0], "{oops"])),
         "--output", str(t / "out.jsonl")], ["in.jsonl", "line 2"]),
    "prepare-non-utf8": lambda t, w: (
        ["prepare", "--data.format", "stepwise", "--data.path", str(write_bytes(t / "in.jsonl", b'{"prompt": "caf\xe9"}\n')),
         "--output", str(t / "out.jsonl")], ["in.jsonl", "line 1", "UTF-8"]),
    "prepare-unknown-format": lambda t, w: (
        ["prepare", "--data.format", "tsv", "--data.path", str(w.pairs), "--output", str(t / "out.jsonl")], ["format", "tsv"]),
    "prepare-output-extension": lambda t, w: (
        ["prepare", "--data.format", "stepwise", "--data.path", str(w.pairs), "--output", str(t / "out.txt")], ["out.txt", ".jsonl"]),
    "prepare-output-folder-under-a-file": lambda t, w: (
        ["prepare", "--data.format", "stepwise", "--data.path", str(w.pairs), "--output", str(a_file(t) / "out.jsonl")], ["a_file"]),
    "prepare-gsm8k-without-input": lambda t, w: (
        ["prepare", "--data.format", "gsm8k", "--output", str(t / "out.jsonl")], ["data.path", "gsm8k"]),
    "prepare-gsm8k-record-missing-answer": lambda t, w: (
        ["prepare", "--data.format", "gsm8k", "--data.path", str(lines(t / "gsm.jsonl", [{"question": "q?", "answer": "a\n#### 1"}, {"question": "q2?"}])),
         "--output", str(t / "out.jsonl")], ["gsm.jsonl", row_or_line(2), "answer"]),
    # ---- score
    "score-input-missing": lambda t, w: (score_args(w, t / "absent.jsonl", t / "out.jsonl"), ["input", "absent.jsonl"]),
    "score-output-extension": lambda t, w: (score_args(w, w.pairs, t / "out.txt"), ["output", "out.txt"]),
    "score-output-is-the-input": lambda t, w: (
        score_args(w, copy_into(t, w.pairs), t / "pairs.jsonl"), ["output", "pairs.jsonl", "input"]),
    "score-output-folder-under-a-file": lambda t, w: (
        score_args(w, w.pairs, a_file(t) / "out.jsonl"), ["output", "a_file"]),
    "score-output-is-a-folder": lambda t, w: (score_args(w, w.pairs, mkdir(t / "out.jsonl")), ["output", "folder"]),
    "score-repeated-ids": lambda t, w: (
        score_args(w, lines(t / "dup.jsonl", pairs_with(w, 3, id=pairs_with(w, 0)[0]["id"])), t / "out.jsonl"),
        ["dup.jsonl", "id", "rows 1, 4"]),
    "score-steps-scores-mismatch": lambda t, w: (
        score_args(w, lines(t / "in.jsonl", pairs_with(w, 1, chosen_step_scores=[0.5])), t / "out.jsonl"),
        ["in.jsonl", row_or_line(2), "chosen_step_scores"]),
    "score-previous-output-broken-in-the-middle": lambda t, w: (
        score_args(w, w.pairs, lines(t / "out.jsonl", [pairs_with(w, 0)[0], "{oops", pairs_with(w, 0)[2]])),
        ["out.jsonl", "line 2"]),
    "score-batch-size-zero": lambda t, w: (score_args(w, w.pairs, t / "out.jsonl", "--batch_size=0"), ["batch_size"]),
    "score-unknown-scorer": lambda t, w: (
        ["score", "--input", str(w.pairs), "--output", str(t / "out.jsonl"), "--scorer", "NoSuchScorer"], ["scorer", "NoSuchScorer"]),
    "score-genrm-model-path-missing": lambda t, w: (
        score_args(w, w.pairs, t / "out.jsonl")[:5]
        + ["--scorer", "GenerativeStepScorer", "--scorer.init_args.model_name_or_path", str(t / "no_model")],
        ["scorer", "no_model"]),
    "score-parquet-cannot-hold-the-rows": lambda t, w: (
        score_args(w, lines(t / "mixed.jsonl", pairs_with(w, 1, prompt=[{"role": "user", "content": "q"}])), t / "out.parquet"),
        ["output", "out.parquet", ".jsonl"]),
}


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "kept.txt").write_text("a file the user put here\n")
    return path


def copy_into(folder: Path, path: Path) -> Path:
    (folder / path.name).write_bytes(path.read_bytes())
    return folder / path.name


@pytest.mark.parametrize("setup", list(CASES.values()), ids=list(CASES))
def test_bad_input_ends_with_one_message_and_exit_code_2(tmp_path, world, capsys, setup):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("the user's own file in the run folder\n")
    argv, words = setup(tmp_path, world)
    before = snapshot(tmp_path)
    outcome = run_entry(ENTRY_POINTS[argv[0]], argv if argv[0] in ("fit", "validate") else argv[1:], capsys)
    assert outcome.code == 2, outcome.err[-3000:]
    assert "Traceback" not in outcome.err
    messages = [line for line in outcome.err.splitlines() if re.match(r"(\S+: )?error:", line)]
    assert len(messages) == 1, outcome.err[-3000:]
    message = outcome.err[outcome.err.index(messages[0]):]
    for word in words:
        alternatives = word if isinstance(word, tuple) else (word,)
        assert any(w in message for w in alternatives), f"{word!r} not in: {message}"
    after = snapshot(tmp_path)
    assert {name: after.get(name) for name in before} == before, "a file that was there before changed or went"


def test_a_score_run_refused_at_start_keeps_the_previous_output_and_parts(tmp_path, world, capsys):
    """A refused `score` (here: repeated ids) leaves a previous output and its part files as they were."""
    out = tmp_path / "out.jsonl"
    lines(out, [pairs_with(world, 0)[0]])
    (tmp_path / "out.jsonl.parts").mkdir()
    lines(tmp_path / "out.jsonl.parts" / "rank-0.jsonl", [pairs_with(world, 0)[1]])
    before = snapshot(tmp_path)
    bad = lines(tmp_path / "dup.jsonl", pairs_with(world, 1, id=pairs_with(world, 0)[0]["id"]))
    outcome = run_entry(score.main, score_args(world, bad, out)[1:], capsys)
    assert outcome.code == 2
    after = snapshot(tmp_path)
    assert {name: after[name] for name in before} == before


def test_show_traceback_keeps_the_traceback(tmp_path, world):
    """With `--show_traceback` the UserError propagates (the command line prints its traceback)."""
    from stepwise_lit.errors import SettingError

    with pytest.raises(SettingError, match="ckpt_path"):
        main(fit(tmp_path, world, {}, "--ckpt_path", str(tmp_path / "gone.ckpt"), "--show_traceback"))
    with pytest.raises(SettingError, match="output"):
        score.main(score_args(world, world.pairs, tmp_path / "out.txt", "--show_traceback")[1:])



LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
LORA_CASES = {
    "rank-zero": ({"r": 0}, (), "model.lora.r", ["0"]),
    "rank-zero-as-a-flag": ({}, ("--model.lora.r=0",), "model.lora.r", ["0"]),
    "alpha-zero": ({"alpha": 0}, (), "model.lora.alpha", ["> 0"]),
    "alpha-negative": ({"alpha": -8}, (), "model.lora.alpha", ["-8"]),
    "dropout-above-1": ({"dropout": 1.5}, (), "model.lora.dropout", ["1.5"]),
    "dropout-1-as-a-flag": ({}, ("--model.lora.dropout=1.0",), "model.lora.dropout", ["1.0"]),
    "dropout-negative": ({"dropout": -0.1}, (), "model.lora.dropout", ["-0.1"]),
    "no-target-module-matches": (
        {"target_modules": ["no_such_proj"]}, (), "model.lora.target_modules",
        # the model's own linear modules are listed
        ["no_such_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]),
    "no-target-module-matches-as-a-flag": (
        {}, ("--model.lora.target_modules=[nope_proj]",), "model.lora.target_modules", ["nope_proj", "q_proj"]),
    "no-target-modules": ({"target_modules": []}, (), "model.lora.target_modules", ["empty"]),
}


@pytest.mark.parametrize("lora, flags, setting, words", list(LORA_CASES.values()), ids=list(LORA_CASES))
def test_lora_settings_out_of_range_stop_with_the_setting_on_the_first_line(tmp_path, world, capsys, lora, flags,
                                                                           setting, words):
    """`train.py fit` with a LoRA value peft refuses (r 0, dropout outside [0, 1)), one that makes no
    sense (alpha <= 0, which peft takes), or target modules the model lacks: exit code 2, no
    traceback, and the one error line starts with the setting's name."""
    outcome = run_entry(main, fit(tmp_path, world, {"model": {"lora": {**LORA, **lora}}}, *flags), capsys)
    assert outcome.code == 2, outcome.err[-3000:]
    assert "Traceback" not in outcome.err
    (first,) = [line for line in outcome.err.splitlines() if line.startswith("error:")]
    assert first.startswith(f"error: {setting}: "), first
    for word in words:
        assert word in first, f"{word!r} not in: {first}"
