"""Gradient accumulation that skips needless DDP all-reduces, clips after unscaling and survives overflow: a
window of A micro-steps runs its first A - 1 backwards under DDP's ``no_sync()``, each loss divided by A, and
a window cut short by the end of an epoch of ``loader`` steps with the mean over what it has. Use: ``with
acc.micro_step(), ap.autocast(): acc.backward(loss)`` then ``if acc.step(): scheduler.step()``."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .ddp import DistributedModel
from .dropin import layers

__all__ = ["GradientAccumulator"]

logger = logging.getLogger(__name__)


class GradientAccumulator:
    """Steps ``optimizer`` every ``accumulation_steps`` micro-steps of ``model`` (wrapped or not), clipping to
    ``max_grad_norm`` after the ``scaler`` unscales (``last_grad_norm``: the norm before). A non-finite gradient
    skips the step on every rank alike; the last batch of an epoch of ``loader`` ends the window."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, accumulation_steps: int = 1,
                 scaler: torch.amp.GradScaler | None = None, max_grad_norm: float | None = None,
                 loader: Any = None) -> None:
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm!r}")
        self.model, self.optimizer, self.accumulation_steps = model, optimizer, accumulation_steps
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.max_grad_norm, self.loader = max_grad_norm, loader
        self.last_grad_norm: torch.Tensor | None = None
        self._skipped = False
        self._scale_before: float | None = None  # with a scaler, skipping is read lazily (no sync per step)
        self._micro_steps = 0
        self._ddp = next((layer for layer in layers(model)  # maybe under torch.compile
                          if isinstance(layer, (DistributedModel, DistributedDataParallel))), None)

    @property
    def last_step_skipped(self) -> bool:
        """Whether the latest boundary left the parameters unchanged because a gradient was inf/NaN."""
        if self._scale_before is not None and self.scaler is not None:
            # GradScaler.update() lowers the scale exactly when it skipped the step; reading it here rather
            # than in step() keeps the host from waiting for the optimizer kernels every step.
            return self.scaler.get_scale() < self._scale_before
        return self._skipped

    @property
    def sync_gradients(self) -> bool:
        """True when the current micro-step ends a window (its backward all-reduces, step() steps)."""
        end_of_epoch = self.loader is not None and getattr(self.loader, "batches_remaining", None) == 0
        return self._micro_steps + 1 >= self.accumulation_steps or end_of_epoch

    @contextmanager
    def micro_step(self) -> Iterator[None]:
        """Wraps one forward and backward; suppresses the DDP all-reduce unless the window ends here."""
        with self._ddp.no_sync() if self._ddp is not None and not self.sync_gradients else nullcontext():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagates ``loss / accumulation_steps`` (scaled by the scaler when there is one)."""
        loss = loss / self.accumulation_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> bool:
        """End a micro-step; at a window's end unscale, clip, step (or skip a non-finite step), zero the grads.
        True at a window's end, when a per-step scheduler should advance."""
        if not self.sync_gradients:
            self._micro_steps += 1
            return False
        window, self._micro_steps = self._micro_steps + 1, 0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        parameters = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in parameters]
        if window < self.accumulation_steps and grads:  # cut short by the epoch's end: the mean over what it has
            torch._foreach_mul_(grads, self.accumulation_steps / window)
        self.last_grad_norm = None
        if self.max_grad_norm is not None:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)
        elif self.scaler is None and grads:  # the norm alone, to skip a non-finite step (a scaler checks itself):
            norms = torch._foreach_norm(grads)  # clip_grad_norm_'s, without its pass that rescales the gradients
            self.last_grad_norm = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
        self._scale_before = None
        if self.scaler is not None:
            self._scale_before = self.scaler.get_scale()  # scaler.step() syncs on its inf check anyway
            self.scaler.step(self.optimizer)  # skips the update when unscale_ found inf/NaN
            self.scaler.update()
        elif self.last_grad_norm is not None and not torch.isfinite(self.last_grad_norm):
            self._skipped = True
            logger.warning("gradient norm is %s: optimizer step skipped", self.last_grad_norm.item())
        else:
            self.optimizer.step()
            self._skipped = False
        self.optimizer.zero_grad(set_to_none=True)
        return True
