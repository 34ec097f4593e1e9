"""Aggregation functions for the tests of `model.aggregation_strategy: tests.helpers.custom_aggregation.<name>`
(importable because pytest puts tests/ on the path): one that works and some that break the contract."""

from __future__ import annotations

import torch

NOT_A_FUNCTION = 3


def fraction_good(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The fraction of real steps the verifier marks good (``g_t > 0``), mapped to [-1, 1]:
    ``2 * good / T - 1``; 0 for a response without real steps.

    Args:
        scores: ``[N, S]`` float32, 0 on masked steps.
        mask: ``[N, S]`` bool.
    """
    good = ((scores > 0) & mask).sum(-1).float()
    steps = mask.sum(-1)
    return torch.where(steps > 0, 2 * good / steps.clamp(min=1) - 1, 0.0)


def per_step(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wrong: one value per step, ``[N, S]``."""
    return scores


def count_good(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wrong: an integer tensor."""
    return (scores > 0).sum(-1)


def as_list(scores: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Wrong: a list."""
    return scores.sum(-1).tolist()


def divide_by_zero(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wrong: infinite rewards."""
    return scores.sum(-1) / 0.0
