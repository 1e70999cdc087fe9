"""The errors autoparallel raises for a problem with the caller's input, files or environment, never for its own bug:
each message names the value, where it came from and the fix, so a script can print ``str(error)`` alone and exit."""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input, file or environment (a value, a variable, a checkpoint); the message says how to fix it."""


class CheckpointError(UsageError, RuntimeError):
    """Base class of the errors raised when a checkpoint cannot be loaded."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (also a ``FileNotFoundError``)."""


class CorruptCheckpointError(CheckpointError):
    """The file exists but is truncated, damaged or is not a checkpoint."""


class UntrustedCheckpointError(CheckpointError):
    """The file needs pickled code to load and the caller has not said it trusts the file."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another architecture (missing, unexpected or reshaped keys)."""
