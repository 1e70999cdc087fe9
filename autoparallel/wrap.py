"""``wrap()`` and ``unwrap()``: put a model where the runtime says, so that it still behaves like the model."""
from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .dataparallel import DataParallel
from .ddp import DistributedModel
from .detect import Runtime
from .dropin import layers, unwrap
from .errors import UsageError
from .runtime import runtime as current_runtime

__all__ = ["unwrap", "wrap"]

logger = logging.getLogger(__name__)


def wrap(model: nn.Module, *, runtime: Runtime | None = None, sync_bn: bool = False, **ddp_options: Any) -> nn.Module:
    """Move ``model`` (maybe ``torch.compile``'d) to the device of ``runtime`` (default ``ap.runtime()``) and wrap
    it for its mode: the model itself on the CPU or one GPU, our DataParallel, or our DDP wrapper, which takes
    DistributedDataParallel's options (ignored in other modes) and ``sync_bn`` (SyncBatchNorm, on GPUs).
    Wrapping a wrapped model returns it unchanged."""
    if any(getattr(type(layer), "_autoparallel_wrapper", False) for layer in layers(model)):
        return model
    if isinstance(model, DistributedDataParallel):
        raise UsageError("wrap() got a model already wrapped in DistributedDataParallel, whose gradient hooks would "
                         "all-reduce every gradient a second time: remove the DistributedDataParallel(...) line and "
                         "pass the plain model; ap.wrap() builds DDP itself")
    if runtime is None:
        runtime = current_runtime()
    while isinstance(model, nn.DataParallel):
        logger.info("wrap() got an nn.DataParallel: replacing it with the wrapper for mode %r", runtime.mode)
        model = model.module
    model = model.to(runtime.device)
    if runtime.mode == "ddp":
        return DistributedModel(model, runtime, sync_bn=sync_bn, **ddp_options)
    if ddp_options:
        logger.debug("DDP options %s ignored in mode %r", sorted(ddp_options), runtime.mode)
    if sync_bn and runtime.mode == "dp":
        logger.warning("sync_bn=True has no effect under DataParallel: BatchNorm statistics stay per GPU. "
                       "Use DDP (autoparallel.launch() or torchrun) for synchronised BatchNorm")
    if runtime.mode != "dp":
        return model
    if len(runtime.device_ids) > 1 and "_orig_mod" in model._modules:
        # DataParallel copies each replica's __dict__, and torch.compile keeps its compiled forward there,
        # bound to the original module on the first GPU: every replica would run that one.
        logger.warning("DataParallel cannot replicate a torch.compile'd model (every replica would run the compiled "
                       "original on GPU %d): wrapping the uncompiled model. To compile and use several GPUs, use DDP "
                       "(autoparallel.launch() or torchrun)", runtime.device_ids[0])
        model = unwrap(model)
    return DataParallel(model, device_ids=list(runtime.device_ids) or None)
