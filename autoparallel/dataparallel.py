"""Our ``nn.DataParallel``: a drop-in for the model, whose outputs come back with their one-GPU values
(:func:`merge_outputs`). The model's own ``dim``, ``device_ids`` and ``output_device`` win over DataParallel's,
and replicas run under the caller's autocast dtype (torch's worker threads would fall back to fp16 under bf16)."""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel._functions import Gather
from torch.nn.parallel.parallel_apply import parallel_apply as _parallel_apply
from torch.nn.parallel.scatter_gather import scatter_kwargs

from .dropin import DropInWrapper, tensors, unwrap

logger = logging.getLogger(__name__)


def dataparallel_split(batch_size: int, num_gpus: int) -> list[int]:
    """The per-GPU batch sizes DataParallel produces (torch.chunk: ceil-sized pieces, maybe fewer than GPUs)."""
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


def _merge_scalars(values: Sequence[torch.Tensor], weights: Sequence[float], device: torch.device | None) -> Any:
    moved = [value.to(values[0].device if device is None else device) for value in values]
    first = moved[0]
    if first.dtype == torch.bool:
        return torch.stack(moved).any()
    if not (first.is_floating_point() or first.is_complex()):
        return torch.stack(moved).sum()
    # Accumulate in at least fp32 so fp16 losses keep their precision; Python-float weights, because a
    # tensor of weights would be a blocking host-to-device copy on every forward.
    dtype = torch.promote_types(first.dtype, torch.float32)
    total = float(sum(weights))
    terms = [value.to(dtype) * (float(weight) / total) for value, weight in zip(moved, weights)]
    return sum(terms[1:], terms[0]).to(first.dtype)


def merge_outputs(outputs: Sequence[Any], split_sizes: Sequence[int] | None,
                  gather_tensors: Callable[[list[torch.Tensor]], torch.Tensor],
                  device: torch.device | None = None) -> Any:
    """One output from one per replica, at any depth: tensors with a batch dimension are concatenated; a 0-dim
    float (tensor or Python) is a mean weighted by each replica's batch share, a 0-dim integer a count (summed), a
    bool true when any replica's is; dicts, sequences, namedtuples and dataclasses merge field by field; strings
    and None must agree; anything else is refused with the fix."""
    weights = list(split_sizes) if split_sizes is not None else [1] * len(outputs)
    if len(weights) != len(outputs):
        raise ValueError(f"DataParallel got {len(outputs)} replica outputs but {len(weights)} batch shares")

    def merge(values: Sequence[Any]) -> Any:
        first = values[0]
        if isinstance(first, torch.Tensor):
            return _merge_scalars(values, weights, device) if first.dim() == 0 else gather_tensors(list(values))
        if isinstance(first, Mapping):
            if any(set(value) != set(first) for value in values):
                raise ValueError("DataParallel replicas returned dicts with different keys")
            merged = [(key, merge([value[key] for value in values])) for key in first]
            try:
                return type(first)(merged)
            except TypeError:
                return dict(merged)
        if dataclasses.is_dataclass(first) and not isinstance(first, type):
            fields = dataclasses.fields(first)
            if all(field.init for field in fields):
                return type(first)(**{f.name: merge([getattr(value, f.name) for value in values]) for f in fields})
        if isinstance(first, (list, tuple)):
            if any(len(value) != len(first) for value in values):
                raise ValueError("DataParallel replicas returned sequences of different lengths")
            items = [merge(group) for group in zip(*values)]
            return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
        if isinstance(first, bool):
            return any(values)
        if isinstance(first, int):
            return sum(values)
        if isinstance(first, float):
            return sum(w * v for w, v in zip(weights, values)) / sum(weights)
        if all(value is first for value in values) or (
                (first is None or isinstance(first, (str, bytes))) and all(value == first for value in values)):
            return first
        raise TypeError(f"DataParallel cannot merge the {type(first).__name__} objects returned by the "
                        f"{len(values)} replicas (one per GPU): return a tensor, a dict, a tuple or a dataclass of "
                        "tensors and numbers from forward, or run one process per GPU with DDP (ap.launch())")

    return merge(outputs)


def _setting(name: str, default: Any) -> property:
    """DataParallel's ``name``, unless the model has an attribute of that name, which then wins."""
    private = f"_dp_{name}"

    def model_has(self: DataParallel) -> bool:
        return bool(self.__dict__.get("_forwarding_ready")) and hasattr(unwrap(self), name)

    def get(self: DataParallel) -> Any:
        return getattr(unwrap(self), name) if model_has(self) else self.__dict__.get(private, default)

    def set_(self: DataParallel, value: Any) -> None:
        if model_has(self):
            setattr(unwrap(self), name, value)
        else:
            self.__dict__[private] = value

    return property(get, set_)


class DataParallel(DropInWrapper, nn.DataParallel):
    """``nn.DataParallel`` that stays a drop-in for the model and merges its outputs by :func:`merge_outputs`."""

    _autoparallel_wrapper = True
    _SETTING_NAMES = {"dim": "_dp_dim", "device_ids": "_dp_device_ids", "output_device": "_dp_output_device"}
    dim = _setting("dim", 0)
    device_ids = _setting("device_ids", [])
    output_device = _setting("output_device", None)

    def __init__(self, module: nn.Module, device_ids: Sequence[int] | None = None, output_device: int | None = None,
                 dim: int = 0) -> None:
        super().__init__(module, device_ids, output_device, dim)
        self.__dict__.update(_split_sizes=None, _warned_splits=set())
        self._drop_in()

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        ids = self.__dict__.get("_dp_device_ids", [])
        if not ids:
            return self.module(*inputs, **kwargs)
        for tensor in chain(self.module.parameters(), self.module.buffers()):
            if tensor.device != self.src_device_obj:
                raise RuntimeError(f"DataParallel needs the model's parameters and buffers on {self.src_device_obj} "
                                   f"(its first GPU) but found one on {tensor.device}: move the model there first")
        inputs, kwargs = self.scatter(inputs, kwargs, ids)
        if not inputs and not kwargs:
            inputs, kwargs = ((),), ({},)
        if len(ids) == 1:
            return self.module(*inputs[0], **kwargs[0])
        replicas = self.replicate(self.module, ids[: len(inputs)])
        return self.gather(self.parallel_apply(replicas, inputs, kwargs), self.__dict__.get("_dp_output_device"))

    def scatter(self, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None, device_ids: Sequence[Any]) -> Any:
        dim = self.__dict__.get("_dp_dim", 0)
        scattered_inputs, scattered_kwargs = scatter_kwargs(inputs, kwargs, device_ids, dim=dim)
        # A replica's batch share: the size of ``dim`` of the first tensor in its inputs that has that dimension.
        sizes = [next((t.shape[dim] for t in tensors((args, kw)) if t.dim() > dim), None)
                 for args, kw in zip(scattered_inputs, scattered_kwargs)]
        self.__dict__["_split_sizes"] = None if not sizes or None in sizes else sizes
        split = (sum(self._split_sizes), len(device_ids)) if self._split_sizes is not None else None
        if split is not None and split not in self._warned_splits and (message := split_warning(*split)):
            self._warned_splits.add(split)
            logger.warning(message)
        return scattered_inputs, scattered_kwargs

    def parallel_apply(self, replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Any) -> list[Any]:
        # torch's parallel_apply re-enters autocast passing only ``enabled`` (pytorch issue #125186): each replica
        # runs decorated with the caller's autocast state instead (parallel_apply only calls module(*input, **kwargs)).
        kind = self.src_device_obj.type
        caller = {"dtype": torch.get_autocast_dtype(kind), "enabled": torch.is_autocast_enabled(kind),
                  "cache_enabled": torch.is_autocast_cache_enabled()}
        runners = [torch.autocast(kind, **caller)(replica) for replica in replicas]
        return _parallel_apply(runners, inputs, kwargs, self.__dict__["_dp_device_ids"][: len(replicas)])

    def gather(self, outputs: Any, output_device: Any) -> Any:
        device = torch.device(self.src_device_obj.type, output_device) if isinstance(output_device, int) \
            else torch.device(output_device)
        dim = self.__dict__.get("_dp_dim", 0)
        return merge_outputs(outputs, self._split_sizes, lambda tensors: Gather.apply(output_device, dim, *tensors),
                             device)
