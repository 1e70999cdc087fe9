"""Per-step overhead of autoparallel against the same loop in bare PyTorch.

    python bench/overhead.py                     # CPU (or the first GPU when there is one), defaults below
    python bench/overhead.py --device cuda       # one GPU
    python bench/overhead.py --wait-load 1.5     # on a shared machine: wait for it to be quiet first
    python bench/overhead.py --ema-only --rounds 30   # the EMA update alone (issue 16.1), in seconds

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

Then the EMA update alone, without the step around it: ap.EMA.update against HandEMA (a hand-written
torch._foreach_lerp_ EMA over the same tensors: parameters and floating buffers lerped, integer buffers
copied), interleaved in blocks of --ema-updates updates, on the ConvNet of every --ema-widths (32: the
default run's model; 8: the tiny run's; 29 tensors each) in every --ema-dtypes. For a bf16/fp16 model both
keep the average in fp32 and cast every tensor per update; a third variant, HandEMA with a preallocated
fp32 scratch, shows that cast without allocation. Target (issue 16.1): ap.EMA / hand EMA <= 1.2.
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
    """The EMA a careful user would write by hand over the tensors ap.EMA averages: the same decay warm-up,
    one fused foreach op, tensor lists gathered once.

    Parameters and floating-point buffers are lerped (``torch._foreach_lerp_``), integer buffers copied
    (``torch._foreach_copy_``). For a half-precision model the average is kept in fp32, as ap.EMA keeps it:
    ``scratch=False`` casts every tensor per update (``[s.float() for s in ...]``, what ap.EMA does);
    ``scratch=True`` copies the model into preallocated fp32 tensors with one ``torch._foreach_copy_``
    (no allocation per update), the fastest hand-written form measured here.

    Warm-up as ap.EMA (timm ModelEmaV3's power form): decay_t = min(decay, 1 - (1 + t) ** -2/3).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, scratch: bool = False) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.module._apply(lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)
        self.decay = decay
        self.updates = 0
        pairs = list(zip((*self.module.parameters(), *self.module.buffers()), (*model.parameters(), *model.buffers())))
        self._target = [a for a, s in pairs if a.is_floating_point()]
        self._source = [s for a, s in pairs if a.is_floating_point()]
        self._int_target = [a for a, s in pairs if not a.is_floating_point()]
        self._int_source = [s for a, s in pairs if not a.is_floating_point()]
        self._cast = any(a.dtype != s.dtype for a, s in zip(self._target, self._source))
        self._scratch = [torch.empty_like(a) for a in self._target] if scratch and self._cast else None

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, 1.0 - (1.0 + self.updates) ** (-2.0 / 3.0))
        sources = self._source
        if self._scratch is not None:
            torch._foreach_copy_(self._scratch, sources)
            sources = self._scratch
        elif self._cast:
            sources = [s.float() for s in sources]
        torch._foreach_lerp_(self._target, sources, 1.0 - decay)
        if self._int_target:
            torch._foreach_copy_(self._int_target, self._int_source)
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
    ema = parser.add_argument_group("EMA update alone (ap.EMA against a hand-written foreach EMA, interleaved)")
    ema.add_argument("--ema-widths", default="32,8", metavar="W,...",
                     help="ConvNet widths whose EMA update is timed alone: 32 is the default run's model, 8 the "
                          "tiny run's, both 29 tensors (default: 32,8)")
    ema.add_argument("--ema-dtypes", default="fp32,bf16,fp16", metavar="DTYPE,...",
                     help="model dtypes for the EMA-alone timing; bf16/fp16 convert the model itself (the EMA "
                          "keeps fp32 and casts every tensor per update) (default: fp32,bf16,fp16)")
    ema.add_argument("--ema-updates", type=int, default=50, help="EMA updates per timed block (default: 50)")
    ema.add_argument("--ema-rounds", type=int, default=None, help="rounds of the EMA-alone timing (default: --rounds)")
    ema.add_argument("--ema-only", action="store_true",
                     help="time the EMA update alone, skipping the four training-step variants")
    ema.add_argument("--ema-camoxpert", action="store_true",
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


MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_ema_updates(model: nn.Module, device: torch.device, rounds: int, updates: int = 50) -> dict:
    """Microseconds per EMA update alone, ap.EMA vs HandEMA over the same tensors, interleaved: the per-tensor
    Python cost that a training step hides but a model with hundreds of tensors (CamoXpert) pays every step.

    For a half-precision model a third variant, HandEMA with a preallocated fp32 scratch, shows what the
    cast costs when it allocates nothing."""
    model = model.to(device)
    tensors = sum(1 for _ in (*model.parameters(), *model.buffers()))
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in model.parameters())
    ap_ema, hand_ema = ap.EMA(model, decay=0.999), HandEMA(model, 0.999)
    variants = {"ap.EMA": lambda i: ap_ema.update(), "hand EMA": lambda i: hand_ema.update()}
    if half:
        scratch_ema = HandEMA(model, 0.999, scratch=True)
        variants["hand EMA (scratch)"] = lambda i: scratch_ema.update()
    samples = time_interleaved(variants, steps_per_block=updates, rounds=rounds, warmup_steps=5, device=device,
                               log=False)
    averages = [ap_ema.module.state_dict()[key] for key in ap_ema.module.state_dict()]
    reference = [hand_ema.module.state_dict()[key] for key in hand_ema.module.state_dict()]
    same = all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(averages, reference))
    return {"tensors": tensors, "parameter_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "us_per_update": {name: quantiles(v)["median"] * 1e6 for name, v in samples.items()},
            "ratio": paired_ratios(samples, "ap.EMA", "hand EMA"),
            "ratio_vs_scratch": paired_ratios(samples, "ap.EMA", "hand EMA (scratch)") if half else None,
            "same_average": same, "samples_s": samples}


def ema_models(args: argparse.Namespace) -> dict[str, nn.Module]:
    """The models whose EMA update is timed alone: each ConvNet width in each dtype (+ CamoXpert if asked)."""
    models: dict[str, nn.Module] = {}
    for width in (int(w) for w in args.ema_widths.split(",") if w.strip()):
        for dtype in (d.strip() for d in args.ema_dtypes.split(",") if d.strip()):
            if dtype not in MODEL_DTYPES:
                raise SystemExit(f"--ema-dtypes {args.ema_dtypes}: unknown {dtype!r}; choose from fp32, bf16, fp16")
            torch.manual_seed(0)
            models[f"ConvNet width {width}, {dtype}"] = ConvNet(width=width, num_blocks=args.blocks).to(
                MODEL_DTYPES[dtype])
    if args.ema_camoxpert:
        from camoxpert.model import CamoXpert

        models["CamoXpert edgenext_base, fp32"] = CamoXpert("edgenext_base", num_experts=7, deep_supervision=True)
    return models


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    info = machine_info()
    print(f"[bench] {describe_machine(info)}")
    load_before = wait_for_quiet(args.wait_load)
    samples: dict[str, list[float]] = {}
    if not args.ema_only:
        variants = build_variants(args, device)
        samples = time_interleaved(variants, steps_per_block=args.steps_per_block, rounds=args.rounds,
                                   warmup_steps=args.warmup, device=device)
    ema_rounds = args.ema_rounds or args.rounds
    ema_updates = {}
    for name, model in ema_models(args).items():
        ema_updates[name] = time_ema_updates(model, device, ema_rounds, args.ema_updates)
        print(f"[ema] {name}: ratio {format_ratio(ema_updates[name]['ratio'])}", flush=True)
    load_after = loadavg()[0]

    per_step = {name: quantiles(values) for name, values in samples.items()}
    comparisons = {} if args.ema_only else {
        "autoparallel / bare": paired_ratios(samples, "autoparallel", "bare"),
        "ap+ema / bare+ema": paired_ratios(samples, "ap+ema", "bare+ema"),
        "ap+ema / bare": paired_ratios(samples, "ap+ema", "bare"),
        "bare+ema / bare": paired_ratios(samples, "bare+ema", "bare"),
    }
    if not args.ema_only:
        print()
        print(markdown_table(["variant", "median ms/step", "IQR ms"],
                             [[name, f"{q['median'] * 1e3:.2f}", f"{q['p25'] * 1e3:.2f}-{q['p75'] * 1e3:.2f}"]
                              for name, q in per_step.items()]))
        print()
        print(markdown_table(["ratio (paired per round)", "median (IQR)", "target"],
                             [[name, format_ratio(q), "<= 1.01" if name.startswith(("autoparallel", "ap+ema / bare+"))
                               else "(cost of EMA)"] for name, q in comparisons.items()]))
    print()
    print(f"EMA update alone: {args.ema_updates} updates per block, {ema_rounds} interleaved rounds, target <= 1.2")
    print(markdown_table(["model", "tensors", "ap.EMA us", "hand EMA us", "ap.EMA / hand (IQR)",
                          "hand, fp32 scratch us", "ap.EMA / scratch (IQR)", "same average"],
                         [[name, r["tensors"], f"{r['us_per_update']['ap.EMA']:.0f}",
                           f"{r['us_per_update']['hand EMA']:.0f}", format_ratio(r["ratio"]),
                           f"{r['us_per_update']['hand EMA (scratch)']:.0f}" if r["ratio_vs_scratch"] else "-",
                           format_ratio(r["ratio_vs_scratch"]) if r["ratio_vs_scratch"] else "-",
                           "yes" if r["same_average"] else "NO"]
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
