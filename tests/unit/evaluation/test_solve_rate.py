"""Solve-rate, pass@k and maj@k metrics on hand tables, their merge across ranks, and the
solve-rate and ProcessBench metrics synced over 2 processes (the ProcessBench metrics alone:
tests/unit/evaluation/test_processbench.py)."""

from __future__ import annotations

import socket
from itertools import combinations
from pathlib import Path

import pytest
import torch
import torch.multiprocessing
from torch.testing import assert_close

from stepwise_lit.evaluation.processbench import (
    ProcessBenchF1,
    WithinResponseAUROC,
)
from stepwise_lit.evaluation.solve_rate import (
    MajorityAtK,
    PassAtK,
    SolveRate,
    majority_answer,
    pass_at_k,
)
from tests.helpers.processbench_table import MASK, REWARDS
from tests.helpers.metric_merge import assert_merged_halves_equal_whole


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


@pytest.mark.parametrize(
    ("make", "inputs"),
    [
        (
            lambda: SolveRate("math"),
            (["\\frac12", "3", None, "4"], ["0.5", "2", "1", "4"], torch.tensor([1.0, 1, 1, 0])),
        ),
        (lambda: PassAtK(2, "gsm8k"), ([["1", "2"], ["3", "3"], ["5", None], ["6", "6"]], ["1", "4", "5", "6"], None)),
        (lambda: MajorityAtK("gsm8k"), ([["1", "2"], ["3", "3"], ["5", None], ["6", "7"]], ["2", "3", "5", "6"], None)),
    ],
)
def test_merged_states_equal_one_metric_over_all_inputs(make, inputs):
    """What DDP's sync does: two ranks' states merged give the value of one rank seeing everything."""
    assert_merged_halves_equal_whole(make, inputs)


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
