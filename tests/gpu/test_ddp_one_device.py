"""DDP as 2 processes on one device with gloo: on one GPU (CUDA tensors; NCCL refuses two ranks on a GPU),
and the same worker on the CPU so that its logic is exercised everywhere."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoparallel as ap

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _ddp_one_device_worker import OPTIMIZER_STEPS, Net  # noqa: E402
from _gpu import DEVICES, REPO, subprocess_environment  # noqa: E402

TIMEOUT_S = 180  # about 10 s on an idle machine; the limit turns a hang into a failure


def run_ranks(device: str, tmp_path: Path) -> list[str]:
    env = subprocess_environment(OMP_NUM_THREADS="1", **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}))
    command = [sys.executable, str(HERE / "_ddp_one_device_worker.py"), "--device", device,
               "--init-file", str(tmp_path / "rendezvous"), "--out", str(tmp_path)]
    processes = [subprocess.Popen([*command, "--rank", str(rank)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True) for rank in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"2 gloo ranks on {device} did not finish in {TIMEOUT_S} s (a hang)")
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} exited with {process.returncode}:\n{output[-3000:]}"
    return outputs


@pytest.mark.distributed
@pytest.mark.parametrize("device", DEVICES)
def test_ddp_two_gloo_ranks_on_one_device_keep_identical_weights(device: str, tmp_path: Path) -> None:
    run_ranks(device, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    expected_device = "cuda:0" if device == "cuda" else "cpu"
    assert (result["device"], result["ema_device"], result["backend"]) == (expected_device, expected_device, "gloo")
    assert result["world_size"] == 2
    assert result["steps"] == OPTIMIZER_STEPS
    assert result["changed"] > 0
    # DDP all-reduces the gradients, so both ranks apply the same update to the same weights: bit for bit.
    assert result["max_parameter_difference"] == 0.0
    # EMA parameters follow identical weights; its BatchNorm buffers are broadcast from rank 0 every update.
    assert result["max_ema_difference"] == 0.0

    # The checkpoint rank 0 wrote from CUDA tensors loads into a model on the CPU, identical.
    model, expected = Net(), torch.load(tmp_path / "expected.pt")
    ema = ap.EMA(model)
    info = ap.load_checkpoint(tmp_path / "ddp.pt", model=model, ema=ema)
    assert info["step"] == OPTIMIZER_STEPS
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu"
        assert torch.equal(tensor, expected["model"][name]), name
    for name, tensor in ema.module.state_dict().items():
        assert torch.equal(tensor, expected["ema"][name]), name
