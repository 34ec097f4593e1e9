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
