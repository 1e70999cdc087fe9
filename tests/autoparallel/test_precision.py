"""autocast() and grad_scaler() follow the runtime's precision and device."""

from __future__ import annotations

import warnings

import pytest
import torch

from autoparallel import Runtime, autocast, grad_scaler

CPU_FP32 = Runtime(mode="cpu", device="cpu", device_ids=())
CPU_BF16 = Runtime(mode="cpu", device="cpu", device_ids=(), precision="bf16")
CPU_FP16 = Runtime(mode="cpu", device="cpu", device_ids=(), precision="fp16")
T4_FP16 = Runtime(mode="dp", device="cuda:0", device_ids=(0, 1), precision="fp16")
A100_BF16 = Runtime(mode="single", device="cuda:0", device_ids=(0,), precision="bf16")
A100_FP32 = Runtime(mode="single", device="cuda:0", device_ids=(0,), precision="fp32")


def matmul_dtype() -> torch.dtype:
    return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype


@pytest.mark.parametrize("rt", [CPU_FP32, CPU_FP16, A100_FP32])
def test_autocast_is_a_no_op_for_fp32_and_cpu_fp16(rt):
    with autocast(rt):
        assert not torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_enabled("cuda")
        assert matmul_dtype() == torch.float32


def test_autocast_bf16_on_cpu_when_asked():
    with autocast(CPU_BF16):
        assert torch.is_autocast_enabled("cpu")
        assert matmul_dtype() == torch.bfloat16
    assert matmul_dtype() == torch.float32


@pytest.mark.parametrize(("rt", "dtype"), [(T4_FP16, torch.float16), (A100_BF16, torch.bfloat16)])
def test_autocast_on_cuda_uses_the_runtime_dtype(rt, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" on this CPU machine; only the settings matter
        context = autocast(rt)
    assert isinstance(context, torch.autocast)
    assert (context.device, context.fast_dtype) == ("cuda", dtype)


@pytest.mark.parametrize(("rt", "enabled"), [(T4_FP16, True), (A100_BF16, False), (A100_FP32, False),
                                             (CPU_FP16, False), (CPU_BF16, False)])
def test_grad_scaler_only_for_fp16_on_cuda(rt, enabled, monkeypatch):
    # Pretend CUDA exists so that GradScaler does not disable itself on this CPU machine.
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    scaler = grad_scaler(rt)
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.is_enabled() is enabled


def test_grad_scaler_passes_options(monkeypatch):
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    assert grad_scaler(T4_FP16, init_scale=512.0).get_scale() == 512.0


def test_disabled_scaler_is_transparent():
    scaler = grad_scaler(CPU_FP32)
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss
    assert scaler.state_dict() == {}
