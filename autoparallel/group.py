"""The one reader of ``torch.distributed``'s process-group state; every other module asks here.

Whoever made the default group (our :func:`autoparallel.runtime`, torchrun + the user, ``mp.spawn`` and
``init_process_group`` as in the PyTorch DDP tutorial, Accelerate), these answers describe it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """Rank, size and backend of the default process group."""

    rank: int
    world_size: int
    backend: str


def current() -> Group | None:
    """The default process group, or None when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return Group(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def is_distributed() -> bool:
    """A process group with more than one rank exists: collectives must be called on every rank."""
    group = current()
    return group is not None and group.world_size > 1


def rank() -> int:
    """This process's rank, 0 without a process group."""
    group = current()
    return 0 if group is None else group.rank


def world_size() -> int:
    """The number of processes, 1 without a process group."""
    group = current()
    return 1 if group is None else group.world_size


def comm_device() -> torch.device:
    """Where tensors must be for the default group's collectives: this rank's GPU for nccl, else the CPU."""
    group = current()
    if group is not None and group.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
