"""Mixed precision for the runtime: which autocast to enter and whether a GradScaler is needed.

The choice itself (bf16 on Ampere or newer, fp16 below, fp32 on the CPU) is made once by
``runtime()``; these helpers only turn it into torch objects, so a training loop reads the same in
every mode.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from .detect import Runtime
from .runtime import runtime as current_runtime


def autocast(runtime: Runtime | None = None) -> AbstractContextManager:
    """The autocast context for the runtime's precision; a no-op for fp32.

    On CUDA it is ``torch.autocast("cuda", dtype=...)`` for fp16 and bf16. On the CPU it autocasts
    only when bf16 was asked for explicitly (runtime() never picks it on its own there, because CPU
    bf16 is slower than fp32 on most CPUs); fp16 on the CPU stays a no-op, since it would need a
    GradScaler that only exists for GPUs.
    """
    rt = runtime if runtime is not None else current_runtime()
    if rt.precision == "fp32":
        return nullcontext()
    if rt.device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16) if rt.precision == "bf16" else nullcontext()
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype)


def grad_scaler(runtime: Runtime | None = None, **scaler_kwargs: Any) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 on CUDA, so ``scaler.scale(loss)`` can be written unconditionally.

    A disabled scaler passes losses and steps through unchanged, and its state dict still saves and
    loads, so checkpoints look the same in every precision.

    Args:
        runtime: where to run; ``autoparallel.runtime()`` when None.
        **scaler_kwargs: passed to ``torch.amp.GradScaler`` (e.g. ``init_scale=512`` for a model whose
            fp16 activations overflow early).
    """
    rt = runtime if runtime is not None else current_runtime()
    enabled = rt.precision == "fp16" and rt.device.type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=enabled, **scaler_kwargs)
