"""Worker for test_ddp.py::test_ddp_options_given_to_wrap_change_what_ddp_does (torchrun, 2 processes).

Each rank trains one step on its own data through a model with BatchNorm, once with the default options and
once with ``broadcast_buffers=False``: the default gives every rank rank 0's running statistics, the option
leaves each rank its own. Both keep the parameters equal across ranks (the gradients are all-reduced).
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist
from _emit import emit  # this folder is sys.path[0] for a script
from torch import nn

import autoparallel as ap


def one_step(rt: ap.Runtime, **options) -> dict:
    torch.manual_seed(0)
    model = ap.wrap(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)), runtime=rt, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.randn(6, 4, generator=torch.Generator().manual_seed(10 + rt.rank))  # each rank its own data
    model(inputs).square().mean().backward()
    optimizer.step()
    state = ap.unwrap(model).state_dict()
    mean = state["1.running_mean"].clone()
    weights = torch.cat([state["0.weight"].reshape(-1), state["2.weight"].reshape(-1)])
    gathered = [torch.empty_like(mean) for _ in range(rt.world_size)]
    dist.all_gather(gathered, mean)
    weight_list = [torch.empty_like(weights) for _ in range(rt.world_size)]
    dist.all_gather(weight_list, weights)
    return {"running_means_equal": torch.equal(gathered[0], gathered[1]),
            "weights_equal": torch.equal(weight_list[0], weight_list[1])}


class UnusedHead(nn.Module):
    """A model one of whose parameters never takes part in the loss (a head left for later)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.unused = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.body(inputs)


def steps_with_an_unused_parameter(rt: ap.Runtime, unfreeze_after: int | None = None, **options) -> str:
    """'trained', or the error of the step DDP refused: the default finds the unused parameter itself. With
    ``unfreeze_after``, the unused head is frozen for that many steps first (every trainable parameter used)."""
    torch.manual_seed(0)
    net = UnusedHead()
    net.unused.requires_grad_(unfreeze_after is None)
    model = ap.wrap(net, runtime=rt, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        for step in range(4):
            if step == unfreeze_after:
                net.unused.requires_grad_(True)
            optimizer.zero_grad()
            model(torch.randn(4, 4)).square().mean().backward()
            optimizer.step()
    except Exception as error:  # the same on both ranks, raised before the step's collectives
        return f"{type(error).__name__}: {error}"
    return "trained"


def main() -> None:
    rt = ap.runtime()
    result = {"default": one_step(rt), "broadcast_buffers=False": one_step(rt, broadcast_buffers=False),
              "unused, default": steps_with_an_unused_parameter(rt),
              "unused, find_unused_parameters=False": steps_with_an_unused_parameter(rt, find_unused_parameters=False),
              "unused head unfrozen later, default": steps_with_an_unused_parameter(rt, unfreeze_after=2)}
    if rt.is_main:
        emit("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
