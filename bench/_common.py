"""Helpers shared by the benchmark scripts: interleaved timing, tables, JSON results, machine facts.

Benchmarks here run on shared machines, so every comparison is measured *interleaved*: each round
runs a block of steps of every variant, in a rotated order, and ratios are taken per round (paired)
before the median. A burst of load from another process then hits all variants of that round, not
one of them. The scripts are run by hand (`python bench/<name>.py`), never by pytest.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _machine import cpu_model
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- machine and load


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (zeros where /proc/loadavg does not exist)."""
    try:
        fields = Path("/proc/loadavg").read_text().split()
        return float(fields[0]), float(fields[1]), float(fields[2])
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0, 0.0


def wait_for_quiet(max_load: float | None, timeout_s: float = 1800.0, poll_s: float = 30.0) -> float:
    """Sleep until the 1-minute load average drops below `max_load`, so others' jobs do not skew timings.

    Returns the load seen when measuring starts. Gives up (and measures anyway, saying so) after
    `timeout_s`, because a benchmark that never runs is worse than one with its load recorded.
    """
    load = loadavg()[0]
    if max_load is None:
        return load
    deadline = time.monotonic() + timeout_s
    while load >= max_load and time.monotonic() < deadline:
        print(f"[bench] 1-minute load {load:.2f} >= {max_load}: waiting {poll_s:.0f} s for a quiet machine",
              flush=True)
        time.sleep(poll_s)
        load = loadavg()[0]
    if load >= max_load:
        print(f"[bench] load still {load:.2f} after {timeout_s:.0f} s: measuring anyway (recorded in the JSON)",
              flush=True)
    return load


def machine_info() -> dict[str, Any]:
    """What a reader needs to reproduce or discount a number: CPU, cores, threads, GPUs, versions."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for the top of a benchmark's output."""
    gpus = ", ".join(f"{gpu['name']} ({gpu['memory_gib']} GiB)" for gpu in info["gpus"]) or "no GPU"
    return (f"{info['cpu']}, {info['cpu_affinity'] or info['cpu_count']} cores ({info['cpu_capability']}), "
            f"{gpus}, torch {info['torch']}, {info['torch_threads']} threads")


# ----------------------------------------------------------------------------- arguments and devices


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark takes: where to write the JSON and how long to wait for a quiet machine."""
    group = parser.add_argument_group("benchmark hygiene")
    group.add_argument("--wait-load", type=float, default=None, metavar="LOAD",
                       help="wait (up to 30 min) until the 1-minute load average is below LOAD before measuring "
                            "(default: measure at once; the load is recorded either way)")
    group.add_argument("--out", type=Path, default=None,
                       help="JSON file to write (default: bench/results/<benchmark>_<device>.json)")
    group.add_argument("--no-json", action="store_true", help="print the table only")


def resolve_device(name: str) -> torch.device:
    """'auto' means the first GPU when there is one, else the CPU; a GPU asked for must exist."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible to this process; pass --device cpu")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a wall-clock interval covers the kernels, not just their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- a stable mid-size workload


class ConvNet(nn.Module):
    """A small ResNet-like classifier: enough arithmetic per step (tens of ms on 2 CPU cores) that
    timings are stable, few enough parameters that per-parameter Python overhead would still show.

    GroupNorm rather than BatchNorm, so one process and several DDP processes compute the same
    gradients for the same global batch (BatchNorm statistics would differ per shard).
    """

    def __init__(self, width: int = 32, num_blocks: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.GroupNorm(8, width), nn.ReLU()]
        channels = width
        for index in range(num_blocks):
            out_channels = channels * 2 if index % 2 == 1 else channels
            stride = 2 if index % 2 == 1 else 1
            layers += [nn.Conv2d(channels, out_channels, 3, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(8, out_channels), nn.ReLU(),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                       nn.GroupNorm(8, out_channels), nn.ReLU()]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def make_batches(num_batches: int, batch_size: int, image_size: int, device: torch.device,
                 num_classes: int = 10, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-built batches on the device, so data loading stays out of step timings."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        batches.append((images.to(device), labels.to(device)))
    return batches


def synthetic_task(args: argparse.Namespace):
    """(model factory, data set, loss of (output, target), optimizer factory) of ``--model`` (``convnet`` or
    ``camoxpert`` with ``--backbone``), on ``8 * --batch-size`` random images of ``--image-size``."""
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(1)
    num_samples = args.batch_size * 8
    images = torch.randn(num_samples, 3, args.image_size, args.image_size, generator=generator)
    if args.model == "convnet":
        labels = torch.randint(0, 10, (num_samples,), generator=generator)
        return (lambda: ConvNet(width=args.width), TensorDataset(images, labels),
                lambda output, target: F.cross_entropy(output, target),
                lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))
    from camoxpert.losses import CODLoss
    from camoxpert.model import CamoXpert

    masks = (torch.rand(num_samples, 1, args.image_size, args.image_size, generator=generator) > 0.7).float()
    criterion = CODLoss()
    return (lambda: CamoXpert(backbone=args.backbone, num_experts=7, deep_supervision=True, pretrained=False),
            TensorDataset(images, masks), lambda output, target: criterion(output, target)[0],
            lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4))


# ----------------------------------------------------------------------------- interleaved timing


StepFn = Callable[[int], None]


def time_interleaved(variants: dict[str, StepFn], *, steps_per_block: int, rounds: int, warmup_steps: int,
                     device: torch.device, log: bool = True) -> dict[str, list[float]]:
    """Per-step seconds of every variant, one sample per (variant, round), measured in alternation.

    Each variant is a callable `step(i)` that performs one full training step. Every round runs a
    block of `steps_per_block` steps of each variant; the order rotates between rounds so no variant
    always runs first (caches, turbo, a neighbour's burst). Warm-up steps are run once, up front.
    """
    names = list(variants)
    for name in names:
        for index in range(warmup_steps):
            variants[name](index)
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    step_index = warmup_steps
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            step = variants[name]
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            for offset in range(steps_per_block):
                step(step_index + offset)
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / steps_per_block)
        step_index += steps_per_block
        if log:
            line = "  ".join(f"{name} {samples[name][-1] * 1e3:.2f} ms" for name in names)
            print(f"[round {round_index + 1}/{rounds}] load {loadavg()[0]:.2f}  {line}", flush=True)
    return samples


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range (p25, p75), plus min and max: the spread a ratio is read with."""
    ordered = sorted(values)
    if len(ordered) == 1:
        only = ordered[0]
        return {"median": only, "p25": only, "p75": only, "min": only, "max": only}
    p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "p25": p25, "p75": p75, "min": ordered[0], "max": ordered[-1]}


def paired_ratios(samples: dict[str, list[float]], numerator: str, denominator: str) -> dict[str, float]:
    """Round-by-round ratio numerator/denominator (paired, so shared load cancels), summarised."""
    ratios = [a / b for a, b in zip(samples[numerator], samples[denominator])]
    return quantiles(ratios)


def format_ratio(summary: dict[str, float]) -> str:
    """'1.004 (IQR 0.998-1.011)': a ratio with its interquartile spread."""
    return f"{summary['median']:.3f} (IQR {summary['p25']:.3f}-{summary['p75']:.3f})"


# ----------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table, padded so it also reads well in a terminal (and pastes into docs/)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[col]) for row in cells)) for col, header in enumerate(headers)]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write a result file (bench/results/ is git-ignored) with the command that produced it."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "command": " ".join(["python", *[arg if " " not in arg else repr(arg) for arg in sys.argv]]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path
