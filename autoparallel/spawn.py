"""``ap.launch(fn)``: run a function as a DDP job from a notebook cell (or any Python), return rank 0's result. The
processes are forked from this one, so a function defined in a cell needs no file; a rank that raises ends the job
and its traceback is raised here. Forking needs CUDA untouched here (a forked child cannot re-initialise it), which
is checked before anything starts.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import socket
from typing import Any, Callable

import torch

from . import group
from .errors import UsageError

logger = logging.getLogger(__name__)


def _cuda_driver_initialised() -> bool:
    """Whether this process has initialised the CUDA driver (``torch.cuda.is_available()`` does): before
    ``cuInit`` every driver call but a few answers CUDA_ERROR_NOT_INITIALIZED, and asking changes nothing."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int()
    return driver.cuDeviceGetCount(ctypes.byref(count)) == 0


def _worker(index: int, fn: Callable[..., Any], args: tuple, kwargs: dict, count: int, port: int, results: Any) -> None:
    from .runtime import _destroy_process_group, reset_runtime, runtime

    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(count), LOCAL_WORLD_SIZE=str(count),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), AUTOPARALLEL_LAUNCHED="1")
    reset_runtime()  # whatever the parent detected describes the parent
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // count))
    try:
        runtime()  # joins the process group
        result = fn(*args, **kwargs)
        if index == 0:
            results.put(result)
    finally:
        _destroy_process_group()  # multiprocessing children skip atexit hooks


def run(fn: Callable[..., Any], args: tuple, kwargs: dict, count: int) -> Any:
    """Run ``fn`` in ``count`` processes joined by a process group; return rank 0's return value."""
    if group.current() is not None:
        raise UsageError("ap.launch(fn) was called inside a distributed job (a process group exists): call fn "
                         "directly there, or call ap.launch(fn) from the parent process")
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork" and torch.cuda.device_count() and (torch.cuda.is_initialized() or _cuda_driver_initialised()):
        raise UsageError("CUDA is already initialised in this process (an earlier cell used the GPU or called "
                         "torch.cuda.is_available()), and processes forked from it cannot use CUDA. Restart the kernel "
                         "and call ap.launch(fn) before anything touches the GPU: build the model and data inside fn "
                         "(ap.runtime() is safe; so is torch.cuda.is_available() with PYTORCH_NVML_BASED_CUDA_CHECK=1)")
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = multiprocessing.get_context(method).SimpleQueue()
    logger.info("starting %d processes (%s) for %s", count, method, getattr(fn, "__name__", fn))
    torch.multiprocessing.start_processes(_worker, args=(fn, args, kwargs, count, port, results), nprocs=count,
                                          join=True, start_method=method)
    return results.get() if not results.empty() else None
