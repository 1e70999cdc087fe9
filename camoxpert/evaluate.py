"""Inference: scoring a model on an evaluation set (validation and ``evaluate``) and writing masks (``predict``).

Every image is scored at its mask's **original** resolution: the logits are resized to
``dataset.original_size(i)`` before the sigmoid, then :func:`camoxpert.metrics.image_metrics` compares the
probability map with ``dataset.original_mask(i)``. Under DDP each rank scores its contiguous share of the
set (``ap.loader(train=False)`` gives every image to exactly one rank) and the per-image rows are gathered,
so the summary is the same as in one process and every rank holds it.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import autoparallel as ap

from .backbone import min_input_size
from .data import EvalDataset, build_eval_dataset
from .errors import UserError
from .metrics import METRIC_NAMES, image_metrics, summarize
from .model import MODEL_ARGS, build_model
from .placement import runtime_from_args


def inference_module(module: nn.Module, rt: ap.Runtime) -> nn.Module:
    """``module`` ready to predict: spread over the GPUs under DataParallel, on this rank's device otherwise.

    Under DDP the plain module is used: inference needs no gradient synchronisation, and ranks may have
    different numbers of batches.
    """
    if rt.mode == "dp":
        return ap.wrap(module, runtime=rt)
    return module.to(rt.device)


@torch.no_grad()
def predict_probabilities(model: nn.Module, loader: Any, dataset: EvalDataset, rt: ap.Runtime,
                          desc: str = "predict") -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(index, probability map at the original size, float32 HxW)`` for this rank's share."""
    model.eval()
    for images, indices in ap.progress(loader, desc=desc, leave=False, dynamic_ncols=True):
        with ap.autocast(rt):
            logits = model(images.to(rt.device, non_blocking=True))["mask"]
        logits = logits.float()
        for logit, index in zip(logits, indices.tolist()):
            height, width = dataset.original_size(index)
            resized = F.interpolate(logit[None], size=(height, width), mode="bilinear", align_corners=False)
            yield index, torch.sigmoid(resized)[0, 0].cpu().numpy()


def score(model: nn.Module, loader: Any, dataset: EvalDataset, rt: ap.Runtime,
          desc: str = "validate") -> tuple[dict[str, float], torch.Tensor]:
    """Per-image metrics of ``model`` on ``dataset``, gathered over ranks.

    Returns:
        The summary ``{metric: mean over images}`` and the gathered rows, a float64 tensor of shape
        ``(len(dataset), 1 + len(METRIC_NAMES))`` (dataset index, then the metrics), sorted by index.
    """
    rows = []
    for index, probability in predict_probabilities(model, loader, dataset, rt, desc=desc):
        metrics = image_metrics(probability, dataset.original_mask(index))
        rows.append([float(index)] + [metrics[name] for name in METRIC_NAMES])
    local = torch.tensor(rows, dtype=torch.float64).reshape(-1, 1 + len(METRIC_NAMES))
    gathered = ap.all_gather(local.to(rt.device)).cpu()
    gathered = gathered[torch.argsort(gathered[:, 0])]
    if gathered.shape[0] != len(dataset):
        raise RuntimeError(f"evaluation scored {gathered.shape[0]} images of {len(dataset)}: every image must be "
                           "scored exactly once; build the loader with autoparallel.loader(train=False)")
    summary = summarize([dict(zip(METRIC_NAMES, row[1:].tolist())) for row in gathered])
    return summary, gathered


# --- checkpoints for inference ------------------------------------------------------------------------------


def _checkpoint_config(args: argparse.Namespace, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The training configuration saved in the checkpoint, overridden by the model flags given here."""
    saved = (checkpoint.get("extra") or {}).get("args") or {}
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved  # a trusted legacy file's Namespace
    config = {key: saved.get(key) for key in (*MODEL_ARGS, "dataset_path", "val_fraction", "seed", "use_ema")}
    for key in MODEL_ARGS:
        if getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    defaults = {"backbone": "edgenext_base", "num_experts": 7, "img_size": 320, "val_fraction": 0.1, "seed": 42}
    for key, value in defaults.items():
        if config.get(key) is None:
            if key in ("backbone", "img_size") and not saved:
                flag = "--" + key.replace("_", "-")
                ap.print(f"checkpoint {args.checkpoint} records no training arguments: assuming {flag} {value} "
                         "(pass it explicitly if the model differs)")
            config[key] = value
    if args.dataset_path is not None:
        config["dataset_path"] = args.dataset_path
    if not config.get("dataset_path"):
        raise UserError(f"checkpoint {args.checkpoint} does not say which data set it was trained on: "
                        "pass --dataset-path")
    smallest = min_input_size(config["backbone"])
    if config["img_size"] < smallest:
        raise UserError(f"--img-size {config['img_size']} is below what backbone {config['backbone']} accepts: pass "
                        f"--img-size {smallest} or more")
    return config


def load_for_inference(args: argparse.Namespace) -> tuple[nn.Module, ap.Runtime, dict[str, Any], str]:
    """Builds the model a checkpoint was trained with and loads the weights ``--weights`` asks for.

    Returns:
        The module to predict with, the runtime, the resolved configuration and which weights were used
        (``"ema"`` or ``"model"``).
    """
    rt = runtime_from_args(args)
    ap.print_banner(rt)
    checkpoint = ap.read_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)  # the model is built from it
    config = _checkpoint_config(args, checkpoint)
    model = build_model(config).to(rt.device)
    use_ema = args.weights == "ema" or (args.weights == "auto" and bool(config.get("use_ema")))
    ema = ap.EMA(model, decay=0.0, warmup=False) if use_ema else None
    ap.load_checkpoint(checkpoint, model=model, ema=ema)
    weights = "ema" if use_ema else "model"
    module = ema.module if ema is not None else model
    ap.print(f"loaded {weights} weights of {args.checkpoint} ({config['backbone']}, {config['num_experts']} experts, "
             f"{config['img_size']} px)")
    return inference_module(module, rt), rt, config, weights


def _eval_dataset(args: argparse.Namespace, config: dict[str, Any]) -> EvalDataset:
    return build_eval_dataset(config["dataset_path"], split=args.split, img_size=config["img_size"],
                              keep_noncam=args.keep_noncam, val_fraction=config["val_fraction"], seed=config["seed"])


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """``train_ultimate.py evaluate``: metrics of a checkpoint on a split, written as JSON by the main process."""
    model, rt, config, weights = load_for_inference(args)
    dataset = _eval_dataset(args, config)
    loader = ap.loader(dataset, args.batch_size, train=False, num_workers=args.num_workers, runtime=rt)
    summary, rows = score(model, loader, dataset, rt, desc=f"evaluate {args.split}")
    result = {
        "checkpoint": str(Path(args.checkpoint).resolve()), "dataset_path": str(config["dataset_path"]),
        "split": args.split, "num_images": len(dataset), "weights": weights, "img_size": config["img_size"],
        "metrics": summary,
        "per_image": [{"name": dataset.name(int(row[0])), **dict(zip(METRIC_NAMES, row[1:].tolist()))}
                      for row in rows],
    }
    output = Path(args.output) if args.output else Path(args.checkpoint).parent / f"metrics_{args.split}.json"
    if rt.is_main:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
    ap.print(f"{args.split} ({len(dataset)} images, {weights} weights): "
             + " | ".join(f"{name} {value:.4f}" for name, value in summary.items()))
    ap.print(f"metrics written to {output}")
    return result


def predict(args: argparse.Namespace) -> list[Path]:
    """``train_ultimate.py predict``: one grayscale PNG per image, at the image's original size.

    Probability maps (0-255) by default, the format COD evaluation toolkits read; binary masks with
    ``--threshold``. Under DDP each rank writes its own share of the files.
    """
    model, rt, config, _ = load_for_inference(args)
    dataset = _eval_dataset(args, config)
    loader = ap.loader(dataset, args.batch_size, train=False, num_workers=args.num_workers, runtime=rt)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, probability in predict_probabilities(model, loader, dataset, rt, desc=f"predict {args.split}"):
        if args.threshold is not None:
            pixels = np.where(probability >= args.threshold, 255, 0).astype(np.uint8)
        else:
            pixels = np.rint(probability * 255.0).astype(np.uint8)
        path = output_dir / f"{dataset.name(index)}.png"
        Image.fromarray(pixels).save(path)
        written.append(path)
    ap.barrier()
    ap.print(f"wrote {len(dataset)} masks to {output_dir}")
    return written
