"""The batch collator and the length-grouped batch sampler."""

import json
import math

import torch
from torch.utils.data import SequentialSampler

from stepwise_lit.data.collate import LengthGroupedBatchSampler, StepwiseCollator
from tests.helpers.rows import token_row

NAN = math.nan


def test_collator_shapes_padding_and_masks():
    rows = [
        # prompt [5, 6], chosen 2 steps + EOS (9), rejected 1 step + EOS
        token_row([5, 6, 10, 11, 12, 9], [0, 0, 1, 1, 2, 2], [5, 6, 13, 9], [0, 0, 1, 1],
                  chosen_score=1.0, rejected_score=-1.0, first_divergence=0),
        # prompt [7], chosen 3 steps, rejected 2 steps with missing scores
        token_row([7, 20, 21, 22, 9], [0, 1, 2, 3, 3], [7, 23, 24, 9], [0, 1, 2, 2],
                  rejected_step_scores=[NAN, NAN], first_divergence=2,
                  prompt_json=json.dumps([{"role": "user", "content": "q"}])),
    ]
    batch = StepwiseCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, 6)
    assert batch["input_ids"].tolist() == [
        [5, 6, 10, 11, 12, 9],
        [7, 20, 21, 22, 9, 0],
        [5, 6, 13, 9, 0, 0],
        [7, 23, 24, 9, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
    ]
    assert batch["step_ids"].tolist() == [
        [0, 0, 1, 1, 2, 2],
        [0, 1, 2, 3, 3, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 1, 2, 2, 0, 0],
    ]
    assert batch["step_scores"].dtype == torch.float32 and batch["step_scores"].shape == (4, 3)
    assert batch["step_scores"].tolist() == [[1, 1, 0], [1, 1, 1], [-1, 0, 0], [0, 0, 0]]
    assert batch["step_mask"].dtype == torch.bool
    assert batch["step_mask"].tolist() == [[True, True, False], [True, True, True], [True, False, False], [True, True, False]]
    assert batch["has_step_scores"].tolist() == [True, True, True, False]
    assert batch["outcome_scores"].tolist() == [1.0, 0.0, -1.0, 0.0]
    assert batch["has_outcome_scores"].tolist() == [True, False, True, False]
    assert batch["first_divergence"].dtype == torch.long and batch["first_divergence"].tolist() == [0, 2]
    assert batch["prompts"] == ["p", [{"role": "user", "content": "q"}]]
    assert batch["steps"] == [["c1", "c2"], ["c1", "c2", "c3"], ["r1"], ["r1", "r2"]]


def test_collator_pads_with_the_given_id():
    rows = [token_row([1, 2, 3], [0, 1, 1], [1, 2], [0, 1]), token_row([1, 4], [0, 1], [1, 5], [0, 1])]
    batch = StepwiseCollator(pad_token_id=258)(rows)
    assert batch["input_ids"][:, -1].tolist() == [3, 258, 258, 258]
    assert batch["step_ids"][:, -1].tolist() == [1, 0, 0, 0]


def test_length_grouped_batches_cover_every_index_once_and_group_similar_lengths():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 100]
    sampler = LengthGroupedBatchSampler(SequentialSampler(lengths), batch_size=2, drop_last=False, lengths=lengths)
    batches = list(sampler)
    # one sorted run (2 * 50 > 9 rows): longest first
    assert batches == [[8, 1], [5, 3], [7, 6], [2, 4], [0]]
    assert len(sampler) == 5
    dropping = LengthGroupedBatchSampler(SequentialSampler(lengths), batch_size=2, drop_last=True, lengths=lengths)
    assert list(dropping) == batches[:4] and len(dropping) == 4


def test_length_grouping_sorts_within_runs_only():
    lengths = [1, 2, 3, 4, 5, 6]
    sampler = LengthGroupedBatchSampler(
        SequentialSampler(lengths), batch_size=1, drop_last=False, lengths=lengths, group_factor=3
    )
    assert [batch[0] for batch in sampler] == [2, 1, 0, 5, 4, 3]


def test_pair_batch_helpers_read_the_collated_batch():
    """Two pairs, the longest response with 3 steps: B = 2, S = 3; the chosen rows come first,
    packed or not, and the helpers split any [2B, ...] tensor at B."""
    from stepwise_lit.data.batch import (
        chosen,
        is_packed,
        num_pairs,
        num_steps,
        rejected,
    )

    rows = [token_row([5, 6, 10, 9], [0, 0, 1, 1], [5, 6, 13, 9], [0, 0, 1, 1]),
            token_row([7, 20, 21, 22, 9], [0, 1, 2, 3, 3], [7, 23, 9], [0, 1, 1])]
    for pack in (False, True):
        batch = StepwiseCollator(pad_token_id=0, pack_pairs=pack)(rows)
        assert (num_pairs(batch), num_steps(batch), is_packed(batch)) == (2, 3, pack)
        assert chosen(batch["step_mask"]).sum(-1).tolist() == [1, 3]
        assert rejected(batch["step_mask"]).sum(-1).tolist() == [1, 1]
        assert [len(steps) for steps in chosen(batch["steps"])] == [1, 3]
