"""Which COD data set layout a folder holds, and which image goes with which mask.

COD data sets circulate in a few layouts; a folder is recognised as one of:

* ``COD10K-v3``: ``Train/Image`` + ``Train/GT_Object`` and ``Test/Image`` + ``Test/GT_Object``
  (``Train/Imgs`` + ``Train/GT`` is accepted too);
* ``SINet-V2``: ``TrainDataset/Imgs`` + ``TrainDataset/GT`` and ``TestDataset/<NAME>/Imgs`` + ``GT``
  (CAMO, CHAMELEON, COD10K, NC4K), one split per test set;
* ``Imgs+GT``: a single folder with ``Imgs`` + ``GT`` (NC4K, CAMO, CHAMELEON or one SINet-V2 test set),
  a single ``test`` split, for evaluation.

When the root itself matches nothing but exactly one of its sub-folders does (Kaggle's
``cod10k-dataset/COD10K-v3``), that sub-folder is used. Images are paired with masks by file stem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from camoxpert.errors import MissingFileError, UnknownSplitError, UserError

__all__ = ["IMAGE_EXTENSIONS", "MASK_EXTENSIONS", "Layout", "SplitDirs", "detect_layout", "is_noncam", "pair_files"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MASK_EXTENSIONS = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"})
_SHOWN = 10  # names listed in an error before "... and N more"

_LOOKED_FOR = (
    "  COD10K-v3: Train/Image + Train/GT_Object, Test/Image + Test/GT_Object (or Train/Imgs + Train/GT)\n"
    "  SINet-V2:  TrainDataset/Imgs + TrainDataset/GT, TestDataset/<NAME>/Imgs + TestDataset/<NAME>/GT\n"
    "  Imgs+GT:   Imgs + GT in one folder (NC4K, CAMO, CHAMELEON; evaluation only)"
)


@dataclass(frozen=True)
class SplitDirs:
    """One split of a data set: where its images and its masks are."""

    name: str
    image_dir: Path
    mask_dir: Path


@dataclass(frozen=True)
class Layout:
    """A recognised data set: its kind, its root and its splits by name (``train``, ``test``, ...)."""

    kind: str
    root: Path
    splits: Mapping[str, SplitDirs]

    def split(self, name: str) -> SplitDirs:
        """The split called ``name``; ``test`` on a SINet-V2 layout means ``COD10K`` (or the only test set)."""
        if name in self.splits:
            return self.splits[name]
        tests = [n for n in self.splits if n != "train"]
        if name == "test" and self.kind == "SINet-V2" and tests:
            if "COD10K" in tests or len(tests) == 1:
                return self.splits["COD10K" if "COD10K" in tests else tests[0]]
            raise UnknownSplitError(f"{self.root} ({self.kind}) has several test sets {tests}: choose one by name")
        hint = "a layout with a Train folder (COD10K-v3 or SINet-V2)" if name == "train" else "one of those names"
        raise UnknownSplitError(f"{self.root} ({self.kind}) has no split {name!r}; it has {list(self.splits)}: "
                                f"use {hint}")

    def describe(self) -> str:
        """One line per split, for logs: ``train: Train/Image + Train/GT_Object``."""
        return "\n".join(
            f"{n}: {s.image_dir.relative_to(self.root)} + {s.mask_dir.relative_to(self.root)}"
            for n, s in self.splits.items()
        )


def _pair_dirs(folder: Path, image_name: str, mask_name: str) -> tuple[Path, Path] | None:
    image_dir, mask_dir = folder / image_name, folder / mask_name
    return (image_dir, mask_dir) if image_dir.is_dir() and mask_dir.is_dir() else None


def _match(root: Path) -> Layout | None:
    for image_name, mask_name, kind in (("Image", "GT_Object", "COD10K-v3"), ("Imgs", "GT", "Train/Test Imgs+GT")):
        train = _pair_dirs(root / "Train", image_name, mask_name)
        if train is not None:
            splits = {"train": SplitDirs("train", *train)}
            test = _pair_dirs(root / "Test", image_name, mask_name)
            if test is not None:
                splits["test"] = SplitDirs("test", *test)
            return Layout(kind, root, splits)
    train = _pair_dirs(root / "TrainDataset", "Imgs", "GT")
    test_root = root / "TestDataset"
    tests = {}
    if test_root.is_dir():
        for sub in sorted(p for p in test_root.iterdir() if p.is_dir()):
            dirs = _pair_dirs(sub, "Imgs", "GT")
            if dirs is not None:
                tests[sub.name] = SplitDirs(sub.name, *dirs)
    if train is not None or tests:
        splits = {"train": SplitDirs("train", *train)} if train is not None else {}
        return Layout("SINet-V2", root, {**splits, **tests})
    plain = _pair_dirs(root, "Imgs", "GT")
    if plain is not None:
        return Layout("Imgs+GT", root, {"test": SplitDirs("test", *plain)})
    return None


def _listing(folder: Path) -> str:
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    shown = [p.name + ("/" if p.is_dir() else "") for p in entries[:20]]
    more = f" ... and {len(entries) - 20} more" if len(entries) > 20 else ""
    return ", ".join(shown) + more if shown else "(empty folder)"


def detect_layout(root: str | Path) -> Layout:
    """Recognise the data set layout at ``root`` (or in its only matching sub-folder).

    Raises:
        FileNotFoundError: ``root`` does not exist, or no layout matches; the message lists what was
            looked for and what was found.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"data set path {root} does not exist or is not a folder: pass --dataset-path DIR")
    layout = _match(root)
    if layout is not None:
        return layout
    children = [c for c in sorted(root.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    matches = [m for m in (_match(c) for c in children) if m is not None]
    if len(matches) == 1:
        return matches[0]
    found = f"Found in {root}: {_listing(root)}"
    if len(matches) > 1:
        found += f"\nSeveral sub-folders match ({', '.join(str(m.root.name) for m in matches)}): pass one of them"
    for sub in ("Train", "Test", "TrainDataset"):
        if (root / sub).is_dir():
            found += f"\nFound in {root / sub}: {_listing(root / sub)}"
    raise MissingFileError(
        f"no COD data set layout recognised at {root}. Looked for (at the root or in one sub-folder):\n"
        f"{_LOOKED_FOR}\n{found}\nFix: pass --dataset-path pointing at the folder that holds one of these layouts."
    )


def _files(folder: Path, extensions: frozenset[str]) -> dict[str, Path]:
    """Files of ``folder`` by stem, ignoring hidden files and other extensions; duplicate stems are an error."""
    by_stem: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in extensions or not path.is_file():
            continue
        if path.stem in by_stem:
            duplicates.append(f"{by_stem[path.stem].name} / {path.name}")
        by_stem[path.stem] = path
    if duplicates:
        raise UserError(
            f"{len(duplicates)} file stems appear twice in {folder}: {_names(duplicates)}; "
            "images and masks are paired by stem: keep one file per stem"
        )
    return by_stem


def _names(items: list[str]) -> str:
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def pair_files(split: SplitDirs) -> list[tuple[Path, Path]]:
    """Pair every image of a split with its mask by file stem, sorted by stem.

    Raises:
        FileNotFoundError: an image has no mask or a mask has no image (all such files are counted and
            the first few named), or the split holds no image at all.
    """
    images = _files(split.image_dir, IMAGE_EXTENSIONS)
    masks = _files(split.mask_dir, MASK_EXTENSIONS)
    no_mask = [images[s].name for s in images if s not in masks]
    no_image = [masks[s].name for s in masks if s not in images]
    if no_mask:
        raise MissingFileError(
            f"{len(no_mask)} of {len(images)} images in {split.image_dir} have no mask with the same stem in "
            f"{split.mask_dir}: {_names(no_mask)}. Fix: add the missing masks or remove those images."
        )
    if no_image:
        raise MissingFileError(
            f"{len(no_image)} of {len(masks)} masks in {split.mask_dir} have no image with the same stem in "
            f"{split.image_dir}: {_names(no_image)}. Fix: add the missing images or remove those masks."
        )
    if not images:
        raise MissingFileError(
            f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {split.image_dir}: is the data set complete?"
        )
    return [(images[s], masks[s]) for s in sorted(images)]


def is_noncam(path: Path) -> bool:
    """COD10K names its non-camouflaged images ``COD10K-NonCAM-...``; they have empty masks."""
    return "NonCAM" in Path(path).name
