"""The study command, ``python -m bench.study`` (see the package's docstring)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import bench.study
from bench.common import REPO
from bench.study.base import base_folder, build_base
from bench.study.methods import FAMILIES, METHODS, Setup
from bench.study.report import write_outputs
from bench.study.run import quiet, run_method

SMOKE = Setup(base_steps=4, curve_every=2, pool_prompts=8, samples=8, val_problems=8, test_problems=8, steps=2,
              batch_size=4, max_new_tokens=48, online_rounds=2, online_prompts=4, sweep_lrs=(1e-4,),
              sweep_nll_weights=(1.0,))
"""The test's budget: a 4-step base, 2-step stages, 8 problems per split, a one-point sweep."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.study", description=bench.study.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study",
                        help="output folder (created; not one holding a study's runs): each run's log and export")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder (created) of table.md, table.json, runs.json and the plots; default: --out")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "study_cache",
                        help="where the base is kept, one folder per settings (base-<hash>); delete it to rebuild")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="preference-stage seeds")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (processes of one torch thread)")
    parser.add_argument("--sampler", default="transformers",
                        help="backend of the pool and the online rounds: transformers, vllm or an import path")
    parser.add_argument("--smoke", action="store_true", help="the test's budget (`SMOKE`), 1 seed, 1 worker")
    args = parser.parse_args(argv)
    args.results = args.results or args.out
    args.setup = replace(SMOKE if args.smoke else Setup(), sampler=args.sampler)
    if args.smoke:
        args.seeds, args.workers = [0], 1
    return args


def sweep_grid(setup: Setup, family: str) -> list[tuple[float, float]]:
    """The (lr, NLL weight) points of a family's sweep; the SFT family has no NLL weight (1 is a placeholder)."""
    weights = setup.sweep_nll_weights if family == "preference" else (1.0,)
    return [(lr, weight) for lr in setup.sweep_lrs for weight in weights]


def chosen_point(runs: list[dict], family: str, setup: Setup) -> dict:
    """The family's grid point with the best mean validation solve rate over its sweep members (ties:
    the first in grid order), with every point's mean."""
    means = {}
    for lr, weight in sweep_grid(setup, family):
        rates = [run["metrics"]["solve_rate"] for run in runs if run["split"] == "val" and run["lr"] == lr
                 and run["nll_weight"] == weight and run["method"] in FAMILIES[family]]
        means[(lr, weight)] = sum(rates) / len(rates)
    lr, weight = max(means, key=lambda point: means[point])
    return {"lr": lr, "nll_weight": weight, "points": [{"lr": p[0], "nll_weight": p[1], "val_solve_rate": m}
                                                          for p, m in means.items()]}


def run_all(args: argparse.Namespace, base: Path, on_result) -> tuple[list[dict], dict]:
    """The sweeps (seed 0, validation), then every method and seed at its family's chosen point (test),
    `args.workers` runs at a time; `on_result(runs, chosen)` after each finished run."""
    setup = args.setup
    families = sorted({METHODS[name].family for name in args.methods})
    queue = [(name, 0, lr, weight, "val") for family in families for lr, weight in sweep_grid(setup, family)
             for name in FAMILIES[family]]
    waiting = {family: sum(1 for item in queue if METHODS[item[0]].family == family) for family in families}
    runs: list[dict] = []
    chosen: dict = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        running: set[Future] = set()
        while queue or running:
            while queue and len(running) < args.workers:
                name, seed, lr, weight, split = queue.pop(0)
                root = args.out / "runs" / f"{split}-{name}-seed{seed}-lr{lr:g}-nll{weight:g}"
                running.add(pool.submit(run_method, setup, name, seed, base, root, lr, weight, split))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                result = future.result()
                runs.append(result)
                metrics = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items() if isinstance(v, float))
                print(f"[study] {result['split']} {result['method']} seed {result['seed']} lr {result['lr']:g} nll "
                      f"{result['nll_weight']:g}: {metrics} ({result['seconds']['total']:.0f} s)", flush=True)
                family = METHODS[result["method"]].family
                if result["split"] == "val":
                    waiting[family] -= 1
                    if not waiting[family]:
                        chosen[family] = point = chosen_point(runs, family, setup)
                        queue += [(name, seed, point["lr"], point["nll_weight"], "test") for seed in args.seeds
                                  for name in args.methods if METHODS[name].family == family]
                on_result(runs, chosen)
    return runs, chosen


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if (args.out / "runs").exists():
        print(f"--out: {args.out} already holds a study's runs; name a new folder", file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    base = base_folder(args.cache, args.setup)
    cached = (base / "base.json").exists()
    if cached:
        print(f"[study] base: cached in {base}", flush=True)
        summary = json.loads((base / "base.json").read_text())
    else:
        print(f"[study] base: building in {base} (SFT, then the pool; {args.setup.base_steps} steps)", flush=True)
        summary = build_base(args.setup, base, threads=args.workers)
        quiet(threads=1)
    base_seconds = time.perf_counter() - start
    print(f"[study] base: test solve rate {summary['test']['solve_rate']:.3f}, pool {summary['pool']['pairs']} "
          f"({base_seconds:.0f} s)", flush=True)
    timing = {"cached": cached, "base_seconds": base_seconds, "built_seconds": summary["seconds"]["total"]}
    runs, chosen = run_all(args, base, lambda runs, chosen: write_outputs(args, summary, runs, chosen, start, load,
                                                                          timing, draw=False))
    table = write_outputs(args, summary, runs, chosen, start, load, timing)
    print(table)
    print(f"wall time of the whole command: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
