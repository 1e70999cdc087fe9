"""Helpers of the gpu tests: the device parametrization, runtimes built without the caller's environment, the
bf16 capability check and a subprocess environment."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import autoparallel as ap

REPO = Path(__file__).resolve().parents[2]

# Only the CUDA variant is marked: tests/gpu/conftest.py skips it without a GPU, the CPU variant runs everywhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def device_runtime(device: str, precision: str = "auto") -> ap.Runtime:
    """The runtime of one process on `device` (cuda: GPU 0), detected from the hardware alone: neither
    AUTOPARALLEL_* variables nor a launcher's can change what a test runs, and the process's cached
    runtime() is left alone."""
    if device == "cpu":
        return ap.detect_runtime(strategy="cpu", precision=precision, env={}, hardware=ap.Hardware())
    return ap.detect_runtime(strategy="single", devices="0", precision=precision, env={},
                             hardware=ap.Hardware.probe())


def require_bf16() -> None:
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 0):
        pytest.skip(f"bf16 needs compute capability 8.0 or newer; {torch.cuda.get_device_name(0)} has {major}.{minor}")


def subprocess_environment(**extra: str) -> dict[str, str]:
    """This environment without autoparallel or launcher settings, with the repository importable."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AUTOPARALLEL_", "TORCHELASTIC_"))
           and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env
