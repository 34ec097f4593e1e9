"""The study's statistics: per task, method and metric the values by seed, their mean and sample
std, and the paired comparison with plain DPO (`sign_test`)."""

from __future__ import annotations

import math
import statistics

from bench.study.methods import BASELINE


def sign_test(differences: list[float]) -> dict:
    """Exact two-sided sign test of paired differences (ties, differences of 0, are dropped).

    Returns:
        ``wins`` (> 0), ``losses`` (< 0), ``ties`` and ``p`` = min(1, 2 P(X <= min(wins,
        losses))), X ~ Binomial(wins + losses, 1/2); 1.0 with no untied pair. With 5 pairs the
        smallest p is 2/32 = 0.0625.
    """
    wins = sum(d > 0 for d in differences)
    losses = sum(d < 0 for d in differences)
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return {"wins": wins, "losses": losses, "ties": len(differences) - n, "p": min(1.0, 2 * tail) if n else 1.0}


def summarise(runs: list[dict]) -> dict:
    """Per task and method, each metric's values by seed, mean and sample std, and against
    plain DPO (same task, same seeds) the paired differences and `sign_test`."""
    summary: dict = {}
    for run in runs:
        entry = summary.setdefault(run["task"], {}).setdefault(run["method"], {})
        for metric, value in run["metrics"].items():
            if value is not None:
                entry.setdefault(metric, {"by_seed": {}})["by_seed"][run["seed"]] = value
    for methods in summary.values():
        baseline = methods.get(BASELINE, {})
        for name, metrics in methods.items():
            for metric, values in metrics.items():
                numbers = list(values["by_seed"].values())
                values["mean"] = statistics.fmean(numbers)
                values["std"] = statistics.stdev(numbers) if len(numbers) > 1 else None
                seeds = sorted(set(values["by_seed"]) & set(baseline.get(metric, {}).get("by_seed", {})))
                if name != BASELINE and seeds:
                    differences = [values["by_seed"][s] - baseline[metric]["by_seed"][s] for s in seeds]
                    values["vs_plain_dpo"] = {
                        "seeds": seeds, "mean_difference": statistics.fmean(differences),
                        "std_difference": statistics.stdev(differences) if len(differences) > 1 else None,
                        **sign_test(differences),
                    }
    return summary

