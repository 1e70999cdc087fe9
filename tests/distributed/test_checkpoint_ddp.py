"""Checkpoints across process counts: 1 process -> 2 DDP ranks (gloo) -> 1 process, with per-rank RNG."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from autoparallel import EMA, load_checkpoint, save_checkpoint

WORKER = Path(__file__).with_name("_ckpt_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_checkpoints_move_between_one_process_and_two_ddp_ranks(tmp_path):
    save_checkpoint(tmp_path / "plain.pt", model=_net(0))
    port = str(_free_port())
    processes = []
    for rank in range(2):
        env = {key: value for key, value in os.environ.items() if not key.startswith(("AUTOPARALLEL_", "SLURM_"))}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", GROUP_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   AUTOPARALLEL_TIMEOUT="60", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                         env.get("PYTHONPATH")])))
        processes.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=90)[0])
    finally:
        for process in processes:
            process.kill()
    report = "\n".join(f"--- rank {rank} (exit {p.returncode}):\n{out}" for rank, (p, out) in
                       enumerate(zip(processes, outputs)))
    assert [p.returncode for p in processes] == [0, 0], report
    assert "rank 0 ok" in outputs[0], report
    assert "rank 1 ok" in outputs[1], report

    # 2 processes -> 1: the DDP checkpoint loads into a plain model, a DataParallel one and an EMA
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    for wrap in (lambda net: net, nn.DataParallel):
        net = _net(7)
        ema = EMA(net)
        info = load_checkpoint(tmp_path / "ddp.pt", model=wrap(net), ema=ema)
        assert (info["epoch"], info["step"]) == (0, 3)
        for key, value in reference["model"].items():
            assert torch.equal(net.state_dict()[key], value), key
        for key, value in reference["ema"].items():
            assert torch.equal(ema.module.state_dict()[key], value), key
    assert len(torch.load(tmp_path / "ddp.pt", weights_only=True)["rng"]) == 2  # one state per rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder.pt", "ddp.pt", "plain.pt", "reference.pt"]
