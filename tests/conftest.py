"""`pytest --torch-threads N`: every test starts with `torch.set_num_threads(N)` (commands under
test may change it, e.g. `train.py`'s `num_threads`), so the suite can be run at 1 and at 2
threads to show its results do not depend on the thread count."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser) -> None:
    parser.addoption("--torch-threads", type=int, default=None, help="torch.set_num_threads before every test")


@pytest.fixture(autouse=True)
def torch_threads(request) -> None:
    threads = request.config.getoption("--torch-threads")
    if threads is not None:
        torch.set_num_threads(threads)
