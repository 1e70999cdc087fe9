"""autoparallel: make an existing PyTorch training script use every GPU, with one line.

    import autoparallel as ap
    model = ap.wrap(model)      # right device; DataParallel on >=2 GPUs; DDP under a launcher

Everything a script needs is exported here. Beyond it, ``autoparallel.check`` is the diagnostics command,
``autoparallel.detect`` the pure detection behind :func:`detect_runtime`, and
``autoparallel.dataparallel.merge_outputs`` the rule by which DataParallel merges what ``forward`` returns.
"""
from __future__ import annotations

from .accumulate import GradientAccumulator
from .checkpoint import CheckpointKeeper, load_checkpoint, read_checkpoint, save_checkpoint
from .collectives import all_gather, all_reduce, barrier, broadcast_object
from .data import loader
from .detect import Hardware, Runtime, detect_runtime
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
from .output import print, print_banner, progress
from .precision import autocast, grad_scaler
from .runtime import is_main_process, runtime
from .stop import EXIT_RESUMABLE, StopRequest, parse_duration
from .wrap import unwrap, wrap

__version__ = "0.2.0"

__all__ = [
    "EMA", "EXIT_RESUMABLE", "CheckpointError", "CheckpointKeeper", "CheckpointMismatchError",
    "CheckpointNotFoundError", "CorruptCheckpointError", "GradientAccumulator", "Hardware", "Runtime", "StopRequest",
    "UntrustedCheckpointError", "UsageError", "all_gather", "all_reduce", "autocast", "barrier", "broadcast_object",
    "detect_runtime", "grad_scaler", "is_main_process", "launch", "load_checkpoint", "loader", "parse_duration",
    "print", "print_banner", "progress", "read_checkpoint", "requested_processes", "runtime", "save_checkpoint",
    "unwrap", "wrap",
]
