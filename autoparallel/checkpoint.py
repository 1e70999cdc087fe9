"""Portable, safe, atomic checkpoints: :func:`save_checkpoint`, :func:`load_checkpoint` and :class:`CheckpointKeeper`. A
file is plain data that ``torch.load(weights_only=True)`` reads: the state dicts of the unwrapped model, EMA, optimizer,
scheduler, scaler and loader, epoch, step, every rank's random states and ``**extra``; pickled code is refused."""
from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint_file, group, statedict
from .dropin import unwrap
from .ema import prepare_load

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


def _capture_rng() -> dict[str, Any]:
    """This process's random states; CUDA's only where CUDA is already in use (reading it would start it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda: dict[int, torch.Tensor] = {}
    if torch.cuda.is_initialized():  # under DDP only this rank's GPU: reading others would create contexts there
        devices = [torch.cuda.current_device()] if group.is_distributed() else range(torch.cuda.device_count())
        cuda = {index: torch.cuda.get_rng_state(index) for index in devices}
    return {"python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(), "cuda": cuda}


def _restore_rng(states: Any, path: Path) -> None:
    """Restore this rank's entry of the per-rank list of :func:`_capture_rng` states."""
    states = [states] if isinstance(states, Mapping) else states
    if not states:
        logger.warning("checkpoint %s has no random states; random streams are not restored", path)
        return
    rank, world = group.rank(), group.world_size()
    if len(states) != world:
        logger.warning("checkpoint %s holds the random states of %d process(es), this job has %d: every process gets "
                       "rank 0's, so random streams will not match the original run", path, len(states), world)
    state = states[rank] if len(states) == world else states[0]
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].cpu().numpy().astype(np.uint32), saved["pos"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    for index, cuda_state in state.get("cuda", {}).items() if torch.cuda.is_available() else ():
        if int(index) < torch.cuda.device_count():
            torch.cuda.set_rng_state(cuda_state.cpu(), int(index))


def _save(path: PathLike, after_write: Callable[[Path], None], /, *, model: Any = None, epoch: Any = None,
          step: Any = None, **extra: Any) -> Path:
    """:func:`save_checkpoint`, with ``after_write(path)`` run by rank 0 once the file is complete."""
    path = Path(path)
    if not isinstance(model, nn.Module):  # on every rank, before any rank waits for another
        raise TypeError(f"saving {path} needs model=<your nn.Module> (wrapped or not), got {type(model).__name__}: "
                        "pass the model itself, not its state_dict()")
    objects = {name: extra.pop(name, None) for name in ("ema", "optimizer", "scheduler", "scaler", "loader")}
    states: list[Any] | None = [_capture_rng()]
    if group.is_distributed():  # rank 0 gathers every rank's
        mine, states = states[0], ([None] * group.world_size() if group.rank() == 0 else None)
        with group.explained(f"save_checkpoint({path.name}) gathering the random states"):
            dist.gather_object(mine, states, dst=0)
    error: BaseException | None = None
    if group.rank() == 0:
        try:
            payload = {"model": statedict.clean_state_dict(model),
                       **{name: statedict.plain(None if obj is None else obj.state_dict(), name)
                          for name, obj in objects.items()},
                       "epoch": statedict.plain(epoch, "epoch"), "step": statedict.plain(step, "step"),
                       "rng": states, "extra": statedict.plain(extra, "extra")}
            checkpoint_file.write(path, payload)
            after_write(path)
        except BaseException as exc:  # told to the other ranks first, then raised
            error = exc
    if group.is_distributed():
        # Acts as the barrier: no rank goes on before the file is complete, and none hangs if rank 0 failed.
        failure = [None if error is None else f"{type(error).__name__}: {error}"]
        with group.explained(f"save_checkpoint({path.name}) waiting for rank 0's write"):
            dist.broadcast_object_list(failure, src=0)
        if error is None and failure[0] is not None:
            raise RuntimeError(f"rank 0 failed to save checkpoint {path}: {failure[0]}")
    if error is not None:
        raise error
    return path


def save_checkpoint(path: PathLike, *, model: nn.Module, ema: Any = None, optimizer: Any = None, scheduler: Any = None,
                    scaler: Any = None, loader: Any = None, epoch: int | None = None, step: int | None = None,
                    **extra: Any) -> Path:
    """Call on EVERY rank (rank 0 gathers their random states): saves what a resume needs; rank 0 writes it atomically.
    The model is saved unwrapped; the other objects are anything with ``state_dict()`` (an ``autoparallel.loader``
    resumes mid-epoch); ``**extra`` is metadata such as ``best_iou=0.7``."""
    return _save(path, lambda _: None, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                 loader=loader, epoch=epoch, step=step, **extra)


class CheckpointKeeper:
    """Keeps ``last.pt``, ``best.pt`` and, with ``keep_last``, the last epochs' ``epoch_XXXX.pt`` in a folder, each
    replaced atomically and removed only after its successor is complete, so a run killed at any moment resumes."""

    def __init__(self, directory: PathLike, keep_last: int = 0) -> None:
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self.directory, self.keep_last = Path(directory), int(keep_last)
        if group.rank() == 0:
            for stale in checkpoint_file.remove_stale_temporaries(self.directory):
                logger.info("removed %s, left by a run killed while saving", stale)

    @property
    def last(self) -> Path | None:
        """``last.pt``, the file to resume from, or None before the first save."""
        return path if (path := self.directory / "last.pt").is_file() else None

    @property
    def best(self) -> Path | None:
        """``best.pt``, or None before the first save with ``is_best``."""
        return path if (path := self.directory / "best.pt").is_file() else None

    def epoch_files(self) -> list[Path]:
        """The kept ``epoch_XXXX.pt`` files, oldest first."""
        numbered = [(int(m[1]), p) for p in self.directory.glob("epoch_*.pt") if (m := _EPOCH_FILE.fullmatch(p.name))]
        return [path for _, path in sorted(numbered)]

    def save(self, *, is_best: bool = False, **save_checkpoint_kwargs: Any) -> Path:
        """Call on EVERY rank: :func:`save_checkpoint` to ``last.pt``, then copied to ``best.pt`` if ``is_best`` (the
        same on every rank) and to ``epoch_XXXX.pt`` with ``keep_last``, the oldest beyond it removed."""
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

        return _save(self.directory / "last.pt", copies, **save_checkpoint_kwargs)


def read_checkpoint(path: PathLike, *, trusted: bool = False, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint once, in our layout whatever its own: its ``extra`` can say how to build the model,
    and :func:`load_checkpoint` takes the result in place of the path, without reading the file again."""
    path = Path(path)
    checkpoint = checkpoint_file.read(path, trusted=trusted, map_location=map_location)
    return {**statedict.interpret(checkpoint, path), "path": path}


def load_checkpoint(path: PathLike | Mapping[str, Any], *, model: nn.Module | None = None, ema: Any = None,
                    optimizer: Any = None, scheduler: Any = None, scaler: Any = None, loader: Any = None,
                    strict: bool = True, trusted: bool = False, restore_rng: bool = False,
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint of ours or of a common tool into the objects given, after validating all of them. ``ema`` is an
    :class:`EMA` or a plain module; ``strict=False`` loads what matches (something must); ``trusted=True`` allows
    pickled objects, which can run arbitrary code. Tensors are read to the CPU, since ``load_state_dict`` copies them to
    the parameters' devices. Returns the saved epoch, step, extra, loader position and format ("autoparallel",
    "tutorial", "state_dict", "model", "lightning" or "raw"). ``path`` may be what :func:`read_checkpoint` returned."""
    if not isinstance(path, Mapping):
        path = read_checkpoint(path, trusted=trusted, map_location=map_location)
    if not isinstance(path.get("path"), Path):
        raise TypeError("load_checkpoint takes a file path or what read_checkpoint(path) returned, not a state dict: "
                        "save it with save_checkpoint or torch.save, then pass the file's path")
    checkpoint, path = path, path["path"]
    actions: list[Callable[[], Any]] = []
    if model is not None:
        target = unwrap(model)
        matched = statedict.prepare(target, checkpoint["model"], what="model", path=path, strict=strict, logger=logger)
        actions.append(lambda: target.load_state_dict(matched, strict=False))
    if ema is not None:
        if checkpoint.get("ema") is None:
            logger.warning("checkpoint %s has no EMA weights; the EMA starts from the loaded model weights", path)
        actions.append(prepare_load(ema, checkpoint.get("ema"), path=path, strict=strict,
                                    model_state=checkpoint["model"]))
    checks = {"optimizer": statedict.check_optimizer, "scheduler": statedict.check_scheduler}
    for name, obj in {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "loader": loader}.items():
        if obj is None or (name == "scaler" and not obj.is_enabled()):
            continue
        if not (state := checkpoint.get(name)):
            logger.warning("checkpoint %s has no %s state; the %s starts fresh", path, name, name)
            continue
        if name in checks:
            checks[name](obj, state, path)
        actions.append(lambda obj=obj, state=state: obj.load_state_dict(state))
    if restore_rng:
        actions.append(lambda: _restore_rng(checkpoint.get("rng"), path))
    for action in actions:
        action()
    logger.info("loaded checkpoint %s (%s layout, epoch %s)", path, checkpoint["kind"], checkpoint.get("epoch"))
    return {"epoch": checkpoint.get("epoch"), "step": checkpoint.get("step"), "extra": checkpoint.get("extra") or {},
            "loader": checkpoint.get("loader"), "format": checkpoint["kind"]}
