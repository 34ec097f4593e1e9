"""The README's main-job table: `configs/tiny.yaml` run with several seeds, validation metrics at each
validation step as mean and range over the seeds, the evaluation report of each run's last
checkpoint (`validate`: solve rate, ProcessBench F1 of the implicit step rewards, ...), the
wall time of each fit, and the exported policy's greedy continuation of a prompt.

    python bench/tiny_seeds.py --seeds 0 1 2 --out runs/tiny_seeds --write   # ~3 min a seed on 2 cores

Each run is `python train.py fit --config configs/tiny.yaml --seed_everything=<seed>
--trainer.default_root_dir=<out>/seed<seed>` (the data, `data.seed: 0`, is the same for every
run; the seed changes the model's initialisation and the batch order). A run whose folder already
holds an export is not run again. ``--write`` also writes the tables to docs/results/tiny_seeds.md
(+ .json).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/tiny_seeds.py`: this checkout's bench

from bench.common import REPO, Report, add_write_option  # noqa: E402

METRICS = ("val/solve_rate", "val/flagged_step_share", "val/reward_accuracy", "val/step_accuracy", "val/step_auroc")
REPORTED = ("solve_rate", "processbench_f1", "error_acc", "correct_acc", "within_response_auroc", "step_auroc")
PROMPT = "Juno's shop has 4 books. Then +5, 3 times. How many books?"  # held out: generate_pairs(20, seed=4242, max_value=20)[6]


def run(seed: int, root: Path) -> float | None:
    """Trains one seed, then validates its last checkpoint (the evaluation report); returns the
    wall time of the fit in seconds (None when the run was already there)."""
    if (root / "report" / "val" / "report.json").is_file():
        return None
    common = ["--config", str(REPO / "configs" / "tiny.yaml"), f"--seed_everything={seed}",
              f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *common], check=True, cwd=REPO)
    wall = time.perf_counter() - start
    checkpoint = root / "checkpoints" / "last.ckpt"
    subprocess.run([sys.executable, str(REPO / "train.py"), "validate", *common, f"--ckpt_path={checkpoint}"],
                   check=True, cwd=REPO)
    return wall


def validation_rows(root: Path) -> dict[int, dict[str, float]]:
    """Validation metrics by global step from the run's CSVLogger file."""
    path = sorted(root.glob("csv/version_*/metrics.csv"))[0]  # the fit's (validate writes the next version)
    rows: dict[int, dict[str, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {name: float(row[name]) for name in METRICS if row.get(name)}
            if values:
                rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def continuation(root: Path) -> str:
    """The exported policy's greedy continuation of `PROMPT` (80 new tokens; the tokenizer adds BOS as in training)."""
    model = AutoModelForCausalLM.from_pretrained(root / "export")
    tokenizer = AutoTokenizer.from_pretrained(root / "export")
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=80, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])


def mean_range(values: list[float]) -> str:
    """``mean (min–max)`` of the values, to 3 decimals."""
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "tiny_seeds")
    add_write_option(parser, "tiny_seeds")
    args = parser.parse_args()
    report = Report(__doc__, f"{' '.join(map(str, args.seeds))} (seed_everything of each run; data.seed 0)")
    walls, tables, texts, reports = {}, {}, {}, {}
    for seed in args.seeds:
        root = args.out / f"seed{seed}"
        walls[seed] = run(seed, root)
        tables[seed] = validation_rows(root)
        texts[seed] = continuation(root)
        reports[seed] = json.loads((root / "report" / "val" / "report.json").read_text())["metrics"]
    steps = sorted(set.intersection(*(set(table) for table in tables.values())))
    rows, summary = [], {}
    for step in steps:
        cells = []
        for name in METRICS:
            values = [tables[seed][step][name] for seed in args.seeds if name in tables[seed][step]]
            summary.setdefault(str(step), {})[name] = values
            if not values:
                cells.append("–")
                continue
            cells.append(mean_range(values))
        rows.append([step, *cells])
    report.table(["step", *(name.split("/")[1] for name in METRICS)], rows)
    report.say("validate of the last checkpoint (report.json), mean (range) over the seeds:")
    report.table(["metric", "mean (range)"], [
        [name, mean_range(values)] for name in REPORTED
        if (values := [reports[seed][name] for seed in args.seeds if reports[seed].get(name) is not None])
    ])
    for seed in args.seeds:
        wall = "already run" if walls[seed] is None else f"{walls[seed]:.0f} s"
        report.say(f"seed {seed}: wall {wall}; greedy continuation of {PROMPT!r}: {texts[seed]!r}")
    report.finish({"seeds": args.seeds, "wall_s": walls, "metrics": summary, "reports": reports, "continuations": texts},
                  args.write)


if __name__ == "__main__":
    main()
