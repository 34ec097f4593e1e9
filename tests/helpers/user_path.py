"""The user-path run: `train.py fit --config <yaml>` in-process (`stepwise_lit.cli.main`) on
`tests.helpers.entry.BASE` + changes, with the checks every such run must pass, and what it logged."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from stepwise_lit.cli import main
from tests.helpers.entry import run_entry, write_config


def fit(tmp_path: Path, changes: dict, cache_dir: Path, capsys) -> Path:
    """`train.py fit --config <yaml>` with BASE + `changes`; checks the run and returns its root."""
    config = write_config(tmp_path, changes, cache_dir)
    outcome = run_entry(main, ["fit", "--config", str(config)], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    root = tmp_path / "run"
    (metrics_file,) = (root / "csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    losses = [float(row.get("train/loss") or row["train/sft_loss"]) for row in rows if row.get("train/loss") or row.get("train/sft_loss")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    val = [float(row["val/loss"]) for row in rows if row.get("val/loss")]
    assert val and all(math.isfinite(loss) for loss in val), "no finite val/loss"
    assert (root / "checkpoints" / "last.ckpt").is_file()
    return root


def logged(root: Path) -> dict[str, list[float]]:
    """Every column of a run's metrics.csv (`root / "csv"`): its values in the order logged."""
    (metrics_file,) = (root / "csv").glob("version_*/metrics.csv")
    values: dict[str, list[float]] = {}
    for row in csv.DictReader(metrics_file.open()):
        for name, value in row.items():
            if value != "" and name not in ("epoch", "step"):
                values.setdefault(name, []).append(float(value))
    return values


# What an option that changes training shows in: the loss of both steps, and validation after step 2.
COMPARED = ("train/loss", "val/loss", "val/reward_margin", "val/chosen_reward")


def largest_difference(run: dict[str, list[float]], default: dict[str, list[float]], names=COMPARED) -> float:
    """The largest |run − default| over the values of `names` both runs logged (step by step)."""
    pairs = [(a, b) for name in names for a, b in zip(run.get(name, []), default.get(name, []))]
    assert pairs, f"neither run logged any of {names}"
    return max(abs(a - b) for a, b in pairs)


def assert_changes(run: dict[str, list[float]], default: dict[str, list[float]], names=COMPARED) -> None:
    """The option moved the logged loss or rewards off the default run's (same data, same seed)."""
    assert largest_difference(run, default, names) > 1e-4, "the option changed nothing the run logged"


def assert_keeps(run: dict[str, list[float]], default: dict[str, list[float]], tolerance: float,
                 names=COMPARED) -> None:
    """The option left the logged loss and rewards within `tolerance` of the default run's."""
    for name in names:
        assert len(run[name]) == len(default[name]), name
    assert largest_difference(run, default, names) <= tolerance
