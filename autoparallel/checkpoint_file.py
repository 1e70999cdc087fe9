"""Checkpoint files on disk: written atomically with a digest, read back safely and verified.

A save writes a temporary file beside the target, reads it back with ``weights_only=True`` to check its
digest, and only then renames it over the target, so a crash, a full disk or a bad write at any moment
leaves the previous complete file. The digest (BLAKE2b over every value of the payload) is checked on
every load, so a file damaged later (a flipped byte, a truncated copy) is refused with its name rather
than loaded. Temporary files of a process killed mid-save are removed on the next save or start.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointNotFoundError, CorruptCheckpointError, UntrustedCheckpointError, UsageError

_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp")


class DiskFullError(UsageError, OSError):
    """The folder has no room for the checkpoint; the previous file is untouched."""


def _feed(digest: Any, value: Any) -> None:
    """Hash ``value`` in an order and form that survive a save and a load unchanged."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest.update(f"T{data.dtype}{tuple(data.shape)}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(value, Mapping):
        digest.update(f"M{len(value)}".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def digest_of(payload: Mapping[str, Any]) -> str:
    """The hex digest of every entry of ``payload`` except ``"digest"`` itself."""
    digest = hashlib.blake2b(digest_size=16)
    _feed(digest, {key: value for key, value in payload.items() if key != "digest"})
    return digest.hexdigest()


def tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files left in ``directory`` by processes that no longer run (killed mid-save)."""
    removed = []
    for candidate in directory.glob(".*.tmp") if directory.is_dir() else ():
        match = _TEMPORARY.fullmatch(candidate.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group("pid")), 0)
            continue  # still running: perhaps another job saving into this folder
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _no_space(path: Path, needed: int) -> DiskFullError:
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(f"no space left on {path.parent}: {needed / 2**20:.0f} MB needed for {path.name}, "
                         f"{free / 2**20:.0f} MB free. Free some space (old epoch_*.pt files?) or save elsewhere; "
                         f"the previous {path.name} is untouched")


def write(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (with its digest) to ``path`` atomically, after checking what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    payload = {**payload, "digest": digest_of(payload)}
    temporary = _temporary(path)
    try:
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except (OSError, RuntimeError) as error:
            needed = tensor_bytes(payload)
            if getattr(error, "errno", None) == 28 or shutil.disk_usage(path.parent).free < needed:  # ENOSPC
                raise _no_space(path, needed) from error
            raise
        written = read(temporary, trusted=False, map_location="cpu")
        if written.get("digest") != payload["digest"] or digest_of(written) != payload["digest"]:
            raise CorruptCheckpointError(f"checkpoint {path}: the file written did not read back the same (a failing "
                                         "disk or file system?): the previous file is untouched")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def copy(source: Path, target: Path) -> None:
    """Make ``target`` a complete copy of ``source`` (a hard link when possible), replaced atomically."""
    temporary = _temporary(target)
    try:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _siblings(path: Path) -> str:
    if not path.parent.is_dir():
        return f" (the folder {path.parent} does not exist either)"
    found = sorted(p.name for p in path.parent.iterdir() if p.suffix in _SUFFIXES and p.is_file())
    return f"; checkpoint files in {path.parent}: {', '.join(found[:10])}" if found else f"; {path.parent} has none"


def read(path: Path, *, trusted: bool, map_location: Any) -> Any:
    """``torch.load`` with weights only (unless trusted), every failure named, our digest verified."""
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist{_siblings(path)}")
    if path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint {path} is a folder; pass a file inside it, e.g. {path / 'last.pt'}")
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=not trusted)
    except PermissionError:
        raise
    except pickle.UnpicklingError as exc:
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        if trusted or not found:  # no pickled class named: damage, not a legacy format worth trusting
            detail = next((line for line in str(exc).splitlines() if "Unpickler error" in line), str(exc)[:200])
            raise CorruptCheckpointError(f"checkpoint {path} is damaged or not a PyTorch checkpoint "
                                         f"({detail.strip()}). Use an earlier copy, e.g. best.pt, last.pt or an "
                                         "epoch_XXXX.pt file") from exc
        try:  # list every offending global, not only the first one the unpickler met
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path) or found
        except Exception:  # a nicer message is optional
            pass
        raise UntrustedCheckpointError(
            f"checkpoint {path} needs pickled Python objects to load ({', '.join(found)}), and unpickling can run "
            "arbitrary code, so it was refused. If you made this file or trust where it came from, call "
            "load_checkpoint(..., trusted=True)") from None
    except Exception as exc:  # truncated zip, damaged records, a foreign file: all the same to the caller
        raise CorruptCheckpointError(f"checkpoint {path} is damaged, truncated or not a PyTorch checkpoint "
                                     f"({type(exc).__name__}: {str(exc)[:200]}). Use an earlier copy, e.g. best.pt, "
                                     "last.pt or an epoch_XXXX.pt file") from exc
    if isinstance(loaded, Mapping) and "digest" in loaded and digest_of(loaded) != loaded["digest"]:
        raise CorruptCheckpointError(f"checkpoint {path} is damaged: its contents do not match the digest saved with "
                                     "them (a changed or partly copied file). Use an earlier copy, e.g. best.pt, "
                                     "last.pt or an epoch_XXXX.pt file")
    return loaded
