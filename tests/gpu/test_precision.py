"""Mixed precision on a GPU: fp16 with the grad scaler (an overflow step is skipped, training goes on), bf16
autocast without one, and the precision chosen from the GPU's compute capability."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import autoparallel as ap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu import device_runtime, require_bf16  # noqa: E402

pytestmark = pytest.mark.gpu


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in model.parameters()]


def unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(old, new) for old, new in zip(before, model.parameters()))


def test_auto_precision_is_bf16_from_capability_8_and_fp16_below() -> None:
    runtime = device_runtime("cuda")
    capability = torch.cuda.get_device_capability(0)
    assert runtime.device == torch.device("cuda", 0)
    assert runtime.precision == ("bf16" if capability >= (8, 0) else "fp16")
    assert ap.grad_scaler(runtime).is_enabled() == (runtime.precision == "fp16")


def test_fp16_grad_scaler_skips_an_overflow_step_and_training_goes_on() -> None:
    runtime = device_runtime("cuda", "fp16")
    assert (runtime.precision, runtime.device.type) == ("fp16", "cuda")
    model = ap.wrap(small_net(), runtime=runtime)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = ap.grad_scaler(runtime, init_scale=1024.0)  # small: only the forced step overflows
    assert scaler.is_enabled()
    step = ap.GradientAccumulator(model, optimizer, accumulation_steps=2, scaler=scaler, max_grad_norm=1.0)
    inputs = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).to(runtime.device)

    def window(loss_factor: float) -> None:
        """Two micro-steps and the optimizer step; a huge factor makes the fp16 gradients overflow (the
        gradient reaching the fp16 output is loss_factor x the scale, far beyond fp16's 65504)."""
        for micro in range(2):
            with step.micro_step(), ap.autocast(runtime):
                output = model(inputs)
                assert output.dtype == torch.float16
                loss = output.float().pow(2).mean() * loss_factor
                assert torch.isfinite(loss)
                step.backward(loss)
            assert step.step() == (micro == 1)

    before, scale = snapshot(model), scaler.get_scale()
    window(1.0)
    assert not step.last_step_skipped
    assert not unchanged(model, before)
    assert scaler.get_scale() == scale

    before = snapshot(model)
    window(1e20)
    assert step.last_step_skipped, "an fp16 overflow must skip the optimizer step"
    assert unchanged(model, before), "a skipped step must leave the parameters as they were"
    assert not torch.isfinite(step.last_grad_norm)
    assert scaler.get_scale() == scale / 2, "the scaler halves its scale after an overflow"
    assert all(parameter.grad is None for parameter in model.parameters())

    before = snapshot(model)
    window(1.0)
    assert not step.last_step_skipped
    assert not unchanged(model, before)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def test_bf16_autocast_trains_without_a_grad_scaler() -> None:
    require_bf16()
    runtime = device_runtime("cuda", "bf16")
    assert runtime.precision == "bf16"
    scaler = ap.grad_scaler(runtime)
    assert not scaler.is_enabled()
    model = ap.wrap(small_net(), runtime=runtime)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    step = ap.GradientAccumulator(model, optimizer, scaler=scaler, max_grad_norm=1.0)
    inputs = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)).to(runtime.device)
    targets = inputs.sum(dim=1, keepdim=True)
    losses = []
    for _ in range(20):
        with step.micro_step(), ap.autocast(runtime):
            output = model(inputs)
            assert output.dtype == torch.bfloat16
            loss = nn.functional.mse_loss(output.float(), targets)
            step.backward(loss)
        assert step.step()
        assert not step.last_step_skipped
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())  # autocast keeps fp32 weights
