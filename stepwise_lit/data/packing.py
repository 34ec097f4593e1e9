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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PREFIX, CHOSEN_REST, REJECTED_REST, PADDING = 0, 1, 2, 3
"""Segment ids of a packed row."""


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


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 4D attention mask of packed rows.

    A query sees the keys at or before it that lie in the shared prefix or in its
    own segment. Padding queries see the prefix and earlier padding (never an
    empty row); no real query sees padding, which comes last.

    Args:
        segment_ids: ``[B, L]`` segment of each position (``PREFIX``..``PADDING``).
        dtype: None for a boolean mask (True: may attend), as sdpa takes it; a
            float dtype for an additive mask (0 or the dtype's minimum), as
            eager attention takes it.

    Returns:
        ``[B, 1, L, L]`` mask.
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    visible = causal & ((key == PREFIX) | (key == query))  # [B, L, L]
    visible = visible[:, None]
    if dtype is None:
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
