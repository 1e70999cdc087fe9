"""Fixtures shared by the test folders."""
from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def single_process_group():
    """A 1-process gloo group, enough to build DDP in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
