"""Gradient accumulation that skips needless DDP all-reduces, clips after unscaling, survives overflow.

A training loop with ``accumulation_steps = A`` runs A micro-steps per optimizer step::

    accumulator = GradientAccumulator(model, optimizer, accumulation_steps=A, scaler=scaler, max_grad_norm=1.0)
    for images, masks in train_loader:
        with accumulator.micro_step():
            with autocast():
                loss = criterion(model(images), masks)
            accumulator.backward(loss)
        if accumulator.step():
            scheduler.step()

Under DDP the first A - 1 micro-steps of each window run inside the model's ``no_sync()``: gradients
accumulate locally and only the last backward all-reduces them. Dividing each loss by A makes the
accumulated gradient the mean over the ``global_batch x A`` samples, which is what
:func:`effective_batch_size` reports.

The micro-step counter runs on across epochs: when an epoch's number of batches does not divide by A,
its last micro-steps join the first optimizer step of the next epoch (their gradients are never
stepped with only some ranks synchronised).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .ddp import DistributedModel

__all__ = ["GradientAccumulator", "effective_batch_size", "scale_lr"]

logger = logging.getLogger(__name__)


def _find_ddp(model: nn.Module) -> nn.Module | None:
    """The DDP wrapper under ``torch.compile``'s ``_orig_mod`` layers, or None."""
    seen = 0
    while seen < 8:
        if isinstance(model, (DistributedModel, DistributedDataParallel)):
            return model
        inner = model.__dict__.get("_modules", {}).get("_orig_mod")
        if inner is None:
            return None
        model, seen = inner, seen + 1
    return None


class GradientAccumulator:
    """Runs micro-steps and steps the optimizer every ``accumulation_steps`` of them.

    Args:
        model: the wrapped model (``no_sync`` is used when it is DDP; anything else accumulates
            plainly).
        optimizer: stepped on boundaries.
        accumulation_steps: micro-steps per optimizer step.
        scaler: a ``torch.amp.GradScaler`` for fp16 (``autoparallel.grad_scaler()``); a disabled scaler
            is the same as none.
        max_grad_norm: clip the global gradient norm of the optimizer's parameters to this, after
            unscaling; None disables clipping.

    Attributes:
        last_grad_norm: the gradient norm before clipping at the latest optimizer step (None without
            clipping). Non-finite on an overflow step.
        last_step_skipped: the latest boundary did not update the parameters because a gradient was
            inf/NaN (fp16 overflow, detected by the scaler; or a non-finite norm when clipping without a
            scaler). Training goes on; the scaler lowers its scale.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, accumulation_steps: int = 1,
                 scaler: torch.amp.GradScaler | None = None, max_grad_norm: float | None = None) -> None:
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm!r}")
        self.model = model
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: torch.Tensor | None = None
        self._skipped = False
        self._scale_before: float | None = None  # with a scaler, skipping is read lazily (no sync per step)
        self._micro_steps = 0  # micro-steps done in the current window
        self._ddp = _find_ddp(model)

    @property
    def last_step_skipped(self) -> bool:
        """Whether the latest boundary left the parameters unchanged because a gradient was inf/NaN."""
        if self._scale_before is not None and self.scaler is not None:
            # GradScaler.update() lowers the scale exactly when the step was skipped; reading it here
            # rather than in step() keeps the host from waiting for the optimizer kernels every step.
            return self.scaler.get_scale() < self._scale_before
        return self._skipped

    @property
    def sync_gradients(self) -> bool:
        """True when the coming micro-step ends a window (its backward all-reduces, step() steps)."""
        return self._micro_steps + 1 >= self.accumulation_steps

    @contextmanager
    def micro_step(self) -> Iterator[None]:
        """Wraps one forward and backward; suppresses the DDP all-reduce unless the window ends here."""
        context: Any = nullcontext()
        if self._ddp is not None and not self.sync_gradients:
            context = self._ddp.no_sync()
        with context:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagates ``loss / accumulation_steps`` (scaled by the scaler when there is one)."""
        loss = loss / self.accumulation_steps
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def step(self) -> bool:
        """Ends a micro-step; on a window boundary unscales, clips, steps, updates the scaler and zeroes grads.

        Returns:
            True when this call was a boundary (the optimizer was stepped or the step was skipped on
            overflow), so a per-step scheduler should advance.
        """
        self._micro_steps += 1
        if self._micro_steps < self.accumulation_steps:
            return False
        self._micro_steps = 0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.last_grad_norm = None
        if self.max_grad_norm is not None:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self._parameters(), self.max_grad_norm)
        self._scale_before = None
        if self.scaler is not None:
            # scaler.step() syncs on its found-inf check anyway, so reading the scale here costs nothing.
            self._scale_before = self.scaler.get_scale()
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


def effective_batch_size(global_batch: int, accumulation_steps: int) -> int:
    """Samples behind one optimizer step: the global micro-batch times the accumulation steps.

    ``global_batch`` is already summed over processes (``loader().global_batch_size``), so the number of
    GPUs does not appear again, which is the mistake of printing ``batch x n_gpu x accumulation``
    for a batch that DataParallel already splits.
    """
    for name, value in (("global_batch", global_batch), ("accumulation_steps", accumulation_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"effective_batch_size needs a positive int {name}, got {value!r}")
    return global_batch * accumulation_steps


def scale_lr(base_lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling rule: ``base_lr`` was tuned for ``base_batch``; return the LR for ``global_batch``.

    Opt-in (nothing calls it for you): the rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD")
    suits large SGD batches; for small batches and AdamW it often is not needed, so try the base LR
    first. Pass the effective batch (:func:`effective_batch_size`) when accumulating.
    """
    if not base_batch > 0 or not global_batch > 0:
        raise ValueError(f"scale_lr needs positive batch sizes, got global_batch={global_batch!r}, "
                         f"base_batch={base_batch!r}")
    return base_lr * global_batch / base_batch
