"""Exponential moving average of ``unwrap(model)``'s weights, so no wrapper changes its keys or its values.
:meth:`EMA.update` communicates with nobody: it may run on every rank or on the main process only (timm's idiom)."""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from . import statedict
from .dropin import canonical, structure_generation, unwrap

logger = logging.getLogger(__name__)

_WARMUP_POWER = 2.0 / 3.0
_HALF = (torch.float16, torch.bfloat16)


class EMA:
    """Exponential moving average of the parameters and buffers of ``unwrap(model)``; evaluate with :attr:`module`, an
    eval-mode copy. :meth:`update` moves its floating-point tensors by ``(1 - decay) * (model - ema)`` and copies
    integer buffers. ``decay=0.999`` averages over about 1000 steps; ``warmup`` grows the decay with the updates (timm's
    ModelEmaV3 power form), so the initial weights fade fast. ``device=None`` follows the model; ``"cpu"`` saves GPU
    memory at the cost of a host copy per update."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True,
                 device: torch.device | str | None = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.device = None if device is None else torch.device(device)
        self._source = unwrap(model)
        self.module: nn.Module = copy.deepcopy(self._source)
        self.module._apply(lambda t: t.float() if t.dtype in _HALF else t)  # a half-precision lerp rounds to nothing
        self.module.eval().requires_grad_(False).zero_grad(set_to_none=True)
        if self.device is not None:
            self.module.to(self.device)
        self.num_updates = 0
        self._listed_for: tuple[int, Any, Any] | None = None
        self._averages, self._sources, self._counters, self._counted, self._cast = [], [], [], [], None

    def current_decay(self) -> float:
        """The decay of the next update: ``min(decay, 1 - (1 + t) ** -2/3)`` after ``t`` updates with warm-up."""
        return min(self.decay, 1.0 - (1.0 + self.num_updates) ** -_WARMUP_POWER) if self.warmup else self.decay

    def _listing(self) -> tuple[int, Any, Any]:
        first = self._sources[0] if self._sources else None  # .to()/.half() replace buffers without a hook
        return structure_generation(), getattr(first, "device", None), getattr(first, "dtype", None)

    def _list_tensors(self) -> None:
        """List the averages, the tensors they follow and the integer buffers; again when the model changes or moves."""
        if self._listed_for == self._listing():
            return
        source = [*self._source.parameters(), *self._source.buffers()]
        if self.device is None and source and next(self.module.parameters(), source[0]).device != source[0].device:
            self.module.to(source[0].device)  # the model moved after the EMA was made: follow it
        average = [*self.module.parameters(), *self.module.buffers()]
        if len(average) != len(source):
            raise RuntimeError(f"the model now has {len(source)} parameters and buffers, its EMA {len(average)}: "
                               "create the EMA after the model's structure is final")
        floats = [(a, s) for a, s in zip(average, source) if a.is_floating_point()]
        self._averages, self._sources = [a for a, _ in floats], [s for _, s in floats]
        counters = [(a, s) for a, s in zip(average, source) if not a.is_floating_point()]
        self._counters, self._counted = [a for a, _ in counters], [s for _, s in counters]
        cast = any(a.dtype != s.dtype or a.device != s.device for a, s in floats)
        to_float = all(a.dtype == torch.float32 and a.device == s.device for a, s in floats)
        self._cast = ("float" if to_float else "to") if cast else None  # .float(): the cheapest cast, no-op on fp32
        self._listed_for = self._listing()

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the model; call once per optimizer step (no communication)."""
        self._list_tensors()
        sources = self._sources
        if self._cast == "float":
            sources = [s.float() for s in sources]
        elif self._cast:
            sources = [s.to(device=a.device, dtype=a.dtype) for a, s in zip(self._averages, sources)]
        if self._averages:
            torch._foreach_lerp_(self._averages, sources, 1.0 - self.current_decay())
        if self._counters:
            torch._foreach_copy_(self._counters, self._counted)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"module": weights with clean keys, "step": number of updates}``."""
        return {"module": self.module.state_dict(), "step": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load :meth:`state_dict` output, an AveragedModel state or a bare state dict (warm-up then counted done)."""
        prepare_load(self, state, path="EMA state", strict=strict)()

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


def prepare_load(ema: EMA | nn.Module, state: Any, *, path: Any, strict: bool,
                 model_state: Mapping[str, Any] | None = None) -> Callable[[], None]:
    """Validate an EMA state (:meth:`EMA.state_dict`, an AveragedModel's, bare weights) for an :class:`EMA` or a plain
    module and return what loads it, so a caller can check everything before loading anything. Buffers the weights
    lack come from ``model_state``; ``state=None`` restarts the EMA from ``model_state``."""
    weights, step = model_state if state is None else state, None
    if isinstance(weights, Mapping) and isinstance(weights.get("module"), Mapping) and "step" in weights:
        weights, step = weights["module"], int(weights["step"])
    elif isinstance(weights, Mapping) and "n_averaged" in weights:
        weights, step = {k: v for k, v in weights.items() if k != "n_averaged"}, int(weights["n_averaged"])
    target = ema.module if isinstance(ema, EMA) else ema
    if isinstance(weights, Mapping) and model_state is not None:  # EMA weights saved without buffers take the model's
        have = {canonical(key) for key in weights}
        model_state = {canonical(key): value for key, value in model_state.items()}
        weights = {**weights, **{name: model_state[canonical(name)] for name, _ in target.named_buffers()
                                 if canonical(name) not in have and canonical(name) in model_state}}
    matched = statedict.prepare(target, weights, what="EMA", path=path, strict=strict, logger=logger)
    if step is None:  # restarted from the model: no update yet; weights without a count: the warm-up is over
        step = 0 if state is None or not isinstance(ema, EMA) else ema.steps_to_full_decay()

    def load() -> None:  # checked above, so what strict=False left out is not reported twice
        target.load_state_dict(matched, strict=False)
        if isinstance(ema, EMA):
            ema.num_updates = step

    return load
