"""The module's settings as users give them: YAML and command-line flags through
`stepwise_lit.cli.main`, the entry point `train.py` calls (issue 11 item 2: LoRA from YAML)."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from stepwise_lit.cli import main

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def config(tmp_path, reference: str, lora: dict | None, **model_settings) -> list[str]:
    """A YAML config of two training steps on synthetic pairs; returns the CLI arguments."""
    model = {"tiny_model": TINY, "reference": reference, **model_settings}
    if lora is not None:
        model["lora"] = lora
    settings = {
        "model": model,
        "data": {"path": "synthetic", "synthetic_train_size": 4, "synthetic_val_size": 0, "batch_size": 2,
                 "max_length": 256, "cache_dir": str(tmp_path / "cache")},
        "trainer": {"accelerator": "cpu", "max_steps": 2, "enable_progress_bar": False, "logger": False,
                    "enable_checkpointing": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run")},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    return ["fit", "--config", str(tmp_path / "config.yaml")]


@pytest.mark.parametrize("reference", ["copy", "adapter"])
@pytest.mark.parametrize("given", ["yaml", "flag"])
def test_lora_from_yaml_or_a_flag_trains_two_steps(tmp_path, given, reference):
    """`model.lora: {r: 4, alpha: 8}` in YAML, or `--model.lora.r=4` on the command line, reaches
    the module as `LoraSettings` (it used to arrive as a dict and fail in `apply_lora`): two steps
    train and the exported adapter has rank 4."""
    if given == "yaml":
        args = config(tmp_path, reference, {"r": 4, "alpha": 8})
    else:
        args = [*config(tmp_path, reference, None), "--model.lora.r=4"]
    main(args)
    adapter = json.loads((tmp_path / "run" / "export" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    saved = json.loads((tmp_path / "run" / "export" / "stepwise_config.json").read_text())
    assert saved["lora"]["r"] == 4 and saved["reference"] == reference and saved["data"]["batch_size"] == 2


def test_a_typo_in_a_choice_is_refused_by_the_parser(tmp_path, capsys):
    """Choices are `Literal` types: the parser names the allowed values before anything is built."""
    with pytest.raises(SystemExit) as stop:
        main([*config(tmp_path, "copy", None), "--model.outcome_loss_type=sigmoidd"])
    assert stop.value.code != 0
    err = capsys.readouterr().err
    assert "outcome_loss_type" in err and "soft_label" in err


def test_per_token_step_rewards_train_from_yaml(tmp_path):
    """`model.step_reward_per_token: true` (with a β_s to match) in YAML trains two steps and is saved
    with the export; the step loss sees h_t / n_t, so the weights after the second step differ from
    a run with the same β_s and the setting off (the first step starts at h = 0 either way)."""
    main(config(tmp_path / "per_token", "copy", None, step_reward_per_token=True, step_beta=2.0))
    saved = json.loads((tmp_path / "per_token" / "run" / "export" / "stepwise_config.json").read_text())
    assert saved["step_reward_per_token"] is True and saved["step_beta"] == 2.0
    main(config(tmp_path / "per_step", "copy", None, step_beta=2.0))
    per_token, per_step = (load_file(tmp_path / name / "run" / "export" / "model.safetensors") for name in ("per_token", "per_step"))
    assert per_token.keys() == per_step.keys()
    assert max((per_token[k] - per_step[k]).abs().max().item() for k in per_token) > 1e-6
