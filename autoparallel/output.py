"""Rank-zero output: print, progress bars and a one-time banner, shown once per job rather than per process.
The library logs to ``logging.getLogger("autoparallel")`` with no handler (not even a ``NullHandler``): until the
application configures logging, Python's last-resort handler prints its warnings ("bf16 asked for on a Tesla T4: using
fp16") to stderr, which a zero-config user needs to see."""
from __future__ import annotations

import builtins
from collections.abc import Iterable
from itertools import groupby
from typing import Any

from tqdm import tqdm

from .detect import Runtime
from .runtime import is_main_process
from .runtime import runtime as current_runtime

_banner_printed = False  # print_banner() prints once per process


def print(*args: Any, **kwargs: Any) -> None:
    """``print`` on the main process only; other ranks stay silent. Never patches ``builtins.print``."""
    if is_main_process():
        builtins.print(*args, **kwargs)


def progress(iterable: Iterable[Any] | None = None, **tqdm_kwargs: Any) -> tqdm:
    """A tqdm progress bar that shows on the main process only (its ``disable`` still applies there, ``None`` too)."""
    disable = tqdm_kwargs.pop("disable", False)
    return tqdm(iterable, disable=disable if is_main_process() else True, **tqdm_kwargs)


def _environment(rt: Runtime) -> str:
    if rt.mode != "ddp":
        return {"cpu": "NO (CPU)", "single": "NO (single GPU)", "dp": "MULTI_GPU (DataParallel)"}[rt.mode]
    on_gpu = rt.device.type == "cuda"
    multi_node = rt.node_rank > 0 or (on_gpu and rt.world_size > max(rt.num_gpus, 1))
    kind = "MULTI_NODE" if multi_node else "MULTI_GPU" if on_gpu else "MULTI_CPU"
    return f"{kind} (DistributedDataParallel)"


def banner(runtime: Runtime | None = None) -> str:
    """One line describing the runtime in the words Accelerate users know, such as ``Distributed environment:
    MULTI_GPU (DataParallel) | Number of processes: 1 | Number of GPUs: 2 | Tesla T4 x2, 15.0 GiB | ...``."""
    rt = runtime if runtime is not None else current_runtime()
    parts = [f"Distributed environment: {_environment(rt)}", f"Number of processes: {rt.num_processes}"]
    if rt.is_distributed:
        parts += [f"Process index: {rt.rank}", f"Local process index: {rt.local_rank}"]
    parts.append(f"Number of GPUs: {rt.num_gpus}")
    if rt.gpu_names:  # "Tesla T4 x2, 15.0 GiB"; different GPUs one group after another, joined by " + "
        groups = [(gpu, len(list(same))) for gpu, same in groupby(zip(rt.gpu_names, rt.gpu_memory_gib))]
        parts.append(" + ".join(f"{name}{f' x{n}' if n > 1 else ''}, {memory:.1f} GiB"
                                for (name, memory), n in groups))
    if rt.is_distributed:
        parts.append(f"Backend: {rt.backend}")
    parts.append(f"mixed precision: {'no' if rt.precision == 'fp32' else rt.precision}")
    return " | ".join(parts)


def print_banner(runtime: Runtime | None = None) -> None:
    """Print :func:`banner` once per process, on the main process only; later calls do nothing."""
    global _banner_printed
    if not _banner_printed:
        rt = runtime if runtime is not None else current_runtime()
        _banner_printed = True
        if rt.is_main:
            builtins.print(banner(rt), flush=True)
