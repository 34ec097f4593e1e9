"""Token id lists through a scorer's model in batches: longest first, padded, on the model's device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from stepwise_lit.rewards.base import length_sorted_batches, model_device, pad_batch


def padded_batches(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int, side: str
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """The sequences in batches of at most `batch_size`, longest first (see `length_sorted_batches`).

    Args:
        model: The model the batches are for (they go to the device of its first parameter).
        sequences: Token ids per sequence.
        batch_size: Most sequences per batch.
        pad_id: Id written into the padding.
        side: "left" or "right" padding (see `pad_batch`).

    Yields:
        The batch's indices into `sequences`, and its `pad_batch` tensors (each ``[B, L]``).
    """
    device = model_device(model)
    for indices in length_sorted_batches([len(sequence) for sequence in sequences], batch_size):
        yield indices, pad_batch([sequences[i] for i in indices], pad_id, side, device)
