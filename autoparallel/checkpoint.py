"""Portable, safe, atomic checkpoints.

One format, written by :func:`save_checkpoint` and read by :func:`load_checkpoint`. A file is a
``dict`` that ``torch.load(path, weights_only=True)`` can read, because every value is a tensor or
a plain container of tensors, ``int``, ``float``, ``bool``, ``str`` and ``None``::

    {
        "format": "autoparallel",       # marks our files
        "version": 1,                   # bumped when the layout changes
        "torch_version": "2.x.y",       # informative
        "model": {name: tensor},        # state_dict of unwrap(model): no "module." or "_orig_mod." keys
        "ema": {"module": {name: tensor}, "step": int} | None,   # EMA.state_dict()
        "optimizer": dict | None,       # optimizer.state_dict()
        "scheduler": dict | None,       # scheduler.state_dict()
        "scaler": dict | None,          # GradScaler.state_dict()
        "epoch": int | None,
        "step": int | None,
        "rng": [                        # one entry per rank (a single entry outside DDP)
            {"python": random.getstate(),
             "numpy": {"kind": str, "keys": int64 tensor, "pos": int, "has_gauss": int, "cached_gaussian": float},
             "torch": uint8 tensor,      # torch.get_rng_state()
             "cuda": {device_index: uint8 tensor}},
        ],
        "extra": dict,                  # the **extra keywords (e.g. best_iou, args)
    }

``extra`` is stored as plain data so that the file never needs pickled code to load: an
``argparse.Namespace`` becomes a ``dict`` (``vars(args)``), a ``pathlib`` path a ``str``, a numpy
scalar a Python number and a numpy array a tensor; other objects are refused with a ``TypeError``.

Besides its own files, :func:`load_checkpoint` reads the layouts people already have: a raw
``state_dict``; ``{"state_dict": ..., "state_dict_ema": ...}`` (timm, Lightning);
``{"model": ..., "model_ema": ..., "optimizer": ...}`` (torchvision references);
``{"model_state_dict": ..., "ema_state_dict": ..., "epoch", "best_iou", "args"}`` (upstream
CamoXpert). Keys may carry ``module.`` (DataParallel, DDP) and ``_orig_mod.`` (``torch.compile``)
at any depth; they are matched to the model whatever it is wrapped in now.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.distributed as dist
from torch import nn

from . import _atomic, _state
from .errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UntrustedCheckpointError,
)
from .wrap import unwrap

logger = logging.getLogger("autoparallel")

FORMAT_NAME = "autoparallel"
FORMAT_VERSION = 1
PathLike = Union[str, "os.PathLike[str]"]

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")


def _prepare_module(
    module: nn.Module, state: Mapping[str, Any], *, what: str, path: PathLike, strict: bool
) -> dict[str, Any]:
    """Validate ``state`` against ``module`` and return the state dict to load (nothing is loaded here)."""
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"checkpoint {path} holds no {what} weights (found {type(state).__name__})")
    matched, missing, unexpected, reshaped = _state.match_state_dict(module.state_dict(), state)
    if missing or unexpected or reshaped:
        description = _state.describe(missing, unexpected, reshaped)
        if strict:
            raise CheckpointMismatchError(
                f"checkpoint {path} does not match the {what}: {description}. Build the {what} with the settings "
                f"it was saved with, or pass strict=False to load only the {len(matched)} matching tensors."
            )
        logger.warning("checkpoint %s, %s: loading %d matching tensors; skipped %s", path, what, len(matched),
                       description)
    return matched


# -------------------------------------------------------------------------------------------- saving


def _is_main() -> bool:
    return not _state.distributed() or dist.get_rank() == 0


def _state_of(obj: Any) -> Any:
    return None if obj is None else obj.state_dict()


def _save(path: PathLike, after_write: Callable[[Path], None] | None, *, model: nn.Module, ema: Any,
          optimizer: Any, scheduler: Any, scaler: Any, epoch: int | None, step: int | None,
          extra: dict[str, Any]) -> Path:
    path = Path(path)
    rng = _state.capture_rng()
    if _state.distributed():
        gathered: list[Any] | None = [None] * dist.get_world_size() if _is_main() else None
        dist.gather_object(rng, gathered, dst=0)
        rng_states = gathered
    else:
        rng_states = [rng]
    failure: str | None = None
    error: BaseException | None = None
    if _is_main():
        try:
            payload = {
                "format": FORMAT_NAME, "version": FORMAT_VERSION, "torch_version": str(torch.__version__),
                "model": _state.clean_state_dict(unwrap(model)), "ema": _state_of(ema),
                "optimizer": _state_of(optimizer), "scheduler": _state_of(scheduler), "scaler": _state_of(scaler),
                "epoch": None if epoch is None else int(epoch), "step": None if step is None else int(step),
                "rng": rng_states, "extra": _state.plain(extra, "extra"),
            }
            _atomic.atomic_write(path, payload)
            if after_write is not None:
                after_write(path)
        except BaseException as exc:  # reported to the other ranks first, then re-raised
            error, failure = exc, f"{type(exc).__name__}: {exc}"
    if _state.distributed():
        # Acts as the barrier: no rank goes on before the file is complete, and none hangs if rank 0 failed.
        status = [failure]
        dist.broadcast_object_list(status, src=0)
        failure = status[0]
    if error is not None:
        raise error
    if failure is not None:
        raise RuntimeError(f"rank 0 failed to save checkpoint {path}: {failure}")
    return path


def save_checkpoint(path: PathLike, *, model: nn.Module, ema: Any = None, optimizer: Any = None,
                    scheduler: Any = None, scaler: Any = None, epoch: int | None = None, step: int | None = None,
                    **extra: Any) -> Path:
    """Call on EVERY rank: saves everything needed to resume to ``path``; the main process writes, the others wait.

    Calling it on rank 0 only (``if rank == 0: save_checkpoint(...)``) deadlocks under DDP: rank 0 waits
    for the RNG states and the barrier of ranks that never come. Rank 0 writes the file atomically (with
    the RNG state of every rank) while the others wait, so no rank reads or overwrites a half-written file.

    Args:
        path: target file; its folder is created if needed.
        model: the model, wrapped or not; its unwrapped weights are saved with clean keys.
        ema: an :class:`autoparallel.EMA` (or anything with ``state_dict()``).
        optimizer, scheduler, scaler: objects whose ``state_dict()`` is saved when given.
        epoch, step: progress counters, returned by :func:`load_checkpoint`.
        **extra: metadata such as ``best_iou=0.7, args=args``, stored as plain data (see module doc).

    Returns:
        ``path`` as a ``Path``, on every process, once the file is complete.
    """
    return _save(path, None, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                 epoch=epoch, step=step, extra=extra)


class CheckpointKeeper:
    """Keeps ``last.pt``, ``best.pt`` and optionally ``epoch_XXXX.pt`` of the last ``keep_last`` epochs.

    Every file is replaced atomically, and an old file is removed only after its successor is
    complete, so a run killed at any moment (Kaggle's 12 hour limit) can always resume.
    """

    def __init__(self, directory: PathLike, keep_last: int = 0) -> None:
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = int(keep_last)

    @property
    def last(self) -> Path | None:
        """``directory/last.pt`` when it exists (the checkpoint to resume from), else None."""
        path = self.directory / "last.pt"
        return path if path.is_file() else None

    @property
    def best(self) -> Path | None:
        """``directory/best.pt`` when it exists (the checkpoint saved with ``is_best=True``), else None."""
        path = self.directory / "best.pt"
        return path if path.is_file() else None

    def epoch_files(self) -> list[Path]:
        """The kept ``epoch_XXXX.pt`` files, oldest first."""
        files = [(int(m.group(1)), p) for p in self.directory.glob("epoch_*.pt")
                 if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
        return [path for _, path in sorted(files)]

    def save(self, *, is_best: bool = False, **save_checkpoint_kwargs: Any) -> Path:
        """Call on EVERY rank: writes ``last.pt`` (``best.pt`` if ``is_best``); the main process writes, others wait.

        Like :func:`save_checkpoint`, whose keyword arguments it takes, calling it on rank 0 only deadlocks
        under DDP. ``is_best`` must be the same on every rank (e.g. computed from all-reduced metrics).
        """
        epoch = save_checkpoint_kwargs.get("epoch")
        if self.keep_last and epoch is None:
            raise ValueError(f"CheckpointKeeper(keep_last={self.keep_last}) names its files by epoch: pass epoch=...")

        def link_copies(last: Path) -> None:
            if is_best:
                _atomic.atomic_copy(last, self.directory / "best.pt")
            if self.keep_last:
                _atomic.atomic_copy(last, self.directory / f"epoch_{int(epoch):04d}.pt")
                for old in self.epoch_files()[: -self.keep_last]:
                    old.unlink(missing_ok=True)

        kwargs = dict(save_checkpoint_kwargs)
        names = ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step")
        known = {name: kwargs.pop(name, None) for name in names}
        if known["model"] is None:
            raise TypeError("CheckpointKeeper.save needs model=...")
        return _save(self.directory / "last.pt", link_copies, extra=kwargs, **known)


# ------------------------------------------------------------------------------------------- loading


def _siblings(path: Path) -> str:
    if not path.parent.is_dir():
        return f" (the folder {path.parent} does not exist either)"
    found = sorted(p.name for p in path.parent.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES and p.is_file())
    return f"; checkpoint files in {path.parent}: {', '.join(found[:10])}" if found else f"; {path.parent} has none"


def _read(path: Path, *, trusted: bool, map_location: Any) -> Any:
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist{_siblings(path)}")
    if path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint {path} is a folder; pass a file inside it, e.g. {path / 'last.pt'}")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trusted)
    except PermissionError:
        raise
    except pickle.UnpicklingError as exc:
        names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        if trusted or not names:
            hint = "" if trusted else " If it is a legacy checkpoint you trust, trusted=True may read it."
            raise CorruptCheckpointError(f"checkpoint {path} cannot be read: {str(exc)[:300]}.{hint}") from exc
        try:  # list every offending global, not only the first one the unpickler met
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path) or names
        except Exception:  # a nicer message is optional
            pass
        raise UntrustedCheckpointError(
            f"checkpoint {path} needs pickled Python objects to load ({', '.join(names)}), and unpickling can run "
            "arbitrary code, so it was refused. If you made this file or trust where it came from, call "
            "load_checkpoint(..., trusted=True)."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise CorruptCheckpointError(
            f"checkpoint {path} is truncated or is not a PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Use an earlier copy, e.g. last.pt or an epoch_XXXX.pt file."
        ) from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())


def _first(checkpoint: Mapping[str, Any], *names: str) -> Any:
    return next((checkpoint[name] for name in names if checkpoint.get(name) is not None), None)


def _interpret(checkpoint: Any, path: Path) -> dict[str, Any]:
    """Bring any supported layout to ours: model, ema, optimizer, scheduler, scaler, epoch, step, rng, extra."""
    if isinstance(checkpoint, nn.Module):  # a whole pickled model (trusted files only)
        checkpoint = {"model": checkpoint.state_dict()}
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not weights")
    if checkpoint.get("format") == FORMAT_NAME:
        version = checkpoint.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointMismatchError(f"checkpoint {path} has format version {version}; this autoparallel reads "
                                          f"up to {FORMAT_VERSION}: upgrade autoparallel")
        return {**checkpoint, "kind": FORMAT_NAME}
    if _is_state_dict(checkpoint):
        return {"model": checkpoint, "kind": "raw"}
    layouts = (  # (kind, model key, EMA keys, optimizer keys, scheduler keys, scaler keys)
        ("upstream", "model_state_dict", ("ema_state_dict",), ("optimizer_state_dict", "optimizer"),
         ("scheduler_state_dict", "scheduler"), ("scaler_state_dict", "scaler")),
        ("state_dict", "state_dict", ("state_dict_ema", "model_ema"), ("optimizer",),
         ("lr_scheduler", "scheduler"), ("scaler", "amp_scaler")),
        ("model", "model", ("model_ema", "ema", "state_dict_ema"), ("optimizer",),
         ("lr_scheduler", "scheduler"), ("scaler",)),
    )
    for kind, model_key, ema_keys, optimizer_keys, scheduler_keys, scaler_keys in layouts:
        model_state = checkpoint.get(model_key)
        if isinstance(model_state, nn.Module):
            model_state = model_state.state_dict()
        if not isinstance(model_state, Mapping):
            continue
        used = {model_key, "epoch", "step", *ema_keys, *optimizer_keys, *scheduler_keys, *scaler_keys}
        return {
            "kind": kind, "model": model_state, "ema": _first(checkpoint, *ema_keys),
            "optimizer": _first(checkpoint, *optimizer_keys), "scheduler": _first(checkpoint, *scheduler_keys),
            "scaler": _first(checkpoint, *scaler_keys), "epoch": checkpoint.get("epoch"),
            "step": checkpoint.get("step"), "rng": None,
            "extra": {key: value for key, value in checkpoint.items() if key not in used},
        }
    raise CheckpointMismatchError(f"checkpoint {path} holds no model weights I recognise; its top-level keys are "
                                  f"{_state.names(sorted(map(str, checkpoint)))}")


_OPTIMIZER_MOMENTS = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                      "sum", "ax", "prev", "exp_inf"}


def _check_optimizer(optimizer: Any, state: Any, path: Path) -> None:
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list):
        raise CheckpointMismatchError(f"checkpoint {path}: the optimizer state has no parameter groups")
    mine = optimizer.param_groups
    if len(groups) != len(mine):
        raise CheckpointMismatchError(f"checkpoint {path}: the optimizer state has {len(groups)} parameter groups, "
                                      f"the optimizer {len(mine)}; build it with the same groups before loading")
    for index, (saved, current) in enumerate(zip(groups, mine)):
        if len(saved["params"]) != len(current["params"]):
            raise CheckpointMismatchError(
                f"checkpoint {path}: optimizer group {index} has {len(saved['params'])} parameters in the checkpoint, "
                f"{len(current['params'])} in the optimizer; build it over the same (trainable) parameters")
        for saved_id, param in zip(saved["params"], current["params"]):
            for name, value in state.get("state", {}).get(saved_id, {}).items():
                if name in _OPTIMIZER_MOMENTS and isinstance(value, torch.Tensor) and value.shape != param.shape:
                    raise CheckpointMismatchError(
                        f"checkpoint {path}: optimizer state {name} of group {index} has shape {list(value.shape)}, "
                        f"the parameter {list(param.shape)}")


def load_checkpoint(path: PathLike, *, model: nn.Module | None = None, ema: Any = None, optimizer: Any = None,
                    scheduler: Any = None, scaler: Any = None, strict: bool = True, trusted: bool = False,
                    restore_rng: bool = False, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` or by another common tool.

    Everything is validated before anything is loaded, so a failure leaves every object untouched.

    Args:
        path: the checkpoint file.
        model: loaded into ``unwrap(model)``, whatever wrapper the checkpoint was saved from.
        ema: an :class:`autoparallel.EMA` (or an ``nn.Module``) for the checkpoint's EMA weights.
        optimizer, scheduler, scaler: restored when given and present in the checkpoint.
        strict: refuse architecture mismatches; with ``False`` load what matches and log the rest.
        trusted: allow pickled Python objects. Unpickling can run arbitrary code: only for files you trust.
        restore_rng: restore the Python, numpy, torch and CUDA random states (exact resume).
        map_location: where the file's tensors are read to. The default, ``"cpu"``, is what you want:
            ``load_state_dict`` copies weights and optimizer moments onto the parameters' devices anyway,
            while reading straight to a GPU holds a second copy of everything there and leaves Adam's
            ``step`` counters on the GPU, which costs a host sync per parameter on every later step.

    Returns:
        ``{"epoch", "step", "extra", "format"}``: progress counters, the saved extra metadata and the
        layout that was recognised ("autoparallel", "upstream", "state_dict", "model", "raw").

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, UntrustedCheckpointError, CheckpointMismatchError.
    """
    path = Path(path)
    checkpoint = _interpret(_read(path, trusted=trusted, map_location=map_location), path)
    model_state = checkpoint["model"]
    actions: list[Callable[[], Any]] = []
    if model is not None:
        target = unwrap(model)
        matched = _prepare_module(target, model_state, what="model", path=path, strict=strict)
        actions.append(lambda: target.load_state_dict(matched, strict=strict))
    if ema is not None:
        ema_state = checkpoint.get("ema")
        if ema_state is None:
            logger.warning("checkpoint %s has no EMA weights; the EMA starts from the loaded model weights", path)
        if hasattr(ema, "_prepare_load"):
            prepared = ema._prepare_load(model_state if ema_state is None else ema_state, fallback=model_state,
                                         path=path, strict=strict, restart=ema_state is None)
            actions.append(lambda: ema._apply_load(prepared))
        else:
            ema_state = model_state if ema_state is None else ema_state
            if isinstance(ema_state, Mapping) and isinstance(ema_state.get("module"), Mapping) and "step" in ema_state:
                ema_state = ema_state["module"]  # our EMA's layout, loaded into a plain module
            ema_matched = _prepare_module(ema, ema_state, what="EMA", path=path, strict=strict)
            actions.append(lambda: ema.load_state_dict(ema_matched, strict=strict))
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        state = checkpoint.get(name)
        if obj is None:
            continue
        if state is None or (name == "scaler" and obj.is_enabled() and not state):
            logger.warning("checkpoint %s has no %s state; the %s starts fresh", path, name, name)
            continue
        if name == "scaler" and not obj.is_enabled():
            continue
        if name == "optimizer":
            _check_optimizer(obj, state, path)
        actions.append(lambda obj=obj, state=state: obj.load_state_dict(state))
    if restore_rng:
        actions.append(lambda: _state.restore_rng(checkpoint.get("rng"), path))
    for action in actions:
        action()
    logger.info("loaded checkpoint %s (%s layout, epoch %s)", path, checkpoint["kind"], checkpoint.get("epoch"))
    return {"epoch": checkpoint.get("epoch"), "step": checkpoint.get("step"), "extra": checkpoint.get("extra") or {},
            "format": checkpoint["kind"]}
