"""Pair packing: one row per pair, ``[shared prefix | chosen rest | rejected rest]``.

In a ``[chosen; rejected]`` batch the prompt (and any text the two responses
begin with alike) is computed twice, and both rows are padded to the longest
row. Packed, each pair is one row: the longest common token prefix of its two
sides (at least the prompt, as a rule) once, then the rest of the chosen side,
then the rest of the rejected side. An attention mask lets the rejected rest see
the prefix and itself but never the chosen rest, and its position ids restart
where the prefix ends, so every token sees exactly the context and positions it
has in its own row: the log-probs equal the unpacked batch's up to float rounding.

Layout of a packed row of a pair whose sides share ``shared`` tokens::

    positions   0 ......... shared-1 | shared ... c_end-1 | c_end ........ end-1 | pad
    segment     0 (prefix)           | 1 (chosen rest)    | 2 (rejected rest)    | 3
    position id 0 ......... shared-1 | shared ... c_end-1 | shared ... len(r)-1 | 0

Each position predicts (at most) one token of each side: ``target_ids[p, 0]`` is
the chosen token the logits at ``p`` predict, ``target_ids[p, 1]`` the rejected
one, with their steps in ``target_step_ids`` (0: ``p`` predicts nothing for that
side). Prefix positions predict for both sides; the last prefix position
predicts the first token of each rest.

Several pairs per row (``data.pack_budget``): each row holds one or more such pair
blocks one after another, positions restarting at 0 in each block; ``slot_ids``
says which block of its row a position belongs to (padding: -1), and attention
never crosses blocks, so the mask is block-diagonal over the pairs. With P blocks
in the widest row, ``target_ids`` has 2P columns: ``s`` for the chosen side of
block ``s``, ``P + s`` for its rejected side (P = 1: ``[chosen, rejected]`` as
above). `balanced_rows` chooses the blocks of each row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PREFIX, CHOSEN_REST, REJECTED_REST, PADDING = 0, 1, 2, 3
"""Segment ids of a packed row."""

PADDING_SLOT = -1
"""Slot id of padding positions (no pair's block)."""


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def pack_pair(
    chosen_ids: Sequence[int],
    chosen_steps: Sequence[int],
    rejected_ids: Sequence[int],
    rejected_steps: Sequence[int],
) -> dict[str, list]:
    """Lay out one pair as a packed row (see the module doc).

    Args:
        chosen_ids: the chosen row's token ids (prompt + response).
        chosen_steps: its step ids (0 for the prompt, ``t`` for step ``t``).
        rejected_ids: the rejected row's token ids.
        rejected_steps: its step ids.

    Returns:
        ``input_ids``, ``position_ids``, ``segment_ids`` (lists of the packed
        length) and ``target_ids``, ``target_step_ids`` (lists of
        ``[chosen, rejected]`` pairs, one per packed position).
    """
    shared = common_prefix_length(chosen_ids, rejected_ids)
    c_end = len(chosen_ids)
    rejected_rest = len(rejected_ids) - shared
    length = c_end + rejected_rest
    targets = [[0, 0] for _ in range(length)]
    target_steps = [[0, 0] for _ in range(length)]
    for j in range(1, c_end):  # chosen token j is predicted at position j - 1
        targets[j - 1][0], target_steps[j - 1][0] = chosen_ids[j], chosen_steps[j]
    for j in range(1, len(rejected_ids)):  # rejected token j is predicted where token j - 1 sits
        predictor = j - 1 if j - 1 < shared else c_end + (j - 1 - shared)
        targets[predictor][1], target_steps[predictor][1] = rejected_ids[j], rejected_steps[j]
    return {
        "input_ids": list(chosen_ids) + list(rejected_ids[shared:]),
        "position_ids": list(range(c_end)) + list(range(shared, len(rejected_ids))),
        "segment_ids": [PREFIX] * shared + [CHOSEN_REST] * (c_end - shared) + [REJECTED_REST] * rejected_rest,
        "target_ids": targets,
        "target_step_ids": target_steps,
    }


def balanced_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group pairs into the fewest rows of at most `budget` tokens each, balanced so that the
    longest row, to which the others are padded, is as short as the greedy finds.

    For R rows, from ``ceil(sum / budget)`` up: pairs are taken longest first (ties: lower
    index first), each into the row holding the fewest tokens so far (ties: the lower row);
    the first R whose rows of two or more pairs all fit the budget is kept. A pair longer than
    the budget thus ends up in a row of its own. Each row lists its pairs in index order.

    Args:
        lengths: tokens of each pair's packed block.
        budget: most tokens per row of two or more pairs (at least 1).

    Returns:
        The pair indices of each row.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fewest = min(-(-sum(lengths) // budget), len(lengths))  # ceil(sum / budget), at most one row per pair
    for num_rows in range(max(1, fewest), len(lengths) + 1):
        rows: list[list[int]] = [[] for _ in range(num_rows)]
        used = [0] * num_rows
        for index in order:
            row = used.index(min(used))
            rows[row].append(index)
            used[row] += lengths[index]
        if all(len(items) == 1 or total <= budget for items, total in zip(rows, used)):
            break
    return [sorted(items) for items in rows if items]


def packed_attention_mask(
    segment_ids: torch.Tensor, slot_ids: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The 4D attention mask of packed rows.

    A query sees the keys at or before it in its own pair's block (same slot) that lie
    in the block's shared prefix or in the query's own segment. Padding (slot
    `PADDING_SLOT`, last) sees only earlier padding and itself (never an empty row); no
    real query sees padding or another pair.

    Args:
        segment_ids: ``[R, L]`` segment of each position (``PREFIX``..``PADDING``).
        slot_ids: ``[R, L]`` pair block of each position within its row.
        dtype: None for a boolean mask (True: may attend), as sdpa takes it; a
            float dtype for an additive mask (0 or the dtype's minimum), as
            eager attention takes it.

    Returns:
        ``[R, 1, L, L]`` mask.
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    same_pair = slot_ids[:, :, None] == slot_ids[:, None, :]
    visible = causal & same_pair & ((key == PREFIX) | (key == query))  # [R, L, L]
    visible = visible[:, None]
    if dtype is None:
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def packed_mask_mod(segment_ids: torch.Tensor, slot_ids: torch.Tensor):
    """The rule of `packed_attention_mask` as a FlexAttention ``mask_mod(b, h, q, k) -> bool``
    (for ``torch.nn.attention.flex_attention.create_block_mask``).

    Args:
        segment_ids: ``[R, L]`` segment of each position.
        slot_ids: ``[R, L]`` pair block of each position within its row.
    """

    def mask_mod(b, h, q, k):
        query, key = segment_ids[b, q], segment_ids[b, k]
        same_pair = slot_ids[b, q] == slot_ids[b, k]
        return (k <= q) & same_pair & ((key == PREFIX) | (key == query))

    return mask_mod
