"""`stepwise_lit.logprobs.forward`: the chosen side of a batch and its token counts, by hand, packed and not."""

from __future__ import annotations

import torch

from stepwise_lit.data.collate import right_pad
from stepwise_lit.data.packing import pack_pair
from stepwise_lit.logprobs.forward import chosen_side, chosen_token_counts

# One pair: chosen = prompt [5, 6] + step 1 [10, 11] + step 2 [12, 9]; rejected = [5, 6] + step 1 [10, 13, 9].
CHOSEN = ([5, 6, 10, 11, 12, 9], [0, 0, 1, 1, 2, 2])
REJECTED = ([5, 6, 10, 13, 9], [0, 0, 1, 1, 1])


def unpacked() -> dict:
    return {
        "input_ids": right_pad([CHOSEN[0], REJECTED[0]], 0),
        "attention_mask": right_pad([[1] * 6, [1] * 5], 0),
        "step_ids": right_pad([CHOSEN[1], REJECTED[1]], 0),
        "first_divergence": torch.tensor([0]),
    }


def packed() -> dict:
    row = pack_pair(*CHOSEN, *REJECTED)
    batch = {key: torch.tensor([row[key]]) for key in ("input_ids", "position_ids", "segment_ids", "target_ids",
                                                       "target_step_ids")}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["slot_ids"] = torch.zeros_like(batch["input_ids"])
    batch["response_targets"] = torch.tensor([[0, 0], [0, 1]])
    batch["first_divergence"] = torch.tensor([0])
    return batch


def test_chosen_token_counts_by_hand():
    """The chosen response has 4 tokens (steps 1 and 2), packed or not."""
    assert chosen_token_counts(unpacked()).tolist() == [4]
    assert chosen_token_counts(packed()).tolist() == [4]


def test_chosen_side_unpacked_is_the_chosen_rows():
    batch = unpacked()
    side = chosen_side(batch)
    assert side["input_ids"].tolist() == [CHOSEN[0]] and side["step_ids"].tolist() == [CHOSEN[1]]
    assert batch["input_ids"].shape == (2, 6)  # the batch is not changed


def test_chosen_side_packed_is_cut_to_the_chosen_width():
    """The packed row is [5 6 10 | 11 12 9 | 13 9] (prefix of 3 tokens): the chosen side is its first
    6 positions, with the chosen targets only (the last position predicts nothing)."""
    batch = packed()
    side = chosen_side(batch)
    assert side["input_ids"].tolist() == [CHOSEN[0]]
    assert side["target_ids"].shape == (1, 6, 1)
    assert side["target_ids"][0, :, 0].tolist() == [6, 10, 11, 12, 9, 0]
    assert side["target_step_ids"][0, :, 0].tolist() == [0, 1, 1, 2, 2, 0]
    assert batch["input_ids"].shape == (1, 8)
