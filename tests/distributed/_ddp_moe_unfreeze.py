"""Worker for test_ddp.py::test_topk_moe_with_frozen_backbone_and_unfreezing (torchrun, 2 processes).

A top-1 Mixture-of-Experts after a frozen backbone trains under DDP with gradient accumulation and no
flags; after UNFREEZE_AFTER optimizer steps every rank unfreezes the backbone, which the wrapper must
notice. Prints one RESULT line (rank 0) as JSON.
"""
from __future__ import annotations

import json

import torch
from _emit import emit  # this folder is sys.path[0] for a script
from torch import nn
from torch.utils.data import TensorDataset

import autoparallel as ap

NUM_EXPERTS = 4
OPTIMIZER_STEPS = 6
UNFREEZE_AFTER = 3


class TopOneMoE(nn.Module):
    """Each sample goes to its highest-scoring expert; experts without samples are not run at all."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.router = nn.Linear(8, NUM_EXPERTS)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(NUM_EXPERTS))
        self.head = nn.Linear(8, 1)
        self.register_buffer("expert_use", torch.zeros(NUM_EXPERTS))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = torch.tanh(self.backbone(inputs))
        gates = self.router(features).softmax(dim=1)
        weight, choice = gates.max(dim=1)
        mixed = torch.zeros_like(features)
        for index, expert in enumerate(self.experts):
            routed = choice == index
            if routed.any():
                mixed = mixed.index_put((routed.nonzero().squeeze(1),),
                                        weight[routed, None] * expert(features[routed]))
        self.expert_use = torch.bincount(choice, minlength=NUM_EXPERTS).float()
        return self.head(mixed)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in ap.unwrap(model).parameters()])


def main() -> None:
    rt = ap.runtime()
    torch.manual_seed(0)
    plain = TopOneMoE()
    plain.backbone.requires_grad_(False)
    initial_backbone = plain.backbone.weight.detach().clone()
    model = ap.wrap(plain, runtime=rt)
    inputs = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    data = ap.loader(TensorDataset(inputs, inputs[:, :1].cos()), 8, seed=1, num_workers=0, runtime=rt)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    accumulator = ap.GradientAccumulator(model, optimizer, accumulation_steps=2)

    steps, idle_expert_steps, backbone_moved_while_frozen = 0, 0, False
    while steps < OPTIMIZER_STEPS:
        for batch_inputs, targets in data:
            with accumulator.micro_step():
                loss = nn.functional.mse_loss(model(batch_inputs), targets)
                accumulator.backward(loss)
            idle_expert_steps += int((ap.unwrap(model).expert_use == 0).any())
            if accumulator.step():
                steps += 1
                if steps <= UNFREEZE_AFTER:
                    backbone_moved_while_frozen |= not torch.equal(plain.backbone.weight, initial_backbone)
                if steps == UNFREEZE_AFTER:
                    model.backbone.requires_grad_(True)  # same step on every rank, through the wrapper
                if steps == OPTIMIZER_STEPS:
                    break

    params = ap.all_gather(flat_parameters(model).reshape(1, -1))
    result = {
        "rank_parameter_difference": (params[0] - params[1]).abs().max().item(),
        "backbone_moved_while_frozen": backbone_moved_while_frozen,
        "backbone_change_after_unfreeze": (plain.backbone.weight - initial_backbone).abs().max().item(),
        "micro_steps_with_an_idle_expert": ap.all_gather(torch.tensor([idle_expert_steps])).tolist(),
    }
    if rt.is_main:
        emit("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
