"""The run folder (``--checkpoint-dir``): the rule that keeps an earlier run's files, the free-space check,
and the files a run writes next to its checkpoints (``args.json``, ``history.jsonl``, ``curves.png``).

A folder that holds a run (``last.pt``, ``best.pt``, ``epoch_*.pt``, ``history.jsonl`` or ``args.json``) is
used again only to continue that run (``--resume-from`` a checkpoint in it) or, with ``--overwrite``, to
start over, which first removes every file an earlier run wrote there, so two runs never mix.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

import autoparallel as ap

from . import curves
from .errors import UserError

RUN_FILES = ("last.pt", "best.pt", "history.jsonl", "args.json")
"""Files whose presence means a run used the folder."""
_OUTPUT_PATTERNS = (*RUN_FILES, "epoch_*.pt", ".*.tmp", "curves.png", "metrics_*.json", "predictions/*.png",
                    "tensorboard/events.out.tfevents.*")
"""Everything a run (and the demo's evaluation and predictions) writes in its folder: what --overwrite removes."""
_MARGIN_BYTES = 16 * 2**20


def previous_run(folder: Path) -> list[str]:
    """The names of the run files in ``folder`` (sorted); empty when no run used it."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name in RUN_FILES or (p.match("epoch_*.pt") and p.is_file()))


def clear(folder: Path) -> None:
    """Removes what an earlier run wrote in ``folder``, and nothing else."""
    for pattern in _OUTPUT_PATTERNS:
        for path in folder.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)
    for sub in ("predictions", "tensorboard"):
        if (folder / sub).is_dir() and not any((folder / sub).iterdir()):
            (folder / sub).rmdir()


def claim(folder: str | Path, *, resume_from: str | None, overwrite: bool, resume_flag: str | None = None) -> None:
    """Makes ``folder`` ready for a run, or refuses with the ways out when an earlier run would be replaced.

    Args:
        folder: the run folder.
        resume_from: the checkpoint the run resumes from, if any; one inside ``folder`` continues its run.
        overwrite: start over in ``folder``, removing the earlier run's files first.
        resume_flag: how the user continues a run, for the message (default ``--resume-from <folder>/last.pt``).

    Raises:
        UserError: ``folder`` holds a run that this one would replace, or both ways were asked for at once.
    """
    folder = Path(folder)
    found = previous_run(folder)
    continues = resume_from is not None and Path(resume_from).resolve().parent == folder.resolve()
    if continues and overwrite:
        raise UserError(f"--overwrite would remove {resume_from}, the checkpoint to resume from: drop --overwrite to "
                        f"continue the run in {folder}, or pass another --checkpoint-dir for the resumed run")
    if not found or continues:
        return
    if overwrite:
        clear(folder)
        return
    ways = []
    if (folder / "last.pt").is_file():
        ways.append(f"pass {resume_flag or '--resume-from ' + str(folder / 'last.pt')} to continue it")
    ways += ["--overwrite to start over there (its files are removed)", "another --checkpoint-dir for a new run"]
    raise UserError(f"{folder} already holds a run ({', '.join(found)}); nothing was replaced: "
                    + ", ".join(ways[:-1]) + f" or {ways[-1]}")


def checkpoint_bytes(model: nn.Module, *, ema: bool) -> int:
    """Estimated size of one checkpoint: the weights, the EMA's copy, and AdamW's two moments per parameter."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return (2 if ema else 1) * (params + buffers) + 2 * params


def check_free_space(folder: str | Path, checkpoint_size: int) -> None:
    """Refuses to start when ``folder``'s disk cannot hold one more checkpoint (plus a 10% + 16 MB margin).

    Raises:
        UserError: ``no space left on <folder>: N MB needed, M free``.
    """
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.resolve().parents) if p.exists())
    needed = checkpoint_size + checkpoint_size // 10 + _MARGIN_BYTES
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"no space left on {folder}: {needed / 1e6:.0f} MB needed for a checkpoint, "
                        f"{free / 1e6:.0f} MB free: free some space or pass --checkpoint-dir on another disk")


class RunLog:
    """``args.json``, ``history.jsonl`` and ``curves.png``; every method does nothing where not ``enabled``."""

    def __init__(self, folder: Path, *, enabled: bool) -> None:
        self.folder, self.enabled = folder, enabled
        self.records: list[dict[str, Any]] = []  # history.jsonl's, for curves.png

    def start(self, config: dict[str, Any], start_epoch: int) -> None:
        """Writes ``args.json``; a continued run keeps the history of the epochs before ``start_epoch``."""
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "args.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        history = self.folder / "history.jsonl"
        if start_epoch and history.is_file():  # its curves start at epoch 1
            records = map(json.loads, history.read_text().splitlines())
            self.records = [record for record in records if record["epoch"] <= start_epoch]
            # Resumed from an earlier checkpoint (best.pt): the epochs after it are trained again, not repeated.
            kept = history.with_name(f".{history.name}.{os.getpid()}.tmp")
            kept.write_text("".join(json.dumps(record) + "\n" for record in self.records))
            os.replace(kept, history)
        if not curves.available():
            ap.print("note: matplotlib is not installed, so curves.png is not written (pip install matplotlib); "
                     "history.jsonl has the same numbers")

    def add(self, record: dict[str, Any]) -> None:
        """Appends ``record`` to ``history.jsonl`` and redraws ``curves.png``."""
        if not self.enabled:
            return
        with open(self.folder / "history.jsonl", "a") as history:
            history.write(json.dumps(record) + "\n")
        self.records.append(record)
        if curves.available():
            curves.write_curves(self.records, self.folder / "curves.png")
