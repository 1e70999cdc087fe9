"""Decoding one image/mask pair, and reading what a mask file means whatever its encoding.

Masks circulate as 0/255 (COD10K), 0/1 (many other sets), other binary scales (16-bit 0/65535, 0/100),
palette PNGs, RGB and grayscale with anti-aliased edges. :func:`mask_levels` brings each to one 8-bit
scale, 0 for background and 255 for the object, so the same data trains and scores the same whatever
its encoding. A file that is no binary mask (grey levels spread across the range, or a few small labels
and nothing near full scale) is refused with its name instead of being read as an empty mask.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from camoxpert.errors import UnreadableFileError

MAX_MID_GREY_SHARE = 0.2
"""Largest share of a grayscale mask's pixels between 25% and 75% of full scale: anti-aliased edges stay far
below it (they are a line, one or two pixels wide), photographs and probability maps far above."""
MASK_FIX = "save masks with 0 for the background and one value (255, or 1) for the object"


class MaskFormatError(UnreadableFileError):
    """A mask file that decodes but is not a binary mask; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"mask {path} is not a binary mask ({reason}): {MASK_FIX}")
        self.path, self.reason = Path(path), reason


def _full_scale(top: float) -> float:
    """The value a mask's object pixels were meant to have: 1, 255 or 65535, the smallest that ``top`` fits."""
    return next((scale for scale in (1.0, 255.0, 65535.0) if top <= scale), float(top))


def _pixel_values(mask: Image.Image) -> np.ndarray:
    if mask.mode in ("P", "PA"):  # palette indices: the object is any non-zero index, whatever its colour
        indices = np.asarray(mask)
        return (indices[..., 0] if indices.ndim == 3 else indices) != 0
    if mask.mode == "1":
        return np.asarray(mask)
    if mask.mode in ("L", "I", "F") or mask.mode.startswith("I;16"):
        return np.asarray(mask)
    return np.asarray(mask.convert("L"))  # RGB, RGBA, LA, CMYK: the brightness


def mask_levels(path: str | Path) -> np.ndarray:
    """A mask file as uint8 HxW: 0 background, 255 object, intermediate values only on soft edges.

    Values ``{0, v}`` (any ``v``) and palette indices are binary: non-zero is the object. Other grayscale
    masks are scaled from their full scale (1, 255 or 65535) to 255, so 8-bit masks come back unchanged.

    Raises:
        MaskFormatError: the file is not a binary mask (see the module docstring).
    """
    with Image.open(path) as mask:
        values = _pixel_values(mask)
    if values.dtype == bool:
        return np.where(values, 255, 0).astype(np.uint8)
    top = float(values.max()) if values.size else 0.0
    low = float(values.min()) if values.size else 0.0
    if low == 0.0 and (top == 0.0 or not np.any((values != 0) & (values != top))):
        return np.where(values != 0, 255, 0).astype(np.uint8)
    scale = _full_scale(top)
    mid_grey = float(np.mean((values > 0.25 * scale) & (values < 0.75 * scale)))
    if mid_grey > MAX_MID_GREY_SHARE:
        raise MaskFormatError(Path(path), f"{mid_grey:.0%} of its pixels are mid-grey, between 25% and 75% of "
                                          f"{scale:g}: a photograph or a probability map?")
    if top < 0.75 * scale:
        raise MaskFormatError(Path(path), f"values {low:g} to {top:g}, none near the full scale {scale:g}: "
                                          "a label map?")
    if scale == 255.0 and values.dtype == np.uint8:
        return values
    return np.rint(values.astype(np.float64) * (255.0 / scale)).clip(0, 255).astype(np.uint8)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as uint8 HxW in {0, 255}: :func:`mask_levels` above 128, as py_sod_metrics binarises."""
    return np.where(mask_levels(path) > 128, 255, 0).astype(np.uint8)


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
    levels = mask_levels(mask_path)
    empty = not bool((levels > 128).any())
    mask = np.asarray(Image.fromarray(levels).resize((size, size), Image.BILINEAR)) > 128
    return image, mask.astype(np.uint8), (int(levels.shape[0]), int(levels.shape[1])), empty
