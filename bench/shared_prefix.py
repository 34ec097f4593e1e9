"""Bench experiment: one row per pair, ``[shared prefix | chosen rest | rejected rest]``.

In a ``[chosen; rejected]`` batch the prompt (and any steps the two responses share)
is computed twice, and both rows are padded to the longest row. Here each pair
becomes one row: the longest common token prefix of its chosen and rejected rows
(at least the prompt) once, then the rest of the chosen response, then the rest of
the rejected response. A 4D attention mask lets the rejected tokens see the shared
prefix and themselves but not the chosen tokens, and position ids restart at the
end of the prefix, so every token sees exactly the context it has in its own row:
the log-probs are those of the ``[chosen; rejected]`` batch up to float rounding.

Each token is predicted by the logits at its predecessor in its own sequence (for
the first token of each rest: the last prefix token), and its log-prob is added to
the step it belongs to on each side (shared tokens count on both sides).

``SharedPrefixModule`` is ``StepwiseDPOModule`` with its per-step log-prob function
swapped for the packed one (policy and reference alike); ``compare_trl.py`` runs it
as the variant ``ours_shared_prefix``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stepwise_lit.logps import token_logps
from stepwise_lit.module import StepwiseDPOModule


@dataclass
class PackedPairs:
    """B packed rows and where each side's tokens are.

    Attributes:
        input_ids: ``[B, P]`` packed token ids (pad 0).
        position_ids: ``[B, P]``; the rejected rest restarts after the prefix.
        attention_mask: ``[B, 1, P, P]`` bool, True where a query may attend to a key.
        predecessor: ``[B, P]`` index of the position whose logits predict each token (0 where unused).
        chosen_step_ids: ``[B, P]`` chosen step of each packed token (0: not a chosen completion token).
        rejected_step_ids: ``[B, P]`` the same for the rejected side.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    predecessor: torch.Tensor
    chosen_step_ids: torch.Tensor
    rejected_step_ids: torch.Tensor


def common_prefix_length(first: list[int], second: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def pack_pairs(batch: dict) -> PackedPairs:
    """Pack a contract batch (``[chosen; rejected]``, 2B right-padded rows) into B rows.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``step_ids`` of shape ``[2B, L]``.

    Returns:
        The packed rows (see :class:`PackedPairs`).
    """
    num_pairs = batch["input_ids"].shape[0] // 2
    lengths = batch["attention_mask"].sum(-1).tolist()
    ids, steps = batch["input_ids"].tolist(), batch["step_ids"].tolist()
    layouts = []
    for pair in range(num_pairs):
        chosen, rejected = pair, num_pairs + pair
        c_ids, r_ids = ids[chosen][: lengths[chosen]], ids[rejected][: lengths[rejected]]
        shared = common_prefix_length(c_ids, r_ids)
        layouts.append((c_ids, r_ids, steps[chosen][: len(c_ids)], steps[rejected][: len(r_ids)], shared))
    width = max(len(c) + len(r) - shared for c, r, _, _, shared in layouts)
    packed = {name: torch.zeros(num_pairs, width, dtype=torch.long)
              for name in ("input_ids", "position_ids", "predecessor", "chosen_step_ids", "rejected_step_ids")}
    mask = torch.zeros(num_pairs, 1, width, width, dtype=torch.bool)
    for pair, (c_ids, r_ids, c_steps, r_steps, shared) in enumerate(layouts):
        c_end = len(c_ids)  # chosen occupies [0, c_end); the rejected rest [c_end, end)
        end = c_end + len(r_ids) - shared
        packed["input_ids"][pair, :end] = torch.tensor(c_ids + r_ids[shared:])
        packed["position_ids"][pair, :end] = torch.tensor(list(range(c_end)) + list(range(shared, len(r_ids))))
        predecessor = list(range(-1, c_end - 1)) + [shared - 1] + list(range(c_end, end - 1))
        packed["predecessor"][pair, :end] = torch.tensor(predecessor[:end]).clamp(min=0)
        packed["chosen_step_ids"][pair, :c_end] = torch.tensor(c_steps)
        packed["rejected_step_ids"][pair, :shared] = torch.tensor(r_steps[:shared])
        packed["rejected_step_ids"][pair, c_end:end] = torch.tensor(r_steps[shared:])
        causal = torch.ones(end, end, dtype=torch.bool).tril()
        causal[c_end:, shared:c_end] = False  # the rejected rest never sees the chosen rest
        mask[pair, 0, :end, :end] = causal
        mask[pair, 0, range(end, width), range(end, width)] = True  # padding attends to itself (no empty rows)
    return PackedPairs(attention_mask=mask, **packed)


def packed_step_logps(model: torch.nn.Module, batch: dict, num_steps: int) -> torch.Tensor:
    """Per-step log-probs ``[2B, S]`` (chosen rows, then rejected) from one packed forward.

    Args:
        model: A Hugging Face causal LM that accepts a 4D boolean attention mask.
        batch: A contract batch.
        num_steps: S.

    Returns:
        float32 ``[2B, S]``, as ``stepwise_lit.logps.step_logps`` gives for the unpacked batch.
    """
    packed = pack_pairs(batch)
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                   position_ids=packed.position_ids, use_cache=False).logits  # [B, P, V]
    predicting = logits.gather(1, packed.predecessor.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    logps = token_logps(predicting, packed.input_ids)  # [B, P]; position 0 and padding are never counted
    sides = []
    for step_ids in (packed.chosen_step_ids, packed.rejected_step_ids):
        sums = logps.new_zeros(logps.shape[0], num_steps + 1)
        sums.scatter_add_(1, step_ids, logps)
        sides.append(sums[:, 1:])
    return torch.cat(sides)


class SharedPrefixModule(StepwiseDPOModule):
    """``StepwiseDPOModule`` computing each pair's shared prefix once (bench experiment)."""

    def _step_logps(self, model: torch.nn.Module, batch: dict, num_steps: int) -> torch.Tensor:
        return packed_step_logps(model, batch, num_steps)
