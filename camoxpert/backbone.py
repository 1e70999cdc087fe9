"""timm feature backbones: construction, pretrained weights without a network, stage groups for unfreezing.

Any timm model that supports ``features_only=True`` works; the decoder reads channels and strides from
``feature_info``, so nothing runs a dummy forward to find them.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import timm
import torch
from torch import nn

from camoxpert.errors import MissingFileError, UserError

__all__ = ["build_backbone", "feature_stage_groups", "min_input_size"]

_logger = logging.getLogger(__name__)

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _cached_weight_file(name: str) -> Path | None:
    """The timm weight file for ``name`` if it is already in the Hugging Face or torch hub cache, else None."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown tags just mean "no cached file"
        return None
    if cfg is None:
        return None
    if getattr(cfg, "hf_hub_id", None):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            filenames = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else list(_HF_WEIGHT_FILES)
            for filename in filenames:
                found = try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    if getattr(cfg, "url", None):
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if candidate.is_file():
            return candidate
    return None


def _network_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """One quick TCP connect: without it, Hugging Face's client retries for about a minute before failing."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_name(name: str) -> None:
    if not timm.models.is_model(name.split(".")[0]):
        raise UserError(f"backbone {name!r} is not a timm model: pass a name from timm.list_models(), "
                        "e.g. edgenext_base")


def min_input_size(name: str) -> int:
    """The smallest square input ``name`` accepts: its deepest feature level's reduction (32 for most backbones).

    Below it the deepest features have no pixel left and timm's layers fail. The backbone is built on the
    ``meta`` device, so this allocates nothing and takes a fraction of a second.
    """
    _check_name(name)
    with torch.device("meta"):
        backbone = timm.create_model(name, features_only=True, pretrained=False)
    return max(int(r) for r in backbone.feature_info.reduction())


def build_backbone(
    name: str, *, pretrained: bool = False, pretrained_path: str | Path | None = None
) -> tuple[nn.Module, bool]:
    """Creates ``timm.create_model(name, features_only=True)`` and loads pretrained weights when it can.

    Weights come, in order, from ``pretrained_path`` (a timm weight file of the classification model, e.g. the
    ``model.safetensors`` of ``timm/<name>`` on the Hugging Face hub), the local timm / Hugging Face cache, or a
    download when the hub is reachable. Without any of them the backbone is randomly initialised and a warning
    says so; that is not an error, because training still works (more slowly).

    Args:
        name: timm model name, e.g. ``edgenext_base`` or ``resnet18``.
        pretrained: try to load ImageNet weights.
        pretrained_path: explicit weight file; implies ``pretrained``. A missing file is an error.

    Returns:
        The feature backbone and whether pretrained weights were loaded.
    """
    _check_name(name)
    if pretrained_path is not None:
        path = Path(pretrained_path).expanduser()
        if not path.is_file():
            raise MissingFileError(
                f"pretrained weights {str(path)!r} not found: pass an existing timm weight file to --pretrained-path"
            )
        try:
            model = timm.create_model(name, features_only=True, pretrained=True,
                                      pretrained_cfg_overlay={"file": str(path)})
        except Exception as error:
            raise UserError(
                f"could not load pretrained weights {str(path)!r} into backbone {name!r}: {error}. The file must be "
                f"the timm classification checkpoint of {name} (a state dict)"
            ) from error
        _logger.info("backbone %s: loaded pretrained weights from %s", name, path)
        return model, True
    if pretrained:
        cached = _cached_weight_file(name)
        try:
            if cached is not None:
                model = timm.create_model(name, features_only=True, pretrained=True,
                                          pretrained_cfg_overlay={"file": str(cached)})
                _logger.info("backbone %s: loaded pretrained weights from the cache (%s)", name, cached)
                return model, True
            if _network_reachable():
                model = timm.create_model(name, features_only=True, pretrained=True)
                _logger.info("backbone %s: downloaded pretrained weights", name)
                return model, True
            reason = "no cached weights and the Hugging Face hub is unreachable"
        except Exception as error:  # noqa: BLE001 - any failure to fetch weights falls back to random init
            reason = f"{type(error).__name__}: {error}"
        _logger.warning(
            "backbone %s: pretrained weights unavailable (%s); using RANDOM initialisation. Pass --pretrained-path "
            "FILE with a timm weight file to use pretrained weights.", name, reason,
        )
    return timm.create_model(name, features_only=True, pretrained=False), False


def feature_stage_groups(backbone: nn.Module) -> list[nn.Module]:
    """Splits a timm feature backbone into one module per returned feature level, shallowest first.

    timm's ``FeatureListNet`` flattens the network into top-level children (``stem_0``, ``stem_1``, ``stages_0``
    ... for EdgeNeXt; ``conv1``, ``bn1``, ``act1``, ``maxpool``, ``layer1`` ... for ResNet). A feature level is
    every child up to and including the one whose name ``feature_info`` reports (dots become underscores), so the
    stem belongs to the first level. Models wrapped differently (hooks, getters) fall back to the feature
    modules themselves, looked up by name.
    """
    module_names = [str(n) for n in backbone.feature_info.module_name()]
    children = list(backbone.named_children())
    child_names = [n for n, _ in children]
    flat_names = [n.replace(".", "_") for n in module_names]
    if all(n in child_names for n in flat_names):
        groups: list[nn.Module] = []
        current: list[nn.Module] = []
        targets = iter(flat_names)
        target = next(targets)
        for child_name, child in children:
            current.append(child)
            if child_name == target:
                groups.append(current[0] if len(current) == 1 else nn.ModuleList(current))
                current = []
                target = next(targets, None)
                if target is None:
                    break
        return groups
    groups = []
    for name in module_names:
        for prefix in ("", "model.", "body."):
            try:
                groups.append(backbone.get_submodule(prefix + name))
                break
            except AttributeError:
                continue
        else:
            raise RuntimeError(
                f"cannot find feature module {name!r} in backbone {type(backbone).__name__}: progressive unfreezing "
                f"needs the modules named by feature_info; use a backbone built by timm with features_only=True"
            )
    return groups
