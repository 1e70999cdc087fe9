"""What makes our wrappers drop-ins for the model in their ``.module``: attributes they do not own are read,
written and deleted on the model, state dicts and module names are the model's (state-dict hooks strip the
wrapper's segment at any depth, also under ``torch.compile``), and ``load_state_dict`` takes ``module.`` keys too."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

_WRAPPER_SEGMENTS = ("module", "_orig_mod")  # DataParallel/DDP keep the model in .module, torch.compile in ._orig_mod
_generation = [0]


def _bump(*_: Any) -> None:
    _generation[0] += 1


_module_hooks.register_module_parameter_registration_hook(_bump)
_module_hooks.register_module_module_registration_hook(_bump)
_module_hooks.register_module_buffer_registration_hook(_bump)  # also `self.buf = tensor`, e.g. inside forward


def structure_generation() -> int:
    """A counter that moves whenever any module registers a parameter, buffer or submodule (``model.fc = ...``), so
    wrappers and the EMA notice a changed model without listing its tensors at every step."""
    return _generation[0]


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a forward's inputs or outputs (dicts, lists and tuples at any depth), depth first."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (Mapping, list, tuple)):
        for item in value.values() if isinstance(value, Mapping) else value:
            yield from tensors(item)


def canonical(key: str) -> str:
    """A state-dict key without wrapper segments."""
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_SEGMENTS)


def inner(model: nn.Module) -> nn.Module | None:
    """The module one wrapper down, or None when ``model`` is not a wrapper."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or getattr(
            type(model), "_autoparallel_wrapper", False):
        return model.module
    return model._modules.get("_orig_mod") if isinstance(model, nn.Module) else None  # torch.compile


def layers(model: nn.Module | None) -> Iterator[nn.Module]:
    """``model`` and each module under it in its stack of wrappers, outermost first."""
    while model is not None:
        yield model
        model = inner(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under any stack of DataParallel, DDP, ``torch.compile`` and autoparallel wrappers."""
    return list(layers(model))[-1]


def _model_key(key: str, prefix: str) -> str:
    """``key`` without a wrapper's ``module.`` (after ``prefix``) and any ``_orig_mod.`` right under it."""
    ours = prefix + "module."
    if not key.startswith(ours):
        return key
    rest = key[len(ours):]
    while rest.startswith("_orig_mod."):
        rest = rest[len("_orig_mod."):]
    return prefix + rest


class DropInWrapper:
    """Mixin placed before ``nn.Module`` in a wrapper's bases; call :meth:`_drop_in` at the end of ``__init__``:
    until then every attribute is the wrapper's own (``nn.DataParallel`` sets ``device_ids`` after ``module``).
    Private names the model does not have stay on the wrapper."""

    def _drop_in(self) -> None:
        self._register_state_dict_hook(DropInWrapper._strip_prefix)
        self._register_load_state_dict_pre_hook(DropInWrapper._add_prefix, with_module=True)
        self.register_load_state_dict_post_hook(DropInWrapper._report_without_prefix)
        self.__dict__["_forwarding_ready"] = True

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

    def named_modules(self, memo: set[nn.Module] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
        """The model's modules under the model's names: the wrapper stands where the model is."""
        *wrappers, model = layers(self)  # the wrapper and any torch.compile layer are not listed
        memo = set() if memo is None else memo
        memo.update(wrappers)
        yield from model.named_modules(memo, prefix, remove_duplicate)

    @staticmethod
    def _strip_prefix(module: nn.Module, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
        for key in [key for key in state if key.startswith(prefix + "module.")]:
            state[_model_key(key, prefix)] = state.pop(key)

    @staticmethod
    def _add_prefix(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
        module.__dict__["_load_prefix"] = prefix
        by_canonical: dict[str, str | None] = {}
        for key in module._modules["module"].state_dict(keep_vars=True):
            name = canonical(key)
            by_canonical[name] = None if name in by_canonical else "module." + key  # ambiguous: exact names only
        for key in [key for key in state if key.startswith(prefix)]:
            target = by_canonical.get(canonical(key[len(prefix):]))
            if target is not None and prefix + target != key:
                state[prefix + target] = state.pop(key)

    @staticmethod
    def _report_without_prefix(module: nn.Module, incompatible: Any) -> None:
        prefix = module.__dict__.get("_load_prefix", "")
        for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
            keys[:] = [_model_key(key, prefix) for key in keys]
