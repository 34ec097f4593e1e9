"""Solve-rate and step-localisation metrics on hand tables, and their merge across ranks."""

from __future__ import annotations

import socket
from itertools import combinations
from pathlib import Path

import pytest
import torch
import torch.multiprocessing
from torch.testing import assert_close

from stepwise_lit.evaluation.solve_rate import MajorityAtK, PassAtK, SolveRate, majority_answer, pass_at_k
from stepwise_lit.evaluation.processbench import (
    ProcessBenchF1,
    WithinResponseAUROC,
    auroc,
    choose_threshold,
    first_error_labels,
    threshold_candidates,
)

# ProcessBench table, threshold 0 (a step is flagged when its reward < 0); -9 is padding.
REWARDS = torch.tensor(
    [
        [0.5, -0.2, -0.4],  # label 1, predicted 1: hit
        [-0.1, 0.3, 0.2],  # label 2, predicted 0: miss
        [0.4, 0.6, -9.0],  # label 1, predicted -1: miss (the padding is not a step)
        [0.2, 0.1, 0.3],  # label -1, predicted -1: hit
        [0.3, -0.5, -9.0],  # label -1, predicted 1: miss
        [1.0, 2.0, 3.0],  # label -1, predicted -1: hit
    ]
)
MASK = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
LABELS = torch.tensor([1, 2, 1, -1, -1, -1])


def test_solve_rate_counts_weighted_matches():
    """Matches 1, 1 ("1,200" = "1200"), 0 (no answer), 0 (weight 0): 2 / 3."""
    metric = SolveRate("gsm8k")
    metric.update(["18", "1,200", None, "7"], ["18", "1200", "3", "7"], torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert_close(metric.compute(), torch.tensor(2 / 3))


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(5, 2, 2, 1 - 3 / 10), (5, 0, 2, 0.0), (5, 4, 2, 1.0), (3, 1, 1, 1 / 3), (10, 3, 10, 1.0)],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    """1 - C(n-c, k) / C(n, k): (5, 2, 2) -> 1 - C(3,2)/C(5,2) = 1 - 3/10; c = 0 -> 0; n - c < k -> 1."""
    assert_close(pass_at_k(torch.tensor([n]), torch.tensor([c]), k), torch.tensor([expected], dtype=torch.float64))


def test_pass_at_k_equals_counting_subsets():
    """The estimator is the share of k-subsets of the n samples holding a correct one."""
    for n, c, k in [(8, 3, 3), (12, 1, 5), (12, 7, 4), (20, 2, 10)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(combinations(samples, k))
        expected = sum(any(subset) for subset in subsets) / len(subsets)
        assert_close(pass_at_k(torch.tensor([n]), torch.tensor([c]), k).item(), expected)


def test_pass_at_k_metric_averages_prompts():
    """k = 2. Prompt 1: 3 of 5 right: 1 - C(2,2)/C(5,2) = 0.9. Prompt 2: 1 of 3 right (None is wrong):
    1 - C(2,2)/C(3,2) = 2/3. Mean (0.9 + 2/3) / 2."""
    metric = PassAtK(2, "gsm8k")
    metric.update([["1", "2", "1", "3", "1"], [None, "4", "5"]], ["1", "5"])
    assert_close(metric.compute(), torch.tensor((0.9 + 2 / 3) / 2))
    with pytest.raises(ValueError, match=r"pass@2 needs at least 2 samples per prompt; prompts \[0\]"):
        metric.update([["1"]], ["1"])


def test_majority_answer_ties_and_abstentions():
    assert majority_answer(["7", "9", "9", "7"], "gsm8k") == "7", "a tie goes to the first answer written"
    assert majority_answer(["3", None, None, None, "5", "5"], "gsm8k") == "5", "None does not vote"
    assert majority_answer(["18.0", "20", "18"], "gsm8k") == "18.0", "18.0 and 18 vote together"
    assert majority_answer([None, None], "gsm8k") is None


def test_majority_at_k_by_hand():
    """Majorities: 5 (right), 7 by the tie rule (wrong, reference 9), 18.0 (right), none (wrong,
    weight 0). Weighted: 2 right of 3 counted."""
    metric = MajorityAtK("gsm8k")
    metric.update(
        [["3", "5", "5", None, None, None], ["7", "9", "9", "7"], ["18.0", "18", "20"], [None, None]],
        ["5", "9", "18", "1"],
        torch.tensor([1.0, 1.0, 1.0, 0.0]),
    )
    assert_close(metric.compute(), torch.tensor(2 / 3))


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
        (
            lambda: SolveRate("math"),
            (["\\frac12", "3", None, "4"], ["0.5", "2", "1", "4"], torch.tensor([1.0, 1, 1, 0])),
        ),
        (lambda: PassAtK(2, "gsm8k"), ([["1", "2"], ["3", "3"], ["5", None], ["6", "6"]], ["1", "4", "5", "6"], None)),
        (lambda: MajorityAtK("gsm8k"), ([["1", "2"], ["3", "3"], ["5", None], ["6", "7"]], ["2", "3", "5", "6"], None)),
        (lambda: ProcessBenchF1(0.0), (REWARDS[:4], MASK[:4], LABELS[2:], torch.tensor([1.0, 1, 0, 1]))),
        (lambda: WithinResponseAUROC(), (REWARDS[:4], -torch.sign(REWARDS[:4] - 0.25), MASK[:4], None)),
    ],
)
def test_merged_states_equal_one_metric_over_all_inputs(make, inputs):
    """What DDP's sync does: two ranks' states merged give the value of one rank seeing everything."""

    def part(index: slice):
        return tuple(None if value is None else value[index] for value in inputs)

    whole, first, second = make(), make(), make()
    whole.update(*inputs)
    first.update(*part(slice(0, 2)))
    second.update(*part(slice(2, 4)))
    first.merge_state(second)
    assert_close(first.compute(), whole.compute(), equal_nan=True)


# Five prompts / labelled responses for the 2-process check: a DistributedSampler gives rank 0
# items 0, 2, 4 and rank 1 items 1, 3 and item 0 again as padding, with weight 0.
SYNC_ANSWERS = ["18", "7", None, "3", "1,000"]
SYNC_REFERENCES = ["18", "8", "2", "3", "1000"]
SYNC_SAMPLES = [["18", "18", "1"], ["8", "7", "7"], [None, "2", "2"], ["3", "4", "5"], ["1", "2", "3"]]
SYNC_LABELS = torch.tensor([1, -1, 0, -1, 1])
SYNC_RANKS = {0: ([0, 2, 4], [1.0, 1.0, 1.0]), 1: ([1, 3, 0], [1.0, 1.0, 0.0])}


def sync_metrics(indices: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
    """Every metric over the given items; computed inside a process group, the values are synced."""
    weight = torch.tensor(weights)
    labels = SYNC_LABELS[indices]
    step_scores = torch.where(
        (labels.unsqueeze(-1) >= 0) & (torch.arange(3) >= labels.unsqueeze(-1)), -1.0, 1.0
    )  # +1 before the labelled step, -1 from it on, all +1 without a label
    metrics = {
        "solve_rate": SolveRate("gsm8k"),
        "pass_at_2": PassAtK(2, "gsm8k"),
        "maj_at_3": MajorityAtK("gsm8k"),
        "processbench": ProcessBenchF1(0.0),
        "within_auroc": WithinResponseAUROC(),
    }
    metrics["solve_rate"].update([SYNC_ANSWERS[i] for i in indices], [SYNC_REFERENCES[i] for i in indices], weight)
    for name in ("pass_at_2", "maj_at_3"):
        metrics[name].update([SYNC_SAMPLES[i] for i in indices], [SYNC_REFERENCES[i] for i in indices], weight)
    metrics["processbench"].update(REWARDS[indices], MASK[indices], labels, weight)
    metrics["within_auroc"].update(REWARDS[indices], step_scores, MASK[indices], weight)
    values = {name: metric.compute() for name, metric in metrics.items()}
    return {**values.pop("processbench"), **values}


def sync_worker(rank: int, port: int, folder: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(sync_metrics(*SYNC_RANKS[rank]), folder / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_sync_equals_one_process(tmp_path):
    """Under a 2-process gloo group each rank sees its shard (one duplicate with weight 0);
    after the sync every rank reports what one process computes over the five items."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(sync_worker, args=(port, tmp_path), nprocs=2)
    expected = sync_metrics([0, 1, 2, 3, 4], [1.0] * 5)
    for rank in (0, 1):
        assert_close(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), expected, equal_nan=True)
