"""The pre-resized uint8 cache: every image/mask pair of a split decoded once, at the size training needs.

Decoding a large JPEG for every sample of every epoch leaves the GPUs waiting, and a per-rank copy of a
decoded data set costs gigabytes. Here a split is decoded into one uint8 array saved as ``.npy`` and
memory-mapped, so DataLoader workers and DDP ranks share the same pages. The cache key covers the
resolved file list, every file's size and modification time, the cached size and :data:`CACHE_VERSION`,
so a changed data set, ``img_size`` or decoding rule rebuilds it.
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

from camoxpert.decode import MASK_FIX, MaskFormatError, load_pair
from camoxpert.errors import UnreadableFileError

try:
    import fcntl
except ImportError:  # Windows: no lock; concurrent builders then only write identical files twice
    fcntl = None

__all__ = ["CACHE_VERSION", "PairCache", "default_cache_dir", "unreadable_message"]

logger = logging.getLogger(__name__)
CACHE_VERSION = 2
"""Bumped when what is cached changes (2: masks read by ``decode.mask_levels``, so 0/1 masks are no longer empty)."""
_CACHE_DIR_NAME = ".camoxpert-cache"


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
        digest = hashlib.sha256(f"v{CACHE_VERSION} size={size}\n".encode())
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
        not_masks: list[str] = []

        def decode(i: int) -> None:
            try:
                images[i], masks[i], sizes[i], empty[i] = load_pair(*pairs[i], size)
            except MaskFormatError as error:
                not_masks.append(f"{error.path.name} ({error.reason})")
            except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for broken files
                failures.append(f"{pairs[i][0].name} / {pairs[i][1].name} ({type(error).__name__}: {error})")

        workers = workers or min(4, os.cpu_count() or 1)
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(decode, range(count)))
        if failures:
            raise UnreadableFileError(unreadable_message(failures, pairs))
        if not_masks:
            raise UnreadableFileError(unreadable_message(sorted(not_masks), pairs, masks=True))
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


def unreadable_message(failures: list[str], pairs: Sequence[tuple[Path, Path]], *, masks: bool = False) -> str:
    """One error for every file of ``pairs`` that failed (the first 10 named), with the fix."""
    shown = "\n  ".join(failures[:10]) + (f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else "")
    folder = pairs[0][0].parent.parent if pairs else "?"
    if masks:
        return (f"{len(failures)} of {len(pairs)} masks under {folder} are not binary masks:\n  {shown}\n"
                f"Fix: {MASK_FIX}.")
    return (f"{len(failures)} of {len(pairs)} image/mask pairs under {folder} could not be read:\n  {shown}\n"
            "Fix: re-extract or remove those files (and their partners).")


def default_cache_dir(root: Path) -> Path:
    """``<root>/.camoxpert-cache`` when the data set folder is writable, else ``~/.cache/camoxpert``."""
    if os.access(root, os.W_OK):
        return root / _CACHE_DIR_NAME
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "camoxpert"
