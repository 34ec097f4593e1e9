"""`model.aggregation_strategy` as a user function by import path, from a YAML file through the
command line (`tests/helpers/custom_aggregation.py` holds the functions)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from stepwise_lit.cli import main
from tests.helpers import custom_aggregation
from tests.helpers.entry import TINY_ARGS


def write_config(folder, strategy: str) -> str:
    path = folder / "aggregation.yaml"
    path.write_text(yaml.safe_dump({"model": {"aggregation_strategy": strategy, "sft_warmup_steps": 0}}))
    return str(path)


def test_fit_from_yaml_calls_the_function_on_every_batch(tmp_path, monkeypatch):
    """fast_dev_run=2 (2 training and 2 validation batches of 4 pairs): the function gets each
    batch's [chosen; rejected] scores [8, S] and bool mask, and the run records its import path."""
    calls, original = [], custom_aggregation.fraction_good

    def recorded(scores, mask):
        calls.append((scores.shape, mask.dtype))
        return original(scores, mask)

    monkeypatch.setattr(custom_aggregation, "fraction_good", recorded)
    config = write_config(tmp_path, "tests.helpers.custom_aggregation.fraction_good")
    main(["fit", *TINY_ARGS, "--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=2"])
    assert len(calls) == 4
    assert all(shape[0] == 8 and dtype == torch.bool for shape, dtype in calls)
    exported = json.loads((tmp_path / "export" / "stepwise_config.json").read_text())
    assert exported["aggregation_strategy"] == "tests.helpers.custom_aggregation.fraction_good"


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("no_such_package.module.function", "cannot import module 'no_such_package.module'"),
        ("tests.helpers.custom_aggregation.missing", "module 'tests.helpers.custom_aggregation' has no attribute 'missing'"),
    ],
)
def test_an_unusable_path_stops_before_training_with_the_setting_named(tmp_path, capsys, strategy, message):
    config = write_config(tmp_path, strategy)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *TINY_ARGS, "--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=2"])
    assert stop.value.code == 2
    assert f"error: model.aggregation_strategy: {message}" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()
