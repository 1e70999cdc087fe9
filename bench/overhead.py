"""Per-step overhead of autoparallel against the same loop in bare PyTorch.

    python bench/overhead.py                     # CPU (or the first GPU when there is one), defaults below
    python bench/overhead.py --device cuda       # one GPU
    python bench/overhead.py --wait-load 1.5     # on a shared machine: wait for it to be quiet first

Four variants train the same mid-size conv net (bench/_common.py::ConvNet) on the same pre-built
batches, each with its own copy of the same initial weights and its own AdamW:

    bare         forward, loss, zero_grad, backward, optimizer.step
    autoparallel ap.wrap + ap.GradientAccumulator (micro_step, backward, step) + ap.autocast
    bare+ema     bare plus a hand-written EMA update (torch._foreach_lerp_ over parameters and buffers)
    ap+ema       autoparallel plus ap.EMA.update()

The EMA pair is there for fairness: an EMA update does real work (one lerp per tensor), so comparing
`ap+ema` with `bare` would charge the library for arithmetic the bare loop simply skips. The ratios
that measure the library are therefore autoparallel/bare and ap+ema/bare+ema; ap+ema/bare is the
total price of turning EMA on. Steps are timed interleaved (bench/_common.py::time_interleaved):
each round runs a block of steps of every variant in rotated order, and each ratio is the median of
per-round ratios with its interquartile range. Target: every library ratio within 1.01.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class HandEMA:
    """The EMA a careful user would write by hand: the same decay warm-up as ap.EMA, one fused foreach op,
    tensor lists gathered once.

    Warm-up as ap.EMA (timm ModelEmaV3's power form): decay_t = min(decay, 1 - (1 + t) ** -2/3).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._source = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        self._target = [t for t in (*self.module.parameters(), *self.module.buffers()) if t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, 1.0 - (1.0 + self.updates) ** (-2.0 / 3.0))
        torch._foreach_lerp_(self._target, self._source, 1.0 - decay)
        self.updates += 1


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--precision", choices=sorted(AMP_DTYPES), default="fp32",
                        help="same precision for every variant (default: fp32)")
    parser.add_argument("--batch-size", type=int, default=16, help="default: 16")
    parser.add_argument("--image-size", type=int, default=32, help="default: 32 (CPU); try 128 on a GPU")
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv (default: 32)")
    parser.add_argument("--blocks", type=int, default=4, help="residual-free conv blocks (default: 4)")
    parser.add_argument("--steps-per-block", type=int, default=10, help="steps per timed block (default: 10)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of interleaved blocks (default: 15)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (default: 5)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="default: 0.999")
    parser.add_argument("--ema-camoxpert", action="store_true",
                        help="also time EMA.update alone on CamoXpert edgenext_base (hundreds of tensors)")
    add_common_args(parser)
    return parser


def build_variants(args: argparse.Namespace, device: torch.device) -> dict:
    """One step function per variant; each owns a model copy (same initial weights) and an optimizer."""
    torch.manual_seed(0)
    reference = ConvNet(width=args.width, num_blocks=args.blocks)
    batches = make_batches(8, args.batch_size, args.image_size, device)
    amp_dtype = AMP_DTYPES[args.precision]
    strategy = "cpu" if device.type == "cpu" else "single"
    devices = None if device.type == "cpu" else [device.index or 0]
    runtime = ap.runtime(strategy=strategy, devices=devices, precision=args.precision)

    def bare_step(with_ema: bool):
        model = copy.deepcopy(reference).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        ema = HandEMA(model, args.ema_decay) if with_ema else None

        def step(index: int) -> None:
            images, labels = batches[index % len(batches)]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update()

        return step

    def autoparallel_step(with_ema: bool):
        model = ap.wrap(copy.deepcopy(reference), runtime=runtime)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        accumulator = ap.GradientAccumulator(model, optimizer, accumulation_steps=1,
                                             scaler=ap.grad_scaler(runtime))
        ema = ap.EMA(model, decay=args.ema_decay) if with_ema else None

        def step(index: int) -> None:
            images, labels = batches[index % len(batches)]
            with accumulator.micro_step():
                with ap.autocast(runtime):
                    loss = F.cross_entropy(model(images), labels)
                accumulator.backward(loss)
            if accumulator.step() and ema is not None:
                ema.update()

        return step

    return {
        "bare": bare_step(with_ema=False),
        "autoparallel": autoparallel_step(with_ema=False),
        "bare+ema": bare_step(with_ema=True),
        "ap+ema": autoparallel_step(with_ema=True),
    }


def time_ema_updates(model: nn.Module, device: torch.device, rounds: int, updates: int = 20) -> dict:
    """Microseconds per EMA update alone, ap.EMA vs HandEMA, interleaved: the per-tensor Python cost that a
    29-tensor ConvNet hides but a model with hundreds of tensors (CamoXpert) pays every step."""
    model = model.to(device)
    tensors = sum(1 for _ in (*model.parameters(), *model.buffers()))
    ap_ema, hand_ema = ap.EMA(model, decay=0.999), HandEMA(model, 0.999)
    samples = time_interleaved({"ap.EMA": lambda i: ap_ema.update(), "hand EMA": lambda i: hand_ema.update()},
                               steps_per_block=updates, rounds=rounds, warmup_steps=2, device=device, log=False)
    return {"tensors": tensors, "us_per_update": {name: quantiles(v)["median"] * 1e6 for name, v in samples.items()},
            "ratio": paired_ratios(samples, "ap.EMA", "hand EMA")}


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    info = machine_info()
    print(f"[bench] {describe_machine(info)}")
    variants = build_variants(args, device)
    load_before = wait_for_quiet(args.wait_load)
    samples = time_interleaved(variants, steps_per_block=args.steps_per_block, rounds=args.rounds,
                               warmup_steps=args.warmup, device=device)
    load_after = loadavg()[0]
    ema_models = {"ConvNet": ConvNet(width=args.width, num_blocks=args.blocks)}
    if args.ema_camoxpert:
        from camoxpert.model import CamoXpert

        ema_models["CamoXpert edgenext_base"] = CamoXpert("edgenext_base", num_experts=7, deep_supervision=True)
    ema_updates = {name: time_ema_updates(model, device, args.rounds) for name, model in ema_models.items()}

    per_step = {name: quantiles(values) for name, values in samples.items()}
    comparisons = {
        "autoparallel / bare": paired_ratios(samples, "autoparallel", "bare"),
        "ap+ema / bare+ema": paired_ratios(samples, "ap+ema", "bare+ema"),
        "ap+ema / bare": paired_ratios(samples, "ap+ema", "bare"),
        "bare+ema / bare": paired_ratios(samples, "bare+ema", "bare"),
    }
    print()
    print(markdown_table(["variant", "median ms/step", "IQR ms"],
                         [[name, f"{q['median'] * 1e3:.2f}", f"{q['p25'] * 1e3:.2f}-{q['p75'] * 1e3:.2f}"]
                          for name, q in per_step.items()]))
    print()
    print(markdown_table(["ratio (paired per round)", "median (IQR)", "target"],
                         [[name, format_ratio(q), "<= 1.01" if name.startswith(("autoparallel", "ap+ema / bare+"))
                           else "(cost of EMA)"] for name, q in comparisons.items()]))
    print()
    print(markdown_table(["EMA update alone", "tensors", "ap.EMA us", "hand EMA us", "ratio (IQR)"],
                         [[name, r["tensors"], f"{r['us_per_update']['ap.EMA']:.0f}",
                           f"{r['us_per_update']['hand EMA']:.0f}", format_ratio(r["ratio"])]
                          for name, r in ema_updates.items()]))
    print(f"\n[bench] device {device}, precision {args.precision}, load {load_before:.2f} -> {load_after:.2f}")
    if not args.no_json:
        path = write_json(f"overhead_{device.type}", {
            "machine": info, "args": vars(args), "device": str(device),
            "load_1min_before": load_before, "load_1min_after": load_after,
            "per_step_s": per_step, "ratios": comparisons, "samples_s": samples, "ema_update": ema_updates,
        }, args.out)
        print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
