"""Finding a COD data set on this machine: ``--dataset-path``, else COD10K-v3 under /kaggle/input, else one in
the working folder (``kaggle_2gpu_train.py`` runs the synthetic demo when there is none)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingFileError
from .synthetic import MARKER_FILE

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "node_modules", "checkpoints", "Image", "GT_Object", "GT_Edge",
              "GT_Instance", "Imgs", "GT"}


@dataclass(frozen=True)
class DatasetChoice:
    """The data set to train on, or None (then the demo runs), and where it was looked for."""

    path: Path | None
    source: str
    searched: tuple[str, ...]


def on_kaggle(environ: Mapping[str, str], kaggle_working: Path = KAGGLE_WORKING) -> bool:
    """Whether this runs in a Kaggle notebook (its outputs then go to /kaggle/working)."""
    return "KAGGLE_KERNEL_RUN_TYPE" in environ or kaggle_working.is_dir()


def is_cod10k_root(folder: Path) -> bool:
    """COD10K-v3 layout (Train/Image + Train/GT_Object), not written by camoxpert.synthetic."""
    train = folder / "Train"
    return (train / "Image").is_dir() and (train / "GT_Object").is_dir() and not (folder / MARKER_FILE).exists()


def _search(top: Path, max_depth: int) -> list[Path]:
    """COD10K roots under ``top`` (itself included), breadth first, at most ``max_depth`` levels down."""
    found, level = [], [top]
    for _ in range(max_depth + 1):
        below = []
        for folder in level:
            if is_cod10k_root(folder):
                found.append(folder)
                continue  # its own Train/Test folders hold no further data set
            try:
                entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
            except OSError:  # unreadable or vanished: not a data set
                continue
            below += [Path(e.path) for e in entries
                      if e.is_dir() and not e.name.startswith(".") and e.name not in _SKIP_DIRS]
        level = below
    # A folder named like COD10K wins over other matches (e.g. a CAMO copy in the same input), then depth.
    return sorted(found, key=lambda p: ("cod10k" not in p.name.lower(), len(p.parts), str(p)))


def find_dataset(explicit: str | None, *, kaggle_input: Path = KAGGLE_INPUT, cwd: Path | None = None) -> DatasetChoice:
    """``--dataset-path``, else COD10K-v3 under /kaggle/input, else one in the working folder, else None.

    Raises:
        FileNotFoundError: ``explicit`` names a folder that does not exist (no silent fallback to the demo).
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise MissingFileError(f"--dataset-path {explicit} does not exist: pass the folder that holds Train/ and "
                                    "Test/ (e.g. /kaggle/input/cod10k-dataset/COD10K-v3), or leave it out to search")
        return DatasetChoice(path, "--dataset-path", (str(path),))
    cwd = Path.cwd() if cwd is None else cwd
    searched = (f"{kaggle_input} (4 levels)", f"{cwd} (2 levels)")
    for top, depth, source in ((kaggle_input, 4, "/kaggle/input"), (cwd, 2, "working folder")):
        matches = _search(top, depth) if top.is_dir() else []
        if matches:
            return DatasetChoice(matches[0], source, searched)
    return DatasetChoice(None, "none", searched)


