"""Exponential moving average of a model's weights, kept on the unwrapped module.

The EMA copies ``unwrap(model)``, so DataParallel, DDP and ``torch.compile`` add nothing to its keys and
the average is the same whatever the model is wrapped in. :meth:`EMA.update` is local to the process: it
may run on every rank or on the main process only (timm's idiom). Under our DDP wrapper every rank's
weights and buffers are identical after each step, so every rank's EMA is too. The average of a
half-precision model is kept in fp32: a bf16 or fp16 lerp by ``1 - decay`` rounds to no change at all.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import statedict
from .dropin import structure_generation, unwrap

logger = logging.getLogger(__name__)

_WARMUP_POWER = 2.0 / 3.0
_HALF = (torch.float16, torch.bfloat16)


@dataclass
class _Lists:
    """The tensors one update touches, listed once; ``device`` is where the model was when listed."""

    generation: int
    averages: list[torch.Tensor]
    sources: list[torch.Tensor]
    counters: list[tuple[torch.Tensor, torch.Tensor]]
    cast: bool
    device: torch.device | None = field(init=False)

    def __post_init__(self) -> None:
        self.device = self.where()

    def where(self) -> torch.device | None:
        return self.sources[0].device if self.sources else None


class EMA:
    """Exponential moving average of the parameters and buffers of ``unwrap(model)``.

    After each optimizer step, :meth:`update` moves every floating-point tensor of :attr:`module` towards
    the model's (``ema += (1 - decay) * (model - ema)``); integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied. Evaluate with :attr:`module` (eval mode, ``requires_grad=False``).

    Args:
        model: the model, wrapped or not.
        decay: the long-run decay; 0.999 averages over roughly the last 1000 steps.
        warmup: start with a small decay that grows with the number of updates (timm's ModelEmaV3 power
            form), so short runs are not dominated by the random initial weights.
        device: where the EMA lives; ``None`` follows the model, even when it moves. ``"cpu"`` saves GPU
            memory at the cost of a copy of every tensor to the host on every update.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True,
                 device: torch.device | str | None = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.device = None if device is None else torch.device(device)
        self._source = unwrap(model)
        self.module: nn.Module = copy.deepcopy(self._source)
        self.module._apply(lambda t: t.float() if t.dtype in _HALF else t)
        self.module.eval().requires_grad_(False)
        for param in self.module.parameters():
            param.grad = None
        if self.device is not None:
            self.module.to(self.device)
        self.num_updates = 0
        self._lists: _Lists | None = None

    def current_decay(self) -> float:
        """The decay of the next update: ``min(decay, 1 - (1 + t) ** -2/3)`` after ``t`` updates with warm-up."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + self.num_updates) ** -_WARMUP_POWER)

    def _tensor_lists(self) -> _Lists:
        """Matching lists of the EMA's and the model's tensors, rebuilt only when the model changed or moved."""
        lists = self._lists
        if lists is not None and lists.generation == structure_generation() and lists.where() == lists.device:
            return lists
        source = [*self._source.parameters(), *self._source.buffers()]
        if self.device is None and source and next(self.module.parameters(), source[0]).device != source[0].device:
            self.module.to(source[0].device)  # the model moved after the EMA was made: follow it
        average = [*self.module.parameters(), *self.module.buffers()]
        if len(average) != len(source):
            raise RuntimeError(f"the model now has {len(source)} parameters and buffers, its EMA {len(average)}: "
                               "create the EMA after the model's structure is final")
        pairs = list(zip(average, source))
        floats = [pair for pair in pairs if pair[0].is_floating_point()]
        self._lists = _Lists(structure_generation(), [a for a, _ in floats], [s for _, s in floats],
                             [pair for pair in pairs if not pair[0].is_floating_point()],
                             any(a.dtype != s.dtype or a.device != s.device for a, s in floats))
        return self._lists

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the model; call once per optimizer step (no communication)."""
        lists = self._tensor_lists()
        sources = lists.sources
        if lists.cast:  # a half-precision model, or an EMA kept on another device
            sources = [s.to(device=a.device, dtype=a.dtype) for a, s in zip(lists.averages, sources)]
        if lists.averages:
            torch._foreach_lerp_(lists.averages, sources, 1.0 - self.current_decay())
        for mine, theirs in lists.counters:
            mine.copy_(theirs)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"module": weights with clean keys, "step": number of updates}``."""
        return {"module": self.module.state_dict(), "step": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load :meth:`state_dict` output, torchvision's AveragedModel state, or a bare (prefixed) state dict.

        A bare state dict has no update count: the warm-up counts as finished. Validated before anything
        is loaded (:class:`autoparallel.CheckpointMismatchError` names the keys).
        """
        weights, step = statedict.ema_weights(state)
        matched = statedict.prepare(self.module, weights, what="EMA", path="EMA state", strict=strict, logger=logger)
        self.module.load_state_dict(matched, strict=False)
        self.num_updates = self.steps_to_full_decay() if step is None else step

    def steps_to_full_decay(self) -> int:
        """Updates after which the warm-up has reached ``decay`` (0 without warm-up)."""
        if not self.warmup or self.decay >= 1.0:
            return 0
        steps = max(0, math.floor((1.0 - self.decay) ** (-1.0 / _WARMUP_POWER) - 1.0))
        while 1.0 - (1.0 + steps) ** -_WARMUP_POWER < self.decay:  # settle the float rounding of the inverse
            steps += 1
        return steps

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, warmup={self.warmup}, num_updates={self.num_updates})"
