"""COD data sets: splits, NonCAM filtering, a pre-resized uint8 cache, training and evaluation datasets.

Decoding a large JPEG for every sample of every epoch made the upstream CPU-bound ("GPU 10-40 %"), and
its fix cached every image per DDP rank (about 26 GB on 2 ranks). Here each split is decoded once, at
the size training needs, into one uint8 array saved as ``.npy`` and memory-mapped, so DataLoader
workers and DDP ranks share the same pages. The cache key covers the resolved file list, every file's
size and modification time and the cached size, so a changed data set or ``img_size`` rebuilds it.

Splits follow the COD literature, not the upstream: the validation set is held out of **Train**
(seeded, default 10 %), never carved from Test, and COD10K's NonCAM images (``NonCAM`` in the name or
an empty mask) are left out of the test split by default, giving the standard CAM test set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from camoxpert.layout import Layout, SplitDirs, detect_layout, is_noncam, pair_files
from camoxpert.transforms import AUGMENTATIONS, cache_size, eval_transform, train_transform

try:
    import fcntl
except ImportError:  # Windows: no lock; concurrent builders then only write identical files twice
    fcntl = None

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
_CACHE_VERSION = 1
_CACHE_DIR_NAME = ".camoxpert-cache"


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as uint8 HxW in {0, 255} (binarised at > 128, as py_sod_metrics does)."""
    with Image.open(path) as mask:
        return np.where(np.asarray(mask.convert("L")) > 128, 255, 0).astype(np.uint8)


def load_pair(image_path: Path, mask_path: Path, size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int], bool]:
    """Decode one pair resized to ``size`` x ``size``.

    Returns:
        (image uint8 size x size x 3, mask uint8 size x size in {0, 1}, the mask's original (H, W),
        whether the original mask is empty). JPEGs are decoded at a reduced DCT scale when that still
        gives at least ``size`` pixels (``Image.draft``), which is most of the decoding speed-up.
    """
    with Image.open(image_path) as image:
        image.draft("RGB", (size, size))
        image = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))
    with Image.open(mask_path) as mask_file:
        mask_full = np.asarray(mask_file.convert("L"))
    empty = not bool((mask_full > 128).any())
    mask = np.asarray(Image.fromarray(mask_full).resize((size, size), Image.BILINEAR)) > 128
    return image, mask.astype(np.uint8), (int(mask_full.shape[0]), int(mask_full.shape[1])), empty


class PairCache:
    """Every pair of a file list decoded once at one size: ``images`` (N,S,S,3) and ``masks`` (N,S,S) uint8.

    Also ``original_sizes`` (N, 2) of the masks and ``empty`` (N,) flags. Persisted caches are
    memory-mapped and pickle as their paths, so DataLoader workers (fork or spawn) reopen the same
    pages instead of copying the arrays.
    """

    def __init__(self, images, masks, original_sizes, empty, paths: tuple[Path, Path] | None = None) -> None:
        self.images, self.masks = images, masks
        self.original_sizes, self.empty = np.asarray(original_sizes), np.asarray(empty, dtype=bool)
        self.paths = paths

    def __len__(self) -> int:
        return len(self.images)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.paths is not None:
            state["images"] = state["masks"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()

    def _map(self) -> None:
        if self.paths is not None:
            self.images, self.masks = (np.load(p, mmap_mode="r") for p in self.paths)

    @staticmethod
    def key(pairs: Sequence[tuple[Path, Path]], size: int) -> str:
        """Hash of the cached size and every file's resolved path, byte size and mtime (ns)."""
        digest = hashlib.sha256(f"v{_CACHE_VERSION} size={size}\n".encode())
        for image_path, mask_path in pairs:
            for path in (image_path, mask_path):
                stat = path.stat()
                digest.update(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:20]

    @classmethod
    def build(cls, pairs: Sequence[tuple[Path, Path]], size: int, *, workers: int | None = None) -> PairCache:
        """Decode every pair (threads: PIL releases the GIL); unreadable files are all named in one error."""
        count = len(pairs)
        images = np.empty((count, size, size, 3), np.uint8)
        masks = np.empty((count, size, size), np.uint8)
        sizes = np.empty((count, 2), np.int64)
        empty = np.empty(count, bool)
        failures: list[str] = []

        def decode(i: int) -> None:
            try:
                images[i], masks[i], sizes[i], empty[i] = load_pair(*pairs[i], size)
            except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for broken files
                failures.append(f"{pairs[i][0].name} / {pairs[i][1].name} ({type(error).__name__}: {error})")

        workers = workers or min(4, os.cpu_count() or 1)
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(decode, range(count)))
        if failures:
            raise OSError(_unreadable_message(failures, pairs))
        logger.info("decoded %d images at %d px in %.1f s", count, size, time.perf_counter() - start)
        return cls(images, masks, sizes, empty)

    def _save(self, paths: tuple[Path, Path], meta_path: Path) -> None:
        for path, array in zip(paths, (self.images, self.masks)):
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, array)
            os.replace(tmp, path)
        meta = {"count": len(self), "original_sizes": self.original_sizes.tolist(), "empty": self.empty.tolist()}
        tmp = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)  # written last: its presence means the cache is complete

    @classmethod
    def load_or_build(cls, pairs: Sequence[tuple[Path, Path]], size: int, cache_dir: Path, tag: str) -> PairCache:
        """Memory-map the cache for (pairs, size) from ``cache_dir``, building and saving it first if needed.

        A file lock makes concurrent processes (DDP ranks) build it once; the others wait and map it.
        Older caches with the same ``tag`` (same split, same size, files since changed) are removed.
        """
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            (cache_dir / f"{tag}-{size}px.lock").touch()
        except OSError as error:
            logger.warning("cannot use %s for the image cache (%s): caching in memory instead", cache_dir, error)
            return cls.build(pairs, size)
        stem = cache_dir / f"{tag}-{size}px-{cls.key(pairs, size)}"
        paths = (stem.with_name(stem.name + ".images.npy"), stem.with_name(stem.name + ".masks.npy"))
        meta_path = stem.with_name(stem.name + ".json")
        with _locked(cache_dir / f"{tag}-{size}px.lock"):
            if not meta_path.is_file():
                cache = cls.build(pairs, size)
                try:
                    cache._save(paths, meta_path)
                except OSError as error:  # disk full, quota: train from memory rather than fail
                    logger.warning("cannot write the image cache in %s (%s): keeping it in memory", cache_dir, error)
                    for leftover in cache_dir.glob(f"{stem.name}*.{os.getpid()}.tmp"):
                        leftover.unlink(missing_ok=True)
                    return cache
                for old in cache_dir.glob(f"{tag}-{size}px-*"):
                    if not old.name.startswith(stem.name) and not old.name.endswith(".tmp"):
                        old.unlink(missing_ok=True)
            meta = json.loads(meta_path.read_text())
        cache = cls(None, None, meta["original_sizes"], meta["empty"], paths)
        cache._map()
        return cache


@contextmanager
def _locked(path: Path):
    if fcntl is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _unreadable_message(failures: list[str], pairs: Sequence[tuple[Path, Path]]) -> str:
    shown = "\n  ".join(failures[:10]) + (f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else "")
    folder = pairs[0][0].parent if pairs else "?"
    return (f"{len(failures)} of {len(pairs)} image/mask pairs under {folder.parent if pairs else folder} "
            f"could not be read:\n  {shown}\nFix: re-extract or remove those files (and their partners).")


def _default_cache_dir(root: Path) -> Path:
    """``<root>/.camoxpert-cache`` when the data set folder is writable, else ``~/.cache/camoxpert``."""
    if os.access(root, os.W_OK):
        return root / _CACHE_DIR_NAME
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "camoxpert"


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
            raise OSError(_unreadable_message(bad, pairs))
        return _Source(pairs, size, None)
    tag = f"{layout.kind}-{split.name}-{'all' if noncam else 'cam'}".replace("/", "_").replace("+", "_")
    if cache == "memory":
        return _Source(pairs, size, PairCache.build(pairs, size))
    directory = Path(cache_dir) if cache_dir is not None else _default_cache_dir(layout.root)
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
        raise ValueError(f"val_fraction={val_fraction} leaves no training image out of {len(pairs)}: lower it")
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
        keep_noncam: Train on COD10K NonCAM images too (the upstream did; the literature's 3040-image
            training set does not). They are never put in the validation set.

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
        raise ValueError(f"split {split!r} of {layout.root} has no image with a non-empty mask: pass keep_noncam=True")
    return EvalDataset(source, indices, img_size)
