"""CamoXpert's additions to ``python test_multi_gpu.py``: one real training step, and Kaggle's advice.

``autoparallel.check`` knows nothing of the application; ``test_multi_gpu.py`` passes it these.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch

import autoparallel as ap

from .discover import on_kaggle

KAGGLE_ADVICE = ("On Kaggle: Settings > Accelerator > 'GPU T4 x2' (not 'GPU T4' or 'GPU P100'), then save and "
                 "restart the session; `nvidia-smi --list-gpus` should list 2 GPUs.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["camoxpert"], default=None,
                        help="also run one training step of the real model on a tiny input")
    parser.add_argument("--model-backbone", default="edgenext_base",
                        help="timm backbone for --model camoxpert (default: edgenext_base)")


def check_model(args: argparse.Namespace) -> tuple[str, str]:
    """One to three training steps of CamoXpert (fp16 may skip an overflow step first): parameters must move."""
    if args.model is None:
        return "SKIP", "not asked (--model camoxpert runs one training step of the real model)"
    from .losses import CODLoss
    from .model import CamoXpert

    # What a plain `python train_ultimate.py` would run on here, with no process group (this is one process).
    choices = {key: os.environ[key] for key in ("AUTOPARALLEL_DEVICES", "AUTOPARALLEL_PRECISION") if key in os.environ}
    rt = ap.detect_runtime(env=choices, hardware=ap.Hardware.probe())
    batch = max(2, 2 * len(rt.device_ids))
    model = ap.wrap(CamoXpert(backbone=args.model_backbone, pretrained=False, deep_supervision=True), runtime=rt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = ap.grad_scaler(rt)
    images = torch.randn(batch, 3, 64, 64, device=rt.device)
    masks = (torch.rand(batch, 1, 64, 64, device=rt.device) > 0.5).float()
    before = [param.detach().clone() for param in model.parameters()]
    setting = f"backbone {args.model_backbone}, batch {batch} at 64 px, {rt.mode}, {rt.precision}"
    for step in range(1, 4):
        optimizer.zero_grad(set_to_none=True)
        with ap.autocast(rt):
            loss, _ = CODLoss()(model(images), masks)
        if not torch.isfinite(loss):
            return "FAIL", f"{setting}: the loss is {loss.item()} on step {step}"
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        changed = sum(not torch.equal(old, new.detach()) for old, new in zip(before, model.parameters()))
        if changed:
            return "PASS", f"{setting}: loss {loss.item():.4f}, {changed}/{len(before)} parameter tensors updated"
    return "FAIL", f"{setting}: no parameter changed in 3 optimizer steps (loss {loss.item():.4f})"


def advice(environment: dict[str, Any], results: list[Any]) -> list[str]:
    """Kaggle's accelerator setting when the GPUs are missing or fewer than two."""
    return [KAGGLE_ADVICE] if on_kaggle(os.environ) and len(environment["gpus"]) < 2 else []


CHECKS = [("model step", check_model)]
