"""User errors: the ones a command reports as ``error: <message>`` and exit status 2, without a traceback.

A user error is anything caused by the user's data, files, flags or machine: :class:`UserError` (raised
by camoxpert), ``autoparallel.UsageError`` (raised by the library, checkpoint errors included), an
``OSError`` about a path (missing, not permitted, disk full) and a GPU out of memory. Everything else is
a bug and keeps its traceback. Under DDP started by :func:`camoxpert.placement.launch`, a worker hands
its message to the parent process, which prints it once after the job has ended.
"""
from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import autoparallel as ap

_RELAY_VARIABLE = "CAMOXPERT_ERROR_FILE"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                *_DISK_FULL}
# Fixes the library (and camoxpert's Python API) spell as keyword arguments, as the command line spells them.
_CLI_SPELLINGS = (
    (re.compile(r",? or pass strict=False to load only the \d+ matching tensors"),
     " (--backbone, --num-experts, --top-k, --deep-supervision)"),
    (re.compile(r"call load_checkpoint\(\.\.\., trusted=True\)"), "pass --trust-checkpoint"),
    (re.compile(r"\btrusted=True\b"), "--trust-checkpoint"),
    (re.compile(r"\(batch_size=(\d+)\), so with drop_last=True an epoch has no batch: lower batch_size or pass "
                r"drop_last=False"), r"(--batch-size \1), so an epoch has no batch: lower --batch-size"),
    (re.compile(r"\bkeep_noncam=True\b"), "--keep-noncam"),
)


class UserError(ap.UsageError):
    """A problem with the user's data, files, flags or run folder, not a bug; the message names it and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A data set folder or file that is not there (also a ``FileNotFoundError``)."""


class UnreadableFileError(UserError, OSError):
    """Image or mask files that exist but cannot be decoded or interpreted (also an ``OSError``)."""


class UnknownSplitError(UserError, KeyError):
    """A split name the data set does not have (also a ``KeyError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def for_cli(message: str) -> str:
    """``message`` with fixes spelled as command-line flags (``--trust-checkpoint``, not ``trusted=True``)."""
    for pattern, replacement in _CLI_SPELLINGS:
        message = pattern.sub(replacement, message)
    return message


def user_message(error: BaseException) -> str | None:
    """What to print for a user error (flags spelled for the command line), or None when ``error`` is a bug."""
    if isinstance(error, ap.UsageError):
        return for_cli(str(error))
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return (f"the GPU ran out of memory ({str(error).splitlines()[0] if str(error) else 'no detail'}): lower "
                "--batch-size (raise --accumulation-steps to keep the effective batch), pass --img-size 288 or "
                "--gradient-checkpointing")
    if isinstance(error, OSError) and error.errno in _PATH_ERRNOS and error.filename:
        text = f"{error.filename}: {error.strerror}"
        if error.errno in _DISK_FULL:
            text += ": free some space or pass a folder on another disk"
        return text
    return None


def report(message: str) -> int:
    """Prints ``error: <message>`` on stderr, or hands it to the parent process that launched this worker.

    Returns the exit status of a user error, 2 (the status argparse gives a bad flag).
    """
    relay = os.environ.get(_RELAY_VARIABLE)
    if relay:
        try:  # the first rank to fail writes it; O_EXCL keeps the others from replacing it
            with open(os.open(relay, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
                handle.write(message)
        except FileExistsError:
            pass
    else:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    return 2


@contextmanager
def relayed_errors() -> Iterator[Path]:
    """Lets the workers started inside the block report a user error to this process, at the yielded path."""
    with tempfile.TemporaryDirectory(prefix="camoxpert-") as folder:
        path = Path(folder) / "error.txt"
        previous = os.environ.get(_RELAY_VARIABLE)
        os.environ[_RELAY_VARIABLE] = str(path)
        try:
            yield path
        finally:
            if previous is None:
                os.environ.pop(_RELAY_VARIABLE, None)
            else:
                os.environ[_RELAY_VARIABLE] = previous
