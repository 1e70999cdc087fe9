"""Checkpoint files on disk: each written to a temporary file that must read back with its digest (BLAKE2b of every
value) before it replaces the target, so a crash or a full disk at any moment leaves the previous file; read with
``weights_only`` unless trusted, and refused by name when damaged later."""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointNotFoundError, CorruptCheckpointError, UntrustedCheckpointError, UsageError

FORMAT_NAME = "autoparallel"
FORMAT_VERSION = 2  # 2: a digest of the payload, the loader's position
_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp")
_EARLIER_COPY = "Use an earlier copy, e.g. best.pt, last.pt or an epoch_XXXX.pt file"


class DiskFullError(UsageError, OSError):
    """The folder has no room for the checkpoint; the previous file is untouched."""


def _digest(payload: Mapping[str, Any]) -> tuple[int, str]:
    """The bytes of the tensors in ``payload`` and the hex digest of all its entries but ``"digest"`` itself."""
    digest = hashlib.blake2b(digest_size=16)

    def feed(value: Any) -> int:  # in an order and a form that survive a save and a load unchanged
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous()
            digest.update(f"T{data.dtype}{tuple(data.shape)}".encode())
            if data.numel():
                digest.update(data.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
            return data.numel() * data.element_size()
        if isinstance(value, Mapping):
            digest.update(f"M{len(value)}".encode())
            return sum(feed(key) + feed(item) for key, item in value.items())
        if isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
            return sum(feed(item) for item in value)
        digest.update(f"{type(value).__name__}:{value!r};".encode())
        return 0

    return feed({key: value for key, value in payload.items() if key != "digest"}), digest.hexdigest()


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files left in ``directory`` by processes that no longer run (killed mid-save)."""
    removed = []
    for candidate in directory.glob(".*.tmp") if directory.is_dir() else ():
        if (match := _TEMPORARY.fullmatch(candidate.name)) is None:
            continue
        try:
            os.kill(int(match["pid"]), 0)  # still running: perhaps another job saving into this folder
        except ProcessLookupError:
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
        except PermissionError:  # running, as another user's process
            pass
    return removed


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed over it (durably) if the block succeeds, else removed."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # Windows cannot open a directory; its rename is durable enough
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write(path: Path, payload: dict[str, Any]) -> None:
    """Write our format's header, ``payload`` and their digest to ``path`` atomically, once it reads back the same."""
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "torch_version": str(torch.__version__), **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    needed, digest = _digest(payload)
    with _replacing(path) as temporary:
        try:
            with open(temporary, "xb") as handle:  # O_CREAT | O_EXCL
                torch.save({**payload, "digest": digest}, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except (OSError, RuntimeError) as error:
            free = shutil.disk_usage(path.parent).free
            if getattr(error, "errno", None) == 28 or free < needed:  # ENOSPC
                raise DiskFullError(f"no space left on {path.parent}: {needed / 2**20:.0f} MB needed for {path.name}, "
                                    f"{free / 2**20:.0f} MB free. Free some space (old epoch_*.pt files?) or save "
                                    f"elsewhere; the previous {path.name} is untouched") from error
            raise
        if read(temporary, trusted=False, map_location="cpu").get("digest") != digest:
            raise CorruptCheckpointError(f"checkpoint {path}: the file written did not read back the same (a failing "
                                         "disk or file system?): the previous file is untouched")


def copy(source: Path, target: Path) -> None:
    """Make ``target`` a complete copy of ``source`` (a hard link when possible), replaced atomically."""
    with _replacing(target) as temporary:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())


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
                                         f"({detail.strip()}). {_EARLIER_COPY}") from exc
        with contextlib.suppress(Exception):  # list every offending global, not only the first the unpickler met
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path) or found
        raise UntrustedCheckpointError(
            f"checkpoint {path} needs pickled Python objects to load ({', '.join(found)}), and unpickling can run "
            "arbitrary code, so it was refused. If you made this file or trust where it came from, call "
            "load_checkpoint(..., trusted=True)") from None
    except Exception as exc:  # truncated zip, damaged records, a foreign file: all the same to the caller
        raise CorruptCheckpointError(f"checkpoint {path} is damaged, truncated or not a PyTorch checkpoint "
                                     f"({type(exc).__name__}: {str(exc)[:200]}). {_EARLIER_COPY}") from exc
    ours = isinstance(loaded, Mapping) and ("digest" in loaded or (loaded.get("format") == FORMAT_NAME and
                                                                   loaded.get("version") == FORMAT_VERSION))
    if ours and ("digest" not in loaded or _digest(loaded)[1] != loaded["digest"]):  # one damaged mark: still ours
        raise CorruptCheckpointError(f"checkpoint {path} is damaged: its contents do not match the digest saved with "
                                     f"them (a changed or partly copied file). {_EARLIER_COPY}")
    return loaded
