"""autoparallel: make an existing PyTorch training script use every GPU, with one line.

    import autoparallel as ap
    model = ap.wrap(model)      # right device; DataParallel on >=2 GPUs; DDP under a launcher

Everything a script needs is exported here; the submodules are implementation detail.
"""
from __future__ import annotations

from .accumulate import GradientAccumulator, effective_batch_size, scale_lr
from .checkpoint import CheckpointKeeper, load_checkpoint, save_checkpoint
from .data import loader
from .distributed import all_gather, all_reduce, barrier, broadcast_object
from .ema import EMA
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UntrustedCheckpointError,
    UsageError,
)
from .launch import launch, requested_processes
from .output import banner, print, print_banner, progress
from .precision import autocast, grad_scaler
from .runtime import Hardware, Runtime, detect_runtime, is_main_process, probe_hardware, runtime
from .wrap import unwrap, wrap

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "CheckpointError",
    "CheckpointKeeper",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "GradientAccumulator",
    "Hardware",
    "Runtime",
    "UntrustedCheckpointError",
    "UsageError",
    "all_gather",
    "all_reduce",
    "autocast",
    "banner",
    "barrier",
    "broadcast_object",
    "detect_runtime",
    "effective_batch_size",
    "grad_scaler",
    "is_main_process",
    "launch",
    "load_checkpoint",
    "loader",
    "print",
    "print_banner",
    "probe_hardware",
    "progress",
    "requested_processes",
    "runtime",
    "save_checkpoint",
    "scale_lr",
    "unwrap",
    "wrap",
]
