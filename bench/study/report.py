"""The study's outputs: ``runs.json``, ``table.json``, ``table.md`` and the two plots."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from bench.study.methods import BASELINE, METHODS, METRICS, PAIRED_METRICS, SFT_START, Task
from bench.study.statistics import summarise


def mean_std(values: dict | None) -> str:
    """``mean ± sample std`` (the mean alone for one seed), ``–`` when absent."""
    if values is None:
        return "–"
    return f"{values['mean']:.3f}" + (f" ± {values['std']:.3f}" if values["std"] is not None else "")


def paired(values: dict | None) -> str:
    """``+0.050 ± 0.020 (4 up, 1 down, p 0.38)``: the mean and sample std of the paired
    differences with plain DPO, and the sign test."""
    versus = (values or {}).get("vs_plain_dpo")
    if not versus:
        return "–"
    spread = f" ± {versus['std_difference']:.3f}" if versus["std_difference"] is not None else ""
    ties = f", {versus['ties']} tied" if versus["ties"] else ""
    return (f"{versus['mean_difference']:+.3f}{spread} ({versus['wins']} up, {versus['losses']} down{ties}, "
            f"p {versus['p']:.2f})")


def markdown(summary: dict) -> str:
    """Per task: mean ± std of every metric by method, then each method minus plain DPO, paired by seed."""
    lines = []
    for task, methods in summary.items():
        lines += [f"### {task}: mean ± sample std over seeds", "",
                  "| method | seeds | " + " | ".join(METRICS) + " |", "| --- | ---: |" + " ---: |" * len(METRICS)]
        for name, metrics in methods.items():
            seeds = max(len(values["by_seed"]) for values in metrics.values())
            label = "SFT policy (every method's start)" if name == SFT_START else name
            lines.append(f"| {label} | {seeds} | " + " | ".join(mean_std(metrics.get(m)) for m in METRICS) + " |")
        lines += ["", f"### {task}: minus {BASELINE}, paired by seed (mean ± std of the differences; exact two-sided sign test)", "",
                  "| method | " + " | ".join(PAIRED_METRICS) + " |", "| --- |" + " ---: |" * len(PAIRED_METRICS)]
        for name, metrics in methods.items():
            if name not in (BASELINE, SFT_START):
                lines.append(f"| {name} | " + " | ".join(paired(metrics.get(m)) for m in PAIRED_METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


def online_markdown(runs: list[dict]) -> str:
    """Per online method and seed: pairs per round, the share of right samples in the first and last
    round, and the seconds spent generating, scoring and training."""
    lines = []
    for run in runs:
        rounds = run.get("online")
        if rounds:
            if not lines:
                lines = ["### online rounds", "", "| task | method | seed | pairs per round | of them with the reference | right samples, "
                         "first → last round | generation s | scoring s | training s |",
                         "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: |"]
            accuracy = rounds["sample_accuracy"]
            lines.append(f"| {run['task']} | {run['method']} | {run['seed']} | {' '.join(map(str, rounds['pairs']))} | "
                         f"{sum(rounds['reference_pairs'])} | {accuracy[0]:.3f} → {accuracy[-1]:.3f} | {sum(rounds['generation_s']):.0f} | "
                         f"{sum(rounds['scoring_s']):.1f} | {sum(rounds['training_s']):.0f} |")
    return "\n".join(lines + [""]) if lines else ""


def plot(summary: dict, metric: str, title: str, path: Path) -> None:
    """Per task a panel: each method's seeds as dots, their mean ± std as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(summary), 3.4))
    for index, (task, methods) in enumerate(summary.items()):
        axes = figure.add_subplot(1, len(summary), index + 1)
        names = [name for name, metrics in methods.items() if metric in metrics]
        for position, name in enumerate(names):
            values = methods[name][metric]
            seeds = list(values["by_seed"].values())
            axes.bar(position, values["mean"], yerr=values["std"] or 0, color="#9ecae1", edgecolor="#3182bd", capsize=4)
            axes.scatter([position] * len(seeds), seeds, color="#08306b", s=12, zorder=3)
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axes.set_ylim(0, 1)
        axes.set_title(f"{task}: {title}", fontsize=9)
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)



def write_outputs(args: argparse.Namespace, tasks: dict[str, Task], runs: list[dict], start: float, load: tuple,
                  plots: bool = True) -> str:
    """Writes runs.json, table.json and table.md of the runs so far under `args.results`, and with
    `plots` the plots; returns table.md's text."""
    order = {name: index for index, name in enumerate([SFT_START, *METHODS])}
    runs = sorted(runs, key=lambda run: (run["task"], order[run["method"]], run["seed"]))
    summary = summarise(runs)
    if plots:
        plot(summary, "solve_rate", "greedy solve rate (test)", args.results / "solve_rate.png")
        plot(summary, "processbench_f1", "ProcessBench F1 of h_t (test)", args.results / "f1.png")
    wall = time.perf_counter() - start
    load_end = os.getloadavg()
    expected = len(args.seeds) * sum(1 + sum(METHODS[m].runs_on(task) for m in args.methods) for task in tasks)
    status = "" if len(runs) == expected else f" (**unfinished: {len(runs)} of {expected} runs so far**)"
    command = " ".join(["python -m bench.study", *args.argv])
    table = (f"`{command}`: wall time {wall / 60:.1f} min{status} on {os.cpu_count()} CPUs; load average "
             f"{load[0]:.2f} at the start (1 min), {load_end[2]:.2f} over the last 15 min at the end\n\n"
             + markdown(summary) + online_markdown(runs))
    (args.results / "runs.json").write_text(json.dumps(runs, indent=2))
    (args.results / "table.json").write_text(json.dumps({
        "command": command, "wall_seconds": wall, "finished_runs": len(runs), "expected_runs": expected,
        "load_average_at_start": load, "load_average_at_end": load_end,
        "tasks": {n: asdict(t) for n, t in tasks.items()}, "methods": {n: asdict(METHODS[n]) for n in args.methods},
        "seeds": args.seeds, "max_value": args.max_value, "summary": summary,
    }, indent=2))
    (args.results / "table.md").write_text(table)
    return table


