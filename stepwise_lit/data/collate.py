"""Collation of token rows into a `PairBatch` (``stepwise_lit.data.batch``), and length-grouped batching."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler

from stepwise_lit.data.batch import PairBatch
from stepwise_lit.data.packing import PADDING, PADDING_SLOT, balanced_rows, pack_pair
from stepwise_lit.data.records import SIDES


class StepwiseCollator:
    """Stack B token rows as ``[chosen; rejected]``: ``2B`` right-padded rows, or,
    packed, rows of ``[shared prefix | chosen rest | rejected rest]`` pair blocks.

    Args:
        pad_token_id: Id that fills ``input_ids`` past each row's end.
        pack_pairs: Lay each pair out as one packed block (``stepwise_lit.data.packing``).
        pack_budget: Packed only: most tokens per row, filled with several pair blocks
            (`stepwise_lit.data.packing.balanced_rows`: the fewest rows, balanced; a pair
            longer than the budget gets a row of its own); None: one pair per row.
    """

    def __init__(self, pad_token_id: int, pack_pairs: bool = False, pack_budget: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pack_pairs = pack_pairs
        self.pack_budget = pack_budget

    def __call__(self, rows: Sequence[dict]) -> PairBatch:
        """Collate token rows (see ``stepwise_lit.data.tokenize.tokenize_row``).

        Returns:
            A `PairBatch`: ``input_ids``, ``attention_mask``, ``step_ids`` long ``[2B, L]``;
            ``step_scores`` float ``[2B, S]`` (0 where padded or missing),
            ``step_mask`` bool ``[2B, S]``; ``has_step_scores``, ``has_outcome_scores``
            bool ``[2B]``; ``outcome_scores`` float ``[2B]`` (0 where missing);
            ``first_divergence`` long ``[B]``; ``prompts`` and ``reference_solutions``
            (B raw prompts and ground-truth solutions or None) and
            ``steps`` (2B lists of step texts). Rows ``0..B-1`` are chosen,
            ``B..2B-1`` rejected. Rows with a ``row_index`` (their position in the
            split, see ``StepwiseDataModule``) also give ``row_index`` long ``[B]``.

            Packed (``pack_pairs``), the token tensors have R rows (R = B with no
            ``pack_budget``) of at most P pair blocks each: ``input_ids``,
            ``attention_mask``, ``position_ids``, ``segment_ids``, ``slot_ids`` long
            ``[R, L]``, ``target_ids``, ``target_step_ids`` long ``[R, L, 2P]`` (see
            ``stepwise_lit.data.packing``) instead of ``step_ids``, and
            ``response_targets`` long ``[2B, 2]``: the (row, target column) of each
            response, chosen ones first, in the order of `rows`.
        """
        step_scores = [row[f"{side}_step_scores"] for side in SIDES for row in rows]
        outcome_scores = torch.tensor([row[f"{side}_score"] for side in SIDES for row in rows], dtype=torch.float32)
        has_step_scores = torch.tensor([not any(map(math.isnan, scores)) for scores in step_scores])
        scores_tensor, step_mask = pad_step_scores(step_scores)  # [2B, S]
        batch: PairBatch = {
            **(self._packed_tokens(rows) if self.pack_pairs else self._tokens(rows)),
            "step_scores": scores_tensor,
            "step_mask": step_mask,
            "has_step_scores": has_step_scores,  # [2B]
            "outcome_scores": torch.nan_to_num(outcome_scores, nan=0.0),  # [2B]
            "has_outcome_scores": ~outcome_scores.isnan(),  # [2B]
            "first_divergence": torch.tensor([row["first_divergence"] for row in rows], dtype=torch.long),  # [B]
            "prompts": [json.loads(row["prompt_json"]) for row in rows],
            "reference_solutions": [row.get("reference_solution") for row in rows],
            "steps": [list(row[f"{side}_steps"]) for side in SIDES for row in rows],
        }
        if "row_index" in rows[0]:  # per-row data kept outside the dataset (precomputed reference)
            batch["row_index"] = torch.tensor([row["row_index"] for row in rows], dtype=torch.long)  # [B]
        return batch

    def _tokens(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        input_ids = [row[f"{side}_input_ids"] for side in SIDES for row in rows]
        return {
            "input_ids": right_pad(input_ids, self.pad_token_id),  # [2B, L]
            "attention_mask": right_pad([[1] * len(ids) for ids in input_ids], 0),  # [2B, L]
            "step_ids": right_pad([row[f"{side}_step_ids"] for side in SIDES for row in rows], 0),  # [2B, L]
        }

    def _packed_tokens(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        blocks = [
            pack_pair(row["chosen_input_ids"], row["chosen_step_ids"], row["rejected_input_ids"], row["rejected_step_ids"])
            for row in rows
        ]
        if self.pack_budget is None:
            groups = [[pair] for pair in range(len(blocks))]
        else:
            groups = balanced_rows([len(block["input_ids"]) for block in blocks], self.pack_budget)
        slots = max(len(group) for group in groups)  # P
        packed = [concatenate_blocks([blocks[pair] for pair in group], slots) for group in groups]
        place = {pair: (row, slot) for row, group in enumerate(groups) for slot, pair in enumerate(group)}
        response_targets = [[place[pair][0], side * slots + place[pair][1]] for side in range(2) for pair in range(len(blocks))]
        return {
            "input_ids": right_pad([p["input_ids"] for p in packed], self.pad_token_id),  # [R, L]
            "attention_mask": right_pad([[1] * len(p["input_ids"]) for p in packed], 0),  # [R, L]
            "position_ids": right_pad([p["position_ids"] for p in packed], 0),  # [R, L]
            "segment_ids": right_pad([p["segment_ids"] for p in packed], PADDING),  # [R, L]
            "slot_ids": right_pad([p["slot_ids"] for p in packed], PADDING_SLOT),  # [R, L]
            "target_ids": right_pad([p["target_ids"] for p in packed], 0),  # [R, L, 2P]
            "target_step_ids": right_pad([p["target_step_ids"] for p in packed], 0),  # [R, L, 2P]
            "response_targets": torch.tensor(response_targets, dtype=torch.long),  # [2B, 2]
        }


def concatenate_blocks(blocks: Sequence[dict[str, list]], slots: int) -> dict[str, list]:
    """One packed row of pair blocks (`pack_pair` outputs), one after another.

    Block ``s``'s chosen targets go to column ``s``, its rejected ones to ``slots + s``
    (2 x `slots` target columns, 0 elsewhere); ``slot_ids`` is ``s`` over block ``s``."""
    row = {"input_ids": [], "position_ids": [], "segment_ids": [], "slot_ids": [], "target_ids": [], "target_step_ids": []}
    for slot, block in enumerate(blocks):
        for key in ("input_ids", "position_ids", "segment_ids"):
            row[key] += block[key]
        row["slot_ids"] += [slot] * len(block["input_ids"])
        for key in ("target_ids", "target_step_ids"):
            for chosen_value, rejected_value in block[key]:
                columns = [0] * (2 * slots)
                columns[slot], columns[slots + slot] = chosen_value, rejected_value
                row[key].append(columns)
    return row


def right_pad(sequences: Sequence[Sequence], value: int) -> torch.Tensor:
    """Long tensor ``[N, max length, ...]`` of the sequences, right-padded with ``value``.

    Elements may be ints, or equal-length lists of ints (a trailing dimension)."""
    tensors = [torch.tensor(sequence, dtype=torch.long) for sequence in sequences]
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value)


def pad_step_scores(step_scores: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[N, S]`` (0 where padded or NaN) and the real-step mask ``[N, S]``, S = most steps."""
    num_steps = torch.tensor([len(scores) for scores in step_scores])
    step_mask = torch.arange(int(num_steps.max()))[None, :] < num_steps[:, None]  # [N, S]
    scores = torch.zeros(step_mask.shape, dtype=torch.float32)
    for row, row_scores in enumerate(step_scores):
        scores[row, : len(row_scores)] = torch.tensor(row_scores, dtype=torch.float32)
    return torch.nan_to_num(scores, nan=0.0), step_mask


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar-length rows, to cut padding.

    Indices come from ``sampler`` (so shuffling and, under DDP, Lightning's
    distributed sampler still decide which rows a process sees and in what
    order). Each run of ``batch_size * group_factor`` indices is sorted by length,
    longest first, and cut into batches.

    Args:
        sampler: Source of row indices.
        batch_size: Rows per batch.
        drop_last: Drop the final batch if it is short (like ``BatchSampler``).
        lengths: Length of every row of the dataset (e.g. its longer side's tokens).
        group_factor: Batches per sorted run.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int],
        group_factor: int = 50,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = lengths
        self.group_factor = group_factor

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        run_size = self.batch_size * self.group_factor
        ordered = []
        for start in range(0, len(indices), run_size):
            ordered += sorted(indices[start : start + run_size], key=lambda index: -self.lengths[index])
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch
