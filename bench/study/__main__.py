"""The study command, ``python -m bench.study`` (see the package's docstring)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import bench.study
from bench.common import GSM8K_PATH, REPO
from bench.study.data import prepare_arithmetic, prepare_gsm8k
from bench.study.methods import BASELINE, HYPOTHESES, MAIN_METHODS, METHODS, SFT_START, TASKS, Task
from bench.study.report import write_outputs
from bench.study.run import data_module, quiet, run_method, run_sft


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.study", description=bench.study.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study",
                        help="output folder (created): data, caches, exports, logs")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder (created) of runs.json, table.md, table.json and the plots; default: --out")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(MAIN_METHODS), choices=list(METHODS),
                        help=f"methods (see METHODS); {BASELINE} is the paired baseline")
    parser.add_argument("--hypotheses", action="store_true",
                        help=f"the hypotheses' methods instead: {' '.join(HYPOTHESES)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max-value", type=int, default=50, help="largest number of an arithmetic problem (tiny.yaml: 20)")
    parser.add_argument("--eval-pairs", type=int, default=256, help="arithmetic validation and test pairs (each)")
    parser.add_argument("--gsm8k-source", type=Path, default=GSM8K_PATH)
    parser.add_argument("--gsm8k-limit", type=int, default=None, help="first N GSM8K questions only")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (processes of one torch thread)")
    parser.add_argument("--online-generator", default="transformers",
                        help="the online method's decoding backend (online.generator): transformers, vllm or an import path")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every task's SFT and preference steps")
    parser.add_argument("--smoke", action="store_true",
                        help="the test's budget: 1 seed, 2+2 steps, plain_dpo, stepwise and online, 64 GSM8K questions, "
                             "32 arithmetic validation and test pairs, 1 worker")
    args = parser.parse_args(argv)
    if args.hypotheses:
        args.methods = list(HYPOTHESES)
    args.results = args.results or args.out
    if args.smoke:
        args.seeds, args.methods, args.gsm8k_limit, args.eval_pairs, args.workers = [0], ["plain_dpo", "stepwise", "online"], 64, 32, 1
    return args


def scaled(task: Task, args: argparse.Namespace) -> Task:
    """The task with the command's step budget (`--smoke`: 2 + 2 steps, 8 test prompts, 2 online rounds of 8 prompts)."""
    if args.smoke:
        return replace(task, sft_steps=2, preference_steps=2, max_prompts=8, max_new_tokens=32, online_rounds=2,
                       online_prompts=8)
    return replace(task, sft_steps=max(1, round(task.sft_steps * args.steps_scale)),
                   preference_steps=max(1, round(task.preference_steps * args.steps_scale)))


def prepare(args: argparse.Namespace, tasks: dict[str, Task]) -> dict[str, dict[str, Path]]:
    """Writes each task's data files and tokenizes its evaluation splits once (before the workers start)."""
    paths = {}
    for name, task in tasks.items():
        folder = args.out / "data" / name
        if name == "arithmetic":
            paths[name] = prepare_arithmetic(folder, task, args.max_value, args.eval_pairs)
        else:
            paths[name] = prepare_gsm8k(folder, args.gsm8k_source, args.gsm8k_limit)
        for train, val in ((paths[name]["val"], paths[name]["val"]), (paths[name]["val"], paths[name]["test"])):
            data_module(task, train, val, 0, args.out / "cache").prepare_data()
    return paths


def run_all(
    args: argparse.Namespace, tasks: dict[str, Task], paths: dict[str, dict[str, Path]], on_result
) -> list[dict]:
    """Every SFT warm-up and every method, `--workers` at a time; `on_result(runs)` after each
    finished run. A free worker takes a method of a finished warm-up before the next warm-up,
    so whole seeds finish in seed order."""
    runs: list[dict] = []
    warmups = [(name, seed) for seed in args.seeds for name in tasks]
    ready: list[tuple[str, str, int]] = []  # (task, method, seed) whose warm-up is done
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        running: set[Future] = set()
        while warmups or ready or running:
            while len(running) < args.workers and (ready or warmups):
                if ready:
                    name, method, seed = ready.pop(0)
                    running.add(pool.submit(run_method, tasks[name], method, seed, paths[name], args.out,
                                            args.online_generator))
                else:
                    name, seed = warmups.pop(0)
                    running.add(pool.submit(run_sft, tasks[name], seed, paths[name], args.out))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                result = future.result()
                runs.append(result)
                metrics = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items() if v is not None)
                print(f"[study] {result['task']} {result['method']} seed {result['seed']}: {metrics} "
                      f"({result['seconds']:.0f} s)", flush=True)
                if result["method"] == SFT_START:
                    ready += [(result["task"], method, result["seed"]) for method in args.methods
                              if METHODS[method].runs_on(result["task"])]
                on_result(runs)
    return runs


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars, here and in the workers
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    quiet(threads=1)
    tasks = {name: scaled(TASKS[name], args) for name in args.tasks}
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    if (args.out / "runs").exists() or (args.out / "sft").exists():
        sys.exit(f"--out: {args.out} already holds a study's runs; name a new folder")
    load = os.getloadavg()
    paths = prepare(args, tasks)
    runs = run_all(args, tasks, paths, lambda runs: write_outputs(args, tasks, runs, start, load, plots=False))
    table = write_outputs(args, tasks, runs, start, load)
    print(table)
    print(f"wall time of the whole command: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
