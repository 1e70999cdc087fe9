"""Stopping a run cleanly and together: a time budget, SIGTERM, SIGINT or SIGUSR1, agreed by every rank. A signal
handler only sets a flag; :meth:`StopRequest.should_stop`, called by every rank at the same step boundaries, combines
all ranks' flags with a small all-reduce on the CPU (its own gloo group under nccl), read at the next call so no check
waits for the network: every rank stops at the same step. Exit with :data:`EXIT_RESUMABLE` to tell a scheduler the
run stopped early on purpose and can be resumed."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from . import group
from .errors import UsageError

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: "temporary failure, try again", i.e. resume
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str | float | int, source: str = "time budget") -> float:
    """Seconds in ``"11h30m"``, ``"90m"``, ``"45s"``, ``"1.5h"`` or plain seconds (``"3600"``, ``3600``)."""
    value = str(text).strip().lower()
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    elif re.fullmatch(r"\d+(?:\.\d+)?", value):
        seconds = float(value)
    elif re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[dhms])+\s*", value):
        seconds = sum(float(number) * _UNITS[unit] for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", value))
    else:
        seconds = -1.0
    if not seconds > 0:
        raise UsageError(f"{source} {text!r} is not a duration: use e.g. 11h30m, 90m, 45s or seconds such as 3600")
    return seconds


class StopRequest:
    """Collects stop requests (``time_budget``, in seconds or as ``"11h30m"``; ``signals``) and tells every rank,
    together, when to stop; with ``save_every``, :attr:`save_due` is True on every rank at the same check once
    that much time has passed. Closing it (or its ``with``) restores the signal handlers; a second Ctrl-C
    interrupts at once."""

    def __init__(self, time_budget: str | float | None = None, save_every: str | float | None = None,
                 signals: tuple[int, ...] = SIGNALS) -> None:
        self.budget_s = None if time_budget is None else parse_duration(time_budget)
        self.save_every_s = None if save_every is None else parse_duration(save_every, "save interval")
        self.started = self._last_save = time.monotonic()
        self.save_due = False
        self.reason: str | None = None  # why this process asked to stop
        self.agreed: str | None = None  # set once every rank agreed to stop
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._group: Any = None
        self._previous = {}
        for number in signals:
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                break

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if number == getattr(signal, "SIGINT", None) and self.reason is not None:
            raise KeyboardInterrupt
        self.reason = self.reason or signal.Signals(number).name

    def request(self, reason: str) -> None:
        """Ask for a stop from code (e.g. an early-stopping rule); it still waits for the next agreement."""
        self.reason = self.reason or reason

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def _local(self) -> list[float]:
        now = time.monotonic()
        if self.reason is None and self.budget_s is not None and now - self.started >= self.budget_s:
            self.reason = f"time budget of {self.budget_s:.0f} s reached"
        due = self.save_every_s is not None and now - self._last_save >= self.save_every_s
        return [float(self.reason is not None), float(due)]

    def _agree(self, stop: bool, due: bool) -> bool:
        self.save_due = due
        if due:
            self._last_save = time.monotonic()
        if stop:
            self.agreed = self.reason or "another rank asked to stop"
            path = os.environ.get("AUTOPARALLEL_STOP_FILE")
            if path and group.rank() == 0:  # tells ap.launch()'s parent that the job stopped on purpose
                Path(path).write_text(self.agreed)
        return stop

    def should_stop(self) -> bool:
        """True, on every rank at the same call, once any rank has asked to stop. Call on every rank."""
        if self.agreed is not None:
            return True
        if not group.is_distributed():
            return self._agree(*(bool(flag) for flag in self._local()))
        if self._group is None:  # CPU coordination; creating it is itself a collective, at the first call
            self._group = dist.new_group(backend="gloo") if group.current().backend != "gloo" else None
        stop = due = False
        if self._pending is not None:
            work, flags = self._pending
            with group.explained("StopRequest.should_stop"):
                work.wait()
            stop, due = (bool(flag) for flag in flags.tolist())
            if due:  # before this check's own flags, or they would ask for the same save again
                self._last_save = time.monotonic()
        flags = torch.tensor(self._local())
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flags)
        if stop:
            self._pending[0].wait()  # leave no collective in flight
        return self._agree(stop, due)

    def close(self) -> None:
        """Restore the signal handlers that were there before."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
