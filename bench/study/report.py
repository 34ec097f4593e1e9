"""The study's outputs: ``runs.json``, ``table.json``, ``table.md`` and the plots (``curve.png``,
``solve_rate.png``, ``paired.png``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

from bench.study.methods import BASELINE, FAMILIES, METHODS, METRICS, PAIRED_METRICS
from bench.study.statistics import summarise


def plateau(curve: list[dict]) -> dict:
    """The last quarter of the base's curve: the points from 3/4 of the steps on, the endpoint gain
    (last minus the point at 3/4) and the least-squares slope over those points times the quarter's steps."""
    last = curve[-1]["step"]
    points = [point for point in curve if point["step"] >= 0.75 * last]
    steps = [point["step"] for point in points]
    rates = [point["solve_rate"] for point in points]
    mean_step, mean_rate = sum(steps) / len(steps), sum(rates) / len(rates)
    spread = sum((step - mean_step) ** 2 for step in steps)
    slope = sum((s - mean_step) * (r - mean_rate) for s, r in zip(steps, rates)) / spread if spread else 0.0
    return {"from_step": steps[0], "endpoint_gain": rates[-1] - rates[0], "fitted_gain": slope * (last - steps[0]),
            "points": len(points)}


def standard_error(rate: float, n: int) -> float:
    return math.sqrt(rate * (1 - rate) / n)


def mean_std(values: dict | None) -> str:
    if values is None:
        return "–"
    return f"{values['mean']:.3f}" + (f" ± {values['std']:.3f}" if values["std"] is not None else "")


def interval(bounds) -> str:
    return "–" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def base_markdown(base: dict, setup) -> list[str]:
    curve, flat, test = base["curve"], plateau(base["curve"]), base["test"]
    lines = ["## The base", "", f"SFT on gold solutions, {setup.base_steps} steps × {setup.base_batch_size}, lr {setup.base_lr:g} "
             f"cosine-decayed to 0; greedy solve rate on the {setup.val_problems} validation problems:", "",
             "| step | " + " | ".join(str(p["step"]) for p in curve) + " |", "| --- |" + " ---: |" * len(curve),
             "| solve rate | " + " | ".join(f"{p['solve_rate']:.3f}" for p in curve) + " |", "",
             f"Last quarter (steps {flat['from_step']}–{curve[-1]['step']}, {flat['points']} points): endpoint gain "
             f"{flat['endpoint_gain']:+.3f}, least-squares gain {flat['fitted_gain']:+.3f}. On the {setup.test_problems} test "
             f"problems: greedy solve rate {test['solve_rate']:.3f} (binomial SE "
             f"{standard_error(test['solve_rate'], setup.test_problems):.3f}), maj@{setup.samples} {test['maj_at_8']:.3f}, "
             f"pass@{setup.samples} {test['pass_at_8']:.3f}.", ""]
    pool, counts = base["pool"], base["pool"]["pairs"]
    lines += ["## The pool", "", f"{pool['samples']} samples ({setup.samples} per prompt, temperature {setup.temperature:g}) of "
              f"the base on {pool['prompts']} training prompts, every step scored by the rule verifier:", "",
              "| right answer | right answer, every step passed | right answer, a step flagged | prompts with a right sample "
              "| prompts all right | first-error pairs | best-vs-worst pairs | prompts with no pair | RFT rows | Step-DPO rows |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
              f"| {pool['right_answer_share']:.3f} | {pool['right_all_steps_share']:.3f} | "
              f"{pool['right_answer_flagged_step_share']:.3f} | {pool['prompts_with_a_right_sample']} | {pool['prompts_all_right']} | "
              f"{counts['first_error_branch']} | {counts['best_vs_worst']} | {counts['no_pair']} | {pool['right_rows']} | "
              f"{pool['step_dpo_rows']} ({pool['step_dpo_left_out']} left out) |", "",
              f"Of the {counts['best_vs_worst']} best-vs-worst pairs, {counts['wrong_chosen']} have a wrong answer on the "
              f"chosen side. In {counts['parting_at_first_error']} of all {counts['first_error_branch'] + counts['best_vs_worst']} "
              "pairs the two sides part exactly at the rejected side's first flagged step.", "",
              "Labelled base samples for ProcessBench: " + ", ".join(
                  f"{split} {values['responses']} ({values['with_error']} with a flagged step)"
                  for split, values in base["labelled"].items()) + ".", ""]
    return lines


def sweep_markdown(chosen: dict) -> list[str]:
    lines = ["## The sweeps (seed 0, validation greedy solve rate, mean over the family's sweep members)", "",
             "| family | members | lr | NLL weight | validation solve rate |", "| --- | --- | ---: | ---: | ---: |"]
    for family, point in chosen.items():
        for entry in point["points"]:
            mark = " **(chosen)**" if (entry["lr"], entry["nll_weight"]) == (point["lr"], point["nll_weight"]) else ""
            weight = f"{entry['nll_weight']:g}" if family == "preference" else "–"
            lines.append(f"| {family} | {', '.join(FAMILIES[family])} | {entry['lr']:g} | {weight} | "
                         f"{entry['val_solve_rate']:.3f}{mark} |")
    return lines + [""]


def methods_markdown(summary: dict, base: dict, setup) -> list[str]:
    lines = [f"## Methods on the {setup.test_problems} test problems: mean ± sample std over seeds", "",
             "| method | seeds | " + " | ".join(METRICS) + " |", "| --- | ---: |" + " ---: |" * len(METRICS),
             "| base (every method's start) | – | " + " | ".join(
                 f"{base['test'][m]:.3f}" if m in base["test"] else "–" for m in METRICS) + " |"]
    for name in METHODS:
        if name in summary:
            seeds = max(len(values["by_seed"]) for values in summary[name].values())
            lines.append(f"| {name} | {seeds} | " + " | ".join(mean_std(summary[name].get(m)) for m in METRICS) + " |")
    lines += ["", f"## Minus {BASELINE}, paired by seed", "",
              "| method | metric | per-seed differences | mean ± std | up / down | sign-test p | 95% t-interval | 95% bootstrap |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in METHODS:
        for metric in PAIRED_METRICS:
            versus = summary.get(name, {}).get(metric, {}).get("vs_baseline")
            if versus:
                spread = f" ± {versus['std_difference']:.3f}" if versus["std_difference"] is not None else ""
                lines.append(f"| {name} | {metric} | {' '.join(f'{d:+.3f}' for d in versus['differences'])} | "
                             f"{versus['mean_difference']:+.3f}{spread} | {versus['wins']} / {versus['losses']} | "
                             f"{versus['p']:.3f} | {interval(versus['t_interval'])} | {interval(versus['bootstrap_interval'])} |")
    return lines + [""]


def online_markdown(runs: list[dict]) -> list[str]:
    rows = [run for run in runs if run.get("online") and run["split"] == "test"]
    if not rows:
        return []
    lines = ["## Online rounds", "", "| seed | pairs per round | right samples per round |", "| ---: | --- | --- |"]
    for run in sorted(rows, key=lambda run: run["seed"]):
        lines.append(f"| {run['seed']} | {' '.join(map(str, run['online']['pairs']))} | "
                     f"{' '.join(f'{a:.3f}' for a in run['online']['sample_accuracy'])} |")
    return lines + [""]


def plots(summary: dict, base: dict, folder: Path) -> None:
    """``curve.png`` (the base's validation curve), ``solve_rate.png`` (each method's seeds and mean,
    the base's rate as a line) and ``paired.png`` (per-seed solve-rate differences from the baseline
    with the t-interval)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 3.2))
    axes = figure.add_subplot()
    axes.plot([p["step"] for p in base["curve"]], [p["solve_rate"] for p in base["curve"]], marker="o", color="#3182bd")
    axes.set_xlabel("SFT step")
    axes.set_ylabel("validation solve rate (greedy)")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / "curve.png", dpi=90)
    names = [name for name in METHODS if name in summary]
    rates = {name: summary[name]["solve_rate"] for name in names}
    versus = {name: rates[name].get("vs_baseline") or {} for name in names}
    panels = (("solve_rate.png", "solve_rate", {n: (list(rates[n]["by_seed"].values()), None) for n in names}),
              ("paired.png", "solve_rate − " + BASELINE,
               {n: (versus[n].get("differences", []), versus[n].get("t_interval")) for n in names}))
    for file, metric, points in panels:
        figure = Figure(figsize=(6.5, 3.4))
        axes = figure.add_subplot()
        for position, name in enumerate(names):
            values, bounds = points[name]
            axes.scatter([position] * len(values), values, color="#08306b", s=14, zorder=3)
            if values:
                axes.hlines(sum(values) / len(values), position - 0.3, position + 0.3, color="#e6550d")
            if bounds:
                axes.vlines(position, *bounds, color="#9ecae1", linewidth=6, zorder=1)
        if file == "solve_rate.png":
            axes.axhline(base["test"]["solve_rate"], color="grey", linestyle="--", label="base")
            axes.legend(fontsize=8)
        else:
            axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axes.set_ylabel(metric + " (test)", fontsize=8)
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(folder / file, dpi=90)


def write_outputs(args: argparse.Namespace, base: dict, runs: list[dict], chosen: dict, start: float, load: tuple,
                  timing: dict, draw: bool = True) -> str:
    """Writes runs.json, table.json and table.md of the runs so far under `args.results`, and with
    `draw` the plots; returns table.md's text."""
    setup = args.setup
    summary = summarise(runs)
    if draw and summary:
        plots(summary, base, args.results)
    wall = time.perf_counter() - start
    tests = sum(run["split"] == "test" for run in runs)
    wanted = len(args.seeds) * len(args.methods)
    status = "" if tests == wanted else f" (**unfinished: {tests} of {wanted} test runs so far**)"
    command = " ".join(["python -m bench.study", *args.argv])
    base_time = ("cached" if timing["cached"] else "built in this run") + f", {timing['built_seconds'] / 60:.1f} min to build"
    text = "\n".join([
        f"`{command}`: wall time {wall / 60:.1f} min{status} on {os.cpu_count()} CPUs (the base: {base_time}); load average "
        f"{load[0]:.2f} at the start (1 min), {os.getloadavg()[2]:.2f} over the last 15 min at the end", "",
        *base_markdown(base, setup), *sweep_markdown(chosen), *methods_markdown(summary, base, setup), *online_markdown(runs)])
    (args.results / "runs.json").write_text(json.dumps(runs, indent=2))
    (args.results / "table.json").write_text(json.dumps({
        "command": command, "wall_seconds": wall, "timing": timing, "finished_test_runs": tests, "expected_test_runs": wanted,
        "setup": asdict(setup), "seeds": args.seeds, "methods": {n: asdict(METHODS[n]) for n in args.methods},
        "base": base, "plateau": plateau(base["curve"]), "sweeps": chosen, "summary": summary,
    }, indent=2))
    (args.results / "table.md").write_text(text)
    return text
