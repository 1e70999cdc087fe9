"""wrap() and unwrap(): put a model where the runtime says, so that it still behaves like the model.

``nn.DataParallel`` breaks existing training code in three ways, each fixed here by our subclass:
attributes of the model are hidden behind ``.module``, ``state_dict()`` keys gain a ``module.`` prefix,
and a 0-dim tensor returned by ``forward`` (an auxiliary loss) comes back as a vector with one value
per GPU. The scalar rule is a plain function, :func:`gather_scalars`, testable on CPU tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel._functions import Gather
from torch.nn.parallel.parallel_apply import parallel_apply as _parallel_apply

from .runtime import Runtime
from .runtime import runtime as current_runtime

logger = logging.getLogger(__name__)


def _is_parallel_wrapper(model: object) -> bool:
    return isinstance(model, (nn.DataParallel, DistributedDataParallel)) or bool(
        getattr(type(model), "_autoparallel_wrapper", False)
    )


def _inner(model: nn.Module) -> nn.Module | None:
    """The module one wrapper down, or None when ``model`` is not a wrapper."""
    if _is_parallel_wrapper(model):
        return model.module
    # torch.compile's OptimizedModule registers the original as the submodule "_orig_mod".
    return model._modules.get("_orig_mod") if isinstance(model, nn.Module) else None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under any stack of DataParallel, DDP, torch.compile and autoparallel wrappers.

    Save, EMA and parameter grouping should use this, so that no ``module.`` or ``_orig_mod.``
    prefix leaks into checkpoints.
    """
    inner = _inner(model)
    while inner is not None:
        model, inner = inner, _inner(inner)
    return model


def _is_wrapped_by_us(model: nn.Module) -> bool:
    current: nn.Module | None = model
    while current is not None:
        if getattr(type(current), "_autoparallel_wrapper", False):
            return True
        current = _inner(current)
    return False


def wrap(model: nn.Module, *, runtime: Runtime | None = None, sync_bn: bool = False) -> nn.Module:
    """Move ``model`` to the runtime's device and wrap it for the runtime's mode.

    cpu / single: the model itself, moved. dp: our :class:`DataParallel`. ddp: the DDP wrapper of
    ``autoparallel.ddp``. Wrapping an already wrapped model returns it unchanged; a plain
    ``nn.DataParallel`` or DDP from the caller is replaced by the wrapper the runtime asks for.

    Args:
        model: the module to train; may be ``torch.compile``'d.
        runtime: where to run; ``autoparallel.runtime()`` when None.
        sync_bn: convert BatchNorm to SyncBatchNorm (only meaningful under ddp).
    """
    if _is_wrapped_by_us(model):
        return model
    rt = runtime if runtime is not None else current_runtime()
    while isinstance(model, (nn.DataParallel, DistributedDataParallel)):
        logger.info("wrap() got a %s: replacing it with the wrapper for mode %r", type(model).__name__, rt.mode)
        model = model.module
    model = model.to(rt.device)
    if rt.mode == "ddp":
        from .ddp import wrap_ddp

        return wrap_ddp(model, rt, sync_bn=sync_bn)
    if sync_bn and rt.mode == "dp":
        logger.warning("sync_bn=True has no effect under DataParallel: BatchNorm statistics stay per GPU. "
                       "Use DDP (autoparallel.launch() or torchrun) for synchronised BatchNorm")
    if rt.mode == "dp" and len(rt.device_ids) > 1 and "_orig_mod" in model._modules:
        # DataParallel copies each replica's __dict__, and torch.compile stores its compiled forward there,
        # bound to the original module on the first GPU: every replica would run that one.
        logger.warning("DataParallel cannot replicate a torch.compile'd model (every replica would run the "
                       "compiled original on GPU %d): wrapping the uncompiled model. To compile and use several "
                       "GPUs, use DDP (autoparallel.launch() or torchrun)", rt.device_ids[0])
        model = unwrap(model)
    if rt.mode == "dp":
        return DataParallel(model, device_ids=list(rt.device_ids) or None)
    return model


def dataparallel_split(batch_size: int, num_gpus: int) -> list[int]:
    """The per-GPU batch sizes nn.DataParallel produces (torch.chunk: ceil-sized pieces, maybe fewer than GPUs)."""
    if batch_size <= 0 or num_gpus <= 0:
        return []
    piece = math.ceil(batch_size / num_gpus)
    return [min(piece, batch_size - start) for start in range(0, batch_size, piece)]


def split_warning(batch_size: int, num_gpus: int) -> str | None:
    """A message when a batch of ``batch_size`` leaves GPUs idle or loads them unevenly, else None."""
    sizes = dataparallel_split(batch_size, num_gpus)
    if batch_size < num_gpus:
        return (f"DataParallel got a batch of {batch_size} for {num_gpus} GPUs: only {len(sizes)} GPU(s) get work. "
                f"Use a batch size of at least {num_gpus}, ideally a multiple of {num_gpus}")
    if len(set(sizes)) > 1 or len(sizes) < num_gpus:
        idle = f", leaving {num_gpus - len(sizes)} GPU(s) idle" if len(sizes) < num_gpus else ""
        return (f"DataParallel split a batch of {batch_size} over {num_gpus} GPUs as {sizes}{idle}: the GPUs wait "
                f"for the largest share. Use a batch size divisible by {num_gpus} for an even split "
                f"(scalar outputs are still weighted correctly)")
    return None


def gather_scalars(
    values: Sequence[torch.Tensor], weights: Sequence[float] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """One 0-dim tensor from one 0-dim tensor per replica: the mean weighted by each replica's batch share.

    A mean-reduced loss over replicas of sizes ``b_i`` then equals the loss over the whole batch:
    ``sum(b_i * loss_i) / sum(b_i)``. Gradients flow back to every replica. Non-float values that all
    agree (a flag, a count that is the same everywhere) are returned unchanged.

    Args:
        values: one 0-dim tensor per replica, on any devices.
        weights: each replica's batch size; equal weights when None.
        device: where the result lives; the first value's device when None.
    """
    if not values:
        raise ValueError("gather_scalars needs at least one value")
    target = values[0].device if device is None else torch.device(device)
    moved = [value.to(target) for value in values]
    first = moved[0]
    if len(moved) == 1:
        return first
    if weights is None:
        weights = [1.0] * len(moved)
    if len(weights) != len(moved):
        raise ValueError(f"gather_scalars got {len(moved)} values but {len(weights)} weights")
    is_float = first.is_floating_point() or first.is_complex()
    # Whether integers agree decides the result's dtype, so it needs one host sync; floats need none.
    if not is_float and bool(torch.stack(moved).eq(first).all()):
        return first
    # Accumulate in at least fp32 so fp16 losses do not lose precision, then return the input dtype.
    # Python-float weights: a tensor of weights would be a blocking host-to-device copy on every forward.
    dtype = torch.promote_types(first.dtype, torch.float32) if is_float else torch.get_default_dtype()
    total = float(sum(weights))
    terms = [value.to(dtype) * (float(weight) / total) for value, weight in zip(moved, weights)]
    mean = sum(terms[1:], terms[0])
    return mean.to(first.dtype) if is_float else mean


def _is_namedtuple(obj: object) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields") and hasattr(obj, "_asdict")


def gather_outputs(
    outputs: Sequence[Any],
    split_sizes: Sequence[int] | None,
    gather_tensors: Callable[[list[torch.Tensor]], torch.Tensor],
    device: torch.device | None = None,
) -> Any:
    """Merge per-replica outputs like nn.DataParallel does, except that 0-dim tensors stay 0-dim.

    Tensors with a batch dimension are joined by ``gather_tensors``; 0-dim tensors go through
    :func:`gather_scalars` weighted by ``split_sizes``; tuples, lists, dicts and namedtuples keep their
    type at any depth; Python numbers are averaged the same way; other objects come from replica 0.
    """

    def merge(values: Sequence[Any]) -> Any:
        first = values[0]
        if isinstance(first, torch.Tensor):
            if first.dim() == 0:
                return gather_scalars(values, split_sizes, device)
            return gather_tensors(list(values))
        if isinstance(first, Mapping):
            if any(set(value) != set(first) for value in values):
                raise ValueError("DataParallel replicas returned dicts with different keys")
            merged = [(key, merge([value[key] for value in values])) for key in first]
            try:
                return type(first)(merged)
            except TypeError:
                return dict(merged)
        if isinstance(first, (list, tuple)):
            if any(len(value) != len(first) for value in values):
                raise ValueError("DataParallel replicas returned sequences of different lengths")
            items = [merge(group) for group in zip(*values)]
            return type(first)(*items) if _is_namedtuple(first) else type(first)(items)
        if isinstance(first, (int, float)) and not isinstance(first, bool) and len(set(values)) > 1:
            weights = split_sizes if split_sizes is not None else [1] * len(values)
            return sum(w * v for w, v in zip(weights, values)) / sum(weights)
        return first

    return merge(outputs)


def _first_batch_size(obj: Any, dim: int) -> int | None:
    """Size of ``dim`` of the first tensor in a replica's inputs (depth first), the replica's batch share."""
    if isinstance(obj, torch.Tensor):
        return obj.shape[dim] if obj.dim() > dim else None
    children = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    for child in children:
        size = _first_batch_size(child, dim)
        if size is not None:
            return size
    return None


class _AutocastReplica:
    """Calls one DataParallel replica under the autocast state of the thread that called ``forward``.

    torch's ``parallel_apply`` re-enters autocast in each worker thread passing only ``enabled``, and the
    autocast dtype is thread-local, so under bf16 the replicas would silently run in fp16, with no grad
    scaler (pytorch issue #125186). The state is captured when this object is built, in the calling thread.
    """

    def __init__(self, module: Callable[..., Any], device_type: str) -> None:
        self.module = module
        self.device_type = device_type
        if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
            self.enabled = torch.is_autocast_enabled(device_type)
            self.dtype = torch.get_autocast_dtype(device_type)
        elif device_type == "cuda":
            self.enabled, self.dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        else:
            self.enabled, self.dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        self.cache_enabled = torch.is_autocast_cache_enabled()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled,
                            cache_enabled=self.cache_enabled):
            return self.module(*args, **kwargs)


class DropInWrapper:
    """What makes our wrappers drop-ins for the model they hold in ``self.module`` (a mixin placed before
    ``nn.Module`` in the bases): reads, writes and deletes of attributes the wrapper does not own reach the
    inner model, and state dicts and named parameters or buffers carry no ``module.`` prefix.

    A wrapper sets ``_forwarding_ready`` in its ``__dict__`` once its own attributes exist (``nn.DataParallel``
    sets public ones such as ``device_ids`` after ``module``); until then every attribute is its own. Private
    names the inner model does not have stay on the wrapper.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "module" or "module" not in modules:
                raise
            return getattr(modules["module"], name)

    def _forwards(self, name: str) -> bool:
        if not self.__dict__.get("_forwarding_ready"):
            return False
        owned = (name in self.__dict__ or name in self._parameters or name in self._buffers
                 or name in self._modules or hasattr(type(self), name))
        return not owned and (not name.startswith("_") or hasattr(unwrap(self), name))

    def __setattr__(self, name: str, value: Any) -> None:
        if self._forwards(name):
            setattr(unwrap(self), name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if self._forwards(name):
            delattr(unwrap(self), name)
        else:
            super().__delattr__(name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(unwrap(self))))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return unwrap(self).state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return unwrap(self).load_state_dict(state_dict, strict=strict, assign=assign)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        return unwrap(self).named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        return unwrap(self).named_buffers(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)


class DataParallel(DropInWrapper, nn.DataParallel):
    """nn.DataParallel that stays a drop-in for the model it wraps.

    - attribute get and set reach the inner model (``model.backbone``, ``model.num_experts = 5``);
    - ``state_dict()``, ``load_state_dict()``, ``named_parameters()`` and ``named_buffers()`` use the
      inner model's names, without ``module.`` (nor ``_orig_mod.`` for a compiled model);
    - 0-dim tensors in the output stay 0-dim (see :func:`gather_scalars`), at any depth;
    - replicas run under the caller's autocast dtype (bf16 stays bf16, see :class:`_AutocastReplica`);
    - a warning, once per batch size, when the batch leaves GPUs idle or splits unevenly.

    Setting an attribute that the wrapper itself does not have goes to the inner model, except new
    names starting with ``_``, which torch internals use for wrapper bookkeeping.
    """

    _autoparallel_wrapper = True

    def __init__(self, module: nn.Module, device_ids: Sequence[int] | None = None, output_device: int | None = None,
                 dim: int = 0) -> None:
        super().__init__(module, device_ids, output_device, dim)
        self._split_sizes: list[int] | None = None
        self._warned_splits: set[tuple[int, int]] = set()
        self._forwarding_ready = True  # from here on, unknown attribute sets go to the inner model

    def scatter(self, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None, device_ids: Sequence[Any]) -> Any:
        scattered_inputs, scattered_kwargs = super().scatter(inputs, kwargs, device_ids)
        sizes = [_first_batch_size((args, kw), self.dim) for args, kw in zip(scattered_inputs, scattered_kwargs)]
        self._split_sizes = None if not sizes or None in sizes else sizes
        if self._split_sizes is not None:
            self._warn_split(sum(self._split_sizes), len(device_ids))
        return scattered_inputs, scattered_kwargs

    def parallel_apply(self, replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Any) -> list[Any]:
        # torch's parallel_apply only calls module(*input, **kwargs), so a callable can stand in for a replica.
        runners = [_AutocastReplica(replica, self.src_device_obj.type) for replica in replicas]
        return _parallel_apply(runners, inputs, kwargs, self.device_ids[: len(replicas)])

    def _warn_split(self, batch_size: int, num_gpus: int) -> None:
        message = split_warning(batch_size, num_gpus)
        if message and (batch_size, num_gpus) not in self._warned_splits:
            self._warned_splits.add((batch_size, num_gpus))
            logger.warning(message)

    def gather(self, outputs: Any, output_device: Any) -> Any:
        if isinstance(output_device, int):
            device = torch.device(self.src_device_obj.type, output_device)
        else:
            device = torch.device(output_device)

        def gather_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
            return Gather.apply(output_device, self.dim, *tensors)

        return gather_outputs(outputs, self._split_sizes, gather_tensors, device)
