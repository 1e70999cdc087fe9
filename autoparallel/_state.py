"""State plumbing shared by checkpoints and the EMA.

Keys without wrapper segments, matching of keys modulo those segments, conversion of metadata to
data that ``torch.load(weights_only=True)`` reads, and the random states of a process.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections import defaultdict
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .wrap import unwrap

logger = logging.getLogger("autoparallel")

_WRAPPER_SEGMENTS = ("module", "_orig_mod")  # DataParallel/DDP keep the model in .module, torch.compile in ._orig_mod
_SHOWN = 3  # names listed in an error before "and N more"


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------------------- wrappers


def is_wrapper(module: nn.Module) -> bool:
    return unwrap(module) is not module


def clean_state_dict(root: nn.Module) -> dict[str, Any]:
    """Return ``root.state_dict()`` without the segments that nested wrappers add to the keys."""
    state = root.state_dict()
    inner = {
        name: ("_orig_mod" if "_orig_mod" in module._modules else "module")
        for name, module in root.named_modules()
        if is_wrapper(module)
    }
    if not inner:
        return state
    cleaned: dict[str, Any] = {}
    for key, value in state.items():
        kept, path = [], ""
        for part in key.split("."):
            if inner.get(path) != part:
                kept.append(part)
            path = f"{path}.{part}" if path else part
        cleaned[".".join(kept)] = value
    return cleaned


# ------------------------------------------------------------------------------------- key matching


def canonical(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_SEGMENTS)


def _shape(value: Any) -> list[int] | None:
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def match_state_dict(
    target: Mapping[str, Any], source: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str], list[str], list[str]]:
    """Pair the keys of ``source`` with those of ``target`` modulo wrapper segments.

    Returns:
        (matched, missing, unexpected, reshaped): ``matched`` maps target keys to source values of the
        right shape; the three lists name target keys with no value, source keys with no target, and
        "key: checkpoint [..] vs model [..]" descriptions.
    """
    targets: dict[str, list[str]] = defaultdict(list)
    sources: dict[str, list[str]] = defaultdict(list)
    for key in target:
        targets[canonical(key)].append(key)
    for key in source:
        sources[canonical(key)].append(key)
    matched: dict[str, Any] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    reshaped: list[str] = []
    for canon, target_keys in targets.items():
        source_keys = sources.get(canon, [])
        if len(target_keys) == 1 and len(source_keys) == 1:
            pairs = [(target_keys[0], source_keys[0])]
        else:  # a real submodule called "module" made names collide: only exact names are safe
            pairs = [(key, key) for key in target_keys if key in source_keys]
            missing += [key for key in target_keys if key not in source_keys]
            unexpected += [key for key in source_keys if key not in target_keys]
        for target_key, source_key in pairs:
            value, expected = source[source_key], _shape(target[target_key])
            if expected is not None and _shape(value) is not None and _shape(value) != expected:
                reshaped.append(f"{target_key}: checkpoint {_shape(value)} vs model {expected}")
            else:
                matched[target_key] = value
    for canon, source_keys in sources.items():
        if canon not in targets:
            unexpected += source_keys
    return matched, missing, unexpected, reshaped


def names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def describe(missing: list[str], unexpected: list[str], reshaped: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' if len(missing) > 1 else ''} ({names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({names(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} with another shape ({names(reshaped)})")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------- plain data


def plain(value: Any, where: str) -> Any:
    """Turn ``value`` into data that ``torch.load(weights_only=True)`` accepts, or refuse it."""
    if value is None or type(value) in (bool, int, float, str, torch.Size) or isinstance(value, torch.Tensor):
        return value
    for base in (bool, int, float, str):  # subclasses (IntEnum, TorchVersion) would need their class to load
        if isinstance(value, base):
            return base(value)
    if isinstance(value, argparse.Namespace):
        return plain(vars(value), where)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Mapping):
        return {key: plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        return sorted(plain(item, where) for item in value)
    raise TypeError(
        f"save_checkpoint cannot store {where} of type {type(value).__name__}: it would need pickled code to "
        "load. Pass plain data (numbers, strings, lists, dicts, tensors) instead, e.g. vars(args) or str(path)."
    )


# --------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's Python, numpy, torch and CUDA random states, as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda: dict[int, torch.Tensor] = {}
    # Not initialised means no CUDA generator was used yet: nothing to save, and reading one would create
    # CUDA contexts in a CPU run on a GPU machine.
    if torch.cuda.is_initialized():
        # Under DDP a rank only touches its own GPU; reading all of them would create a context on each.
        devices = [torch.cuda.current_device()] if distributed() else range(torch.cuda.device_count())
        cuda = {index: torch.cuda.get_rng_state(index) for index in devices}
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng(states: Any, path: Any) -> None:
    """Restore this rank's entry of the per-rank list that :func:`capture_rng` states were gathered into."""
    if isinstance(states, Mapping):  # tolerate a single entry
        states = [states]
    if not states:
        logger.warning("checkpoint %s has no RNG state; random streams are not restored", path)
        return
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    if len(states) != world:
        logger.warning("checkpoint %s holds RNG states of %d process(es), this job has %d: every process gets "
                       "those of rank 0, so random streams will not match the original run", path, len(states), world)
    state = states[rank] if len(states) == world else states[0]
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].cpu().numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for index, cuda_state in state.get("cuda", {}).items():
            if int(index) < torch.cuda.device_count():
                torch.cuda.set_rng_state(cuda_state.cpu(), int(index))
