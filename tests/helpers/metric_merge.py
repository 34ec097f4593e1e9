"""The check both metric test files run: merged states equal one metric over all inputs."""

from __future__ import annotations

from collections.abc import Callable

from torch.testing import assert_close
from torchmetrics import Metric


def assert_merged_halves_equal_whole(make: Callable[[], Metric], inputs: tuple) -> None:
    """What DDP's sync does: the states of two metrics, one updated with inputs ``[0:2]`` and one
    with ``[2:4]`` (None inputs stay None), merged give the value of one metric seeing all four."""

    def part(index: slice):
        return tuple(None if value is None else value[index] for value in inputs)

    whole, first, second = make(), make(), make()
    whole.update(*inputs)
    first.update(*part(slice(0, 2)))
    second.update(*part(slice(2, 4)))
    first.merge_state(second)
    assert_close(first.compute(), whole.compute(), equal_nan=True)
