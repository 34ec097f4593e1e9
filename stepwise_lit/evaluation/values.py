"""Metric values as JSON numbers, for the reports."""

from __future__ import annotations

import math

import torch


def json_count(value: float | torch.Tensor) -> int | float:
    """A weighted count for JSON: an int when whole, as it is with 0/1 prompt or pair weights; a
    float otherwise (fractional weights give fractional counts)."""
    value = float(value)
    return int(value) if value.is_integer() else value


def json_number(value: float | torch.Tensor) -> float | None:
    """A JSON number: float, or None for NaN / inf (nothing counted)."""
    value = float(value)
    return value if math.isfinite(value) else None
