"""Where a command runs: one reading of --device, one rule for the number of processes, for both scripts."""
from __future__ import annotations

import pytest

from autoparallel import Hardware
from camoxpert import kaggle
from camoxpert.placement import device_arguments, process_count


@pytest.mark.parametrize(("device", "expected"), [
    ("auto", {}), ("cuda", {}), ("GPU", {}), ("cpu", {"strategy": "cpu"}), (" CPU ", {"strategy": "cpu"}),
    ("cuda:1", {"devices": "1"}), ("0,1", {"devices": "0,1"}),
])
def test_device_flag(device, expected):
    assert device_arguments(device) == expected


@pytest.mark.parametrize(("strategy", "device", "env", "gpus", "expected"), [
    ("auto", "auto", {}, 0, 1),
    ("auto", "auto", {}, 1, 1),
    ("auto", "auto", {}, 2, 2),  # DDP on 2+ GPUs unless asked otherwise
    ("dp", "auto", {}, 2, 1),
    ("auto", "cpu", {}, 2, 1),
    ("auto", "cuda:1", {}, 2, 1),
    ("auto", "0,1,2", {}, 4, 3),  # one process per listed GPU
    ("ddp", "auto", {}, 1, 1),
    ("ddp", "auto", {}, 4, 4),
    ("auto", "auto", {"AUTOPARALLEL_STRATEGY": "dp"}, 2, 1),
    ("auto", "auto", {"AUTOPARALLEL_STRATEGY": "single"}, 2, 1),
    ("auto", "auto", {"AUTOPARALLEL_NPROC": "2"}, 0, 2),  # gloo processes on the CPU
    ("dp", "cpu", {"AUTOPARALLEL_NPROC": "3"}, 0, 3),  # AUTOPARALLEL_NPROC always wins
])
def test_process_count(strategy, device, env, gpus, expected):
    assert process_count(strategy, device, env, gpus) == expected


def test_kaggle_decides_the_processes_by_the_same_rule(tmp_path, capsys):
    for sub in ("Image", "GT_Object"):
        (tmp_path / "work" / "COD10K-v3" / "Train" / sub).mkdir(parents=True)
    assert kaggle.main(["--dry-run", "--strategy", "dp"], environ={"AUTOPARALLEL_NPROC": "2"},
                       hardware=Hardware(), kaggle_input=tmp_path / "in", kaggle_working=tmp_path / "kw",
                       cwd=tmp_path / "work") == 0
    out = capsys.readouterr().out
    assert "Strategy: DDP, 2 processes on the CPU (gloo)" in out
    assert "--strategy ddp" in out
