"""A 2-process CamoXpert run stopped by its time budget, or by SIGTERM, resumes to the uninterrupted result.

The commands are the user's: ``AUTOPARALLEL_NPROC=2 python train_ultimate.py train ...`` (gloo on the CPU),
then the same command with ``--resume-from last.pt``. A stop exits with status 75 and says how to resume.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import autoparallel as ap
from camoxpert.synthetic import generate_dataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _ddp_jobs import finish_job, job_environment, run_job, start_job  # noqa: E402

pytestmark = pytest.mark.distributed


def _command(data: Path, checkpoints: Path, *extra: str) -> list[str]:
    return [sys.executable, "train_ultimate.py", "train", "--dataset-path", str(data), "--checkpoint-dir",
            str(checkpoints), "--backbone", "edgenext_xx_small", "--no-pretrained", "--num-experts", "3",
            "--img-size", "32", "--batch-size", "4", "--epochs", "3", "--stage1-epochs", "0", "--val-fraction", "0.2",
            "--use-ema", "--num-workers", "0", "--seed", "5", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("cod") / "data", num_train=24, num_test=2, size=64, seed=1)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    checkpoints = tmp_path_factory.mktemp("straight")
    status, output = run_job(_command(data, checkpoints), job_environment(AUTOPARALLEL_NPROC="2"))
    assert status == 0, output[-4000:]
    return checkpoints


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _resume_and_compare(data: Path, checkpoints: Path, uninterrupted: Path) -> None:
    status, output = run_job(_command(data, checkpoints, "--resume-from", str(checkpoints / "last.pt")),
                             job_environment(AUTOPARALLEL_NPROC="2"))
    assert status == 0, output[-4000:]
    resumed, straight = _weights(checkpoints / "last.pt"), _weights(uninterrupted / "last.pt")
    for name, value in straight.items():
        # Float tolerance across separate DDP jobs: gloo's sums need not repeat bit for bit between jobs.
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-7, msg=name)
    history = [json.loads(line) for line in (checkpoints / "history.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in history] == [1, 2, 3]


def test_a_time_budget_stops_both_ranks_and_the_resume_matches(data, uninterrupted, tmp_path):
    two = job_environment(AUTOPARALLEL_NPROC="2")
    status, output = run_job(_command(data, tmp_path, "--time-budget", "0.001"), two)
    assert status == ap.EXIT_RESUMABLE, output[-4000:]
    assert "stopped (time budget of 0 s reached)" in output
    assert f"--resume-from {tmp_path / 'last.pt'}" in output
    info = ap.load_checkpoint(tmp_path / "last.pt")
    assert info["extra"]["partial_epoch"]["micro_done"] == 2  # asked at step 1, agreed at step 2's check
    _resume_and_compare(data, tmp_path, uninterrupted)


def test_sigterm_to_the_job_stops_it_cleanly_and_the_resume_matches(data, uninterrupted, tmp_path):
    job = start_job(_command(data, tmp_path), job_environment(AUTOPARALLEL_NPROC="2"))
    history = tmp_path / "history.jsonl"
    deadline = time.monotonic() + 120  # bounds a hang only
    while not history.is_file() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what Kaggle, SLURM or a cluster's preemption sends
    status, output = finish_job(job)
    assert status == ap.EXIT_RESUMABLE, output[-4000:]
    assert "stopped (SIGTERM)" in output
    _resume_and_compare(data, tmp_path, uninterrupted)
