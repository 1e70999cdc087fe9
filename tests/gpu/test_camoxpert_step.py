"""One CamoXpert training step in every precision on a GPU, and channels_last / cudnn.benchmark computing the
same loss as the default layout. Small backbone, random weights (nothing downloaded), tiny images."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import autoparallel as ap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu import DEVICES, device_runtime, require_bf16  # noqa: E402

pytest.importorskip("timm", reason="CamoXpert's backbones come from timm")
from camoxpert.losses import CODLoss  # noqa: E402
from camoxpert.model import CamoXpert  # noqa: E402

BACKBONE, SIZE, BATCH = "edgenext_xx_small", 64, 2
gpu = pytest.mark.gpu


def tiny_camoxpert() -> CamoXpert:
    torch.manual_seed(0)
    return CamoXpert(backbone=BACKBONE, num_experts=7, deep_supervision=True, pretrained=False)


def batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    masks = (torch.rand(BATCH, 1, SIZE, SIZE, generator=generator) > 0.7).float()
    return images.to(device), masks.to(device)


@pytest.mark.parametrize(("device", "precision"), [("cpu", "fp32"), pytest.param("cuda", "fp32", marks=gpu),
                                                    pytest.param("cuda", "fp16", marks=gpu),
                                                    pytest.param("cuda", "bf16", marks=gpu)])
def test_camoxpert_training_step(device: str, precision: str) -> None:
    if precision == "bf16":
        require_bf16()
    runtime = device_runtime(device, precision)
    assert runtime.precision == precision
    model = ap.wrap(tiny_camoxpert(), runtime=runtime)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = ap.grad_scaler(runtime)
    assert scaler.is_enabled() == (precision == "fp16")
    step = ap.GradientAccumulator(model, optimizer, scaler=scaler, max_grad_norm=1.0)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    images, masks = batch(runtime.device)
    criterion = CODLoss()
    for attempt in range(4):  # fp16: the scaler may skip a first step whose gradients overflow, then lowers its scale
        with step.micro_step(), ap.autocast(runtime):
            output = model(images)
            loss, _parts = criterion(output, masks)
            step.backward(loss)
        assert torch.isfinite(loss), f"loss {loss.item()} at attempt {attempt}"
        assert output["aux_loss"].dim() == 0
        assert step.step()
        if not step.last_step_skipped:
            break
    assert not step.last_step_skipped, "every step overflowed"
    changed = sum(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
    assert changed > len(before) // 2, f"only {changed} of {len(before)} parameter tensors changed"
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def forward_loss(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    loss, _parts = CODLoss()(model(images), masks)
    return loss.detach()


@pytest.mark.usefixtures("restore_cudnn_flags")
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_cudnn_benchmark_compute_the_same_loss(device: str) -> None:
    """Layouts and convolution algorithms change the order of float sums, nothing else. TF32 is turned off so
    that the comparison is at fp32 rounding (TF32 alone differs from fp32 by about 1e-3)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    reference = tiny_camoxpert().to(device).eval()  # eval: BatchNorm's running statistics, no batch dependence
    images, masks = batch(torch.device(device))
    with torch.no_grad():
        default = forward_loss(reference, images, masks)
        channels_last = copy.deepcopy(reference).to(memory_format=torch.channels_last)
        nhwc = forward_loss(channels_last, images.contiguous(memory_format=torch.channels_last), masks)
        torch.testing.assert_close(nhwc, default, rtol=1e-4, atol=1e-5)
        if device == "cuda":
            torch.backends.cudnn.benchmark = True
            benchmarked = forward_loss(reference, images, masks)
            again = forward_loss(reference, images, masks)  # the second call runs the algorithms it picked
            torch.testing.assert_close(benchmarked, default, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(again, default, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(default)
