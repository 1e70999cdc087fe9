"""A script that makes its own process group (the PyTorch DDP tutorial) gets DDP, not one CPU process per rank."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "distributed"))
from _ddp_jobs import job_environment, run_job  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.distributed
def test_mp_spawn_with_init_process_group_trains_as_ddp():
    status, output = run_job([sys.executable, str(HERE / "_tutorial_spawn.py"), str(free_port())],
                             job_environment())
    assert status == 0, output[-4000:]
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    ranks = json.loads(line[len("RESULT "):])["ranks"]
    assert [(r["mode"], r["world_size"], r["is_main"]) for r in ranks] == [("ddp", 2, True), ("ddp", 2, False)]
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(32))  # sharded: each sample once
    assert ranks[0]["weights"] == ranks[1]["weights"]  # exact: same start (broadcast), same all-reduced steps
