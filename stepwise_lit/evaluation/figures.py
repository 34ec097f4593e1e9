"""The report's figures: solve rate, step accuracy by step index, step-reward histograms and the
training history, as matplotlib `Figure` objects (no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

HISTORY_METRICS = ("reward_accuracy", "reward_margin", "solve_rate")
HISTORY_STAGES = ("train", "val")
HISTORY_LABELS = {
    "reward_accuracy": "reward accuracy (chosen > rejected)",
    "reward_margin": "reward margin (chosen − rejected)",
    "solve_rate": "solve rate (evaluation.during_fit)",
}


def report_figures(report: dict, good: torch.Tensor, bad: torch.Tensor, bins: int) -> dict[str, Figure]:
    """The report's plots by file stem; ``training_curves`` only when there is a history."""
    figures = {
        "step_accuracy_by_index": step_accuracy_figure(report),
        "step_reward_distribution": step_reward_figure(report["stage"], good, bad, bins),
    }
    if report["history"] and report["history"]["series"]:
        figures["training_curves"] = history_figure(report["history"])
    if report["generation"] is not None:
        figures["solve_rate"] = solve_rate_figure(report)
    return figures


def solve_rate_figure(report: dict) -> Figure:
    """Bars of the solve rate and, when sampled, pass@k and maj@k."""
    k = report["generation"]["k"]
    names = {"solve_rate": "solve rate (first completion)", "pass_at_k": f"pass@{k}", "maj_at_k": f"maj@{k}"}
    shown = {label: report["metrics"][name] for name, label in names.items() if report["metrics"].get(name) is not None}
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    bars = axes.bar(list(shown), list(shown.values()), color="tab:blue")
    axes.bar_label(bars, fmt="%.3f")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("share of prompts solved")
    axes.set_title(f"Generated solutions ({report['stage']}, {report['generation']['num_prompts']:g} prompts, "
                   f"{report['generation']['source']} answers)")
    axes.grid(alpha=0.3, axis="y")
    return figure


def step_accuracy_figure(report: dict) -> Figure:
    """Step accuracy by step index, chosen and rejected, over grey bars of the steps counted."""
    by_index = report["step_accuracy_by_index"]
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axes = figure.add_subplot()
    counts_axes = axes.twinx()
    totals = [c + r for c, r in zip(by_index["chosen_count"], by_index["rejected_count"])]
    counts_axes.bar(by_index["step"], totals, color="grey", alpha=0.2, label="steps counted (right axis)")
    counts_axes.set_ylabel("steps counted (chosen + rejected)")
    axes.set_zorder(counts_axes.get_zorder() + 1)
    axes.patch.set_visible(False)
    for side, marker in (("chosen", "o"), ("rejected", "s")):
        values = [math.nan if v is None else v for v in by_index[side]]
        axes.plot(by_index["step"], values, marker=marker, label=f"{side} steps")
    axes.set_xlabel("step index (1 = first step of the response)")
    axes.set_ylabel("step accuracy: sign(h_t) = sign(verifier g_t)")
    axes.set_ylim(-0.03, 1.03)
    if by_index["step"]:
        axes.set_xticks(by_index["step"])
    axes.set_title(f"Step accuracy by step index ({report['stage']}, {report['num_pairs']:g} pairs)")
    axes.grid(alpha=0.3)
    lines, labels = axes.get_legend_handles_labels()
    bars, bar_labels = counts_axes.get_legend_handles_labels()
    axes.legend(lines + bars, labels + bar_labels)
    return figure


def step_reward_figure(stage: str, good: torch.Tensor, bad: torch.Tensor, bins: int) -> Figure:
    """Histograms (densities) of the implicit step rewards of good and bad steps."""
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axes = figure.add_subplot()
    both = torch.cat([good, bad]).double()
    if both.numel():
        low, high = float(both.min()), float(both.max())
        edges = torch.linspace(low, high if high > low else low + 1e-6, bins + 1).tolist()
        for values, label, color in ((good, "verifier: good step (g > 0)", "tab:green"), (bad, "verifier: bad step (g < 0)", "tab:red")):
            if values.numel():
                axes.hist(values.tolist(), bins=edges, density=True, alpha=0.55, color=color, label=f"{label}, n={values.numel()}")
    axes.axvline(0.0, color="black", linewidth=1, label="h = 0")
    axes.set_xlabel("implicit step reward h_t = β_s · (log π_θ − log π_ref) of the step")
    axes.set_ylabel("density")
    axes.set_title(f"Implicit step rewards of good vs bad steps ({stage})")
    axes.legend()
    return figure


def history_figure(history: dict) -> Figure:
    """Reward accuracy, reward margin and (when logged) the solve rate against the training
    step, train and val; one panel per metric found."""
    shown = [metric for metric in HISTORY_METRICS if any(f"{stage}/{metric}" in history["series"] for stage in HISTORY_STAGES)]
    figure = Figure(figsize=(5.5 * len(shown), 4.2), layout="constrained")
    for position, metric in enumerate(shown, start=1):
        axes = figure.add_subplot(1, len(shown), position)
        for stage, marker in zip(HISTORY_STAGES, ("o", "s")):
            series = history["series"].get(f"{stage}/{metric}")
            if series:
                axes.plot(series["step"], series["value"], marker=marker, markersize=3, label=stage)
        axes.set_xlabel("training step")
        axes.set_ylabel(HISTORY_LABELS[metric])
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"Over training (from {Path(history['source']).name})")
    return figure
