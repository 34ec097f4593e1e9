"""One model's per-step log-probs of a pair batch, packed or not, from logits or lean (`stepwise_lit.logprobs.lean`).

The policy and every reference mode go through `step_logps`, so the label shift and the
step sums can never differ between them.
"""

from __future__ import annotations

import torch

from stepwise_lit.data.batch import PairBatch, chosen, is_packed, num_pairs
from stepwise_lit.data.packing import CHOSEN_REST, packed_attention_mask, packed_mask_mod
from stepwise_lit.errors import SettingError
from stepwise_lit.logprobs.lean import LeanLogps, target_logps
from stepwise_lit.logprobs.logps import next_token_targets


def step_logps(model: torch.nn.Module, batch: PairBatch, num_steps: int, lean: LeanLogps | None = None) -> torch.Tensor:
    """Per-step log-probs of the batch's responses from one forward pass of `model`.

    Args:
        model: A Hugging Face causal LM (or a PEFT model around one).
        batch: Unpacked (``2B`` rows) or packed (rows of ``[prefix | chosen rest | rejected rest]``
            pair blocks); `chosen_side` gives a batch of the chosen responses alone, which this takes too.
        num_steps: S, the step columns of the result (the batch's most steps).
        lean: The run's lean path (`stepwise_lit.logprobs.lean.use_lean_logps`): where it serves `model`,
            the LM head is applied to the final hidden states a chunk at a time, never building
            ``[rows, L, V]`` logits; None: the model's own logits.

    Returns:
        float ``[2B, S]``: chosen rows, then rejected rows (``[B, S]`` for a chosen side alone).
    """
    if is_packed(batch):
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": packed_mask_for(model, batch),  # [R, 1, L, L] or a BlockMask
        }
        target_ids, target_step_ids = batch["target_ids"], batch["target_step_ids"]  # [R, L, 2P] (or [R, L, P])
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        target_ids, target_step_ids = next_token_targets(batch["input_ids"], batch["step_ids"])  # [2B, L, 1]
    on_lean_path = lean is not None and lean.serves(model, batch["input_ids"])
    logps = target_logps(model, inputs, target_ids, target_step_ids, num_steps, on_lean_path)  # [R, K, S]
    if is_packed(batch):  # [R, 2P, S] -> each response's (row, column), in pair order
        rows, columns = batch["response_targets"].unbind(-1)
        return logps[rows, columns]
    return logps[:, 0]  # [2B, 1, S] -> [2B, S]


def chosen_side(batch: PairBatch) -> PairBatch:
    """The token tensors of the chosen responses alone (a new batch; `batch` is not changed).
    Packed, only the chosen target columns (the first half) are kept; with one pair per row the
    chosen side is each row's first ``c_end`` positions (prefix + chosen rest), so the rows are
    also cut to the longest of those (with several pair blocks per row they keep their width)."""
    if is_packed(batch):
        slots = batch["target_ids"].shape[-1] // 2  # P
        width = int((batch["segment_ids"] <= CHOSEN_REST).sum(-1).max()) if slots == 1 else None
        side = {key: batch[key][:, :width] for key in ("input_ids", "position_ids", "segment_ids", "slot_ids")}
        side.update({key: batch[key][:, :width, :slots] for key in ("target_ids", "target_step_ids")})
        side["response_targets"] = chosen(batch["response_targets"])
        return side
    return {key: batch[key][: num_pairs(batch)] for key in ("input_ids", "attention_mask", "step_ids")}


def chosen_token_counts(batch: PairBatch) -> torch.Tensor:
    """Response tokens of each chosen side, long ``[B]``, in an unpacked or a packed batch."""
    if is_packed(batch):
        counts = (batch["target_step_ids"] > 0).sum(1)  # [R, 2P]
        rows, columns = chosen(batch["response_targets"]).unbind(-1)
        return counts[rows, columns]
    return (chosen(batch["step_ids"])[:, 1:] > 0).sum(-1)


def step_token_counts(batch: PairBatch, num_steps: int) -> torch.Tensor:
    """Tokens each step's log-prob sums over, long ``[2B, S]`` (chosen rows, then rejected), packed or not.

    Counted from the targets the log-probs use (``stepwise_lit.logprobs.forward.step_logps``), so a
    response's last step counts its EOS token as its log-prob does; 0 past a response's steps.

    Args:
        batch: An unpacked or packed pair batch.
        num_steps: S, the step columns.
    """
    if is_packed(batch):
        target_step_ids = batch["target_step_ids"]  # [B, L, 2]
    else:
        _, target_step_ids = next_token_targets(batch["input_ids"], batch["step_ids"])  # [2B, L, 1]
    counts = torch.nn.functional.one_hot(target_step_ids, num_steps + 1).sum(1)[..., 1:]  # [N, K, S]
    return counts.transpose(0, 1).reshape(-1, num_steps)


def packed_mask_for(model: torch.nn.Module, batch: PairBatch):
    """The attention mask of a packed batch in the form `model`'s attention takes: boolean
    ``[R, 1, L, L]`` for sdpa, additive in the weights' dtype for eager, a FlexAttention
    ``BlockMask`` (which lets the kernel skip the blocks no query of it sees) for flex_attention.

    Raises:
        SettingError: naming ``data.pack_pairs``, for attention that takes none of these masks or a
            sliding window shorter than a row's positions.
    """
    config = model.config
    attention = config._attn_implementation
    if attention not in ("sdpa", "eager", "flex_attention"):
        raise SettingError(
            f"data.pack_pairs: packed rows need a 4D attention mask or a block mask, which {attention!r} "
            "attention does not take (sdpa, eager and flex_attention do); set data.pack_pairs: false"
        )
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and int(batch["position_ids"].max()) >= window:
        raise SettingError(
            f"data.pack_pairs: a response is longer than the model's sliding window ({window} tokens), which "
            "the packed mask does not apply; set data.pack_pairs: false"
        )
    segment_ids, slot_ids = batch["segment_ids"], batch["slot_ids"]
    if attention == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask  # needs torch >= 2.5

        rows, length = segment_ids.shape
        return create_block_mask(
            packed_mask_mod(segment_ids, slot_ids), rows, None, length, length, device=segment_ids.device
        )
    dtype = None if attention == "sdpa" else next(model.parameters()).dtype
    return packed_attention_mask(segment_ids, slot_ids, dtype)
