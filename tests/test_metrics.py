"""Preference metrics (stepwise_lit.metrics) against hand computations."""

import math

import pytest
import torch
from torch.testing import assert_close
from torchmetrics import Metric

from stepwise_lit.metrics import PAIR_METRICS, PreferenceMetrics, WeightedMean

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
    metrics.update(**_batch())
    _assert_expected(metrics.compute())


def test_split_batches_and_merged_rank_states_give_the_same_values():
    """Two updates give the same values as one; so do two "ranks" whose states are merged with
    each metric's own reduction (what a distributed sync does)."""
    batch = _batch()
    two_updates = PreferenceMetrics(max_step_index=4)
    two_updates.update(**_take(batch, [0]))
    two_updates.update(**_take(batch, [1, 2]))
    _assert_expected(two_updates.compute())

    rank0, rank1 = PreferenceMetrics(max_step_index=4), PreferenceMetrics(max_step_index=4)
    rank0.update(**_take(batch, [0, 2]))
    rank1.update(**_take(batch, [1]))
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
    metrics.update(**_first_error_batch())
    values = metrics.compute()
    assert_close(values["first_error_accuracy"], torch.tensor(0.25))
    assert_close(values["first_error_distance"], torch.tensor(1.25))


def test_first_error_metrics_absent_without_a_bad_rejected_step():
    batch = _first_error_batch()
    batch["rejected_step_scores"] = batch["rejected_step_scores"].clamp(min=0.0)
    metrics = PreferenceMetrics()
    metrics.update(**batch)
    assert not {"first_error_accuracy", "first_error_distance"} & set(metrics.compute())


def test_default_weight_counts_every_pair():
    """Without weights pair 2 counts: reward_accuracy = 2/3, verifier_agreement = 1/3."""
    batch = _batch()
    del batch["weight"]
    metrics = PreferenceMetrics()
    metrics.update(**batch)
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
    metrics.update(**batch)
    values = metrics.compute()
    assert "step_auroc" not in values
    # chosen h (0.2, -0.1, 0.3) vs g > 0: 2 right; rejected h (-0.3, 0.5) vs g (1, 0.5): 1 right
    assert_close(values["step_accuracy"], torch.tensor(3 / 5))

    metrics.reset()
    batch["chosen_step_scores"] = torch.zeros(1, 3)
    batch["rejected_step_scores"] = torch.zeros(1, 3)
    metrics.update(**batch)
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
            chosen_rewards=torch.zeros(1),
            rejected_rewards=torch.zeros(1),
            chosen_step_rewards=torch.tensor([h]),
            rejected_step_rewards=torch.zeros(1, 2),
            chosen_step_scores=torch.tensor([g]),
            rejected_step_scores=torch.zeros(1, 2),
            chosen_mask=torch.ones(1, 2, dtype=torch.bool),
            rejected_mask=torch.ones(1, 2, dtype=torch.bool),
            chosen_verifier_rewards=torch.zeros(1),
            rejected_verifier_rewards=torch.zeros(1),
            chosen_logps=torch.zeros(1),
            rejected_logps=torch.zeros(1),
        )
    assert_close(metrics.compute()["step_auroc"], torch.tensor(0.75))


def test_reset_clears_every_metric():
    metrics = PreferenceMetrics(max_step_index=4)
    metrics.update(**_batch())
    metrics.reset()
    metrics.update(**_take(_batch(), [1]))
    values = metrics.compute()
    assert_close(values["reward_accuracy"], torch.tensor(0.0))
    assert_close(values["chosen_logps"], torch.tensor(-5.0))
    assert math.isnan(values["chosen_step_accuracy_by_index"][2])


@pytest.mark.parametrize("name", ["chosen_rewards", "chosen_step_rewards"])
def test_update_does_not_keep_the_graph(name):
    batch = _batch()
    batch[name] = batch[name].clone().requires_grad_()
    metrics = PreferenceMetrics()
    metrics.update(**batch)
    assert not any(value.requires_grad for value in metrics.compute().values())
