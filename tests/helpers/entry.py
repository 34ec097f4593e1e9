"""Running the user's entry points in-process from tests: `train.py` (cli.main), `prepare` and
`score`, with a YAML file written from a dict and what the command printed and returned."""

from __future__ import annotations

import copy
import csv
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.data.writers import write_rows
from tests.helpers.paths import REPO

# `train.py`'s flags for configs/tiny.yaml shrunk to the tiny model (fast_dev_run=2: one SFT step, then
# one stepwise DPO step).
TINY_ARGS = [
    "--config", str(REPO / "configs" / "tiny.yaml"),
    "--model.tiny_model.hidden_size=32", "--model.tiny_model.num_layers=1",
    "--model.tiny_model.num_heads=2", "--model.tiny_model.intermediate_size=64",
    "--model.sft_warmup_steps=1",  # fast_dev_run=2: one SFT step, then one stepwise DPO step
    "--data.synthetic_train_size=16", "--data.synthetic_val_size=8", "--data.batch_size=4",
    "--trainer.enable_progress_bar=false",
]

# The tiny run of the user-path layer: the model sizes of TINY_ARGS, two
# optimizer steps, one validation batch after step 2, checkpoints in <root>/checkpoints (the CLI's
# default ModelCheckpoint, which keeps last.ckpt).
BASE = {
    "seed_everything": 0,
    "num_threads": 1,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "precision": 32,
        "max_steps": 2,
        "limit_val_batches": 1,
        "val_check_interval": 2,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    },
    "model": {
        "tiny_model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
    },
    "data": {
        "path": "synthetic",
        "synthetic_train_size": 8,
        "synthetic_val_size": 4,
        "synthetic_max_value": 10,
        "max_length": 256,
        "max_prompt_length": 32,
        "batch_size": 4,
    },
}


@dataclass
class Outcome:
    """What a command did: its exit code (0 when it returned) and what it printed."""

    code: int
    out: str
    err: str


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, section by section (a None value removes a setting)."""
    result = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict) and "class_path" not in value:
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def write_config(folder: Path, changes: dict, cache_dir: Path, base: dict = BASE) -> Path:
    """Writes `BASE` + `changes` as YAML, with `data.cache_dir` and `trainer.default_root_dir`
    (`folder / "run"`) set; returns the file."""
    config = merged(base, changes)
    config.setdefault("data", {}).setdefault("cache_dir", str(cache_dir))
    config.setdefault("trainer", {}).setdefault("default_root_dir", str(folder / "run"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_entry(main: Callable[[Sequence[str]], object], argv: Sequence[str], capsys) -> Outcome:
    """Calls an entry point's `main(argv)` as the command line would, catching its exit."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_info:
        code = 0 if exit_info.code is None else exit_info.code if isinstance(exit_info.code, int) else 1
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def write_pairs(path: Path, num_pairs: int, **changes) -> list[dict]:
    """Writes `num_pairs` embedded pairs (canonical rows) to `path`, each updated with `changes`."""
    rows = [{**row, **changes} for row in generate_pairs(num_pairs, seed=3, max_value=10)]
    write_rows(rows, path)
    return rows


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256 of its bytes), to show nothing changed."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def logged_losses(root: Path, columns: Sequence[str] = ("train/loss",)) -> list[float]:
    """Per training step, in step order, the first of `columns` a run under `root` logged in its CSV
    log (``csv/version_*/metrics.csv``), from the step's first row that has one (a later row of the
    same step holds epoch-level values)."""
    losses: dict[int, float] = {}
    for path in sorted((root / "csv").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            value = next((row[column] for column in columns if row.get(column)), None)
            if value is not None:
                losses.setdefault(int(row["step"]), float(value))
    return [losses[step] for step in sorted(losses)]
