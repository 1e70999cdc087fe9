"""Trivial COD baselines on a data set: how hard is it without learning anything?

A camouflage data set is only useful if predicting "nothing", "a blob in the middle" or "whatever
stands out in colour or texture" fails. This script scores such baselines on a split with the
application's own metrics (per image at the original resolution, then averaged) and prints a table.

    python bench/baselines.py --generate /tmp/cod-synthetic          # synthetic set (default 320/80, 160 px)
    python bench/baselines.py --dataset-path /data/COD10K-v3 --json baselines.json

The centre disk's area is the mean object fraction of the training masks (an oracle prior, to be
generous); the outlier baselines keep the same fraction of each image's most outlying pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from camoxpert.data import detect_layout, pair_files  # noqa: E402
from camoxpert.metrics import METRIC_NAMES, image_metrics, summarize  # noqa: E402
from camoxpert.synthetic import generate_dataset  # noqa: E402


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an HxW or HxWxC float array through the FFT (periodic borders are fine here)."""
    h, w = image.shape[:2]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None] ** 2))
    if image.ndim == 3:
        kernel = kernel[..., None]
    return np.fft.irfft2(np.fft.rfft2(image, axes=(0, 1)) * kernel, s=(h, w), axes=(0, 1))


def _top_fraction(score: np.ndarray, fraction: float) -> np.ndarray:
    """Binary mask of the ``fraction`` highest-scoring pixels."""
    return (score >= np.quantile(score, 1.0 - fraction)).astype(np.float64)


def all_background(image: np.ndarray, fraction: float) -> np.ndarray:
    """Predict no object at all."""
    return np.zeros(image.shape[:2])


def centre_disk(image: np.ndarray, fraction: float) -> np.ndarray:
    """A centred disk (ellipse on non-square images) covering the mean object fraction."""
    h, w = image.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    radius = np.sqrt(fraction / np.pi)
    return ((((y + 0.5) / h - 0.5) ** 2 + ((x + 0.5) / w - 0.5) ** 2) <= radius**2).astype(np.float64)


def colour_outlier(image: np.ndarray, fraction: float) -> np.ndarray:
    """Pixels whose colour is furthest from the image's median colour."""
    pixels = image.astype(np.float64)
    return _top_fraction(np.linalg.norm(pixels - np.median(pixels.reshape(-1, 3), axis=0), axis=2), fraction)


def local_colour_outlier(image: np.ndarray, fraction: float) -> np.ndarray:
    """Pixels whose neighbourhood's mean colour is furthest from the image's mean colour."""
    sigma = max(image.shape[:2]) / 40
    local = _blur(image.astype(np.float64), sigma)
    return _top_fraction(np.linalg.norm(local - local.reshape(-1, 3).mean(axis=0), axis=2), fraction)


def local_texture_outlier(image: np.ndarray, fraction: float) -> np.ndarray:
    """Pixels whose local contrast (std of grey levels) is furthest from the image's median one."""
    grey = image.astype(np.float64).mean(axis=2)
    sigma = max(image.shape[:2]) / 40
    std = np.sqrt(np.maximum(_blur(grey**2, sigma) - _blur(grey, sigma) ** 2, 0.0))
    return _top_fraction(_blur(np.abs(std - np.median(std)), sigma), fraction)


BASELINES = {
    "all background": all_background,
    "centre disk": centre_disk,
    "colour outlier": colour_outlier,
    "local colour outlier": local_colour_outlier,
    "local texture outlier": local_texture_outlier,
}


def _read_mask(path: Path) -> np.ndarray:
    return np.where(np.asarray(Image.open(path).convert("L")) > 128, 255, 0).astype(np.uint8)


def run(root: Path, split: str = "test") -> dict[str, dict[str, float]]:
    """Score every baseline on ``split`` of the data set at ``root``; returns {baseline: summary}."""
    layout = detect_layout(root)
    train_pairs = pair_files(layout.split("train")) if "train" in layout.splits else []
    test_pairs = pair_files(layout.split(split))
    prior_pairs = train_pairs or test_pairs
    fractions = [(_read_mask(m) > 0).mean() for _, m in prior_pairs]
    fraction = float(np.mean(fractions))
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in BASELINES}
    for image_path, mask_path in test_pairs:
        gt = _read_mask(mask_path)
        if "NonCAM" in image_path.name or not gt.any():
            continue  # the standard CAM test, as build_eval_dataset does by default
        image = np.asarray(Image.open(image_path).convert("RGB"))
        for name, baseline in BASELINES.items():
            rows[name].append(image_metrics(baseline(image, fraction), gt))
    return {name: {**summarize(r), "images": len(r)} for name, r in rows.items()} | {"_fraction": fraction}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset-path", type=Path, help="an existing data set (any layout camoxpert.data detects)")
    source.add_argument("--generate", type=Path, help="generate the synthetic set here first")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-train", type=int, default=320)
    parser.add_argument("--num-test", type=int, default=80)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    root = args.dataset_path
    if args.generate is not None:
        root = generate_dataset(args.generate, num_train=args.num_train, num_test=args.num_test, size=args.size,
                                seed=args.seed)
    start = time.perf_counter()
    results = run(root, args.split)
    fraction = results.pop("_fraction")
    print(f"data set: {root} (split {args.split}); mean object fraction of train masks {fraction:.3f}")
    print(f"| baseline | images | {' | '.join(METRIC_NAMES)} |")
    print("| --- " * (len(METRIC_NAMES) + 2) + "|")
    for name, summary in results.items():
        values = " | ".join(f"{summary[m]:.3f}" for m in METRIC_NAMES)
        print(f"| {name} | {summary['images']} | {values} |")
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.json is not None:
        payload = {"dataset": str(root), "split": args.split, "object_fraction": fraction, "baselines": results}
        if args.generate is not None:
            payload["generator"] = {"num_train": args.num_train, "num_test": args.num_test, "size": args.size,
                                    "seed": args.seed}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
