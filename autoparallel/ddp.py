"""DistributedDataParallel that needs no flags for models whose trainable set and routing change.

``wrap()`` calls :func:`wrap_ddp` under a distributed launcher. The wrapper keeps torch's
``DistributedDataParallel`` for gradient synchronisation and adds what our models need:

* **Unused parameters** (top-k Mixture-of-Experts routes each batch to a few experts; a frozen or
  partly frozen backbone): DDP is built with ``find_unused_parameters=True``. Routing is data
  dependent, so no static choice is right for every step (``static_graph`` assumes the same graph
  every iteration and ``find_unused_parameters=False`` fails at the next step as soon as one expert
  sat idle). The flag costs one traversal of the autograd graph per step: measured on the CPU at
  about 1 to 2.5 microseconds per autograd node (+4 to +9 % on toy MLPs whose layers take
  microseconds), which disappears next to a convolutional network's step on a GPU. DDP prints a
  one-time warning about the flag when a step happens to use every parameter; it is expected.
* **Progressive unfreezing**: DDP registers only the parameters that require grad when it is
  built. Each training forward compares the ``requires_grad`` flags with those DDP was built with
  (one Python loop over the parameter list) and rebuilds DDP when they changed. Rebuilding is a
  collective (DDP broadcasts rank 0's parameters and buffers), so every rank must change
  ``requires_grad`` between the same two steps, which a correct program does anyway: the unfreeze
  plan is a function of the epoch, identical on all ranks.
* **Evaluation without hangs**: forward passes without autograd (``torch.no_grad()``,
  ``torch.inference_mode()``) run the plain module and do no collective, so ranks may evaluate
  different numbers of batches (the uneven shards of the evaluation loader). DDP would broadcast
  buffers in the first such forward, and hang if one rank had no batch. Instead ``model.eval()``
  broadcasts rank 0's buffers (BatchNorm statistics) once after training, so every rank evaluates
  the same model; call it on every rank, as evaluation loops do.

The wrapper looks like the model: attribute reads and writes reach the inner module, ``state_dict()``
has no ``module.`` prefix, and ``.module`` is the plain model.
"""
from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .wrap import DropInWrapper

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["DistributedModel", "wrap_ddp"]

logger = logging.getLogger(__name__)


class DistributedModel(DropInWrapper, nn.Module):
    """Our DDP wrapper: see the module docstring for what it adds to ``DistributedDataParallel``.

    Args:
        module: the plain model, already on its device.
        device_ids: ``[local_rank]`` on a GPU, ``None`` on the CPU (passed to DDP).
    """

    _autoparallel_wrapper = True

    def __init__(self, module: nn.Module, device_ids: list[int] | None = None) -> None:
        super().__init__()
        self.module = module
        # Plain attributes live in __dict__ directly: nn.Module.__setattr__ would register the DDP
        # instance as a child (its parameters twice in named_modules) and our __setattr__ forwards
        # unknown names to the inner model.
        self.__dict__.update(
            _device_ids=device_ids, _ddp=None, _flags=(), _grad_sync=True, _buffers_stale=False,
            _params=list(module.parameters()), _has_buffers=any(True for _ in module.buffers()),
            _forwarding_ready=True,  # from here on, unknown attribute sets go to the inner model
        )
        self._rebuild()

    # -- DDP life cycle -------------------------------------------------------------------------
    def _requires_grad_flags(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in self._params)

    def _rebuild(self) -> None:
        """(Re)creates DDP for the parameters that require grad now; a collective on every rank."""
        if self._ddp is not None:
            # Free the old reducer first: it owns a flat gradient buffer as large as the trainable
            # parameters and autograd hooks that are removed only when it is destroyed.
            self.__dict__["_ddp"] = None
            gc.collect()
        flags = self._requires_grad_flags()
        ddp = None
        if any(flags):  # DDP refuses a module without trainable parameters; nothing to sync then
            ddp = DistributedDataParallel(self.module, device_ids=self._device_ids, find_unused_parameters=True)
            ddp.training = self.training
        self.__dict__.update(_ddp=ddp, _flags=flags)

    def _sync_buffers(self) -> None:
        """Copies rank 0's buffers to every rank: one broadcast per (device, dtype) group."""
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for buffer in self.module.buffers():
            groups.setdefault((buffer.device, buffer.dtype), []).append(buffer)
        with torch.no_grad():
            for buffers in groups.values():
                flat = torch.cat([b.reshape(-1) for b in buffers])
                dist.broadcast(flat, src=0)
                offset = 0
                for b in buffers:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()

    # -- nn.Module behaviour ----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        if self._requires_grad_flags() != self._flags:
            logger.info("trainable parameters changed since DDP was built: rebuilding DistributedDataParallel")
            self._rebuild()
        ddp = self._ddp
        if ddp is None:
            return self.module(*args, **kwargs)
        ddp.require_backward_grad_sync = self._grad_sync
        if self._has_buffers:
            # DDP broadcasts rank 0's buffers before this forward; the forward then updates each
            # rank's copy with its own batch (BatchNorm), so they differ again until the next sync.
            self.__dict__["_buffers_stale"] = True
        return ddp(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulates gradients locally, without all-reduce, for the backward passes inside.

        The flag is kept here and applied at each forward, so it survives a DDP rebuild (an unfreeze
        inside an accumulation window), which ``DistributedDataParallel.no_sync`` would not.
        """
        previous = self._grad_sync
        self.__dict__["_grad_sync"] = False
        try:
            yield
        finally:
            self.__dict__["_grad_sync"] = previous

    def train(self, mode: bool = True) -> DistributedModel:
        super().train(mode)
        if self._ddp is not None:
            self._ddp.training = mode
        if not mode and self._buffers_stale and dist.is_initialized() and dist.get_world_size() > 1:
            self._sync_buffers()
            self.__dict__["_buffers_stale"] = False
        return self


def wrap_ddp(model: nn.Module, runtime: Runtime, sync_bn: bool = False) -> nn.Module:
    """Wraps ``model`` for DDP on ``runtime.device``; ``wrap()`` calls this in mode ``"ddp"``.

    Args:
        model: the plain model (a :class:`DistributedModel` is returned unchanged).
        runtime: a ``Runtime`` in mode ``"ddp"`` whose process group is initialised (``runtime()``
            does that under a launcher).
        sync_bn: convert BatchNorm layers to ``SyncBatchNorm`` before wrapping, so batch statistics
            come from the global batch (useful with a few images per GPU). torch has no CPU kernel for
            it, so on the CPU the layers stay per-process BatchNorm and a warning says so.

    Returns:
        A :class:`DistributedModel` around the model moved to ``runtime.device``.
    """
    if isinstance(model, DistributedModel):
        return model
    if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        raise TypeError(f"wrap_ddp got a model already wrapped in {type(model).__name__}: pass the plain model "
                        "(autoparallel.unwrap(model)) and let autoparallel wrap it once")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_ddp needs an initialised process group: call autoparallel.runtime() first, "
                           "inside a job started by torchrun or autoparallel.launch()")
    device = runtime.device
    if sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.warning("sync_bn=True ignored on %s: torch's SyncBatchNorm runs on GPUs only; BatchNorm "
                           "statistics stay per process", device)
    model = model.to(device)
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedModel(model, device_ids=device_ids)
