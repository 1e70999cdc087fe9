"""Checkpoints and EMA across devices: saved with CUDA tensors and loaded on the CPU (also in a process that
sees no GPU at all), saved on the CPU and loaded on a GPU, and an EMA kept on the CPU for a GPU model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoparallel as ap

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _ddp_one_device_worker import Net  # noqa: E402
from _gpu import REPO, device_runtime, subprocess_environment  # noqa: E402

gpu = pytest.mark.gpu
CASES = [("cpu", "cpu"), pytest.param("cuda", "cpu", marks=gpu), pytest.param("cpu", "cuda", marks=gpu),
         pytest.param("cuda", "cuda", marks=gpu)]


def trained(device: str, steps: int = 2):
    """A model, its AdamW, a grad scaler (enabled on a GPU) and an EMA after a few steps on `device`."""
    torch.manual_seed(0)
    model = ap.wrap(Net(), runtime=device_runtime(device, "fp32"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = ap.grad_scaler(device_runtime(device, "fp16" if device == "cuda" else "fp32"))
    ema = ap.EMA(model, decay=0.5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.randn(4, 3, 8, 8, generator=generator).to(device)
        labels = torch.randint(0, 4, (4,), generator=generator).to(device)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        ema.update()
    return model, optimizer, scaler, ema


def on_cpu(state: dict) -> dict:
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


@pytest.mark.parametrize(("saved_on", "loaded_on"), CASES)
def test_checkpoint_saved_on_one_device_loads_on_the_other(saved_on: str, loaded_on: str, tmp_path: Path) -> None:
    model, optimizer, scaler, ema = trained(saved_on)
    path = ap.save_checkpoint(tmp_path / "last.pt", model=model, ema=ema, optimizer=optimizer, scaler=scaler,
                              epoch=1, step=2)
    weights, averages = on_cpu(model.state_dict()), on_cpu(ema.module.state_dict())
    moments = [on_cpu(optimizer.state[p]) for p in model.parameters()]

    fresh, fresh_optimizer, fresh_scaler, fresh_ema = trained(loaded_on, steps=0)
    info = ap.load_checkpoint(path, model=fresh, ema=fresh_ema, optimizer=fresh_optimizer, scaler=fresh_scaler)

    assert (info["epoch"], info["step"]) == (1, 2)
    for name, tensor in fresh.state_dict().items():
        assert tensor.device.type == loaded_on, name
        assert torch.equal(tensor.cpu(), weights[name]), name
    for name, tensor in fresh_ema.module.state_dict().items():
        assert tensor.device.type == loaded_on, name
        assert torch.equal(tensor.cpu(), averages[name]), name
    for parameter, saved in zip(fresh.parameters(), moments):
        state = fresh_optimizer.state[parameter]
        assert state["exp_avg"].device == parameter.device
        for key, value in saved.items():
            assert torch.equal(state[key].cpu(), value), key
    if saved_on == loaded_on == "cuda":
        assert fresh_scaler.get_scale() == scaler.get_scale()
    # and training goes on where it was loaded
    images = torch.randn(4, 3, 8, 8).to(loaded_on)
    loss = fresh(images).logsumexp(dim=1).mean()
    fresh_scaler.scale(loss).backward()
    fresh_scaler.step(fresh_optimizer)
    fresh_scaler.update()
    fresh_ema.update()
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


@gpu
def test_checkpoint_with_cuda_tensors_and_cuda_rng_loads_in_a_process_without_a_gpu(tmp_path: Path) -> None:
    model, optimizer, scaler, ema = trained("cuda")
    path = ap.save_checkpoint(tmp_path / "gpu.pt", model=model, ema=ema, optimizer=optimizer, scaler=scaler)
    code = (f"import sys, torch\nsys.path.insert(0, {str(HERE)!r})\nimport autoparallel as ap\n"
            "from _ddp_one_device_worker import Net\n"
            "assert not torch.cuda.is_available()\n"
            "model = Net(); ema = ap.EMA(model); optimizer = torch.optim.AdamW(model.parameters())\n"
            f"ap.load_checkpoint({str(path)!r}, model=model, ema=ema, optimizer=optimizer, restore_rng=True)\n"
            "torch.save({'model': model.state_dict(), 'ema': ema.module.state_dict()}, "
            f"{str(tmp_path / 'cpu.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_environment(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.load(tmp_path / "cpu.pt")
    for name, tensor in on_cpu(model.state_dict()).items():
        assert torch.equal(loaded["model"][name], tensor), name
    for name, tensor in on_cpu(ema.module.state_dict()).items():
        assert torch.equal(loaded["ema"][name], tensor), name


@gpu
def test_ema_kept_on_the_cpu_follows_a_gpu_model() -> None:
    torch.manual_seed(0)
    model = Net().cuda()
    on_gpu, kept_on_cpu = ap.EMA(model, decay=0.5), ap.EMA(model, decay=0.5, device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(4, 3, 8, 8, device="cuda")).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        on_gpu.update()
        kept_on_cpu.update()
    assert next(on_gpu.module.parameters()).device.type == "cuda"
    assert next(kept_on_cpu.module.parameters()).device.type == "cpu"
    # the same lerp on two devices: equal to fp32 rounding
    for name, tensor in on_gpu.module.state_dict().items():
        torch.testing.assert_close(kept_on_cpu.module.state_dict()[name], tensor.cpu(), msg=name)
