"""``AUTOPARALLEL_NPROC=2 python train_ultimate.py train ...``: the unchanged command as 2 DDP processes (gloo).

One epoch on a tiny synthetic set; the validation the two ranks ran (5 images: 3 on rank 0, 2 on rank 1,
gathered) must equal a one-process evaluation of the saved weights, exactly: every image counted once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from camoxpert.cli import main
from camoxpert.synthetic import generate_dataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _ddp_jobs import job_environment, run_job  # noqa: E402

pytestmark = pytest.mark.distributed


def test_train_under_two_processes_validates_like_one_process(tmp_path):
    data = generate_dataset(tmp_path / "data", num_train=24, num_test=2, size=64, seed=1)
    checkpoints = tmp_path / "checkpoints"
    env = job_environment(AUTOPARALLEL_NPROC="2")
    status, output = run_job([sys.executable, "train_ultimate.py", "train", "--dataset-path", str(data),
                              "--checkpoint-dir", str(checkpoints), "--backbone", "edgenext_xx_small",
                              "--no-pretrained", "--num-experts", "3", "--img-size", "32", "--batch-size", "4",
                              "--epochs", "1", "--stage1-epochs", "0", "--val-fraction", "0.2", "--use-ema",
                              "--num-workers", "0", "--seed", "5"], env)
    assert status == 0, output[-4000:]
    assert "MULTI_CPU (DistributedDataParallel) | Number of processes: 2" in output
    assert "global batch 4 per micro-step (2 per process x 2 processes)" in output
    history = [json.loads(line) for line in (checkpoints / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1  # written by rank 0 only
    # 19 training images: 9 per rank in batches of 2 -> 4 steps, as one process with batches of 4.
    assert history[0]["step"] == 4
    assert {p.name for p in checkpoints.iterdir()} >= {"last.pt", "best.pt", "args.json"}

    assert main(["evaluate", "--checkpoint", str(checkpoints / "last.pt"), "--split", "val", "--output",
                 str(tmp_path / "val.json"), "--num-workers", "0", "--device", "cpu"]) == 0
    val = json.loads((tmp_path / "val.json").read_text())
    assert val["num_images"] == 5
    assert val["metrics"] == pytest.approx(history[0]["val"], abs=1e-12)
