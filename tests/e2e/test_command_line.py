"""`stepwise-lit <command>`, the one command line, from the user's seat: the seven commands and
their help, the shared flags (`--seed_everything`, `--trainer.accelerator`/`--trainer.devices`)
spelled alike, each command's effect on disk, and a wrong command."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from tests.helpers.entry import run_entry, write_pairs
from stepwise_lit.cli import main
from stepwise_lit.data.readers import read_records
from stepwise_lit.evaluate import evaluation_device

from tests.helpers.paths import REPO
COMMANDS = ("fit", "validate", "test", "predict", "prepare", "score", "evaluate")
TINY_FIT = [
    "--config", str(REPO / "configs" / "tiny.yaml"), "--trainer.max_steps=2", "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--evaluation.enabled=false",
    "--model.tiny_model.hidden_size=32", "--model.tiny_model.num_layers=1", "--model.tiny_model.num_heads=2",
    "--model.tiny_model.intermediate_size=64", "--model.sft_warmup_steps=1",
    "--data.synthetic_train_size=8", "--data.synthetic_val_size=4", "--data.batch_size=4",
]


def fit(root: Path, seed: int) -> None:
    """`stepwise-lit fit --config configs/tiny.yaml`, two steps of a smaller model, in-process."""
    main(["fit", *TINY_FIT, f"--seed_everything={seed}", f"--trainer.default_root_dir={root}",
          f"--data.cache_dir={root / 'cache'}"])


def policy_weights(root: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    return {name: value for name, value in checkpoint["state_dict"].items() if name.startswith("policy.")}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    fit(root, seed=0)
    return root


def test_help_lists_the_seven_commands_one_line_each(capsys):
    outcome = run_entry(main, ["--help"], capsys)
    assert outcome.code == 0
    lines = outcome.out.splitlines()
    assert lines[0] == "usage: stepwise-lit <command> [options]"
    for command in COMMANDS:
        assert len([line for line in lines if line.split()[:1] == [command]]) == 1, command


@pytest.mark.parametrize("command", ["prepare", "score", "evaluate", "fit"])
def test_each_commands_help_shows_its_own_options_under_its_name(capsys, command):
    outcome = run_entry(main, [command, "--help"], capsys)
    assert outcome.code == 0
    usage = " ".join(outcome.out.split())  # one line, however the parser wraps it
    name = "stepwise-lit [options] fit" if command == "fit" else f"stepwise-lit {command}"
    assert usage.startswith(f"usage: {name} ")
    own = {"prepare": "--num_pairs", "score": "--only_missing", "evaluate": "--labelled.path", "fit": "--trainer.max_steps"}
    assert own[command] in usage


@pytest.mark.parametrize("argv", [["frobnicate", "--config", "x.yaml"], ["prepar"], []], ids=["unknown", "typo", "none"])
def test_a_missing_or_unknown_command_exits_2_listing_the_commands(capsys, argv):
    outcome = run_entry(main, argv, capsys)
    assert outcome.code == 2
    message = outcome.err.strip().splitlines()[-1]
    assert all(command in message for command in COMMANDS), message
    assert (repr(argv[0]) if argv else "no command") in message


def test_prepare_writes_the_pairs_its_seed_chooses(tmp_path, capsys):
    outputs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        outputs[name] = tmp_path / f"{name}.jsonl"
        argv = ["prepare", "--data.path", "synthetic", "--num_pairs", "6", "--data.seed", str(seed), "--output", str(outputs[name])]
        outcome = run_entry(main, argv, capsys)
        assert outcome.code == 0, outcome.err[-2000:]
    rows = read_records(outputs["a"])
    assert len(rows) == 6 and all(row["chosen_step_scores"] for row in rows)
    assert outputs["a"].read_bytes() == outputs["b"].read_bytes()
    assert [row["prompt"] for row in read_records(outputs["c"])] != [row["prompt"] for row in rows]


def test_score_takes_seed_everything_and_the_trainer_flags(tmp_path, capsys):
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    rows = write_pairs(pairs, 3, chosen_step_scores=None, rejected_step_scores=None)
    argv = ["score", "--input", str(pairs), "--output", str(out), "--scorer", "ArithmeticStepVerifier",
            "--seed_everything", "7", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.enable_progress_bar=false"]
    outcome = run_entry(main, argv, capsys)
    assert outcome.code == 0, outcome.err[-2000:]
    assert torch.initial_seed() == 7
    scored = read_records(out)
    assert [len(row["chosen_step_scores"]) for row in scored] == [len(row["chosen_steps"]) for row in rows]


def test_the_seed_changes_sampled_genrm_scores(tmp_path, capsys):
    """`--seed_everything` seeds the sampled rationales of the embedded GenRM: another seed, other scores."""
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, 2, chosen_step_scores=None, rejected_step_scores=None)
    scores = {}
    for seed in (0, 1):
        out = tmp_path / f"scored-{seed}.jsonl"
        argv = ["score", "--config", str(REPO / "configs" / "score_tiny.yaml"), "--input", str(pairs), "--output", str(out),
                "--scorer.init_args.num_rationales=1", "--scorer.init_args.max_new_tokens=4",
                "--trainer.enable_progress_bar=false", f"--seed_everything={seed}"]
        outcome = run_entry(main, argv, capsys)
        assert outcome.code == 0, outcome.err[-2000:]
        scores[seed] = [row["chosen_step_scores"] + row["rejected_step_scores"] for row in read_records(out)]
    assert scores[0] != scores[1]


def test_fit_trains_two_steps_and_its_seed_chooses_the_model(fitted, tmp_path):
    """`fit --config configs/tiny.yaml --trainer.max_steps=2`: a checkpoint at step 2, the logged
    losses and the export; `--seed_everything 1` builds (so trains) another embedded model."""
    first = policy_weights(fitted)
    assert (fitted / "export" / "model.safetensors").is_file()
    metrics = (fitted / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert {"train/sft_loss", "train/loss", "val/loss"} <= set(metrics[0].split(","))
    fit(tmp_path, seed=1)
    second = policy_weights(tmp_path)
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[name], second[name]) for name in first)


def test_evaluate_runs_where_trainer_accelerator_and_devices_say(fitted, tmp_path, capsys):
    export = fitted / "export"
    argv = ["evaluate", "--model.model_name_or_path", str(export), "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--evaluation.max_prompts=2", "--evaluation.generation.max_new_tokens=8"]
    outcome = run_entry(main, [*argv, "--output", str(tmp_path / "eval")], capsys)
    assert outcome.code == 0, outcome.err[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["num_prompts"] == 2 and report["model"] == str(export)
    bad = run_entry(main, [*argv, "--trainer.devices=0", "--output", str(tmp_path / "bad")], capsys)
    assert bad.code == 2 and "error: trainer.accelerator: 'cpu' with trainer.devices '0'" in bad.err
    assert not (tmp_path / "bad").exists()
    old = run_entry(main, [*argv, "--device", "cpu", "--output", str(tmp_path / "old")], capsys)  # the flag it had before
    assert old.code == 2 and "--device" in old.err


def test_evaluation_device_reads_accelerator_and_devices_as_the_trainer():
    assert evaluation_device({"accelerator": "cpu", "devices": 1}) == torch.device("cpu")
    assert evaluation_device({"accelerator": "cpu", "devices": 2}) == torch.device("cpu")  # the first of two
    assert evaluation_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_one_console_script_runs_prepare(tmp_path):
    """pyproject.toml declares the one `stepwise-lit` script; run as that script runs (a new
    process calling the declared `module:function` with the command line), `prepare` writes its pairs."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"stepwise-lit": "stepwise_lit.cli:main"}
    module, function = scripts["stepwise-lit"].split(":")
    launcher = f"import sys; from {module} import {function}; sys.argv[0] = 'stepwise-lit'; sys.exit({function}())"
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run([sys.executable, "-c", launcher, "prepare", "--data.path", "synthetic", "--num_pairs", "4",
                           "--output", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(read_records(out)) == 4
    wrong = subprocess.run([sys.executable, "-c", launcher, "fitt"], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "unknown command 'fitt'" in wrong.stderr
