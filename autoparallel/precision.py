"""Mixed precision for the runtime: the autocast to enter and the GradScaler, so a loop reads the same in every mode.
The choice (bf16 on Ampere or newer, fp16 below, fp32 on the CPU) is made once by ``runtime()``."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from .detect import Runtime
from .runtime import runtime as current_runtime


def autocast(runtime: Runtime | None = None) -> AbstractContextManager:
    """The autocast context for the runtime's precision; a no-op for fp32, and on the CPU for fp16 (which
    would need a GradScaler). bf16 on the CPU, slower than fp32 on most CPUs, runs only when asked for."""
    rt = runtime if runtime is not None else current_runtime()
    if rt.precision == "fp32" or (rt.device.type == "cpu" and rt.precision == "fp16"):
        return nullcontext()
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype)


def grad_scaler(runtime: Runtime | None = None, **scaler_kwargs: Any) -> torch.amp.GradScaler:
    """A GradScaler (``scaler_kwargs`` go to ``torch.amp.GradScaler``), enabled only for fp16 on CUDA: a
    disabled one passes losses and steps through and still saves its state, so every precision reads alike."""
    rt = runtime if runtime is not None else current_runtime()
    enabled = rt.precision == "fp16" and rt.device.type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=enabled, **scaler_kwargs)
