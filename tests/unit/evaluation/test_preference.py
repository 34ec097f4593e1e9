"""Preference metrics (stepwise_lit.evaluation.preference) against hand computations."""

import math

import pytest
import torch
from torch.testing import assert_close
from torchmetrics import Metric

from stepwise_lit.evaluation.preference import (
    PAIR_METRICS,
    PreferenceMetrics,
    StepAUROC,
    StepIndexAccuracy,
    WeightedMean,
)

NAN = float("nan")


def _batch():
    """Three pairs, S = 3; pair 2 has weight 0 (a sampler's padding duplicate) and values
    that would change every metric if it were counted."""
    return {
        "chosen_rewards": torch.tensor([0.5, -0.2, 9.0]),
        "rejected_rewards": torch.tensor([0.1, 0.3, -9.0]),
        "chosen_step_rewards": torch.tensor([[0.2, -0.1, 0.3], [0.4, 0.0, 7.0], [-1.0, -1.0, -1.0]]),
        "rejected_step_rewards": torch.tensor([[-0.3, 0.5, -8.0], [0.1, -0.2, -0.6], [1.0, 1.0, 1.0]]),
        "chosen_step_scores": torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]]),
        "rejected_step_scores": torch.tensor([[-1.0, -1.0, 1.0], [0.0, -1.0, -1.0], [1.0, -1.0, 1.0]]),
        "chosen_mask": torch.tensor([[True, True, True], [True, True, False], [True, True, True]]),
        "rejected_mask": torch.tensor([[True, True, False], [True, True, True], [True, True, True]]),
        "chosen_verifier_rewards": torch.tensor([1.0, -1.0, -5.0]),
        "rejected_verifier_rewards": torch.tensor([0.0, 0.0, 5.0]),
        "chosen_logps": torch.tensor([-3.0, -5.0, 100.0]),
        "rejected_logps": torch.tensor([-6.0, -4.0, 100.0]),
        "weight": torch.tensor([1.0, 1.0, 0.0]),
    }


def _take(batch, rows):
    return {name: value[rows] for name, value in batch.items()}


def _inputs(sides: dict) -> dict:
    """`PreferenceMetrics.update` arguments from per-side tensors: `[chosen; rejected]` rows."""

    def both(name: str) -> torch.Tensor:
        return torch.cat([sides[f"chosen_{name}"], sides[f"rejected_{name}"]])

    return {
        "rewards": both("rewards"),
        "step_rewards": both("step_rewards"),
        "step_scores": both("step_scores"),
        "step_mask": both("mask"),
        "verifier_rewards": both("verifier_rewards"),
        "logps": both("logps"),
        "num_pairs": sides["chosen_rewards"].shape[0],
        "weight": sides.get("weight"),
    }


EXPECTED = {
    # pairs 0 and 1 only
    "reward_accuracy": 0.5,  # 0.5 > 0.1 yes, -0.2 > 0.3 no
    "reward_margin": -0.05,  # (0.4 - 0.5) / 2
    "chosen_reward": 0.15,  # (0.5 - 0.2) / 2
    "rejected_reward": 0.2,  # (0.1 + 0.3) / 2
    "chosen_logps": -4.0,
    "rejected_logps": -5.0,
    "verifier_agreement": 0.5,  # 1 > 0 yes, -1 > 0 no
    # Counted steps (real, g != 0), (h, g):
    #   chosen  p0: (0.2, 1) ok, (-0.1, 1) wrong          [idx 2 has g = 0]
    #   chosen  p1: (0.4, 1) ok, (0.0, -1) wrong (sign 0)  [idx 2 masked]
    #   rejected p0: (-0.3, -1) ok, (0.5, -1) wrong        [idx 2 masked]
    #   rejected p1: (-0.2, -1) ok, (-0.6, -1) ok          [idx 0 has g = 0]
    "step_accuracy": 5 / 8,
    # positives h: {0.2, -0.1, 0.4}; negatives h: {0.0, -0.3, 0.5, -0.2, -0.6}
    # pos > neg: 0.2 -> 4, -0.1 -> 3, 0.4 -> 4 of 5 each: 11 / 15
    "step_auroc": 11 / 15,
    # by step index 0..3: chosen idx0 2/2, idx1 0/2; rejected idx0 1/1, idx1 1/2, idx2 1/1
    "chosen_step_accuracy_by_index": [1.0, 0.0, NAN, NAN],
    "rejected_step_accuracy_by_index": [1.0, 0.5, 1.0, NAN],
    "chosen_steps_by_index": [2.0, 2.0, 0.0, 0.0],
    "rejected_steps_by_index": [1.0, 2.0, 1.0, 0.0],
    # rejected, lowest h over real steps vs first g < 0:
    #   p0: h (-0.3, 0.5) [-8.0 masked] -> idx 0; first bad 0: hit, distance 0
    #   p1: h (0.1, -0.2, -0.6) -> idx 2; first bad 1: miss, distance 1
    "first_error_accuracy": 0.5,
    "first_error_distance": 0.5,
}


def _assert_expected(values):
    assert set(values) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        assert values[name].dtype == torch.float32
        assert_close(values[name], torch.tensor(expected), equal_nan=True, msg=name)


def test_hand_computed_values_ignore_weight_zero_pairs():
    metrics = PreferenceMetrics(max_step_index=4)
    metrics.update(**_inputs(_batch()))
    _assert_expected(metrics.compute())


def test_split_batches_and_merged_rank_states_give_the_same_values():
    """Two updates give the same values as one; so do two "ranks" whose states are merged with
    each metric's own reduction (what a distributed sync does)."""
    batch = _batch()
    two_updates = PreferenceMetrics(max_step_index=4)
    two_updates.update(**_inputs(_take(batch, [0])))
    two_updates.update(**_inputs(_take(batch, [1, 2])))
    _assert_expected(two_updates.compute())

    rank0, rank1 = PreferenceMetrics(max_step_index=4), PreferenceMetrics(max_step_index=4)
    rank0.update(**_inputs(_take(batch, [0, 2])))
    rank1.update(**_inputs(_take(batch, [1])))
    for metric0, metric1 in zip(rank0.modules(), rank1.modules()):
        if isinstance(metric0, Metric):
            metric0.merge_state(metric1)
    _assert_expected(rank0.compute())


def _first_error_batch():
    """Five rejected responses (chosen side neutral), S = 4, weights (1, 2, 1, 1, 0)."""
    rejected_step_rewards = torch.tensor(
        [
            [0.2, -0.5, 0.1, -0.3],  # first bad 2, lowest 1: distance 1
            [0.0, 0.3, -0.4, -9.0],  # first bad 0, lowest 2 (idx 3 masked): distance 2, weight 2
            [0.1, -0.2, 0.0, 0.3],  # first bad 1 (g = -0.5 counts as bad), lowest 1: hit
            [-5.0, 0.0, 0.0, 0.0],  # no bad step: not counted
            [5.0, -5.0, 0.0, 0.0],  # weight 0: not counted (would be distance 1)
        ]
    )
    rejected_step_scores = torch.tensor(
        [[1.0, 1.0, -1.0, -1.0], [-1.0, 1.0, 1.0, 0.0], [1.0, -0.5, -1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [-1.0, 1.0, 1.0, 1.0]]
    )
    rejected_mask = torch.tensor([[True] * 4, [True, True, True, False], [True] * 4, [True] * 4, [True] * 4])
    zeros_pairs, zeros_steps = torch.zeros(5), torch.zeros(5, 4)
    return {
        "chosen_rewards": zeros_pairs,
        "rejected_rewards": zeros_pairs,
        "chosen_step_rewards": zeros_steps,
        "rejected_step_rewards": rejected_step_rewards,
        "chosen_step_scores": zeros_steps,
        "rejected_step_scores": rejected_step_scores,
        "chosen_mask": torch.ones(5, 4, dtype=torch.bool),
        "rejected_mask": rejected_mask,
        "chosen_verifier_rewards": zeros_pairs,
        "rejected_verifier_rewards": zeros_pairs,
        "chosen_logps": zeros_pairs,
        "rejected_logps": zeros_pairs,
        "weight": torch.tensor([1.0, 2.0, 1.0, 1.0, 0.0]),
    }


def test_first_error_localisation_hand_computed():
    """Weighted over responses with a bad step: accuracy (0 + 0 + 1) / 4, distance (1 + 2*2 + 0) / 4."""
    metrics = PreferenceMetrics()
    metrics.update(**_inputs(_first_error_batch()))
    values = metrics.compute()
    assert_close(values["first_error_accuracy"], torch.tensor(0.25))
    assert_close(values["first_error_distance"], torch.tensor(1.25))


def test_first_error_metrics_absent_without_a_bad_rejected_step():
    batch = _first_error_batch()
    batch["rejected_step_scores"] = batch["rejected_step_scores"].clamp(min=0.0)
    metrics = PreferenceMetrics()
    metrics.update(**_inputs(batch))
    assert not {"first_error_accuracy", "first_error_distance"} & set(metrics.compute())


def test_default_weight_counts_every_pair():
    """Without weights pair 2 counts: reward_accuracy = 2/3, verifier_agreement = 1/3."""
    batch = _batch()
    del batch["weight"]
    metrics = PreferenceMetrics()
    metrics.update(**_inputs(batch))
    values = metrics.compute()
    assert_close(values["reward_accuracy"], torch.tensor(2 / 3))
    assert_close(values["verifier_agreement"], torch.tensor(1 / 3))
    assert values["chosen_step_accuracy_by_index"].shape == (16,)


def test_fractional_weights_are_exact():
    """weights [2, 1]: reward_margin = (2 * 0.4 + 1 * (-0.5)) / 3 = 0.1."""
    metric = WeightedMean()
    metric.update(torch.tensor([0.4, -0.5]), torch.tensor([2.0, 1.0]))
    assert_close(metric.compute(), torch.tensor(0.1))


def test_step_metrics_absent_when_undefined():
    """All counted steps positive -> no step_auroc; all scores 0 -> no step_accuracy either."""
    batch = _take(_batch(), [0])
    batch["chosen_step_scores"] = torch.tensor([[1.0, 1.0, 1.0]])
    batch["rejected_step_scores"] = torch.tensor([[1.0, 0.5, 0.0]])
    metrics = PreferenceMetrics()
    metrics.update(**_inputs(batch))
    values = metrics.compute()
    assert "step_auroc" not in values
    # chosen h (0.2, -0.1, 0.3) vs g > 0: 2 right; rejected h (-0.3, 0.5) vs g (1, 0.5): 1 right
    assert_close(values["step_accuracy"], torch.tensor(3 / 5))

    metrics.reset()
    batch["chosen_step_scores"] = torch.zeros(1, 3)
    batch["rejected_step_scores"] = torch.zeros(1, 3)
    metrics.update(**_inputs(batch))
    values = metrics.compute()
    assert "step_auroc" not in values and "step_accuracy" not in values
    assert set(PAIR_METRICS) <= set(values)


def test_auroc_consistent_across_batches_with_small_and_large_rewards():
    """A batch with every h in [0, 1] and one with h > 1: AUROC over both is the rank AUROC.

    positives h: {0.9, 5.0}, negatives h: {0.2, 1.5}: 0.9 loses to 1.5, the other 3 pairs win
    -> 3/4. (Sigmoid applied to the second batch only would rank 0.9 above σ(1.5) = 0.82 -> 1.0.)
    """
    metrics = PreferenceMetrics()
    for h, g in (([0.9, 0.2], [1.0, -1.0]), ([5.0, 1.5], [1.0, -1.0])):
        metrics.update(
            rewards=torch.zeros(2),
            step_rewards=torch.tensor([h, [0.0, 0.0]]),
            step_scores=torch.tensor([g, [0.0, 0.0]]),
            step_mask=torch.ones(2, 2, dtype=torch.bool),
            verifier_rewards=torch.zeros(2),
            logps=torch.zeros(2),
            num_pairs=1,
        )
    assert_close(metrics.compute()["step_auroc"], torch.tensor(0.75))


def test_reset_clears_every_metric():
    metrics = PreferenceMetrics(max_step_index=4)
    metrics.update(**_inputs(_batch()))
    metrics.reset()
    metrics.update(**_inputs(_take(_batch(), [1])))
    values = metrics.compute()
    assert_close(values["reward_accuracy"], torch.tensor(0.0))
    assert_close(values["chosen_logps"], torch.tensor(-5.0))
    assert math.isnan(values["chosen_step_accuracy_by_index"][2])


@pytest.mark.parametrize("name", ["chosen_rewards", "chosen_step_rewards"])
def test_update_does_not_keep_the_graph(name):
    batch = _batch()
    batch[name] = batch[name].clone().requires_grad_()
    metrics = PreferenceMetrics()
    metrics.update(**_inputs(batch))
    assert not any(value.requires_grad for value in metrics.compute().values())


def _slow_metrics(inputs: dict) -> dict[str, float | list[float]]:
    """The metrics by plain Python loops over pairs and steps (an independent path)."""
    n = inputs["num_pairs"]
    r, h, g, m = (inputs[k].tolist() for k in ("rewards", "step_rewards", "step_scores", "step_mask"))
    v, lp, w = inputs["verifier_rewards"].tolist(), inputs["logps"].tolist(), inputs["weight"].tolist()
    total = sum(w)

    def mean(values):
        return sum(wi * x for wi, x in zip(w, values)) / total

    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    expected = {
        "reward_accuracy": mean([float(r[i] > r[n + i]) for i in range(n)]),
        "reward_margin": mean([r[i] - r[n + i] for i in range(n)]),
        "chosen_reward": mean(r[:n]),
        "rejected_reward": mean(r[n:]),
        "chosen_logps": mean(lp[:n]),
        "rejected_logps": mean(lp[n:]),
        "verifier_agreement": mean([float(v[i] > v[n + i]) for i in range(n)]),
    }
    right = {side: [0.0] * 16 for side in ("chosen", "rejected")}
    seen = {side: [0.0] * 16 for side in ("chosen", "rejected")}
    for row in range(2 * n):
        side, weight = ("chosen", w[row]) if row < n else ("rejected", w[row - n])
        for t in range(len(g[row])):
            if m[row][t] and g[row][t] != 0:
                right[side][t] += weight * (sign(h[row][t]) == sign(g[row][t]))
                seen[side][t] += weight
    expected["step_accuracy"] = sum(map(sum, right.values())) / sum(map(sum, seen.values()))
    for side in ("chosen", "rejected"):
        expected[f"{side}_step_accuracy_by_index"] = [a / b if b else NAN for a, b in zip(right[side], seen[side])]
        expected[f"{side}_steps_by_index"] = seen[side]
    hits = distances = bad_weight = 0.0
    for i in range(n):
        row = n + i
        real = [t for t in range(len(g[row])) if m[row][t]]
        bad = [t for t in real if g[row][t] < 0]
        if bad:
            lowest = min(real, key=lambda t: (h[row][t], t))
            hits += w[i] * (lowest == bad[0])
            distances += w[i] * abs(lowest - bad[0])
            bad_weight += w[i]
    expected["first_error_accuracy"], expected["first_error_distance"] = hits / bad_weight, distances / bad_weight
    return expected


def test_random_batches_match_a_slow_path():
    """Random rewards, scores in {-1, 0, 1}, ragged masks and 0/1/2 weights over two updates: every
    value but the AUROC (checked by hand above) equals the loop computation."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for n, steps in ((5, 4), (3, 6)):
        lengths = torch.randint(1, steps + 1, (2 * n,), generator=generator)
        batches.append({
            "rewards": torch.randn(2 * n, generator=generator),
            "step_rewards": torch.randn(2 * n, steps, generator=generator),
            "step_scores": torch.randint(-1, 2, (2 * n, steps), generator=generator).float(),
            "step_mask": torch.arange(steps) < lengths[:, None],
            "verifier_rewards": torch.randint(-2, 3, (2 * n,), generator=generator).float(),
            "logps": -10 * torch.rand(2 * n, generator=generator),
            "num_pairs": n,
            "weight": torch.randint(0, 3, (n,), generator=generator).float(),
        })
    metrics = PreferenceMetrics()
    for batch in batches:
        metrics.update(**batch)
    # one batch of both, padded to 6 steps with masked columns
    padded = [{**b, "step_rewards": torch.nn.functional.pad(b["step_rewards"], (0, 6 - b["step_rewards"].shape[1])),
               "step_scores": torch.nn.functional.pad(b["step_scores"], (0, 6 - b["step_scores"].shape[1])),
               "step_mask": torch.nn.functional.pad(b["step_mask"], (0, 6 - b["step_mask"].shape[1]))} for b in batches]
    n = sum(b["num_pairs"] for b in batches)
    joined = {k: torch.cat([b[k][: b["num_pairs"]] for b in padded] + [b[k][b["num_pairs"] :] for b in padded])
              for k in ("rewards", "step_rewards", "step_scores", "step_mask", "verifier_rewards", "logps")}
    joined.update(num_pairs=n, weight=torch.cat([b["weight"] for b in batches]))
    values = metrics.compute()
    for name, expected in _slow_metrics(joined).items():
        assert_close(values[name], torch.tensor(expected), equal_nan=True, msg=name)


def test_without_step_metrics_only_pair_and_first_error_keys():
    """`step_metrics=False`: no step accuracy or AUROC state is kept and no step key is returned;
    the pair and first-error values are those of the full metrics."""
    full, lean = PreferenceMetrics(max_step_index=4), PreferenceMetrics(max_step_index=4, step_metrics=False)
    for metrics in (full, lean):
        metrics.update(**_inputs(_batch()))
    assert not any(isinstance(module, (StepAUROC, StepIndexAccuracy)) for module in lean.modules())
    values = lean.compute()
    assert set(values) == {*PAIR_METRICS, "first_error_accuracy", "first_error_distance"}
    expected = full.compute()
    for name, value in values.items():
        assert_close(value, expected[name], msg=name)


def test_rows_not_twice_the_pairs_are_an_error():
    inputs = _inputs(_batch())
    inputs["step_mask"] = inputs["step_mask"][:5]
    with pytest.raises(ValueError, match=r"step_mask has 5 rows, expected 2 \* num_pairs = 6"):
        PreferenceMetrics().update(**inputs)
