"""Portable, safe, atomic checkpoints: :func:`save_checkpoint`, :func:`load_checkpoint`, :class:`CheckpointKeeper`.

A file is a dict that ``torch.load(path, weights_only=True)`` reads::

    {"format": "autoparallel", "version": 2, "torch_version": "2.x.y", "digest": "<blake2b of the rest>",
     "model": {name: tensor},            # state_dict of unwrap(model): no "module." or "_orig_mod."
     "ema": {"module": {...}, "step": int} | None, "optimizer": ..., "scheduler": ..., "scaler": ...,
     "loader": {"epoch": int, "batch": int} | None,          # where the data loader was
     "epoch": int | None, "step": int | None,
     "rng": [{"python", "numpy", "torch", "cuda"}, ...],     # one entry per rank
     "extra": {...}}                                         # the **extra keywords, as plain data

Every value is converted to plain data at save time (numpy numbers, paths, ``argparse.Namespace``) or
refused there, so every file written loads without trusting it. Loading validates every object first
and loads only when all of them fit, so a mismatch leaves everything untouched.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint_file, group, rng, statedict
from .dropin import canonical, unwrap
from .ema import EMA
from .errors import CheckpointMismatchError

logger = logging.getLogger(__name__)

FORMAT_NAME = "autoparallel"
FORMAT_VERSION = 2  # 2: a digest of the payload, the loader's position
PathLike = Union[str, "os.PathLike[str]"]
_FAMILY_KEYS = {"betas", "momentum", "dampening", "nesterov", "alpha", "centered", "lr_decay", "rho", "lambd", "etas",
                "step_sizes", "momentum_decay", "max_iter", "initial_accumulator_value", "t0"}
_MOMENTS = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum", "ax",
            "prev", "exp_inf"}


def _state_of(obj: Any) -> Any:
    return None if obj is None else obj.state_dict()


def _save(path: PathLike, after_write: Callable[[Path], None] | None, *, model: nn.Module, extra: dict[str, Any],
          epoch: int | None = None, step: int | None = None, **objects: Any) -> Path:
    path = Path(path)
    states: list[Any] | None = [rng.capture()]
    if group.is_distributed():
        gathered: list[Any] | None = [None] * group.world_size() if group.rank() == 0 else None
        with group.explained(f"save_checkpoint({path.name}) gathering the random states"):
            dist.gather_object(states[0], gathered, dst=0)
        states = gathered
    failure: str | None = None
    error: BaseException | None = None
    if group.rank() == 0:
        try:
            payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "torch_version": str(torch.__version__),
                       "model": statedict.clean_state_dict(model),
                       **{name: statedict.plain(_state_of(obj), name) for name, obj in objects.items()},
                       "epoch": statedict.plain(epoch, "epoch"), "step": statedict.plain(step, "step"),
                       "rng": states, "extra": statedict.plain(extra, "extra")}
            checkpoint_file.write(path, payload)
            if after_write is not None:
                after_write(path)
        except BaseException as exc:  # told to the other ranks first, then raised
            error, failure = exc, f"{type(exc).__name__}: {exc}"
    if group.is_distributed():
        # Acts as the barrier: no rank goes on before the file is complete, and none hangs if rank 0 failed.
        status = [failure]
        with group.explained(f"save_checkpoint({path.name}) waiting for rank 0's write"):
            dist.broadcast_object_list(status, src=0)
        failure = status[0]
    if error is not None:
        raise error
    if failure is not None:
        raise RuntimeError(f"rank 0 failed to save checkpoint {path}: {failure}")
    return path


def save_checkpoint(path: PathLike, *, model: nn.Module, ema: Any = None, optimizer: Any = None, scheduler: Any = None,
                    scaler: Any = None, loader: Any = None, epoch: int | None = None, step: int | None = None,
                    **extra: Any) -> Path:
    """Call on EVERY rank: saves what a resume needs; rank 0 writes (atomically), the others wait.

    Calling it on rank 0 only deadlocks under DDP (rank 0 waits for the others' random states). Objects
    that are None (e.g. the EMA on ranks that keep none) are simply not saved by that rank.

    Args:
        model: wrapped or not; its unwrapped weights are saved with clean keys.
        ema, optimizer, scheduler, scaler, loader: anything with ``state_dict()`` (``loader``: an
            ``autoparallel.loader``, for resuming mid-epoch at the next batch).
        epoch, step: progress counters, returned by :func:`load_checkpoint`.
        **extra: metadata such as ``best_iou=0.7, args=args``, stored as plain data.
    """
    return _save(path, None, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                 loader=loader, epoch=epoch, step=step, extra=extra)


class CheckpointKeeper:
    """Keeps ``last.pt``, ``best.pt`` and optionally ``epoch_XXXX.pt`` of the last ``keep_last`` epochs.

    Each file is replaced atomically and an old one is removed only after its successor is complete, so a
    run killed at any moment can resume. Temporary files of an earlier run killed mid-save are removed.
    """

    def __init__(self, directory: PathLike, keep_last: int = 0) -> None:
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self.directory, self.keep_last = Path(directory), int(keep_last)
        if group.rank() == 0:
            for stale in checkpoint_file.remove_stale_temporaries(self.directory):
                logger.info("removed %s, left by a run killed while saving", stale)

    @property
    def last(self) -> Path | None:
        path = self.directory / "last.pt"
        return path if path.is_file() else None

    @property
    def best(self) -> Path | None:
        path = self.directory / "best.pt"
        return path if path.is_file() else None

    def epoch_files(self) -> list[Path]:
        """The kept ``epoch_XXXX.pt`` files, oldest first."""
        files = [(int(m.group(1)), p) for p in self.directory.glob("epoch_*.pt")
                 if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
        return [path for _, path in sorted(files)]

    def save(self, *, is_best: bool = False, **save_checkpoint_kwargs: Any) -> Path:
        """Call on EVERY rank: writes ``last.pt`` (and ``best.pt`` if ``is_best``, the same on every rank)."""
        epoch = save_checkpoint_kwargs.get("epoch")
        if self.keep_last and epoch is None:
            raise ValueError(f"CheckpointKeeper(keep_last={self.keep_last}) names its files by epoch: pass epoch=...")

        def copies(last: Path) -> None:
            if is_best:
                checkpoint_file.copy(last, self.directory / "best.pt")
            if self.keep_last:
                checkpoint_file.copy(last, self.directory / f"epoch_{int(epoch):04d}.pt")
                for old in self.epoch_files()[: -self.keep_last]:
                    old.unlink(missing_ok=True)

        kwargs = dict(save_checkpoint_kwargs)
        known = {name: kwargs.pop(name, None) for name in
                 ("model", "ema", "optimizer", "scheduler", "scaler", "loader", "epoch", "step")}
        if known["model"] is None:
            raise TypeError("CheckpointKeeper.save needs model=...")
        return _save(self.directory / "last.pt", copies, extra=kwargs, **known)


def _check_optimizer(optimizer: Any, state: Any, path: Path) -> None:
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


def _check_scheduler(scheduler: Any, state: Any, path: Path) -> None:
    public = {key for key in scheduler.state_dict() if not key.startswith("_") and key != "verbose"}
    saved = {key for key in state if not key.startswith("_") and key != "verbose"} if isinstance(state, Mapping) \
        else set()
    if public != saved:
        raise CheckpointMismatchError(f"checkpoint {path}: the scheduler state is for another scheduler (it has "
                                      f"{statedict.names(sorted(saved - public)) or 'no extra keys'}; "
                                      f"{type(scheduler).__name__} needs {statedict.names(sorted(public - saved))}): "
                                      "build the scheduler it was saved with")
    for key in ("base_lrs", "min_lrs"):
        if key in state and len(state[key]) != len(scheduler.state_dict()[key]):
            raise CheckpointMismatchError(f"checkpoint {path}: the scheduler state covers {len(state[key])} parameter "
                                          f"groups, the optimizer has {len(scheduler.state_dict()[key])}")


def _prepare_ema(ema: Any, checkpoint: Mapping[str, Any], path: Path, strict: bool) -> Callable[[], Any]:
    """Validate the checkpoint's EMA weights for ``ema`` (an EMA or a plain module); return the loading step."""
    state = checkpoint.get("ema")
    if state is None:
        logger.warning("checkpoint %s has no EMA weights; the EMA starts from the loaded model weights", path)
    weights, step = statedict.ema_weights(checkpoint["model"] if state is None else state)
    target = ema.module if isinstance(ema, EMA) else ema
    if isinstance(weights, Mapping):  # EMA weights saved without buffers take the model's
        have = {canonical(key) for key in weights}
        model_state = {canonical(key): value for key, value in checkpoint["model"].items()}
        weights = {**weights, **{name: model_state[canonical(name)] for name, _ in target.named_buffers()
                                 if canonical(name) not in have and canonical(name) in model_state}}
    matched = statedict.prepare(target, weights, what="EMA", path=path, strict=strict, logger=logger)
    if not isinstance(ema, EMA):
        return lambda: target.load_state_dict(matched, strict=False)
    step = 0 if state is None else ema.steps_to_full_decay() if step is None else step
    return lambda: ema.load_state_dict({"module": matched, "step": step}, strict=False)


def load_checkpoint(path: PathLike, *, model: nn.Module | None = None, ema: Any = None, optimizer: Any = None,
                    scheduler: Any = None, scaler: Any = None, loader: Any = None, strict: bool = True,
                    trusted: bool = False, restore_rng: bool = False, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint of ours or of a common tool; every object is validated before any is loaded.

    Args:
        model: loaded into ``unwrap(model)``, whatever wrapper the checkpoint was saved from.
        ema: an :class:`autoparallel.EMA` (or a plain module) for the checkpoint's EMA weights.
        optimizer, scheduler, scaler, loader: restored when given and present in the checkpoint.
        strict: refuse architecture mismatches; ``False`` loads what matches (something must).
        trusted: allow pickled Python objects: unpickling can run arbitrary code, so only for files you trust.
        restore_rng: restore the Python, numpy, torch and CUDA random states (exact resume).
        map_location: where tensors are read to; ``"cpu"`` (the default) is right in nearly every case,
            since ``load_state_dict`` copies onto the parameters' devices anyway.

    Returns:
        ``{"epoch", "step", "extra", "loader", "format"}`` (``loader``: the saved loader position, for a loader
        not passed here); the format is "autoparallel", "tutorial", "state_dict", "model", "lightning" or "raw".
    """
    path = Path(path)
    checkpoint = statedict.interpret(checkpoint_file.read(path, trusted=trusted, map_location=map_location), path,
                                     FORMAT_NAME)
    if checkpoint["kind"] == FORMAT_NAME and not 1 <= int(checkpoint.get("version", 0)) <= FORMAT_VERSION:
        raise CheckpointMismatchError(f"checkpoint {path} has format version {checkpoint.get('version')}; this "
                                      f"autoparallel reads up to {FORMAT_VERSION}: upgrade autoparallel")
    actions: list[Callable[[], Any]] = []
    if model is not None:
        target = unwrap(model)
        matched = statedict.prepare(target, checkpoint["model"], what="model", path=path, strict=strict, logger=logger)
        actions.append(lambda: target.load_state_dict(matched, strict=False))
    if ema is not None:
        actions.append(_prepare_ema(ema, checkpoint, path, strict))
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler), ("loader", loader)):
        state = checkpoint.get(name)
        if obj is None or (name == "scaler" and not obj.is_enabled()):
            continue
        if not state:
            logger.warning("checkpoint %s has no %s state; the %s starts fresh", path, name, name)
            continue
        if name == "optimizer":
            _check_optimizer(obj, state, path)
        if name == "scheduler":
            _check_scheduler(obj, state, path)
        actions.append(lambda obj=obj, state=state: obj.load_state_dict(state))
    if restore_rng:
        actions.append(lambda: rng.restore(checkpoint.get("rng"), path))
    for action in actions:
        action()
    logger.info("loaded checkpoint %s (%s layout, epoch %s)", path, checkpoint["kind"], checkpoint.get("epoch"))
    return {"epoch": checkpoint.get("epoch"), "step": checkpoint.get("step"), "extra": checkpoint.get("extra") or {},
            "loader": checkpoint.get("loader"), "format": checkpoint["kind"]}
