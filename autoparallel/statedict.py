"""State dicts across wrappers and tools: matching keys, plain data, and the layouts other tools save.

Keys match modulo wrapper segments (``module.``, ``_orig_mod.``) at any depth. Everything a checkpoint
stores is turned into data that ``torch.load(weights_only=True)`` reads, or refused at save time.
:func:`interpret` brings the layouts people already have to ours: raw state dicts, timm
(``state_dict``/``state_dict_ema``), torchvision's references (``model``/``model_ema`` with ``n_averaged``),
Lightning (``state_dict`` under the LightningModule's attribute, ``optimizer_states``) and the common
``model_state_dict``/``optimizer_state_dict`` of the PyTorch tutorials.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import torch
from torch import nn

from .dropin import canonical, unwrap
from .errors import CheckpointMismatchError

_SHOWN = 3  # names listed in a message before "and N more"
# (kind, model key, EMA keys, optimizer keys, scheduler keys, scaler keys)
_LAYOUTS = (
    ("tutorial", "model_state_dict", ("ema_state_dict",), ("optimizer_state_dict", "optimizer"),
     ("scheduler_state_dict", "scheduler"), ("scaler_state_dict", "scaler")),
    ("state_dict", "state_dict", ("state_dict_ema", "model_ema"), ("optimizer",), ("lr_scheduler", "scheduler"),
     ("scaler", "amp_scaler")),
    ("model", "model", ("model_ema", "ema", "state_dict_ema"), ("optimizer",), ("lr_scheduler", "scheduler"),
     ("scaler",)),
)


def clean_state_dict(root: nn.Module) -> dict[str, Any]:
    """``root.state_dict()`` without the segments that torch's own wrappers nested inside ``root`` add."""
    state = unwrap(root).state_dict()
    wrappers = {name: ("_orig_mod" if "_orig_mod" in module._modules else "module")
                for name, module in unwrap(root).named_modules() if unwrap(module) is not module}
    if not wrappers:
        return state
    cleaned: dict[str, Any] = {}
    for key, value in state.items():
        kept, path = [], ""
        for part in key.split("."):
            if wrappers.get(path) != part:
                kept.append(part)
            path = f"{path}.{part}" if path else part
        cleaned[".".join(kept)] = value
    return cleaned


def names(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def match(target: Mapping[str, Any], source: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str],
                                                                         list[str]]:
    """Pair ``source``'s keys with ``target``'s modulo wrapper segments.

    Returns ``(matched, missing, unexpected, reshaped)``: target keys with the source value of the right
    shape, target keys without a value, source keys without a target, and "key: checkpoint [..] vs model
    [..]" descriptions. When nothing matches but every source key carries one leading segment that the
    target does not (Lightning's ``model.``), that segment is dropped.
    """
    result = _match(target, source)
    heads = {key.split(".", 1)[0] for key in source if "." in key}
    if not result[0] and len(heads) == 1 and all("." in key for key in source):
        stripped = {key.split(".", 1)[1]: value for key, value in source.items()}
        retry = _match(target, stripped)
        if retry[0]:
            return retry
    return result


def _shape(value: Any) -> list[int] | None:
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def _match(target: Mapping[str, Any], source: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str],
                                                                          list[str]]:
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
    unexpected += [key for canon, keys in sources.items() if canon not in targets for key in keys]
    return matched, missing, unexpected, reshaped


def prepare(module: nn.Module, state: Any, *, what: str, path: Any, strict: bool, logger: Any) -> dict[str, Any]:
    """Validate ``state`` against ``module`` and return the state dict to load; loads nothing."""
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"checkpoint {path} holds no {what} weights (found {type(state).__name__})")
    matched, missing, unexpected, reshaped = match(module.state_dict(), state)
    parts = [f"{len(items)} {label} ({names(items)})" for items, label in
             ((missing, "missing key" + "s" * (len(missing) > 1)), (unexpected, "unexpected"),
              (reshaped, "with another shape")) if items]
    if parts and strict:
        raise CheckpointMismatchError(f"checkpoint {path} does not match the {what}: {', '.join(parts)}. Build the "
                                      f"{what} with the settings it was saved with, or pass strict=False to load only "
                                      f"the {len(matched)} matching tensors.")
    if not matched and state:
        raise CheckpointMismatchError(f"checkpoint {path}: none of the checkpoint's {len(state)} {what} tensors match "
                                      f"the {what} ({', '.join(parts)}): it was saved from another architecture")
    if parts:
        logger.warning("checkpoint %s, %s: loading %d matching tensors; skipped %s", path, what, len(matched),
                       ", ".join(parts))
    return matched


def plain(value: Any, where: str) -> Any:
    """``value`` as data ``torch.load(weights_only=True)`` reads (numpy -> Python/tensors, paths -> str), or refused."""
    if value is None or type(value) in (bool, int, float, str, torch.Size) or isinstance(value, torch.Tensor):
        return value
    for base in (bool, int, float, str):  # subclasses (IntEnum, TorchVersion) would need their class to load
        if isinstance(value, base):
            return base(value)
    if isinstance(value, argparse.Namespace):
        return plain(vars(value), where)
    if isinstance(value, (PurePath, torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Mapping):
        return {plain(key, f"a key of {where}"): plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        return sorted(plain(item, where) for item in value)
    raise TypeError(f"save_checkpoint cannot store {where} of type {type(value).__name__}: it would need pickled "
                    "code to load. Pass plain data (numbers, strings, lists, dicts, tensors), e.g. vars(args) or "
                    "str(path)")


def _first(checkpoint: Mapping[str, Any], *keys: str) -> Any:
    return next((checkpoint[key] for key in keys if checkpoint.get(key) is not None), None)


def interpret(checkpoint: Any, path: Any, format_name: str) -> dict[str, Any]:
    """Any supported layout as ours: kind, model, ema, optimizer, scheduler, scaler, epoch, step, rng, extra."""
    if isinstance(checkpoint, nn.Module):  # a whole pickled model (trusted files only)
        checkpoint = {"model": checkpoint.state_dict()}
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not weights")
    if checkpoint.get("format") == format_name:
        return {**checkpoint, "kind": format_name}
    if checkpoint and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        return {"model": checkpoint, "kind": "raw"}
    if "pytorch-lightning_version" in checkpoint or "optimizer_states" in checkpoint:
        optimizers, schedulers = checkpoint.get("optimizer_states") or [], checkpoint.get("lr_schedulers") or []
        used = {"state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step"}
        return {"kind": "lightning", "model": checkpoint.get("state_dict"), "ema": None,
                "optimizer": optimizers[0] if optimizers else None, "scheduler": schedulers[0] if schedulers else None,
                "scaler": None, "epoch": checkpoint.get("epoch"), "step": checkpoint.get("global_step"), "rng": None,
                "extra": {k: v for k, v in checkpoint.items() if k not in used}}
    for kind, model_key, ema_keys, optimizer_keys, scheduler_keys, scaler_keys in _LAYOUTS:
        model_state = checkpoint.get(model_key)
        model_state = model_state.state_dict() if isinstance(model_state, nn.Module) else model_state
        if not isinstance(model_state, Mapping):
            continue
        used = {model_key, "epoch", "step", *ema_keys, *optimizer_keys, *scheduler_keys, *scaler_keys}
        return {"kind": kind, "model": model_state, "ema": _first(checkpoint, *ema_keys),
                "optimizer": _first(checkpoint, *optimizer_keys), "scheduler": _first(checkpoint, *scheduler_keys),
                "scaler": _first(checkpoint, *scaler_keys), "epoch": checkpoint.get("epoch"),
                "step": checkpoint.get("step"), "rng": None,
                "extra": {key: value for key, value in checkpoint.items() if key not in used}}
    raise CheckpointMismatchError(f"checkpoint {path} holds no model weights I recognise; its top-level keys are "
                                  f"{names(sorted(map(str, checkpoint)))}")


def ema_weights(state: Any) -> tuple[Any, int | None]:
    """(weights, update count or None) of an EMA state: ours, torchvision's AveragedModel, or a bare state dict."""
    if isinstance(state, Mapping) and isinstance(state.get("module"), Mapping) and "step" in state:
        return state["module"], int(state["step"])
    if isinstance(state, Mapping) and "n_averaged" in state:
        count = state["n_averaged"]
        return {k: v for k, v in state.items() if k != "n_averaged"}, int(count)
    return state, None
