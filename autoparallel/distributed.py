"""Collectives for metrics and coordination that are a no-op outside DDP.

Evaluation code calls the same four functions in every mode: in one process they return their input
unchanged, under DDP they talk to the other ranks through ``torch.distributed``. They act on the process
group that exists (``torch.distributed.is_initialized()``), not on a configuration, so a script started
by any launcher gets the right behaviour.

Tensors may live on any device: they are moved to the device the backend needs (CUDA for nccl, CPU for
gloo) and the result comes back on the input's device. Results are detached: these are for metrics and
bookkeeping, not for gradients.
"""
from __future__ import annotations

from typing import Any, Union

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_reduce", "barrier", "broadcast_object", "is_distributed"]

Number = Union[int, float, bool]

_REDUCE_OPS = ("sum", "mean", "max", "min")
# Shapes travel as a fixed-length int64 row so every rank sends the same number of bytes:
# [ndim, dtype code, dim0, dim1, ...] padded with -1.
_MAX_DIMS = 8
_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """The device tensors must be on for the default group's backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor | Number, op: str = "sum") -> torch.Tensor:
    """Reduces ``tensor`` element-wise over all ranks and returns the result on every rank.

    The input is not modified (``torch.distributed.all_reduce`` works in place; this returns a new
    tensor). ``"mean"`` is a sum divided by the world size, because ``ReduceOp.AVG`` exists only on
    nccl; integer tensors therefore come back as floating point for ``"mean"``.

    Args:
        tensor: a tensor, or a Python number (becomes a 0-dim tensor).
        op: ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``.

    Returns:
        The reduced tensor, on the input's device. Outside DDP the input itself (as a tensor).
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce(op={op!r}) is not supported: use one of {', '.join(_REDUCE_OPS)}")
    tensor = torch.as_tensor(tensor)
    if not is_distributed():
        return tensor
    work = tensor.detach().to(_comm_device(), copy=True)
    if op == "mean" and not (work.is_floating_point() or work.is_complex()):
        work = work.double()
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                 "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(work, op=reduce_op)
    if op == "mean":
        work /= dist.get_world_size()
    return work.to(tensor.device)


def _shape_row(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather supports tensors with at most {_MAX_DIMS} dimensions, got shape "
                         f"{tuple(tensor.shape)}: flatten the trailing dimensions first")
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"all_gather does not support dtype {tensor.dtype}: convert to one of "
                         f"{', '.join(str(d) for d in _DTYPES)}")
    row = torch.full((_MAX_DIMS + 2,), -1, dtype=torch.int64)
    row[0] = tensor.dim()
    row[1] = _DTYPES.index(tensor.dtype)
    row[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return row


def _check_compatible(rows: list[torch.Tensor]) -> None:
    """Raises the same error on every rank when the gathered shapes cannot be concatenated."""
    reference = rows[0]
    for rank, row in enumerate(rows):
        same_kind = int(row[0]) == int(reference[0]) and int(row[1]) == int(reference[1])
        if not same_kind or not torch.equal(row[3:], reference[3:]):
            shapes = [(tuple(r[2:2 + int(r[0])].tolist()), str(_DTYPES[int(r[1])])) for r in rows]
            raise ValueError(f"all_gather needs the same dtype and the same sizes after dimension 0 on every "
                             f"rank; rank 0 and rank {rank} differ: (shape, dtype) per rank = {shapes}")


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates ``tensor`` from every rank along dimension 0, in rank order.

    The first dimension may differ between ranks (the evaluation sampler gives some ranks one sample
    more than others): sizes are gathered first, each rank pads to the largest, and the padding is
    trimmed before concatenation. With the contiguous evaluation shards of ``autoparallel.loader`` the
    result is in dataset order. A 0-dim tensor counts as one row.

    Returns:
        The concatenation, on the input's device. Outside DDP the input itself.
    """
    if not is_distributed():
        return tensor
    device = _comm_device()
    work = tensor.detach()
    if work.dim() == 0:
        work = work.reshape(1)
    world_size = dist.get_world_size()

    row = _shape_row(work).to(device)
    rows = [torch.empty_like(row) for _ in range(world_size)]
    dist.all_gather(rows, row)
    rows = [r.cpu() for r in rows]
    _check_compatible(rows)
    sizes = [int(r[2]) for r in rows]

    largest = max(sizes)
    padded = torch.zeros((largest, *work.shape[1:]), dtype=work.dtype, device=device)
    padded[: work.shape[0]] = work.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    pieces = [part[:size] for part, size in zip(gathered, sizes)]
    return torch.cat(pieces, dim=0).to(tensor.device)


def barrier() -> None:
    """Waits until every rank reaches this point; returns at once outside DDP."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        # Naming the device avoids nccl guessing GPU 0 for a rank that drives another GPU.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Returns rank ``src``'s ``obj`` on every rank (pickled, for small objects such as a run name).

    Every rank must call it; the value passed on other ranks is ignored. Outside DDP returns ``obj``.
    """
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
