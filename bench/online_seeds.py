"""Online vs offline stepwise DPO vs SFT alone on the embedded task, at equal optimizer steps, over seeds.

Every run is `train.py fit` of `configs/online_tiny.yaml` (350 SFT warm-up steps on 11,200 embedded
pairs with numbers up to 40, then 150 steps at a hundredth of the learning rate), changed only where
the method differs:

- ``online``: the config as it is: 15 rounds of 10 steps, each on pairs of the policy's own samples;
- ``offline``: ``online.enabled: false``, a second epoch over the same 11,200 pairs, stopped at
  step 500: the 150 preference steps on fixed pairs (a correct solution vs an injected slip), as
  tiny.yaml;
- ``sft``: the same 500 steps, all SFT (``model.sft_warmup_steps: 500``).

The warm-up (epoch 0: same data, order and initialisation) is the same run in all three, so their
solve rates at step 350 agree. The held-out greedy solve rate (``val/solve_rate``, 128 validation
problems) is read from each run's metrics.csv: at the end of the warm-up (step 350) and at the
end (step 500); the offline runs validate every 50 steps, the online run after every epoch (round).
Two runs at a time, one thread each.

    python bench/online_seeds.py --seeds 0 1 2 --out runs/online_seeds --write   # ~35 min on 2 quiet cores

The seed is ``seed_everything`` and ``data.seed`` (the data, the initialisation and the sampling
change with it). A run whose folder already has ``done.json`` is not run again. The last stdout
line is JSON; ``--write`` also writes the table to docs/results/online_seeds.md (+ .json).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/online_seeds.py`: this checkout's bench

from bench.common import REPO, Report, add_write_option  # noqa: E402

OFFLINE = ["--online.enabled=false", "--trainer.max_epochs=2", "--trainer.max_steps=500", "--trainer.val_check_interval=50"]
METHODS = {"online": [], "offline": OFFLINE, "sft": [*OFFLINE, "--model.sft_warmup_steps=500"]}


def run(method: str, seed: int, root: Path) -> dict:
    """One fit (skipped when ``done.json`` exists); its wall time and solve rates by step."""
    done = root / "done.json"
    if not done.is_file():
        command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "online_tiny.yaml"),
                   f"--seed_everything={seed}", f"--data.seed={seed}", f"--trainer.default_root_dir={root}",
                   "--trainer.enable_progress_bar=false", *METHODS[method]]
        start = time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "fit.log", "w") as log:
            subprocess.run(command, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        done.write_text(json.dumps({"wall_s": time.perf_counter() - start}))
    rates = {}
    with open(sorted(root.glob("csv/version_*/metrics.csv"))[0], newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("val/solve_rate"):
                rates[int(row["step"]) + 1] = float(row["val/solve_rate"])  # logged at the step index, 0-based
    return {"wall_s": json.loads(done.read_text())["wall_s"], "solve_rate": rates}


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "online_seeds")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    add_write_option(parser, "online_seeds")
    args = parser.parse_args()
    report = Report(__doc__, f"{' '.join(map(str, args.seeds))} (seed_everything and data.seed of each run)")
    jobs = [(method, seed) for seed in args.seeds for method in args.methods]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(zip(jobs, pool.map(lambda job: run(*job, args.out / f"{job[0]}-seed{job[1]}"), jobs)))
    rows, summary = [], {}
    for method in args.methods:
        final = [results[method, seed]["solve_rate"][max(results[method, seed]["solve_rate"])] for seed in args.seeds]
        warmup = [results[method, seed]["solve_rate"].get(350) for seed in args.seeds]
        walls = [results[method, seed]["wall_s"] for seed in args.seeds]
        summary[method] = {"final": final, "warmup": warmup, "wall_s": walls,
                           "by_step": {seed: results[method, seed]["solve_rate"] for seed in args.seeds}}
        known = [value for value in warmup if value is not None]
        rows.append([method, spread(final), ", ".join(f"{v:.3f}" for v in final), spread(known) if known else "–",
                     ", ".join(f"{w:.0f}" for w in walls)])
    report.table(["method", "solve rate at step 500 (mean ± std)", "per seed", "at step 350 (end of warm-up)",
                  "fit wall (s, per seed)"], rows)
    report.finish({"seeds": args.seeds, "methods": summary}, args.write)


if __name__ == "__main__":
    main()
