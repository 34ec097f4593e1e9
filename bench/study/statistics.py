"""The study's statistics: per method and metric the values by seed, mean and sample std, and against
the baseline, paired by seed, the differences with a sign test (`sign_test`), a t-interval
(`t_interval`) and a paired bootstrap interval (`bootstrap_interval`)."""

from __future__ import annotations

import math
import random
import statistics

from bench.study.methods import BASELINE

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..10."""


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


def t_interval(differences: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean difference: mean ± t_{0.975, n-1} s / sqrt(n); None below 2 or above 11 pairs."""
    n = len(differences)
    if n - 1 not in T_975:
        return None
    half = T_975[n - 1] * statistics.stdev(differences) / math.sqrt(n)
    mean = statistics.fmean(differences)
    return mean - half, mean + half


def bootstrap_interval(differences: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float] | None:
    """Paired bootstrap 95% percentile interval of the mean difference: the seeds' differences drawn
    with replacement `resamples` times (`random.Random(seed)`); the 2.5th and 97.5th percentiles of
    the means. None below 2 pairs. With 5 seeds it is narrower than the t-interval (it ignores
    that the spread itself is estimated)."""
    if len(differences) < 2:
        return None
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(differences, k=len(differences))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def paired(values: dict[int, float], baseline: dict[int, float]) -> dict | None:
    """The paired comparison of one metric's values by seed with the baseline's (same seeds)."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    differences = [values[seed] - baseline[seed] for seed in seeds]
    return {"seeds": seeds, "differences": differences, "mean_difference": statistics.fmean(differences),
            "std_difference": statistics.stdev(differences) if len(differences) > 1 else None,
            "t_interval": t_interval(differences), "bootstrap_interval": bootstrap_interval(differences),
            **sign_test(differences)}


def summarise(runs: list[dict]) -> dict:
    """Per method (test runs only) each metric's values by seed, mean and sample std, and against
    `BASELINE` the `paired` comparison."""
    summary: dict = {}
    for run in runs:
        if run["split"] == "test":
            entry = summary.setdefault(run["method"], {})
            for metric, value in run["metrics"].items():
                if value is not None:
                    entry.setdefault(metric, {"by_seed": {}})["by_seed"][run["seed"]] = value
    baseline = summary.get(BASELINE, {})
    for name, metrics in summary.items():
        for metric, values in metrics.items():
            numbers = list(values["by_seed"].values())
            values["mean"] = statistics.fmean(numbers)
            values["std"] = statistics.stdev(numbers) if len(numbers) > 1 else None
            if name != BASELINE and metric in baseline:
                values["vs_baseline"] = paired(values["by_seed"], baseline[metric]["by_seed"])
    return summary
