"""``runtime()``: this process's :class:`Runtime`, detected once per process and process group. Under a launcher
the first call joins the process group (nccl on GPUs, gloo on the CPU, ``env://`` rendezvous,
``AUTOPARALLEL_TIMEOUT``) and registers its destruction at exit.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
from collections.abc import Mapping, MutableMapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from . import group
from .detect import Hardware, Runtime, detect_runtime, int_var, slurm_master_addr
from .errors import UsageError

logger = logging.getLogger(__name__)

_cache: dict[tuple[int, group.Group | None], Runtime] = {}
_warned_nproc = False


def distributed_env_defaults(rt: Runtime, env: Mapping[str, str]) -> dict[str, str]:
    """The ``env://`` rendezvous variables missing from ``env`` (SLURM sets none of them)."""
    master_addr = slurm_master_addr(env) if rt.launcher == "slurm" else env.get("MASTER_ADDR")
    if not master_addr:
        if rt.world_size > 1:
            raise UsageError(f"{rt.launcher} started {rt.world_size} processes but MASTER_ADDR is not set: export "
                             "MASTER_ADDR (rank 0's host name) and MASTER_PORT, or use torchrun")
        master_addr = "127.0.0.1"
    job_id = int_var(env, "SLURM_JOB_ID")
    # A port derived from the job id keeps two SLURM jobs sharing a node from colliding on 29500.
    port = 29500 if job_id is None or rt.launcher != "slurm" else 10000 + job_id % 20000
    wanted = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(port), "RANK": str(rt.rank),
              "WORLD_SIZE": str(rt.world_size), "LOCAL_RANK": str(rt.local_rank)}
    return {key: value for key, value in wanted.items() if not env.get(key)}


def process_group_timeout(env: Mapping[str, str]) -> timedelta:
    """``AUTOPARALLEL_TIMEOUT`` seconds (default 1800): how long a collective waits for a slow rank."""
    value = env.get("AUTOPARALLEL_TIMEOUT", "").strip()
    try:
        seconds = float(value) if value else 1800
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):  # also refuses nan, which passes a `<= 0` test
        raise UsageError(f"AUTOPARALLEL_TIMEOUT={value!r} is not a positive number of seconds, e.g. 1800")
    return timedelta(seconds=seconds)


def _destroy_process_group() -> None:
    if group.current() is not None:
        # DDP reducers left in reference cycles hold the group and its threads; destroying the group
        # before them sometimes aborted the process ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def _join_process_group(rt: Runtime, environ: MutableMapping[str, str]) -> None:
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed, which DDP needs: install a standard torch wheel")
    environ.update(distributed_env_defaults(rt, environ))
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    added = group.debug_environment(environ) if rt.backend == "nccl" else {}
    if added:
        environ.update(added)
        os.makedirs(os.path.dirname(group.TRACE_PREFIX), exist_ok=True)
        logger.info("NCCL flight recorder on: a timeout dumps each rank's trace to %s<rank>", group.TRACE_PREFIX)
    with group.explained(f"joining the process group at {environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"):
        dist.init_process_group(backend=rt.backend, init_method="env://", timeout=process_group_timeout(environ))
    atexit.register(_destroy_process_group)
    logger.info("joined process group: rank %d of %d, backend %s", rt.rank, rt.world_size, rt.backend)


def runtime(strategy: str | None = None, devices: str | Sequence[int] | None = None,
            precision: str | None = None) -> Runtime:
    """Where this process runs. ``strategy`` (``auto``, ``cpu``, ``single``, ``dp``, ``ddp``), ``devices`` (``"0,1"``)
    and ``precision`` (``auto``, ``fp32``, ``fp16``, ``bf16``) override ``AUTOPARALLEL_STRATEGY``, ``_DEVICES`` and
    ``_PRECISION`` and re-detect, replacing the cached answer."""
    global _warned_nproc
    existing = group.current()
    key = (os.getpid(), existing)
    if key in _cache and strategy is None and devices is None and precision is None:
        return _cache[key]
    detected = detect_runtime(strategy, devices, precision, env=os.environ, hardware=Hardware.probe(),
                              group=existing)
    if detected.mode == "ddp" and existing is None:
        _join_process_group(detected, os.environ)
        key = (os.getpid(), group.current())
    nproc = os.environ.get("AUTOPARALLEL_NPROC", "").strip()
    if nproc not in ("", "1") and not (_warned_nproc or detected.is_distributed):  # 1 asks for this one process
        _warned_nproc = True
        logger.warning("AUTOPARALLEL_NPROC=%s is set but this script did not start its processes: call ap.launch() at "
                       "the top of the script (or ap.launch(fn) in a notebook). Running one process", nproc)
    _cache.clear()
    _cache[key] = detected
    logger.debug("detected %s", detected)
    return detected


def reset_runtime() -> None:
    """Forget the cached runtime so the next runtime() call detects again (tests, notebook workers)."""
    _cache.clear()


def is_main_process() -> bool:
    """Whether this process is rank 0, without detecting or initialising anything (safe anywhere)."""
    existing = group.current()
    if existing is not None:
        return existing.rank == 0
    cached = _cache.get((os.getpid(), None))
    if cached is not None:
        return cached.is_main
    rank = int_var(os.environ, "RANK")
    if rank is None and int_var(os.environ, "SLURM_STEP_NUM_TASKS"):
        rank = int_var(os.environ, "SLURM_PROCID")
    return not rank
