"""Per-step overhead of autoparallel and of Hugging Face Accelerate on the same loop and device.

    pip install accelerate                       # optional; without it this prints SKIP and exits 0
    python bench/vs_accelerate.py                # CPU (or the first GPU when there is one)
    python bench/vs_accelerate.py --wait-load 1.5

Three variants train the same mid-size conv net (bench/_common.py::ConvNet) on the same pre-built
batches, each with its own copy of the same initial weights and its own AdamW, in one process:

    bare          forward, loss, zero_grad, backward, optimizer.step
    accelerate    Accelerator().prepare(model, optimizer); with accelerator.accumulate(model):
                  forward, accelerator.backward, optimizer.step, optimizer.zero_grad
    autoparallel  ap.wrap + ap.GradientAccumulator (micro_step, backward, step) + ap.autocast

Both libraries run with accumulation 1, no clipping, fp32 (or the same --precision), so each pays only
for its bookkeeping. Steps are timed interleaved (bench/_common.py::time_interleaved); each ratio is the
median of per-round ratios with its interquartile range.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    ConvNet,
    add_common_args,
    describe_machine,
    format_ratio,
    loadavg,
    machine_info,
    make_batches,
    markdown_table,
    paired_ratios,
    quantiles,
    resolve_device,
    time_interleaved,
    wait_for_quiet,
    write_json,
)

import autoparallel as ap  # noqa: E402

ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--precision", choices=sorted(ACCELERATE_PRECISION), default="fp32", help="default: fp32")
    parser.add_argument("--batch-size", type=int, default=16, help="default: 16")
    parser.add_argument("--image-size", type=int, default=32, help="default: 32 (CPU); try 128 on a GPU")
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv (default: 32)")
    parser.add_argument("--steps-per-block", type=int, default=10, help="default: 10")
    parser.add_argument("--rounds", type=int, default=15, help="default: 15")
    parser.add_argument("--warmup", type=int, default=5, help="default: 5")
    add_common_args(parser)
    return parser


def build_variants(args: argparse.Namespace, device: torch.device, accelerate) -> dict:
    torch.manual_seed(0)
    reference = ConvNet(width=args.width)
    batches = make_batches(8, args.batch_size, args.image_size, device)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    runtime = ap.runtime(strategy="cpu" if device.type == "cpu" else "single",
                         devices=None if device.type == "cpu" else [device.index or 0], precision=args.precision)

    def bare():
        model = copy.deepcopy(reference).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

        def step(index: int) -> None:
            images, labels = batches[index % len(batches)]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return step

    def with_accelerate():
        accelerator = accelerate.Accelerator(cpu=device.type == "cpu",
                                             mixed_precision=ACCELERATE_PRECISION[args.precision])
        model = copy.deepcopy(reference)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)

        def step(index: int) -> None:
            images, labels = batches[index % len(batches)]
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(images), labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return step

    def with_autoparallel():
        model = ap.wrap(copy.deepcopy(reference), runtime=runtime)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        accumulator = ap.GradientAccumulator(model, optimizer, accumulation_steps=1, scaler=ap.grad_scaler(runtime))

        def step(index: int) -> None:
            images, labels = batches[index % len(batches)]
            with accumulator.micro_step():
                with ap.autocast(runtime):
                    loss = F.cross_entropy(model(images), labels)
                accumulator.backward(loss)
            accumulator.step()

        return step

    return {"bare": bare(), "accelerate": with_accelerate(), "autoparallel": with_autoparallel()}


def main(args: argparse.Namespace) -> int:
    try:
        import accelerate
    except ImportError:
        print("SKIP: Hugging Face Accelerate is not installed (pip install accelerate, or pip install -e '.[bench]'); "
              "nothing to compare against")
        return 0
    device = resolve_device(args.device)
    info = machine_info()
    print(f"[bench] {describe_machine(info)}, accelerate {accelerate.__version__}")
    variants = build_variants(args, device, accelerate)
    load_before = wait_for_quiet(args.wait_load)
    samples = time_interleaved(variants, steps_per_block=args.steps_per_block, rounds=args.rounds,
                               warmup_steps=args.warmup, device=device)
    load_after = loadavg()[0]
    per_step = {name: quantiles(values) for name, values in samples.items()}
    comparisons = {
        "accelerate / bare": paired_ratios(samples, "accelerate", "bare"),
        "autoparallel / bare": paired_ratios(samples, "autoparallel", "bare"),
        "autoparallel / accelerate": paired_ratios(samples, "autoparallel", "accelerate"),
    }
    print()
    print(markdown_table(["variant", "median ms/step", "IQR ms"],
                         [[name, f"{q['median'] * 1e3:.2f}", f"{q['p25'] * 1e3:.2f}-{q['p75'] * 1e3:.2f}"]
                          for name, q in per_step.items()]))
    print()
    print(markdown_table(["ratio (paired per round)", "median (IQR)"],
                         [[name, format_ratio(q)] for name, q in comparisons.items()]))
    print(f"\n[bench] device {device}, precision {args.precision}, load {load_before:.2f} -> {load_after:.2f}")
    if not args.no_json:
        path = write_json(f"vs_accelerate_{device.type}", {
            "machine": info, "args": vars(args), "device": str(device), "accelerate": accelerate.__version__,
            "load_1min_before": load_before, "load_1min_after": load_after,
            "per_step_s": per_step, "ratios": comparisons, "samples_s": samples,
        }, args.out)
        print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
