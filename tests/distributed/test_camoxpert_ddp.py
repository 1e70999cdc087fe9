"""``AUTOPARALLEL_NPROC=2 python train_ultimate.py ...``: the unchanged commands as 2 DDP processes (gloo).

The promise: distributed evaluation counts every image exactly once and gives the single-process numbers.
"Exactly once" is checked exactly, by image name. "The same numbers" is checked to a tolerance, because
the two runs cannot be bitwise equal: the ranks score shards of 3 and 2 images with one thread each, one
process scores all 5 in one batch, and CPU kernels choose their blocking and summation order by batch
shape, thread count and instruction set (torch promises no bitwise identity across them). The logits then
differ in their last bits (up to ~6e-8 measured) and now and then a pixel of the uint8 prediction lands on
the other side of a rounding step.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from camoxpert.synthetic import generate_dataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _ddp_jobs import job_environment, run_job  # noqa: E402

pytestmark = pytest.mark.distributed

# One uint8 step of one pixel moves S, E, weighted-F and MAE of a 64 x 64 mask by well under 1e-3, and a
# pixel crossing the 0.5 threshold moves IoU by 1/union (< 5e-3 here); float noise flips a few pixels at
# most. A dropped or duplicated image is caught by the name check, which is exact, not by this tolerance.
PER_IMAGE_TOLERANCE = 1e-2
# The mean over 5 images of the per-image noise above, which is far below what one image's metrics
# differ by from the mean (> 0.02 for these images, so a swapped or mis-weighted image shows here too).
SUMMARY_TOLERANCE = 2e-3


def _train_ultimate(env: dict[str, str], *arguments: str) -> str:
    status, output = run_job([sys.executable, "train_ultimate.py", *arguments], env)
    assert status == 0, output[-4000:]
    return output


def _per_image(path: Path) -> dict[str, dict[str, float]]:
    """The per-image rows of an evaluate JSON, by image name; each name must occur once."""
    rows = json.loads(path.read_text())["per_image"]
    names = [row.pop("name") for row in rows]
    assert len(names) == len(set(names)), f"an image was scored twice: {sorted(names)}"
    return dict(zip(names, rows))


def test_two_processes_train_and_evaluate_every_image_once_with_the_single_process_numbers(tmp_path):
    data = generate_dataset(tmp_path / "data", num_train=24, num_test=2, size=64, seed=1)
    checkpoints = tmp_path / "checkpoints"
    two = job_environment(AUTOPARALLEL_NPROC="2")
    output = _train_ultimate(two, "train", "--dataset-path", str(data), "--checkpoint-dir", str(checkpoints),
                             "--backbone", "edgenext_xx_small", "--no-pretrained", "--num-experts", "3",
                             "--img-size", "32", "--batch-size", "4", "--epochs", "1", "--stage1-epochs", "0",
                             "--val-fraction", "0.2", "--use-ema", "--num-workers", "0", "--seed", "5")
    assert "MULTI_CPU (DistributedDataParallel) | Number of processes: 2" in output
    assert "global batch 4 per micro-step (2 per process x 2 processes)" in output
    history = [json.loads(line) for line in (checkpoints / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1  # written by rank 0 only
    # 19 training images: 9 per rank in batches of 2 -> 4 steps, as one process with batches of 4.
    assert history[0]["step"] == 4
    assert {p.name for p in checkpoints.iterdir()} >= {"last.pt", "best.pt", "args.json"}

    evaluate = ["evaluate", "--checkpoint", str(checkpoints / "last.pt"), "--split", "val", "--num-workers", "0"]
    _train_ultimate(two, *evaluate, "--output", str(tmp_path / "two.json"))
    _train_ultimate(job_environment(), *evaluate, "--device", "cpu", "--output", str(tmp_path / "one.json"))
    one, two_processes = _per_image(tmp_path / "one.json"), _per_image(tmp_path / "two.json")
    assert len(one) == 5  # the 20 % of 24 training images held out for validation
    assert sorted(two_processes) == sorted(one)  # every image scored, none twice, none missing
    for name, metrics in one.items():
        assert two_processes[name] == pytest.approx(metrics, abs=PER_IMAGE_TOLERANCE), name

    single = json.loads((tmp_path / "one.json").read_text())["metrics"]
    assert json.loads((tmp_path / "two.json").read_text())["metrics"] == pytest.approx(single, abs=SUMMARY_TOLERANCE)
    # The validation the training ranks ran on their shards, against one process scoring the same weights.
    assert history[0]["val"] == pytest.approx(single, abs=SUMMARY_TOLERANCE)
