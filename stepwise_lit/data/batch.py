"""The collated pair batch: what `StepwiseCollator` gives and every later stage reads.

Rows ``0..B-1`` of every ``[2B, ...]`` tensor are the chosen responses and rows
``B..2B-1`` the rejected ones (``stepwise_lit.data.records.SIDES`` order); `num_pairs`, `num_steps`, `is_packed`,
`chosen` and `rejected` read a batch so that nobody slices it by hand. Nothing changes a
batch in place once collated: what a later stage computes (reference log-probs, scores from
a reward model) is returned as new tensors.

A `TypedDict` rather than a dataclass: the data module's evaluation loader adds
``pair_weights`` to the collated batch (``PairWeightCollator``) and callers index batches
by key; Lightning moves a dict of tensors to the device as it is.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

import torch


class PairBatch(TypedDict):
    """B preference pairs, unpacked (``2B`` rows) or packed (R rows of P pair blocks each, R = B and
    P = 1 without ``data.pack_budget``; see `stepwise_lit.data.packing`).

    Keys marked optional are absent when they do not apply.

    Attributes:
        input_ids: long ``[2B, L]``, or packed ``[R, L]``.
        attention_mask: long ``[2B, L]`` (1: real token), or packed ``[R, L]``.
        step_scores: float ``[2B, S]`` verifier step scores g_t (0 where padded or missing).
        step_mask: bool ``[2B, S]``, True at a response's real steps.
        has_step_scores: bool ``[2B]``, False for a response whose scores are missing.
        outcome_scores: float ``[2B]`` outcome scores (0 where missing).
        has_outcome_scores: bool ``[2B]``.
        first_divergence: long ``[B]``, the first step where the two responses differ (0-based).
        prompts: B raw prompts (strings or chat messages).
        reference_solutions: B ground-truth solutions or None.
        steps: 2B lists of step texts.
        step_ids: unpacked only (optional): long ``[2B, L]``, the step of each token (0: prompt, padding).
        position_ids: packed only (optional): long ``[R, L]``, restarting in each pair block.
        segment_ids: packed only (optional): long ``[R, L]`` (prefix, chosen rest, rejected rest, padding).
        slot_ids: packed only (optional): long ``[R, L]``, the pair block of each position in its row (padding: -1).
        target_ids: packed only (optional): long ``[R, L, 2P]``, the token each position predicts for the chosen
            (columns ``0..P-1``, one per block) and rejected (``P..2P-1``) side of each block.
        target_step_ids: packed only (optional): long ``[R, L, 2P]``, their steps (0: predicts nothing).
        response_targets: packed only (optional): long ``[2B, 2]``, the (row, target column) of each response,
            chosen responses first, in pair order.
        row_index: long ``[B]``, each pair's position in its split, (optional) when the rows carry one.
        pair_weights: float ``[B]``, 0 for rows that only pad a distributed evaluation shard; absent: all 1 (optional).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    step_scores: torch.Tensor
    step_mask: torch.Tensor
    has_step_scores: torch.Tensor
    outcome_scores: torch.Tensor
    has_outcome_scores: torch.Tensor
    first_divergence: torch.Tensor
    prompts: list
    reference_solutions: list
    steps: list[list[str]]
    step_ids: NotRequired[torch.Tensor]
    position_ids: NotRequired[torch.Tensor]
    segment_ids: NotRequired[torch.Tensor]
    slot_ids: NotRequired[torch.Tensor]
    target_ids: NotRequired[torch.Tensor]
    target_step_ids: NotRequired[torch.Tensor]
    response_targets: NotRequired[torch.Tensor]
    row_index: NotRequired[torch.Tensor]
    pair_weights: NotRequired[torch.Tensor]


def num_pairs(batch: PairBatch) -> int:
    """B, the number of pairs."""
    return batch["first_divergence"].shape[0]


def num_steps(batch: PairBatch) -> int:
    """S, the most steps of any response in the batch."""
    return batch["step_mask"].shape[1]


def is_packed(batch: PairBatch) -> bool:
    """Whether the pairs are packed blocks (``data.pack_pairs``)."""
    return "segment_ids" in batch


def chosen(values: torch.Tensor | list) -> torch.Tensor | list:
    """The chosen rows ``[B, ...]`` of a ``[2B, ...]`` tensor (or the first half of a list of 2B items)."""
    return values[: len(values) // 2]


def rejected(values: torch.Tensor | list) -> torch.Tensor | list:
    """The rejected rows ``[B, ...]`` of a ``[2B, ...]`` tensor (or the second half of a list of 2B items)."""
    return values[len(values) // 2 :]
