"""A user script for test_launch.py: launch() at the top, then one all-reduce.

Behaviour switches (environment): AP_TEST_RAISE_RANK=r makes rank r raise while the others wait in a
collective; AP_TEST_STUCK_RANK=r makes rank r sleep instead of joining the collective, so the others
time out after AUTOPARALLEL_TIMEOUT seconds.
"""
from __future__ import annotations

import os
import sys
import time

import torch
from _emit import emit  # this folder is sys.path[0] for a script

import autoparallel as ap

ap.launch()  # first thing: in the parent process nothing else runs


def main() -> None:
    rt = ap.runtime()
    if os.environ.get("AP_TEST_RAISE_RANK") == str(rt.rank):
        raise RuntimeError(f"deliberate failure on rank {rt.rank}")
    if os.environ.get("AP_TEST_STUCK_RANK") == str(rt.rank):
        time.sleep(300)
    total = ap.all_reduce(torch.tensor(float(rt.rank + 1)), op="sum")
    emit(f"RESULT rank={rt.rank} world={rt.world_size} sum={total.item():g} launcher={rt.launcher} "
         f"mode={rt.mode} args={' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
