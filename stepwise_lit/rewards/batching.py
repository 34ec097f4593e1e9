"""Token id lists through a scorer's model in batches (longest first, padded, on the model's
device), and `PositionScorer`, the scorers that read their model at one position per step."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence

import torch

from stepwise_lit.data.records import Prompt
from stepwise_lit.rewards.base import (
    StepScorer,
    length_sorted_batches,
    model_device,
    pad_batch,
)


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


def outputs_at_positions(
    model: torch.nn.Module,
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    pad_id: int,
) -> list[torch.Tensor]:
    """Each sequence's model output at its read positions, right padded and batched (`padded_batches`).

    Args:
        model: The model (for its device).
        forward: Maps a batch's `pad_batch` tensors to per-position outputs ``[B, L, ...]``.
        encoded: Per sequence, its token ids and the positions to read (one per step).
        batch_size: Most sequences per forward pass.
        pad_id: Id written into the padding.

    Returns:
        In input order, float ``[num_positions, ...]`` tensors.
    """
    results: list[torch.Tensor] = [torch.empty(0)] * len(encoded)
    for batch, inputs in padded_batches(model, [ids for ids, _ in encoded], batch_size, pad_id, "right"):
        outputs = forward(inputs).float()
        for row, index in enumerate(batch):
            positions = torch.tensor(list(encoded[index][1]), dtype=torch.long, device=outputs.device)
            results[index] = outputs[row, positions]
    return results


class PositionScorer(StepScorer):
    """A model scorer that reads its model at one position per step: subclasses set ``model``,
    ``tokenizer`` and ``batch_size`` and give `encode` (the ids and the read positions of a
    response) and `step_probability` (p in [0, 1] from the outputs there); score = 2p - 1."""

    def _score_steps(
        self, prompts: list[Prompt], steps: list[list[str]], reference_solutions: list[str | None]
    ) -> list[list[float]]:
        encoded = [self.encode(prompt, row_steps) for prompt, row_steps in zip(prompts, steps)]
        outputs = outputs_at_positions(
            self.model, self.model_outputs, encoded, self.batch_size, self.tokenizer.pad_token_id
        )
        return [(2.0 * self.step_probability(row) - 1.0).tolist() for row in outputs]

    def model_outputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's per-position outputs ``[B, L, ...]`` (its logits unless a subclass says otherwise)."""
        return self.model(**inputs).logits

    @abc.abstractmethod
    def encode(self, prompt: Prompt, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of one response as the model reads it, and the position read for each step."""

    @abc.abstractmethod
    def step_probability(self, outputs: torch.Tensor) -> torch.Tensor:
        """p in [0, 1] per step, ``[num_steps]``, from the outputs at the read positions ``[num_steps, ...]``."""
