"""The golden runs of `tests/helpers/golden.py` give what the code before the architecture move gave:
the loss of each step, every logged metric and every policy gradient, within the tolerances of
`golden.mismatches` (its docstring gives the argument; docs/results/golden_tolerance.md the
measured figures), or bit for bit with ``STEPWISE_GOLDEN_EXACT=1``."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.helpers.golden import CASES, GOLDEN, LAYOUTS, mismatches, run_case


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_golden_run_is_unchanged(case, layout, tmp_path):
    expected = load_file(GOLDEN / f"{case}-{layout}.safetensors")
    actual = run_case(case, layout, tmp_path)
    assert sorted(actual) == sorted(expected), "recorded names differ (metrics logged or parameters)"
    assert mismatches(actual, expected) == []


@pytest.mark.parametrize(("case", "beta"), [(case, ("step_beta", "outcome_beta")[i % 2]) for i, case in enumerate(CASES)])
def test_a_beta_changed_by_a_tenth_of_a_percent_fails_the_tolerance(case, beta, tmp_path):
    """β (default 0.1) times 1.001, β_s and β_o in turn over the cases (`python -m tests.helpers.golden
    measure` changes both in every case): the DPO gradient scales with β, so the first step's gradients
    move by 6e-4 to 1e-3 of their norm, 20 to 30 times `GRADIENT_RTOL` (with an SFT warm-up
    step, the second step's loss and the metrics move instead); the comparison must see it."""
    expected = load_file(GOLDEN / f"{case}-unpacked.safetensors")
    actual = run_case(case, "unpacked", tmp_path, {beta: 0.1 * 1.001})
    assert mismatches(actual, expected) != []
