"""Exponential moving average of a model's weights, kept on the unwrapped module.

The EMA copies ``unwrap(model)``, so DataParallel, DDP and ``torch.compile`` add nothing to its keys
and the average is the same whatever the model is wrapped in, or when it was wrapped.

Under DDP the parameters are identical on every rank, but BatchNorm's running statistics are not: DDP
broadcasts rank 0's buffers at the start of each forward, then every rank updates them from its own
shard. Averaged as they are, the EMA's buffers would drift apart across ranks and each rank would
evaluate its shard with other statistics. :meth:`EMA.update` therefore broadcasts the EMA's floating
buffers from rank 0 (one flattened broadcast per update), so every rank holds rank 0's EMA, which is
also what a checkpoint saves.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ._state import canonical, distributed
from .checkpoint import _prepare_module
from .wrap import unwrap

logger = logging.getLogger("autoparallel")

_WARMUP_POWER = 2.0 / 3.0


class EMA:
    """Exponential moving average of the parameters and buffers of ``unwrap(model)``.

    After each optimizer step, :meth:`update` moves every floating-point tensor of :attr:`module`
    towards the model's (``ema += (1 - decay) * (model - ema)``); integer buffers such as BatchNorm's
    ``num_batches_tracked`` are copied. Frozen parameters are tracked too: they simply do not move.
    Evaluate with :attr:`module`, which stays in eval mode with ``requires_grad=False``.

    Args:
        model: the model, wrapped or not.
        decay: the long-run decay; 0.999 averages over roughly the last 1000 steps.
        warmup: start with a small decay that grows with the number of updates, so the average is not
            dominated by the random initial weights in short runs.
        device: where the EMA lives. ``None`` follows the model, even when it is moved after the EMA
            was created. ``"cpu"`` saves GPU memory but costs a device-to-host copy of every parameter
            and buffer on every update (one blocking copy per tensor), which can cost more than the
            optimizer step itself: use it only when the GPU memory is really needed.

    Attributes:
        num_updates: how many times :meth:`update` ran (saved as ``"step"`` in :meth:`state_dict`);
            it drives the warm-up.

    Under DDP, call :meth:`update` on every rank: it broadcasts the EMA's floating buffers from rank 0.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True,
                 device: torch.device | str | None = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.device = None if device is None else torch.device(device)
        self._source = unwrap(model)
        self.module: nn.Module = copy.deepcopy(self._source)
        self.module.eval().requires_grad_(False)
        for param in self.module.parameters():
            param.grad = None
        if self.device is not None:
            self.module.to(self.device)
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses.

        With warm-up it is ``min(decay, 1 - (1 + t) ** -2/3)`` after ``t`` updates (:attr:`num_updates`):
        the power form of timm's ModelEmaV3 warm-up (``get_decay``, power 2/3, gamma 1). The first update
        therefore copies the model, and the decay reaches 0.999 after about 31 600 updates.
        """
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + self.num_updates) ** -_WARMUP_POWER)

    def _tensors(self, module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the model; call once per optimizer step, on every rank."""
        source = self._tensors(self._source)
        average = self._tensors(self.module)
        if self.device is None and source and average and average[0].device != source[0].device:
            self.module.to(source[0].device)  # the model was moved after the EMA was made: follow it
            average = self._tensors(self.module)
        if len(average) != len(source):
            raise RuntimeError(f"the model now has {len(source)} parameters and buffers, its EMA {len(average)}: "
                               "create the EMA after the model's structure is final")
        weight = 1.0 - self.current_decay()
        float_average, float_source = [], []
        for mine, theirs in zip(average, source):
            if theirs.device != mine.device or theirs.dtype != mine.dtype:  # .to() is a no-op then, but not free
                theirs = theirs.to(device=mine.device, dtype=mine.dtype)
            if mine.is_floating_point():
                float_average.append(mine)
                float_source.append(theirs)
            else:
                mine.copy_(theirs)
        if float_average:
            torch._foreach_lerp_(float_average, float_source, weight)
        self._broadcast_buffers()
        self.num_updates += 1

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's floating EMA buffers (BatchNorm statistics differ per rank under DDP)."""
        if not distributed() or dist.get_world_size() < 2:
            return
        buffers = [buffer for buffer in self.module.buffers() if buffer.is_floating_point()]
        if not buffers:
            return
        flat = _flatten_dense_tensors(buffers)
        if dist.get_backend() == "nccl" and flat.device.type != "cuda":  # an EMA kept on the CPU under NCCL
            flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(flat, src=0)
        for buffer, synced in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
            buffer.copy_(synced)

    def state_dict(self) -> dict[str, Any]:
        """``{"module": weights with clean keys, "step": number of updates}``."""
        return {"module": self.module.state_dict(), "step": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output, or a plain (possibly prefixed) state dict of EMA weights."""
        self._apply_load(self._prepare_load(state, path="EMA state", strict=True))

    def _steps_to_full_decay(self) -> int:
        if not self.warmup or self.decay >= 1.0:
            return 0
        steps = max(0, math.floor((1.0 - self.decay) ** (-1.0 / _WARMUP_POWER) - 1.0))
        while 1.0 - (1.0 + steps) ** -_WARMUP_POWER < self.decay:  # settle float rounding of the inverse
            steps += 1
        return steps

    def _prepare_load(self, state: Any, *, fallback: Mapping[str, Any] | None = None, path: Any = "EMA state",
                      strict: bool = True, restart: bool = False) -> tuple[dict[str, Any], int]:
        """Validate ``state`` and return what :meth:`_apply_load` needs, loading nothing yet."""
        if isinstance(state, Mapping) and isinstance(state.get("module"), Mapping) and "step" in state:
            weights, step = state["module"], int(state["step"])
        else:  # a bare state dict (timm, upstream CamoXpert): the history length is unknown
            weights, step = state, None
        if isinstance(weights, Mapping) and fallback is not None:
            # Upstream CamoXpert kept only parameters; take missing buffers from the checkpoint's model.
            present = {canonical(key) for key in weights}
            by_canon = {canonical(key): value for key, value in fallback.items()}
            buffers = [name for name, _ in self.module.named_buffers() if canonical(name) not in present]
            weights = {**weights, **{name: by_canon[canonical(name)] for name in buffers
                                     if canonical(name) in by_canon}}
        matched = _prepare_module(self.module, weights, what="EMA", path=path, strict=strict)
        if restart:
            step = 0
        elif step is None:
            step = self._steps_to_full_decay()
            logger.info("%s: EMA weights without an update count; warm-up treated as finished (step %d)", path, step)
        return matched, step

    def _apply_load(self, prepared: tuple[dict[str, Any], int]) -> None:
        matched, step = prepared
        self.module.load_state_dict(matched, strict=False)
        self.num_updates = step

    def __repr__(self) -> str:
        return (f"EMA(decay={self.decay}, warmup={self.warmup}, num_updates={self.num_updates}, "
                f"module={type(self.module).__name__})")
