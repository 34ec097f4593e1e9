"""The golden runs of `tests/golden.py` give what the code before the architecture move gave:
the loss of each step, every logged metric and every policy gradient, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from golden import CASES, GOLDEN, LAYOUTS, run_case


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_golden_run_is_unchanged(case, layout, tmp_path):
    expected = load_file(GOLDEN / f"{case}-{layout}.safetensors")
    actual = run_case(case, layout, tmp_path)
    assert sorted(actual) == sorted(expected), "recorded names differ (metrics logged or parameters)"
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
