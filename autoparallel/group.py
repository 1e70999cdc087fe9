"""The one reader of ``torch.distributed``'s process-group state, whoever made the default group (our
:func:`autoparallel.runtime`, torchrun, ``mp.spawn`` and ``init_process_group``, Accelerate).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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
    return world_size() > 1


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


class CollectiveTimeout(RuntimeError):
    """A collective waited past the process group's timeout: some rank never reached it."""


TRACE_PREFIX = os.path.join(tempfile.gettempdir(), "autoparallel-nccl-trace", "rank_")


def debug_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings, where not already set, under which a hang leaves ``<TRACE_PREFIX><rank>`` files from
    torch's NCCL flight recorder (for ``torchfrtrace``); under both names torch has used for each."""
    wanted = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_FR_BUFFER_SIZE": "2000",
              "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": TRACE_PREFIX,
              "TORCH_FR_DUMP_TEMP_FILE": TRACE_PREFIX}
    return {key: value for key, value in wanted.items() if not environ.get(key)}


@contextmanager
def explained(operation: str) -> Iterator[None]:
    """Re-raise a collective's timeout as :class:`CollectiveTimeout` naming this rank, the operation and the fixes."""
    try:
        yield
    except Exception as error:
        text = str(error).lower()
        if isinstance(error, CollectiveTimeout) or ("timed out" not in text and "timeout" not in text):
            raise
        where = current()
        rank = (f"rank {where.rank} of {where.world_size}" if where else
                f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}")
        trace = (f"; the NCCL flight recorder dumps its trace to {TRACE_PREFIX}<rank>"
                 if where is not None and where.backend == "nccl" else "")
        raise CollectiveTimeout(
            f"{rank}: {operation} timed out (AUTOPARALLEL_TIMEOUT, default 1800 s): another rank never reached it. "
            "It may have failed (see its output), be stuck, or have taken another path: a different number of "
            "batches or steps, or a collective under `if rank == 0`. Try: AUTOPARALLEL_TIMEOUT=<seconds> to wait "
            f"longer, TORCH_DISTRIBUTED_DEBUG=DETAIL to compare the ranks' collectives{trace}. ({error})"[:2000]
        ) from error
