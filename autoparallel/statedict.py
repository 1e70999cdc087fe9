"""State dicts across wrappers and tools: keys matched modulo ``module.`` and ``_orig_mod.``, optimizer and scheduler
states checked, values made plain data, and raw, timm, torchvision, Lightning and tutorial layouts read as ours."""
from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint_file import FORMAT_NAME, FORMAT_VERSION
from .dropin import canonical, unwrap
from .errors import CheckpointMismatchError

_FAMILY_KEYS = {"betas", "momentum", "dampening", "nesterov", "alpha", "centered", "lr_decay", "rho", "lambd", "etas",
                "step_sizes", "momentum_decay", "max_iter", "initial_accumulator_value", "t0"}
_MOMENTS = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum", "ax",
            "prev", "exp_inf"}
# (kind, model key, EMA keys, optimizer keys, scheduler keys, scaler keys)
_LAYOUTS = (("tutorial", "model_state_dict", ("ema_state_dict",), ("optimizer_state_dict", "optimizer"),
             ("scheduler_state_dict", "scheduler"), ("scaler_state_dict", "scaler")),
            ("state_dict", "state_dict", ("state_dict_ema", "model_ema"), ("optimizer",), ("lr_scheduler", "scheduler"),
             ("scaler", "amp_scaler")),
            ("model", "model", ("model_ema", "ema", "state_dict_ema"), ("optimizer",), ("lr_scheduler", "scheduler"),
             ("scaler",)))


def clean_state_dict(root: nn.Module) -> dict[str, Any]:
    """``root.state_dict()`` without the segments that torch's own wrappers nested inside ``root`` add."""
    root = unwrap(root)
    state = root.state_dict()
    wrappers = {name: ("_orig_mod" if "_orig_mod" in module._modules else "module")
                for name, module in root.named_modules() if unwrap(module) is not module}

    def clean(key: str) -> str:  # without each part that is the attribute a wrapper keeps its module under
        parts = key.split(".")
        return ".".join(part for i, part in enumerate(parts) if wrappers.get(".".join(parts[:i])) != part)

    return {clean(key): value for key, value in state.items()} if wrappers else state


def names(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f", and {len(items) - 3} more" if len(items) > 3 else "")


def _match(target: Mapping[str, Any], source: Mapping[str, Any]) -> tuple[dict, list[str], list[str], list[str]]:
    """``(matched, missing, unexpected, reshaped)`` of ``source``'s keys against ``target``'s, modulo wrappers."""
    keys: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))  # canonical: (target's, source's)
    for side, state in enumerate((target, source)):
        for key in state:
            keys[canonical(key)][side].append(key)
    matched, missing, unexpected, reshaped = {}, [], [], []
    for target_keys, source_keys in keys.values():  # the target's names first, then those only the source has
        if len(target_keys) == 1 and len(source_keys) == 1:
            pairs = [(target_keys[0], source_keys[0])]
        else:  # none on one side, or a real submodule called "module" made names collide: only exact names match
            pairs = [(key, key) for key in target_keys if key in source_keys]
            missing += [key for key in target_keys if key not in source_keys]
            unexpected += [key for key in source_keys if key not in target_keys]
        for mine, theirs in pairs:
            value, expected = source[theirs], target[mine]
            if isinstance(value, torch.Tensor) and isinstance(expected, torch.Tensor) and value.shape != expected.shape:
                reshaped.append(f"{mine}: checkpoint {list(value.shape)} vs model {list(expected.shape)}")
            else:
                matched[mine] = value
    return matched, missing, unexpected, reshaped


def prepare(module: nn.Module, state: Any, *, what: str, path: Any, strict: bool, logger: Any) -> dict[str, Any]:
    """Validate ``state`` against ``module`` and return the state dict to load; loads nothing."""
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"checkpoint {path} holds no {what} weights (found {type(state).__name__})")
    target = module.state_dict()
    matched, missing, unexpected, reshaped = _match(target, state)
    # Nothing matches, but every key has the same extra first segment (Lightning's "model."): drop it.
    if not matched and len({key.split(".", 1)[0] for key in state}) == 1 and all("." in key for key in state):
        retry = _match(target, {key.split(".", 1)[1]: value for key, value in state.items()})
        if retry[0]:
            matched, missing, unexpected, reshaped = retry
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


def check_optimizer(optimizer: Any, state: Any, path: Any) -> None:
    """Refuse an optimizer state saved for other parameter groups, another optimizer or other parameter shapes."""
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list):
        raise CheckpointMismatchError(f"checkpoint {path}: the optimizer state has no parameter groups")
    mine = optimizer.param_groups
    if len(groups) != len(mine):
        raise CheckpointMismatchError(f"checkpoint {path}: the optimizer state has {len(groups)} parameter groups, "
                                      f"the optimizer {len(mine)}: build it with the same groups before loading")
    saved_family, my_family = set(groups[0]) & _FAMILY_KEYS, set(mine[0]) & _FAMILY_KEYS
    if saved_family != my_family:
        raise CheckpointMismatchError(f"checkpoint {path}: the optimizer state is for another optimizer (its groups "
                                      f"have {', '.join(sorted(saved_family)) or 'none of'} {sorted(my_family)}), not "
                                      f"{type(optimizer).__name__}: build the optimizer it was saved with")
    for index, (saved, current) in enumerate(zip(groups, mine)):
        if len(saved["params"]) != len(current["params"]):
            raise CheckpointMismatchError(f"checkpoint {path}: optimizer group {index} has {len(saved['params'])} "
                                          f"parameters in the checkpoint, {len(current['params'])} in the optimizer; "
                                          "build it over the same (trainable) parameters")
        for saved_id, param in zip(saved["params"], current["params"]):
            for name, value in state.get("state", {}).get(saved_id, {}).items():
                if name in _MOMENTS and isinstance(value, torch.Tensor) and value.shape != param.shape:
                    raise CheckpointMismatchError(f"checkpoint {path}: optimizer state {name} of group {index} has "
                                                  f"shape {list(value.shape)}, the parameter {list(param.shape)}")


def check_scheduler(scheduler: Any, state: Any, path: Any) -> None:
    """Refuse a scheduler state saved for another scheduler class or another number of parameter groups."""
    mine = scheduler.state_dict()
    public, saved = ({key for key in keys if not key.startswith("_") and key != "verbose"}
                     for keys in (mine, state if isinstance(state, Mapping) else ()))
    if public != saved:
        raise CheckpointMismatchError(f"checkpoint {path}: the scheduler state is for another scheduler (it has "
                                      f"{names(sorted(saved - public)) or 'no extra keys'}; "
                                      f"{type(scheduler).__name__} needs {names(sorted(public - saved))}): "
                                      "build the scheduler it was saved with")
    for key in ("base_lrs", "min_lrs"):
        if key in state and len(state[key]) != len(mine[key]):
            raise CheckpointMismatchError(f"checkpoint {path}: the scheduler state covers {len(state[key])} parameter "
                                          f"groups, the optimizer has {len(mine[key])}")


def plain(value: Any, where: str) -> Any:
    """``value`` as data ``torch.load(weights_only=True)`` reads (numpy -> Python/tensors, paths -> str), or refused."""
    if value is None or isinstance(value, (torch.Tensor, torch.Size)):
        return value
    for base in (bool, int, float, str):  # subclasses (IntEnum, TorchVersion, numpy's float64) would need their class
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


def interpret(checkpoint: Any, path: Any) -> dict[str, Any]:
    """Any supported layout as ours (kind, model, ema, optimizer, ...); entries a layout lacks are left out."""
    if isinstance(checkpoint, nn.Module):  # a whole pickled model (trusted files only)
        checkpoint = {"model": checkpoint.state_dict()}
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not weights")
    if checkpoint.get("format") == FORMAT_NAME:
        if not 1 <= int(checkpoint.get("version", 0)) <= FORMAT_VERSION:
            raise CheckpointMismatchError(f"checkpoint {path} has format version {checkpoint.get('version')}; this "
                                          f"autoparallel reads up to {FORMAT_VERSION}: upgrade autoparallel")
        return {**checkpoint, "kind": FORMAT_NAME}
    if checkpoint and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        return {"model": checkpoint, "kind": "raw"}
    if "pytorch-lightning_version" in checkpoint or "optimizer_states" in checkpoint:
        optimizers, schedulers = checkpoint.get("optimizer_states") or [None], checkpoint.get("lr_schedulers") or [None]
        used = {"state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step"}
        return {"kind": "lightning", "model": checkpoint.get("state_dict"), "optimizer": optimizers[0],
                "scheduler": schedulers[0], "epoch": checkpoint.get("epoch"), "step": checkpoint.get("global_step"),
                "extra": {k: v for k, v in checkpoint.items() if k not in used}}
    for kind, model_key, *object_keys in _LAYOUTS:
        model_state = checkpoint.get(model_key)
        model_state = model_state.state_dict() if isinstance(model_state, nn.Module) else model_state
        if not isinstance(model_state, Mapping):
            continue
        found = {name: next((checkpoint[key] for key in keys if checkpoint.get(key) is not None), None)
                 for name, keys in zip(("ema", "optimizer", "scheduler", "scaler"), object_keys)}
        used = {model_key, "epoch", "step", *(key for keys in object_keys for key in keys)}
        return {"kind": kind, "model": model_state, **found, "epoch": checkpoint.get("epoch"),
                "step": checkpoint.get("step"), "extra": {k: v for k, v in checkpoint.items() if k not in used}}
    raise CheckpointMismatchError(f"checkpoint {path} holds no model weights I recognise; its top-level keys are "
                                  f"{names(sorted(map(str, checkpoint)))}")

