"""test_multi_gpu.py, run as users run it: exit 2 with an explanation without a GPU, 0 with --allow-cpu."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(*argv: str) -> subprocess.CompletedProcess:
    # An empty CUDA_VISIBLE_DEVICES hides every GPU, so the no-GPU path is tested on any machine.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "test_multi_gpu.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_without_gpu_exits_2_with_an_explanation():
    result = run_script()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "No GPU found: torch cannot see a CUDA device" in result.stdout
    assert "CUDA_VISIBLE_DEVICES='': an empty value hides every GPU." in result.stdout
    assert result.stdout.rstrip().endswith("Result: no GPU found (exit code 2)")


@pytest.mark.distributed
def test_allow_cpu_passes_and_prints_json():
    result = run_script("--allow-cpu", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses["DataParallel fwd+bwd"] == "PASS"
    assert statuses["DDP all-reduce"] == "PASS"
    assert report["exit_code"] == 0
    assert report["environment"]["cuda_visible_devices"] == ""
