"""A stop asked for on one rank stops every rank at the same step (2 gloo processes under torchrun)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_jobs import torchrun_result  # noqa: E402

pytestmark = pytest.mark.distributed


def test_a_signal_to_one_rank_stops_both_at_the_same_step():
    result = torchrun_result("_stop_worker.py")
    assert result["steps"] == [4, 4]  # asked in step 3, agreed at the next check: no rank runs ahead
    assert result["reason"] == "another rank asked to stop"  # rank 0 did not get the signal itself
