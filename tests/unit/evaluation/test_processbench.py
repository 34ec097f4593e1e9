"""ProcessBench metrics (first-error F1, the threshold choice, within-response AUROC) on hand
tables, and their merge across ranks."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from stepwise_lit.evaluation.processbench import (
    ProcessBenchF1,
    WithinResponseAUROC,
    auroc,
    choose_threshold,
    first_error_labels,
    threshold_candidates,
)
from tests.helpers.processbench_table import LABELS, MASK, REWARDS
from tests.helpers.metric_merge import assert_merged_halves_equal_whole


def test_processbench_f1_by_hand():
    """Erroneous: 1 hit of 3 -> error_acc 1/3. Correct: 2 hits of 3 -> correct_acc 2/3.
    F1 = 2 (1/3)(2/3) / (1/3 + 2/3) = 4/9."""
    metric = ProcessBenchF1(threshold=0.0)
    metric.update(REWARDS, MASK, LABELS)
    scores = metric.compute()
    expected = {"error_acc": 1 / 3, "correct_acc": 2 / 3, "f1": 4 / 9}
    assert_close({name: value.item() for name, value in scores.items()}, expected)


def test_processbench_labels_from_verifier_scores():
    scores = torch.tensor([[1.0, -1.0, -1.0], [1.0, 1.0, -1.0], [1.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert first_error_labels(scores, mask).tolist() == [1, -1, -1]


def test_choose_threshold_by_hand():
    """Response 1 [0.5, -0.2] has its error at step 1; response 2 [0.3, 0.1] is all right.
    t <= -0.2 finds no error (F1 0); t in (-0.2, 0.1] finds both (F1 1); above 0.1, response 2
    is flagged. Candidates -0.2, -0.05, 0.1, ...: the smallest with F1 1 is the midpoint -0.05."""
    rewards = torch.tensor([[0.5, -0.2], [0.3, 0.1]])
    threshold = choose_threshold(rewards, torch.ones(2, 2, dtype=torch.bool), torch.tensor([1, -1]))
    assert_close(threshold, -0.05)


def test_choose_threshold_equals_trying_every_candidate():
    """Against the slow path: ProcessBenchF1 at every candidate, first best kept."""
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(40, 6, generator=generator).round(decimals=1)  # ties between rewards
    mask = torch.arange(6) < torch.randint(1, 7, (40, 1), generator=generator)
    labels = torch.randint(-1, 6, (40,), generator=generator)  # some labels past the last real step
    weights = torch.randint(0, 2, (40,), generator=generator).float()
    best_f1, best_threshold = -1.0, None
    for candidate in threshold_candidates(rewards, mask).tolist():
        metric = ProcessBenchF1(candidate)
        metric.update(rewards, mask, labels, weights)
        f1 = metric.compute()["f1"].item()
        if f1 > best_f1:
            best_f1, best_threshold = f1, candidate
    assert choose_threshold(rewards, mask, labels, weights) == best_threshold


def test_choose_threshold_needs_both_kinds():
    with pytest.raises(ValueError, match="needs responses with an error"):
        choose_threshold(REWARDS, MASK, torch.tensor([-1] * 6))


def test_within_response_auroc_counts_flawed_responses_only():
    """Counted good steps 0.9 (B), 0.3 (C); bad 0.2, 0.1 (B), 0.4 (C), 0.05 (D). 0.9 beats all
    four, 0.3 beats three: 7/8. A (all good) and E (weight 0) are left out; with A the pooled
    AUROC would be 15/16."""
    rewards = torch.tensor(
        [[5.0, 6.0, 0.0], [0.9, 0.2, 0.1], [0.3, 0.4, 0.0], [0.8, 0.05, 0.0], [-5.0, 5.0, 0.0]]
    )
    scores = torch.tensor(
        [[1.0, 1.0, 0.0], [1.0, -1.0, -1.0], [1.0, -1.0, -1.0], [0.0, -1.0, 0.0], [1.0, -1.0, 0.0]]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    metric = WithinResponseAUROC()
    metric.update(rewards, scores, mask, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    assert_close(metric.compute(), torch.tensor(7 / 8, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric WithinResponseAUROC was called before")
def test_auroc_counts_ties_half_and_is_nan_without_a_class():
    """Positive 0.5 vs negatives 0.5 (tie: 1/2) and 0.1 (1): 1.5 / 2."""
    tied = auroc(torch.tensor([0.5, 0.5, 0.1]), torch.tensor([True, False, False]))
    assert_close(tied, torch.tensor(0.75, dtype=torch.float64))
    assert auroc(torch.tensor([0.5, 0.1]), torch.tensor([True, True])).isnan()
    assert WithinResponseAUROC().compute().isnan()


@pytest.mark.parametrize(
    ("make", "inputs"),
    [
        (lambda: ProcessBenchF1(0.0), (REWARDS[:4], MASK[:4], LABELS[2:], torch.tensor([1.0, 1, 0, 1]))),
        (lambda: WithinResponseAUROC(), (REWARDS[:4], -torch.sign(REWARDS[:4] - 0.25), MASK[:4], None)),
    ],
)
def test_merged_states_equal_one_metric_over_all_inputs(make, inputs):
    """What DDP's sync does: two ranks' states merged give the value of one rank seeing everything."""
    assert_merged_halves_equal_whole(make, inputs)
