"""The banner on a GPU names the GPU, how many and the precision; print_banner prints it once."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoparallel as ap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu import REPO, subprocess_environment  # noqa: E402

pytestmark = pytest.mark.gpu


def expected_precision() -> str:
    return "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"


def test_banner_names_the_gpu_and_the_precision() -> None:
    runtime = ap.detect_runtime(env={}, hardware=ap.Hardware.probe())
    from autoparallel.output import banner

    text = banner(runtime)
    count = torch.cuda.device_count()
    assert torch.cuda.get_device_name(0) in text
    assert f"Number of GPUs: {count}" in text
    assert f"mixed precision: {expected_precision()}" in text
    assert ("MULTI_GPU (DataParallel)" if count > 1 else "NO (single GPU)") in text


def test_print_banner_prints_one_line_once_in_a_fresh_process() -> None:
    code = "import autoparallel as ap; ap.print_banner(); ap.print_banner()"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_environment(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert torch.cuda.get_device_name(0) in lines[0]
    assert lines[0].endswith(f"mixed precision: {expected_precision()}")
