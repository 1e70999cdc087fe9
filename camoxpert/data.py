"""COD data sets for training and evaluation: splits, NonCAM filtering, and datasets over the uint8 cache.

Splits follow the COD literature: the validation set is held out of **Train** (seeded, default 10 %),
never carved from Test, and COD10K's NonCAM images (``NonCAM`` in the name or an empty mask) are left
out of the test split by default, giving the standard CAM test set. Pixels come from
:class:`camoxpert.cache.PairCache` (decoded once) or are decoded per access (``cache=False``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from camoxpert.cache import PairCache, default_cache_dir, unreadable_message
from camoxpert.decode import load_pair, read_mask
from camoxpert.errors import UnreadableFileError, UserError
from camoxpert.layout import Layout, SplitDirs, detect_layout, is_noncam, pair_files
from camoxpert.transforms import AUGMENTATIONS, cache_size, eval_transform, train_transform

__all__ = [
    "PairCache",
    "TrainDataset",
    "EvalDataset",
    "Layout",
    "detect_layout",
    "pair_files",
    "build_train_val",
    "build_eval_dataset",
    "load_pair",
    "read_mask",
    "split_train_val",
]

logger = logging.getLogger(__name__)


class _Source:
    """Pixels of a file list at one size: from a PairCache, or decoded per access when uncached."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], size: int, cache: PairCache | None) -> None:
        self.pairs, self.size, self.cache = list(pairs), size, cache

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None:
            return self.cache.images[i], self.cache.masks[i]
        image, mask, _, _ = load_pair(*self.pairs[i], self.size)
        return image, mask


def _make_source(layout: Layout, split: SplitDirs, size: int, cache: bool | str, cache_dir, *, noncam: bool):
    if cache not in (True, False, None, "disk", "memory", "none"):
        raise ValueError(f"cache={cache!r} is not one of True/'disk' (memory-mapped file), 'memory', False/'none'")
    pairs = pair_files(split)
    if not noncam:
        pairs = [p for p in pairs if not is_noncam(p[0])]
    if cache in (False, None, "none"):
        bad = []
        for image_path, mask_path in pairs:  # header check now, so a broken file fails here, not mid-epoch
            for path in (image_path, mask_path):
                try:
                    with Image.open(path):
                        pass
                except (OSError, ValueError, SyntaxError) as error:
                    bad.append(f"{path.name} ({type(error).__name__}: {error})")
        if bad:
            raise UnreadableFileError(unreadable_message(bad, pairs))
        return _Source(pairs, size, None)
    tag = f"{layout.kind}-{split.name}-{'all' if noncam else 'cam'}".replace("/", "_").replace("+", "_")
    if cache == "memory":
        return _Source(pairs, size, PairCache.build(pairs, size))
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir(layout.root)
    return _Source(pairs, size, PairCache.load_or_build(pairs, size, directory, tag))


def _is_empty(source: _Source, i: int) -> bool:
    if source.cache is not None:
        return bool(source.cache.empty[i])
    return not read_mask(source.pairs[i][1]).any()


class TrainDataset(Dataset):
    """(image float32 3xSxS ImageNet-normalised, mask float32 1xSxS in {0, 1}) with joint augmentation."""

    def __init__(self, source: _Source, indices: Sequence[int], img_size: int, augment: str = "standard") -> None:
        if augment != "none" and augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r}: choose one of {', '.join([*AUGMENTATIONS, 'none'])}")
        self.source, self.indices, self.img_size = source, list(indices), img_size
        self.transform = (eval_transform(img_size) if augment == "none"
                          else train_transform(img_size, **AUGMENTATIONS[augment]))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.source.get(self.indices[k])
        image = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(np.array(mask))[None])
        image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).float()

    def name(self, k: int) -> str:
        return self.source.pairs[self.indices[k]][0].stem


class EvalDataset(Dataset):
    """(image float32 3xSxS normalised, index) plus each image's original mask, name and size.

    Metrics are computed at the mask's original resolution: resize the prediction to
    ``original_size(i)`` and compare with ``original_mask(i)``.
    """

    def __init__(self, source: _Source, indices: Sequence[int], img_size: int) -> None:
        self.source, self.indices, self.img_size = source, list(indices), img_size
        self.transform = eval_transform(img_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        image, _ = self.source.get(self.indices[k])
        image = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        return self.transform(image).as_subclass(torch.Tensor), k

    def original_mask(self, k: int) -> np.ndarray:
        """The ground truth at its original resolution, uint8 HxW in {0, 255}."""
        return read_mask(self.mask_path(k))

    def original_size(self, k: int) -> tuple[int, int]:
        """(H, W) of the original mask, the size predictions are scored (and saved) at."""
        if self.source.cache is not None:
            h, w = self.source.cache.original_sizes[self.indices[k]]
            return int(h), int(w)
        with Image.open(self.mask_path(k)) as mask:
            return mask.height, mask.width

    def name(self, k: int) -> str:
        """File stem of the image (predictions are saved as ``<name>.png``)."""
        return self.image_path(k).stem

    def image_path(self, k: int) -> Path:
        return self.source.pairs[self.indices[k]][0]

    def mask_path(self, k: int) -> Path:
        return self.source.pairs[self.indices[k]][1]


def split_train_val(pairs: Sequence[tuple[Path, Path]], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded hold-out of ``round(val_fraction * n)`` CAM images of Train (NonCAM never go to val).

    Returns sorted (train indices, val indices), disjoint, together covering every pair.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1): pass e.g. 0.1")
    pool = np.array([i for i, (image, _) in enumerate(pairs) if not is_noncam(image)], dtype=np.int64)
    count = int(round(val_fraction * len(pool)))
    if val_fraction > 0 and count == 0 and len(pool) >= 2:
        count = 1
    if count >= len(pairs):
        raise UserError(f"val_fraction={val_fraction} leaves no training image out of {len(pairs)}: lower it")
    val = np.sort(np.random.default_rng(seed).choice(pool, size=count, replace=False)) if count else pool[:0]
    val_set = set(val.tolist())
    return [i for i in range(len(pairs)) if i not in val_set], val.tolist()


def build_train_val(
    root: str | Path,
    *,
    img_size: int,
    val_fraction: float = 0.1,
    seed: int = 42,
    augment: str = "standard",
    cache: bool | str = True,
    cache_dir: str | Path | None = None,
    keep_noncam: bool = True,
) -> tuple[TrainDataset, EvalDataset]:
    """Training set and validation set, both from the data set's Train split.

    Args:
        root: Data set folder (any layout :func:`detect_layout` knows that has a train split).
        img_size: Model input side; Train is cached at ``cache_size(img_size)`` for random crops.
        val_fraction: Share of Train's CAM images held out (seeded by ``seed``); 0 gives an empty val set.
        augment: ``standard`` or ``light`` joint crop/flip(/rotation) and colour jitter (see
            ``transforms.AUGMENTATIONS``); ``none`` only resizes.
        cache: True (memory-mapped ``.npy`` in ``cache_dir``), ``"memory"``, or False (decode per access).
        cache_dir: Where the cache lives; default ``<root>/.camoxpert-cache``, or ``~/.cache/camoxpert``
            when the data set is read-only.
        keep_noncam: Train on COD10K NonCAM images too (the literature's 3040-image training set leaves
            them out). They are never put in the validation set.

    Returns:
        (TrainDataset yielding (image, mask), EvalDataset yielding (image, index)).
    """
    layout = detect_layout(root)
    source = _make_source(layout, layout.split("train"), cache_size(img_size), cache, cache_dir, noncam=keep_noncam)
    train_idx, val_idx = split_train_val(source.pairs, val_fraction, seed)
    logger.info("%s train split: %d training, %d validation images", layout.kind, len(train_idx), len(val_idx))
    return TrainDataset(source, train_idx, img_size, augment), EvalDataset(source, val_idx, img_size)


def build_eval_dataset(
    root: str | Path,
    *,
    split: str = "test",
    img_size: int,
    keep_noncam: bool = False,
    cache: bool | str = True,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 42,
) -> EvalDataset:
    """An evaluation set: ``test`` (COD10K CAM test by default), ``val``, ``train`` or a named test set.

    Args:
        root: Data set folder (any known layout).
        split: ``test``, ``val`` (the same hold-out as :func:`build_train_val` with the same
            ``val_fraction`` and ``seed``), ``train``, or a SINet-V2 test set name (CAMO, NC4K, ...).
        img_size: Model input side.
        keep_noncam: Keep COD10K NonCAM images (``NonCAM`` in the name or an empty mask) in the set.
        cache: As in :func:`build_train_val`.
        cache_dir: As in :func:`build_train_val`.
        val_fraction: Only for ``split="val"``.
        seed: Only for ``split="val"``.
    """
    layout = detect_layout(root)
    if split == "val":
        _, val = build_train_val(root, img_size=img_size, val_fraction=val_fraction, seed=seed, augment="none",
                                 cache=cache, cache_dir=cache_dir)
        return val
    if split == "train":
        source = _make_source(layout, layout.split("train"), cache_size(img_size), cache, cache_dir, noncam=keep_noncam)
    else:
        source = _make_source(layout, layout.split(split), img_size, cache, cache_dir, noncam=keep_noncam)
    indices = [i for i in range(len(source.pairs)) if keep_noncam or not _is_empty(source, i)]
    dropped = len(source.pairs) - len(indices)
    if dropped:
        logger.info("left out %d images with empty masks (NonCAM) from %s: pass keep_noncam=True to keep them",
                    dropped, split)
    if not indices:
        raise UserError(f"split {split!r} of {layout.root} has no image with a non-empty mask: pass keep_noncam=True "
                        "to evaluate on those images")
    return EvalDataset(source, indices, img_size)
