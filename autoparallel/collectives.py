"""Gathers and reductions for metrics and coordination, the same in every mode: ``all_gather`` and ``all_reduce``
take tensors, Python numbers (floats as float64, ints as int64) and dicts, lists and tuples of them, and return the
same structure of detached tensors on the input's device (in one process, over that process: shapes and types match
those under DDP)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import group

__all__ = ["all_gather", "all_reduce", "barrier", "broadcast_object"]

_REDUCE_OPS = ("sum", "mean", "max", "min")
_MAX_DIMS = 8  # shapes travel as a fixed-length int64 row: [ndim, dtype, dim0, dim1, ...], padded with -1
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def _tree(value: Any, leaf: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``leaf`` applied to every tensor and number in it, containers kept."""
    if isinstance(value, Mapping):
        return {key: _tree(item, leaf) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_tree(item, leaf) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, torch.Tensor):
        return leaf(value)
    if isinstance(value, (bool, int, float)):  # a bool stays bool, an int is int64
        return leaf(torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else None))
    raise TypeError(f"all_gather/all_reduce take tensors, Python numbers, and dicts, lists or tuples of them; "
                    f"got {type(value).__name__}: use broadcast_object for other objects")


def _reduce_tensor(tensor: torch.Tensor, op: str) -> torch.Tensor:
    work = tensor.detach()
    if op == "mean" and not (work.is_floating_point() or work.is_complex()):
        work = work.double()
    if not group.is_distributed():
        return work.clone()
    work = work.to(group.comm_device(), copy=True)
    with group.explained("all_reduce"):
        dist.all_reduce(work, op=getattr(dist.ReduceOp, "SUM" if op == "mean" else op.upper()))
    if op == "mean":
        work /= group.world_size()  # ReduceOp.AVG exists only on nccl
    return work.to(tensor.device)


def all_reduce(value: Any, op: str = "sum") -> Any:
    """Reduces element-wise over all ranks (``"sum"``, ``"mean"``, ``"max"``, ``"min"``); every rank gets the
    result. The input is not modified; ``"mean"`` of integers is float64."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce(op={op!r}) is not supported: use one of {', '.join(_REDUCE_OPS)}")
    return _tree(value, lambda tensor: _reduce_tensor(tensor, op))


def _gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    work = tensor.detach().reshape(1) if tensor.dim() == 0 else tensor.detach()
    if not group.is_distributed():
        return work
    if work.dim() > _MAX_DIMS or work.dtype not in _DTYPES:
        raise ValueError(f"all_gather takes tensors of at most {_MAX_DIMS} dimensions with a dtype among "
                         f"{', '.join(str(d) for d in _DTYPES)}; got shape {tuple(work.shape)}, {work.dtype}")
    device, world_size = group.comm_device(), group.world_size()
    padding = [-1] * (_MAX_DIMS - work.dim())
    row = torch.tensor([work.dim(), _DTYPES.index(work.dtype), *work.shape, *padding], device=device)
    rows = [torch.empty_like(row) for _ in range(world_size)]
    with group.explained("all_gather"):
        dist.all_gather(rows, row)
    rows = [r.tolist() for r in rows]
    for rank, other in enumerate(rows):  # the same error on every rank, not a hang
        if other[:2] + other[3:] != rows[0][:2] + rows[0][3:]:
            shapes = [(tuple(r[2:2 + r[0]]), str(_DTYPES[r[1]])) for r in rows]
            raise ValueError(f"all_gather needs the same dtype and the same sizes after dimension 0 on every "
                             f"rank; rank 0 and rank {rank} differ: (shape, dtype) per rank = {shapes}")
    sizes = [r[2] for r in rows]
    padded = torch.zeros((max(sizes), *work.shape[1:]), dtype=work.dtype, device=device)
    padded[: work.shape[0]] = work.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    with group.explained("all_gather"):
        dist.all_gather(gathered, padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)]).to(tensor.device)


def all_gather(value: Any) -> Any:
    """Concatenates every rank's tensors along dimension 0 (whose size may differ), in rank order: after a loop
    over ``loader(train=False)`` the rows are in dataset order. A 0-dim tensor or a number is one row."""
    return _tree(value, _gather_tensor)


def barrier() -> None:
    """Waits until every rank reaches this point; returns at once outside DDP."""
    if not group.is_distributed():
        return
    with group.explained("barrier"):  # nccl needs this rank's GPU named, or it may guess GPU 0
        dist.barrier(device_ids=[torch.cuda.current_device()] if group.current().backend == "nccl" else None)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled, for small objects such as a run name); call on every rank."""
    if not group.is_distributed():
        return obj
    holder = [obj]
    with group.explained("broadcast_object"):
        dist.broadcast_object_list(holder, src=src)
    return holder[0]
