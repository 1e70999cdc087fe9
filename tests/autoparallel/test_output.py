"""Banner text for simulated runtimes, and output that appears on the main process only."""

from __future__ import annotations

import io

import pytest
import torch

from autoparallel import Runtime, output, print_banner, progress
from autoparallel.runtime import reset_runtime

banner = output.banner  # the text print_banner prints (on the main process)


T4X2 = {"gpu_names": ("Tesla T4",) * 2, "gpu_memory_gib": (15.0,) * 2}


@pytest.fixture
def fresh(monkeypatch):
    reset_runtime()
    for name in ("RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(output, "_banner_printed", False)
    yield monkeypatch
    reset_runtime()


@pytest.mark.parametrize(
    ("rt", "text"),
    [
        (Runtime(mode="cpu", device="cpu", device_ids=()),
         "Distributed environment: NO (CPU) | Number of processes: 1 | Number of GPUs: 0 | mixed precision: no"),
        (Runtime(mode="single", device="cuda:0", device_ids=(0,), precision="bf16",
                 gpu_names=("NVIDIA A100-SXM4-40GB",), gpu_memory_gib=(39.39,)),
         "Distributed environment: NO (single GPU) | Number of processes: 1 | Number of GPUs: 1 | "
         "NVIDIA A100-SXM4-40GB, 39.4 GiB | mixed precision: bf16"),
        (Runtime(mode="dp", device="cuda:0", device_ids=(0, 1), precision="fp16", **T4X2),
         "Distributed environment: MULTI_GPU (DataParallel) | Number of processes: 1 | Number of GPUs: 2 | "
         "Tesla T4 x2, 15.0 GiB | mixed precision: fp16"),
        (Runtime(mode="ddp", device="cuda:1", device_ids=(1,), rank=1, local_rank=1, world_size=2, backend="nccl",
                 precision="fp16", launcher="torchrun", **T4X2),
         "Distributed environment: MULTI_GPU (DistributedDataParallel) | Number of processes: 2 | Process index: 1 | "
         "Local process index: 1 | Number of GPUs: 2 | Tesla T4 x2, 15.0 GiB | Backend: nccl | mixed precision: fp16"),
        (Runtime(mode="ddp", device="cuda:0", device_ids=(0,), world_size=4, backend="nccl", precision="fp16",
                 **T4X2),
         "Distributed environment: MULTI_NODE (DistributedDataParallel) | Number of processes: 4 | "
         "Process index: 0 | Local process index: 0 | Number of GPUs: 2 | Tesla T4 x2, 15.0 GiB | Backend: nccl | "
         "mixed precision: fp16"),
        (Runtime(mode="ddp", device="cpu", device_ids=(), world_size=2, backend="gloo"),
         "Distributed environment: MULTI_CPU (DistributedDataParallel) | Number of processes: 2 | Process index: 0 | "
         "Local process index: 0 | Number of GPUs: 0 | Backend: gloo | mixed precision: no"),
        (Runtime(mode="dp", device="cuda:0", device_ids=(0, 1, 2), precision="fp16",
                 gpu_names=("Tesla P100-PCIE-16GB", "Tesla T4", "Tesla T4"), gpu_memory_gib=(15.89, 14.74, 14.74)),
         "Distributed environment: MULTI_GPU (DataParallel) | Number of processes: 1 | Number of GPUs: 3 | "
         "Tesla P100-PCIE-16GB, 15.9 GiB + Tesla T4 x2, 14.7 GiB | mixed precision: fp16"),
    ],
    ids=["cpu", "single", "dp", "ddp", "multi-node", "ddp-cpu", "mixed-gpus"],
)
def test_banner_text(rt, text):
    assert banner(rt) == text


def test_banner_detects_when_not_given(fresh):
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "AUTOPARALLEL_STRATEGY", "AUTOPARALLEL_PRECISION"):
        fresh.delenv(name, raising=False)
    assert banner().startswith("Distributed environment: NO (CPU) | Number of processes: 1")


def test_print_on_main_only(fresh, capsys):
    output.print("hello", 3)
    assert capsys.readouterr().out == "hello 3\n"
    fresh.setenv("RANK", "1")
    output.print("hidden")
    assert capsys.readouterr().out == ""


def test_progress_shows_on_main_only(fresh):
    assert list(progress(range(3))) == [0, 1, 2]
    assert progress(range(3)).disable is False
    assert progress(range(3), disable=True).disable is True
    assert progress(range(3), disable=None, file=io.StringIO()).disable is True  # tqdm's "off unless a terminal"
    fresh.setenv("RANK", "2")
    bar = progress(range(3), desc="train")
    assert bar.disable is True
    assert list(bar) == [0, 1, 2]


def test_print_banner_once_on_main(fresh, capsys):
    rt = Runtime(mode="cpu", device="cpu", device_ids=())
    print_banner(rt)
    print_banner(rt)
    assert capsys.readouterr().out == banner(rt) + "\n"


def test_print_banner_silent_off_main(fresh, capsys):
    print_banner(Runtime(mode="ddp", device="cpu", device_ids=(), rank=1, world_size=2, backend="gloo"))
    assert capsys.readouterr().out == ""
