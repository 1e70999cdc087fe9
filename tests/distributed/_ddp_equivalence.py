"""Worker for test_ddp.py::test_ddp_matches_single_process (run by torchrun, 2 processes, gloo).

Trains the same model with the same seed and global batch twice: as this DDP job, and inside each
rank as one plain process over the whole global batch. Prints one RESULT line (rank 0) as JSON.
"""
from __future__ import annotations

import json

import torch
from _emit import emit  # this folder is sys.path[0] for a script
from torch import nn
from torch.utils.data import TensorDataset

import autoparallel as ap

GLOBAL_BATCH = 8
ACCUMULATION = 2
OPTIMIZER_STEPS = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def make_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(GLOBAL_BATCH * ACCUMULATION * OPTIMIZER_STEPS + 5, 6, generator=generator)
    return TensorDataset(inputs, inputs.sum(dim=1, keepdim=True).sin())


def checksum(tensors) -> torch.Tensor:
    return torch.stack([t.detach().double().sum() for t in tensors]).sum().reshape(1)


def train(model: nn.Module, rt: ap.Runtime, probe: bool) -> dict:
    data = ap.loader(make_dataset(), GLOBAL_BATCH, seed=3, num_workers=0, runtime=rt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    accumulator = ap.GradientAccumulator(model, optimizer, accumulation_steps=ACCUMULATION, max_grad_norm=0.5)
    probes: dict = {"per_process_batch": data.batch_size, "batches_per_epoch": len(data)}
    steps = 0
    while steps < OPTIMIZER_STEPS:
        for micro, (inputs, targets) in enumerate(data):
            with accumulator.micro_step():
                loss = nn.functional.mse_loss(model(inputs), targets)
                accumulator.backward(loss)
            if probe and micro in (0, 1):
                grads = [p.grad for p in model.parameters()]
                probes[f"grad_checksums_micro{micro}"] = ap.all_gather(checksum(grads)).tolist()
            if accumulator.step():
                steps += 1
                if steps == OPTIMIZER_STEPS:
                    break
    return probes


def main() -> None:
    rt = ap.runtime()
    ddp_model = ap.wrap(make_model(), runtime=rt)
    probes = train(ddp_model, rt, probe=True)
    ddp_params = [p.detach().clone() for p in ap.unwrap(ddp_model).parameters()]

    single_model = make_model()
    train(single_model, ap.Runtime(mode="cpu", device=torch.device("cpu"), device_ids=()), probe=False)
    difference = max((a - b).abs().max().item() for a, b in zip(ddp_params, single_model.parameters()))
    initial = make_model()
    moved = max((a - b).abs().max().item() for a, b in zip(ddp_params, initial.parameters()))
    result = {
        "mode": rt.mode, "world_size": rt.world_size, "wrapper": type(ddp_model).__name__,
        "max_difference_to_single_process": difference, "max_change_from_init": moved,
        "param_checksums_per_rank": ap.all_gather(checksum(ddp_params)).tolist(), **probes,
    }
    if rt.is_main:
        emit("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
