"""The idioms of existing DDP scripts, with ``ap.wrap`` added, give the one-process result or fail at once.

Each test runs ``_examples_style.py --case NAME`` under torchrun as 2 gloo processes (and some also as
plain ``python``) and asserts what the script's author would check: every sample once, the same weights
on every rank, a checkpoint that loads, a clear error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "distributed"))
from _ddp_jobs import job_environment, run_job  # noqa: E402

pytestmark = pytest.mark.distributed
SCRIPT = HERE / "_examples_style.py"


def run_case(case: str, *extra: str, nproc: int = 2) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = (launcher if nproc > 1 else [sys.executable]) + [str(SCRIPT), "--case", case, *extra]
    status, output = run_job(command, job_environment())
    assert status == 0, output[-4000:]
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, output[-4000:]
    return json.loads(lines[0][len("RESULT "):])


def test_a_rank_zero_only_batch_and_set_epoch_keep_every_epoch_whole_and_resumable():
    result = run_case("loader-epochs")
    assert result["world_size"] == 2
    assert result["epochs_cover_all"] == [True, True, True]  # 16 samples, each once per epoch over both ranks
    assert result["resumed_equals_epoch_2"] is True  # sampler.set_epoch(2) gives epoch 2's order
    assert result["explicit_equals_automatic"] is True
    assert result["orders_differ_between_epochs"] is True


def test_evaluation_without_no_grad_on_uneven_shards_finishes_with_every_sample_once():
    result = run_case("eval-without-no-grad")
    assert result["labels"] == list(range(7))  # gathered once at the end: dataset order
    # Float tolerance: two ranks of 3-4 rows against one batch of 7 (summation order); measured ~1e-7.
    assert result["max_difference"] < 1e-5


def test_per_batch_gathers_on_uneven_shards_count_every_sample_once():
    result = run_case("gather-per-batch")
    assert result["labels"] == list(range(7))
    assert result["predictions"] == 7
    # Dicts, lists and Python numbers gather the same way in every mode; floats stay float64.
    assert result["mixed"] == {"count": [4, 3], "loss": [0.5, 0.5], "loss_dtype": "torch.float64",
                               "parts": [[1.0, 1.0], [2.0, 2.0]]}
    assert result["reduced"] == 8.0


def test_the_same_gathers_in_one_process_return_the_same_structure():
    result = run_case("gather-per-batch", nproc=1)
    assert result["labels"] == list(range(7))
    assert result["mixed"] == {"count": [7], "loss": [0.5], "loss_dtype": "torch.float64",
                               "parts": [[1.0], [2.0]]}
    assert result["reduced"] == 4.0


def test_ema_updated_on_the_main_process_only_neither_hangs_nor_breaks_the_checkpoint(tmp_path):
    result = run_case("ema-on-main-only", "--directory", str(tmp_path))
    assert result["ema_updates"] == 4  # 16 samples / global batch 4
    assert result["ema_differs_from_model"] is True
    first, second = result["model_checksums"]
    assert first == second  # exact: DDP gives every rank the same weights


def test_a_head_replaced_after_wrapping_is_synchronised():
    result = run_case("head-replaced")
    first, second = result["head_checksums"]
    assert first == second  # exact: every rank steps the same all-reduced gradient from rank 0's weights
    assert result["model_checksums"][0] == result["model_checksums"][1]


def test_wrapping_the_wrapped_model_in_ddp_again_fails_at_once_with_the_fix():
    result = run_case("double-ddp")
    assert result["error"] is not None
    assert "already distributed by autoparallel.wrap" in result["error"]
    assert "remove the DistributedDataParallel" in result["error"]


def test_reentrant_activation_checkpointing_trains_like_one_process():
    result = run_case("reentrant-checkpoint")
    assert result["body_trained"] is True  # the checkpointed segment gets gradients
    first, second = result["model_checksums"]
    assert first == second
    # Float tolerance across process counts (each rank sums half the batch); a missing all-reduce or a
    # skipped parameter moves the checksum by > 1e-2.
    assert first == pytest.approx(result["single_process"], abs=1e-4)


def test_a_nan_loss_on_one_rank_skips_that_step_on_every_rank_and_training_goes_on():
    result = run_case("nan-loss-on-one-rank")
    assert result["skipped"] == [1.0, 1.0]  # both ranks skipped the first step: the NaN was all-reduced
    assert result["unchanged_by_nan"] == [1.0, 1.0]
    assert result["later_steps_skipped"] == [0.0, 0.0]
    assert result["finite"] is True
    checksums = result["model_checksums"]
    assert checksums[0] == checksums[1]  # the same weights: DDP all-reduced identical gradients
