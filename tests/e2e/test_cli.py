"""The command line: fit on the embedded default, print_config round-trip, export reload, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from stepwise_lit.cli import main
from stepwise_lit.errors import UserError
from tests.helpers.entry import TINY_ARGS, run_entry
from tests.helpers.paths import REPO


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python train.py <args>` in a subprocess (where what the script itself prints is the point)."""
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """`fit --trainer.fast_dev_run=2` on the embedded default, run in-process."""
    root = tmp_path_factory.mktemp("fit")
    main(["fit", *TINY_ARGS, f"--trainer.default_root_dir={root}", "--trainer.fast_dev_run=2"])
    return root


def test_fit_fast_dev_run_exports_a_reloadable_model(fitted):
    """The export at the end of fit reloads with the Auto classes and generates text."""
    assert torch.get_num_threads() == 1, "tiny.yaml's num_threads: 1 was not applied"
    export = fitted / "export"
    assert (export / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = tokenizer("What is 3 + 4?", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    assert isinstance(tokenizer.decode(generated[0]), str)
    config = json.loads((export / "stepwise_config.json").read_text())
    assert config["outcome_loss_type"] == "soft_label" and config["data"]["path"] == "synthetic"
    saved = torch.load(export / "stepwise_config.pt", weights_only=True)
    assert saved["step_beta"] == config["step_beta"]
    assert not list(fitted.glob(".export.tmp-*")), "a staging folder was left behind"


def test_print_config_round_trips(tmp_path, capsys):
    """The printed config, fed back as --config, prints the same config."""
    first = run_entry(main, ["fit", *TINY_ARGS, "--model.step_beta=0.25", "--print_config"], capsys)
    assert first.code == 0, first.err
    printed = yaml.safe_load(first.out)
    assert printed["model"]["step_beta"] == 0.25
    assert "tokenizer_name_or_path" not in printed["data"], "a linked setting must come from the model"
    (tmp_path / "printed.yaml").write_text(first.out)
    second = run_entry(main, ["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"], capsys)
    assert second.code == 0, second.err
    assert yaml.safe_load(second.out) == printed


def test_bad_setting_ends_with_one_paragraph_naming_it(tmp_path, capsys):
    result = run_entry(main, ["fit", *TINY_ARGS, "--model.step_beta=0"], capsys)
    assert result.code == 2
    assert "model.step_beta" in result.err
    assert "Traceback" not in result.err and result.err.startswith("error: ")


def test_bad_data_file_ends_with_the_data_error_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_step_scores": [1], "rejected_step_scores": [-1]}\n{oops\n')
    argv = ["fit", *TINY_ARGS, f"--data.path={bad}", f"--trainer.default_root_dir={tmp_path}"]
    result = run_entry(main, argv, capsys)
    assert result.code == 2, result.err[-2000:]
    assert "bad.jsonl" in result.err and "line 2" in result.err
    assert "Traceback" not in result.err
    with pytest.raises(UserError, match="line 2"):  # --show_traceback: the error itself, with its traceback
        main([*argv, "--show_traceback"])


@pytest.mark.parametrize(
    "configs",
    [["zephyr_gsm8k.yaml"], ["tiny.yaml", "fsdp.yaml"], ["tiny.yaml", "fsdp1_gpu.yaml"], ["online_tiny.yaml"]],
    ids=["zephyr_gsm8k", "tiny+fsdp", "tiny+fsdp1_gpu", "online_tiny"],
)
def test_the_documented_configs_parse(tmp_path, capsys, configs):
    """The configs not run here (users' machines; online_tiny.yaml's 15 rounds, which
    bench/online_seeds.py runs) parse as the CLI reads them, with every setting they name known
    (a renamed setting would fail here, not on a user's GPU)."""
    args = [arg for name in configs for arg in ("--config", str(REPO / "configs" / name))]
    result = run_entry(main, ["fit", *args, "--print_config"], capsys)
    assert result.code == 0, result.err[-2000:]
    printed = yaml.safe_load(result.out)
    for name in configs:
        for section, settings in yaml.safe_load((REPO / "configs" / name).read_text()).items():
            if isinstance(settings, dict) and section in ("model", "data", "online"):
                assert set(settings) <= set(printed[section]), (name, section)


def test_help_lists_show_traceback_without_the_args_warning(tmp_path):
    """`python train.py --help` and `fit --help` (before: LightningCLI's "args parameter is
    intended to run from within Python" warning on every command; `--show_traceback` missing)."""
    top = run_cli("--help", cwd=tmp_path)
    fit_help = run_cli("fit", "--help", cwd=tmp_path)
    for result in (top, fit_help):
        assert result.returncode == 0, result.stderr[-2000:]
        assert "args parameter" not in result.stdout + result.stderr
    assert "--show_traceback" in fit_help.stdout
