"""Procedurally generated camouflage scenes in the COD10K-v3 layout.

No COD data set can be downloaded on the machines this project is tested on, so the tests, the demo
and the benchmarks train on scenes drawn here. Each scene is a textured background and one object whose
texture is drawn from the *same palette* as the background: the object is not a colour outlier. It
differs only subtly, in texture scale, in texture contrast or by a small colour shift (one of the
three, sometimes two), so a model has to compare a region with its surroundings, as in real COD.
Trivial baselines (all background, a centre disk, colour-outlier thresholding) stay below IoU 0.3
(see ``bench/baselines.py``) while a small convolutional net learns the task in CPU minutes.

Every image is drawn from its own ``numpy.random.Generator`` seeded by ``(seed, split, index)``, so a
seed gives byte-identical files and changing ``num_test`` leaves the training images unchanged.

Usage::

    python -m camoxpert.synthetic data/synthetic --num-train 320 --num-test 80 --size 160
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["MARKER_FILE", "generate_dataset", "make_scene", "main"]

MARKER_FILE = ".camoxpert-synthetic.json"
"""Written at the data set root; lets ``generate_dataset`` overwrite its own output and nothing else."""

_SPLIT_IDS = {"Train": 1, "Test": 2, "NonCAM": 3}
# (shape kind -> COD10K-style category); real COD10K names read COD10K-CAM-<super>-<Super>-<sub>-<Sub>-<n>.
_CATEGORIES = {
    "blob": "COD10K-CAM-1-Aquatic-1-Fish",
    "ellipse": "COD10K-CAM-2-Terrestrial-1-Frog",
    "polygon": "COD10K-CAM-3-Flying-1-Moth",
}
_NONCAM_CATEGORY = "COD10K-NonCAM-5-Background-1-Grass"
_JPEG_QUALITY = 92


def _smooth_noise(rng: np.random.Generator, count: int, size: int, sigma: float) -> np.ndarray:
    """Return ``count`` stationary Gaussian noise fields (size x size), zero mean, unit std.

    White noise low-passed by a Gaussian of ``sigma`` pixels in the Fourier domain: ``sigma`` is the
    texture scale, the one knob the object may change. Periodic boundaries are harmless here.
    """
    white = rng.standard_normal((count, size, size), dtype=np.float32)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx * fx + fy * fy)).astype(np.float32)
    fields = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=(size, size))
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-12
    return fields


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for an (..., 3) array in [0, 1]."""
    h, s, v = hsv[..., 0] % 1.0, hsv[..., 1], hsv[..., 2]
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _palette(rng: np.random.Generator) -> np.ndarray:
    """A natural-looking palette of 3-5 colours around one hue (K x 3, floats in [0, 1])."""
    count = int(rng.integers(3, 6))
    hue = rng.uniform(0.0, 1.0)
    hsv = np.stack(
        [hue + rng.uniform(-0.08, 0.08, count), rng.uniform(0.2, 0.75, count), rng.uniform(0.2, 0.9, count)],
        axis=1,
    )
    return _hsv_to_rgb(hsv)


def _texture(rng: np.random.Generator, palette: np.ndarray, size: int, sigma: float, contrast: float) -> np.ndarray:
    """Mix the palette with soft weights driven by noise: scale ``sigma`` px, sharpness ``contrast``."""
    logits = contrast * _smooth_noise(rng, len(palette), size, sigma)
    logits -= logits.max(axis=0, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=0, keepdims=True)
    return np.einsum("khw,kc->hwc", weights, palette.astype(np.float32))


def _shape_distance(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """Approximate signed distance in pixels to a random smooth shape (negative inside), and its kind.

    The object covers roughly 4-30 % of the image, centred anywhere in the middle 70 % (not always
    centred, sometimes cut by the border).
    """
    kind = ("blob", "ellipse", "polygon")[int(rng.integers(0, 3))]
    area = rng.uniform(0.04, 0.30) * size * size
    radius = np.sqrt(area / np.pi)
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dy, dx = y - cy, x - cx
    if kind == "blob":
        theta = np.arctan2(dy, dx)
        boundary = np.ones_like(theta)
        for k in range(2, 6):
            boundary += rng.uniform(0.0, 0.32 / k) * np.cos(k * theta + rng.uniform(0.0, 2.0 * np.pi))
        boundary = radius * np.maximum(boundary, 0.35)
        return np.hypot(dy, dx) - boundary, kind
    angle = rng.uniform(0.0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "ellipse":
        aspect = rng.uniform(1.0, 2.5)
        a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
        rho = np.hypot(u / a, v / b)
        return (rho - 1.0) * min(a, b), kind
    # convex polygon with rounded corners: smooth maximum (log-sum-exp) of the half-plane distances
    sides = int(rng.integers(3, 8))
    normals = np.sort(rng.uniform(0.0, 2.0 * np.pi, sides)) + np.linspace(0.0, 2.0 * np.pi, sides, endpoint=False)
    offsets = radius * rng.uniform(0.8, 1.15, sides)
    dist = np.cos(normals)[:, None, None] * u + np.sin(normals)[:, None, None] * v - offsets[:, None, None]
    tau = 0.12 * radius
    top = dist.max(axis=0)
    return top + tau * np.log(np.exp((dist - top) / tau).sum(axis=0)) - tau * np.log(sides) / 2, kind


def make_scene(rng: np.random.Generator, size: int, *, with_object: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """Draw one scene: (image uint8 HxWx3, mask uint8 HxW in {0, 255}, shape kind or "none")."""
    palette = _palette(rng)
    sigma = size * rng.uniform(0.012, 0.03)
    contrast = rng.uniform(2.0, 4.0)
    background = _texture(rng, palette, size, sigma, contrast)
    if with_object:
        distance, kind = _shape_distance(rng, size)
        cues = rng.permutation(3)[: 1 + int(rng.uniform() < 0.6)]
        obj_sigma, obj_contrast, obj_palette = sigma, contrast, palette
        if 0 in cues:  # texture scale
            obj_sigma = sigma * (rng.uniform(0.3, 0.45) if rng.uniform() < 0.5 else rng.uniform(2.2, 3.0))
        if 1 in cues:  # texture contrast
            obj_contrast = contrast * (rng.uniform(0.15, 0.3) if rng.uniform() < 0.5 else rng.uniform(2.8, 4.0))
        if 2 in cues:  # small colour shift of the whole palette
            shift = rng.standard_normal(3)
            obj_palette = np.clip(palette + rng.uniform(0.10, 0.16) * shift / np.linalg.norm(shift), 0.0, 1.0)
        foreground = _texture(rng, obj_palette, size, obj_sigma, obj_contrast)
        alpha = np.clip(0.5 - distance / 1.5, 0.0, 1.0)[..., None]  # ~1.5 px anti-aliased edge
        image = alpha * foreground + (1.0 - alpha) * background
        mask = np.where(distance <= 0.0, 255, 0).astype(np.uint8)
    else:
        kind, image, mask = "none", background, np.zeros((size, size), np.uint8)
    # A gentle illumination gradient and sensor noise shared by object and background.
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.cos(angle) * np.arange(size)[None, :] + np.sin(angle) * np.arange(size)[:, None]) / size
    image = image * (1.0 + rng.uniform(0.0, 0.25) * (ramp - ramp.mean()))[..., None]
    image = image + rng.normal(0.0, 0.015, image.shape)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8), mask, kind


def _clear_previous(root: Path) -> None:
    """Remove what an earlier ``generate_dataset`` wrote at ``root``; refuse to touch any other data."""
    dirs = [root / split / sub for split in ("Train", "Test") for sub in ("Image", "GT_Object")]
    existing = [p for d in dirs if d.is_dir() for p in d.iterdir()]
    if not existing:
        return
    if not (root / MARKER_FILE).is_file():
        raise FileExistsError(
            f"{root} already holds {len(existing)} files in Train/ or Test/ and was not written by "
            f"camoxpert.synthetic (no {MARKER_FILE}); refusing to overwrite it: pass an empty or new folder"
        )
    (root / MARKER_FILE).unlink()  # first: a reader waiting for the marker must not see the old one
    for path in existing:
        if path.name.startswith("COD10K-") and path.suffix in (".jpg", ".png"):
            path.unlink()


def generate_dataset(
    root: str | Path,
    *,
    num_train: int = 320,
    num_test: int = 80,
    size: int = 160,
    seed: int = 0,
    noncam_test: int = 0,
) -> Path:
    """Write a synthetic COD data set in the COD10K-v3 layout and return its root.

    Writes ``root/Train/Image/*.jpg`` + ``root/Train/GT_Object/*.png`` and the same under ``Test``;
    ``noncam_test`` extra test images are COD10K-NonCAM scenes (background only, empty mask), which
    the standard evaluation leaves out. Re-running on the same root replaces the earlier output.

    Args:
        root: Folder to write (created if needed).
        num_train: Number of training scenes.
        num_test: Number of camouflaged test scenes.
        size: Side of the square images in pixels.
        seed: Same seed, same bytes; each image has its own stream keyed by (seed, split, index).
        noncam_test: Number of NonCAM (empty mask) test images added to the test split.

    Returns:
        The root as a ``Path``.
    """
    if size < 16:
        raise ValueError(f"size={size} is too small for a scene: pass size >= 16")
    if min(num_train, num_test, noncam_test) < 0:
        raise ValueError(f"counts must be >= 0, got num_train={num_train} num_test={num_test} noncam={noncam_test}")
    root = Path(root)
    _clear_previous(root)
    plan = [("Train", "Train", i) for i in range(num_train)]
    plan += [("Test", "Test", i) for i in range(num_test)]
    plan += [("Test", "NonCAM", i) for i in range(noncam_test)]
    for split in ("Train", "Test"):
        (root / split / "Image").mkdir(parents=True, exist_ok=True)
        (root / split / "GT_Object").mkdir(parents=True, exist_ok=True)
    for number, (split, stream, index) in enumerate(plan, start=1):
        rng = np.random.default_rng([seed, _SPLIT_IDS[stream], index])
        image, mask, kind = make_scene(rng, size, with_object=stream != "NonCAM")
        stem = f"{_CATEGORIES.get(kind, _NONCAM_CATEGORY)}-{number}"
        Image.fromarray(image).save(root / split / "Image" / f"{stem}.jpg", quality=_JPEG_QUALITY)
        Image.fromarray(mask).save(root / split / "GT_Object" / f"{stem}.png", optimize=False)
    marker = {"generator": "camoxpert.synthetic", "num_train": num_train, "num_test": num_test,
              "size": size, "seed": seed, "noncam_test": noncam_test}
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m camoxpert.synthetic ROOT [--num-train N] ...``."""
    parser = argparse.ArgumentParser(prog="python -m camoxpert.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="output folder (COD10K-v3 layout)")
    parser.add_argument("--num-train", type=int, default=320)
    parser.add_argument("--num-test", type=int, default=80)
    parser.add_argument("--size", type=int, default=160, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noncam-test", type=int, default=0, help="extra NonCAM (empty mask) test images")
    args = parser.parse_args(argv)
    try:
        root = generate_dataset(args.root, num_train=args.num_train, num_test=args.num_test, size=args.size,
                                seed=args.seed, noncam_test=args.noncam_test)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_train} train, {args.num_test} test and {args.noncam_test} NonCAM test images "
          f"({args.size} px, seed {args.seed}) to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
