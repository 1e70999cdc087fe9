"""The PyTorch DDP tutorial's pattern, with ``ap.wrap``: ``mp.spawn``, a process group the script makes
itself (no RANK/WORLD_SIZE in the environment), then one epoch. Run as plain ``python``; the parent
prints one ``RESULT {json}`` line: each rank's mode, weights checksum and the samples it saw.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import autoparallel as ap

WORLD_SIZE = 2


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 10, generator=generator)
    return TensorDataset(inputs, torch.arange(32))


def train(model: nn.Module, runtime=None) -> tuple[list[int], float]:
    loader = ap.loader(dataset(), batch_size=8, num_workers=0, seed=0, runtime=runtime)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for inputs, indices in loader:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), inputs[:, :5]).backward()
        optimizer.step()
        seen += indices.tolist()
    return seen, float(sum(p.detach().double().sum() for p in ap.unwrap(model).parameters()))


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 5))


def demo_basic(rank: int, world_size: int, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = sys.argv[1]
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(100 + rank)  # the tutorial seeds nothing alike; the wrapper must sync the weights
    model = ap.wrap(nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 5)))
    rt = ap.runtime()
    seen, weights = train(model)
    queue.put({"rank": rank, "mode": rt.mode, "world_size": rt.world_size, "is_main": rt.is_main,
               "seen": seen, "weights": weights})
    dist.destroy_process_group()


def main() -> None:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(demo_basic, args=(WORLD_SIZE, queue), nprocs=WORLD_SIZE, join=True)
    results = sorted((queue.get() for _ in range(WORLD_SIZE)), key=lambda r: r["rank"])
    print("RESULT " + json.dumps({"ranks": results}), flush=True)


if __name__ == "__main__":
    main()
