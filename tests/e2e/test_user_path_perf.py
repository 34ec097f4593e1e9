"""Issue 14's options set in YAML and run through `train.py fit` (two steps of the tiny model,
checked as in tests/test_user_path.py): several pairs per row, the attention setting and
`lean_logps: auto`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.user_path import fit

CASES = {
    "pack_budget": {"data": {"pack_budget": 512}},
    "attention_eager_with_pack_budget": {"model": {"attention": "eager"}, "data": {"pack_budget": 512}},
    "lean_logps_auto": {"model": {"lean_logps": "auto"}},
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("changes", list(CASES.values()), ids=list(CASES))
def test_perf_options_from_yaml(tmp_path, cache_dir, capsys, changes):
    fit(tmp_path, changes, cache_dir, capsys)
