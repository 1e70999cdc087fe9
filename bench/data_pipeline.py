"""Training data pipeline throughput, with and without the pre-resized uint8 cache.

Decoding a full-size JPEG per sample and epoch is what starved the GPUs upstream. This measures the
images per second one core delivers (one process, one torch thread, ``num_workers=0``): a DataLoader
with N workers delivers about N times that. Synthetic images are generated at ``--source-size`` (COD10K
photos are about 1024 x 768) and served at ``--img-size``.

    python bench/data_pipeline.py --img-size 320 --num-images 200 --json data_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from camoxpert.data import build_eval_dataset, build_train_val  # noqa: E402
from camoxpert.synthetic import generate_dataset  # noqa: E402


def _rate(dataset, passes: int) -> float:
    """Items per second over ``passes`` full passes (after one warm-up item)."""
    dataset[0]
    start = time.perf_counter()
    for _ in range(passes):
        for i in range(len(dataset)):
            dataset[i]
    return passes * len(dataset) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--source-size", type=int, default=768, help="side of the generated JPEGs")
    parser.add_argument("--num-images", type=int, default=120)
    parser.add_argument("--passes", type=int, default=2, help="epochs timed over the cached data set")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_dataset(Path(tmp) / "data", num_train=args.num_images, num_test=args.num_images // 4,
                                size=args.source_size, seed=0)
        kwargs = {"img_size": args.img_size, "val_fraction": 0.0}
        train, _ = build_train_val(root, cache=False, **kwargs)
        rows.append(("train, no cache (decode + resize + augment)", _rate(train, 1)))
        start = time.perf_counter()
        train, _ = build_train_val(root, cache=True, cache_dir=Path(tmp) / "cache", **kwargs)
        build = time.perf_counter() - start
        rows.append((f"cache build (decode once, {len(train)} images, up to 4 threads)", len(train) / build))
        rows.append(("train, cached (memory-mapped uint8 + augment)", _rate(train, args.passes)))
        train, _ = build_train_val(root, cache=True, cache_dir=Path(tmp) / "cache", augment="none", **kwargs)
        rows.append(("train, cached, no augmentation (resize + normalise)", _rate(train, args.passes)))
        test = build_eval_dataset(root, img_size=args.img_size, cache=False)
        rows.append(("eval, no cache", _rate(test, 1)))
        test = build_eval_dataset(root, img_size=args.img_size, cache=True, cache_dir=Path(tmp) / "cache")
        rows.append(("eval, cached", _rate(test, args.passes)))
    print(f"{args.num_images} synthetic {args.source_size} px JPEGs served at {args.img_size} px; "
          f"1 process, 1 torch thread ({platform.processor() or platform.machine()})")
    print("| pipeline | images/s per core |")
    print("| --- | --- |")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "img_size": args.img_size, "source_size": args.source_size, "num_images": args.num_images,
            "torch": torch.__version__, "images_per_second_per_core": dict(rows),
        }, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
