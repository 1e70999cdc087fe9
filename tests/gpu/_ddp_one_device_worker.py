"""One rank of test_ddp_one_device.py: DDP over gloo with both ranks on the same device (cuda:0, or the CPU).

NCCL refuses two ranks on one GPU, and under torchrun with 2 processes and 1 visible GPU autoparallel's
runtime() falls back to gloo on the CPU. So this worker joins a gloo group itself and builds the DDP runtime
by hand (``ap.Runtime``), which is how a script pins its device: the model, the DDP buckets, the EMA and the
data then live on that device and gloo all-reduces CUDA tensors.
"""
from __future__ import annotations

import argparse
import gc
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import autoparallel as ap

OPTIMIZER_STEPS = 3


class Net(nn.Module):
    """Convolutions with BatchNorm (buffers that differ per rank) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.detach().float().reshape(-1).cpu() for tensor in tensors])


def max_difference_across_ranks(values: torch.Tensor, world_size: int) -> float:
    """Largest |rank r - rank 0| (gathered as CPU tensors: what is compared is the values, not gloo's CUDA path)."""
    gathered = [torch.empty_like(values) for _ in range(world_size)]
    dist.all_gather(gathered, values)
    return max(float((tensor - gathered[0]).abs().max()) for tensor in gathered)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--init-file", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank,
                            world_size=args.world_size, timeout=timedelta(seconds=60))
    on_gpu = args.device == "cuda"
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    runtime = ap.Runtime(mode="ddp", device=device, device_ids=(0,) if on_gpu else (), rank=args.rank, local_rank=0,
                         world_size=args.world_size, backend="gloo", precision="fp32",
                         gpu_names=(torch.cuda.get_device_name(0),) if on_gpu else (),
                         gpu_memory_gib=(1.0,) if on_gpu else ())

    torch.manual_seed(0)
    model = ap.wrap(Net(), runtime=runtime)
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(64, 3, 8, 8, generator=generator),
                            torch.randint(0, 4, (64,), generator=generator))
    loader = ap.loader(dataset, batch_size=8, num_workers=0, seed=0, runtime=runtime)  # 4 images per rank
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = ap.GradientAccumulator(model, optimizer, accumulation_steps=2, max_grad_norm=1.0)
    ema = ap.EMA(model, decay=0.9)
    initial = flat(model.parameters())
    steps, loss = 0, torch.zeros(())
    while steps < OPTIMIZER_STEPS:
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            with step.micro_step():
                loss = F.cross_entropy(model(images), labels)
                step.backward(loss)
            if step.step():
                ema.update()
                steps += 1
                if steps == OPTIMIZER_STEPS:
                    break
    parameters = flat(model.parameters())
    ema_tensors = flat(value for value in ema.module.state_dict().values() if value.is_floating_point())
    result = {
        "device": str(next(ap.unwrap(model).parameters()).device),
        "ema_device": str(next(ema.module.parameters()).device),
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
        "steps": steps,
        "loss": float(loss),
        "changed": float((parameters - initial).abs().max()),
        "max_parameter_difference": max_difference_across_ranks(parameters, args.world_size),
        "max_ema_difference": max_difference_across_ranks(ema_tensors, args.world_size),
    }
    ap.save_checkpoint(args.out / "ddp.pt", model=model, ema=ema, optimizer=optimizer, step=steps)
    if args.rank == 0:
        torch.save({"model": {k: v.cpu() for k, v in ap.unwrap(model).state_dict().items()},
                    "ema": {k: v.cpu() for k, v in ema.module.state_dict().items()}}, args.out / "expected.pt")
        (args.out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    del model, step, ema, optimizer
    gc.collect()  # free the DDP reducer before its process group
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
