"""The `gpu` marker: tests that need a CUDA GPU, skipped with one reason on a machine without one.

`python bench/gpu_suite.py --device cuda` runs them (`pytest -m gpu tests/gpu`) on a GPU machine. Tests whose
logic also holds on a CPU are parametrized over the device, and only their CUDA variant carries the marker,
so the CPU variant runs everywhere.
"""
from __future__ import annotations

import pytest
import torch

NO_CUDA = ("needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
           "(run the gpu tests on a GPU: python bench/gpu_suite.py --device cuda)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def restore_cudnn_flags():
    """Tests that flip cudnn.benchmark or TF32 leave them as they found them."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
