"""``ap.launch()`` re-runs what the user ran: a package directory, interpreter flags, the devices asked for,
and never a SLURM batch step as rank 0 of a job whose other ranks will never come."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

import autoparallel as ap

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "distributed"))
from _ddp_jobs import job_environment, run_job  # noqa: E402

APP = '''import os, sys
import torch
import autoparallel as ap
ap.launch()
rt = ap.runtime()
total = ap.all_reduce(torch.tensor(1.0)).item()
flags = f"optimize={sys.flags.optimize} warnings={','.join(sys.warnoptions)}"
# one write(2) per line: the two ranks share the pipe
os.write(1, f"RESULT rank={rt.rank} world={rt.world_size} total={total:g} {flags}\\n".encode())
'''


@pytest.mark.distributed
def test_a_package_directory_is_relaunched_with_its_interpreter_flags(tmp_path):
    app = tmp_path / "appdir"
    app.mkdir()
    (app / "__main__.py").write_text(APP)
    status, output = run_job([sys.executable, "-O", "-W", "ignore::DeprecationWarning", str(app)],
                             job_environment(AUTOPARALLEL_NPROC="2"))
    assert status == 0, output[-4000:]
    results = sorted(line for line in output.splitlines() if line.startswith("RESULT "))
    assert results == [f"RESULT rank={r} world=2 total=2 optimize=1 warnings=ignore::DeprecationWarning"
                       for r in (0, 1)], output[-4000:]


def test_a_slurm_batch_step_without_srun_runs_one_process(caplog):
    batch_step = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                  "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node01"}  # sbatch's script: no SLURM_STEP_ID
    with caplog.at_level(logging.WARNING):
        rt = ap.detect_runtime(env=batch_step, hardware=ap.Hardware())
    assert (rt.mode, rt.world_size) == ("cpu", 1)
    assert "srun" in caplog.text
    under_srun = {**batch_step, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    rt = ap.detect_runtime(env=under_srun, hardware=ap.Hardware())
    assert (rt.mode, rt.rank, rt.world_size) == ("ddp", 1, 2)


def test_one_device_asked_for_on_two_gpus_is_one_process():
    two_gpus = ap.Hardware.uniform(2)
    assert ap.requested_processes(None, {"AUTOPARALLEL_DEVICES": "1"}, 2) is None
    assert ap.requested_processes(None, {"AUTOPARALLEL_DEVICES": "0,1"}, 2) == 2
    assert ap.requested_processes(None, {}, two_gpus.gpu_count) == 2


def test_nproc_without_launch_says_so_once(monkeypatch, caplog):
    monkeypatch.setenv("AUTOPARALLEL_NPROC", "2")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "AUTOPARALLEL_LAUNCHED"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING):
        ap.runtime(strategy="cpu")
        ap.runtime(strategy="cpu")
    assert caplog.text.count("AUTOPARALLEL_NPROC=2 is set but") == 1
    assert "ap.launch()" in caplog.text
