"""CamoXpert training-step throughput (images/s) and peak memory: fp32 vs mixed precision, and optimisations.

    python bench/train_step.py                                   # CPU: edgenext_base, 320 px, batch 2, fp32 vs bf16
    python bench/train_step.py --device cuda                     # GPU: batch 8, fp32 vs fp16 (+scaler) vs bf16
    python bench/train_step.py --device cuda --channels-last both --cudnn-benchmark
    python bench/train_step.py --device cuda --compile both --precisions bf16
    python bench/train_step.py --device cuda --variants fp32,bf16,bf16+cl,bf16+cudnn,bf16+compile
    python bench/train_step.py --backbone edgenext_xx_small --img-size 128   # the CPU demo's model

One step is forward (under autocast for fp16/bf16), CODLoss (deep supervision + MoE balancing loss),
backward (through a GradScaler for fp16), AdamW step, exactly as the training engine does it, on
random images and masks already on the device (data loading is benchmarked in bench/data_pipeline.py).
Variants are the product of --precisions x --channels-last x --compile (or the explicit --variants list),
each with its own copy of the same initial weights, timed interleaved (blocks of steps of every variant in
rotated order, several rounds). Peak memory: torch.cuda.max_memory_allocated per variant on a GPU; on the
CPU each variant is also run once in a fresh subprocess (a probe) whose peak resident set size (ru_maxrss)
is reported, because one process's high-water mark cannot be split between variants.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    add_common_args,
    describe_machine,
    loadavg,
    machine_info,
    markdown_table,
    paired_ratios,
    quantiles,
    resolve_device,
    time_interleaved,
    wait_for_quiet,
    write_json,
)

from camoxpert.losses import CODLoss  # noqa: E402
from camoxpert.model import CamoXpert  # noqa: E402

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANT_OPTIONS = ("cl", "cudnn", "compile", "dp")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="edgenext_base", help="timm backbone (default: edgenext_base)")
    model.add_argument("--img-size", type=int, default=320, help="default: 320")
    model.add_argument("--num-experts", type=int, default=7, help="default: 7")
    model.add_argument("--top-k", type=int, default=None, help="default: the model's (3 for 7 experts)")
    model.add_argument("--no-deep-supervision", action="store_true", help="deep supervision is on by default")
    model.add_argument("--gradient-checkpointing", action="store_true")
    model.add_argument("--freeze-backbone", action="store_true", help="stage 1: train the decoder only")
    variants = parser.add_argument_group("variants (their product is measured)")
    variants.add_argument("--precisions", default=None,
                          help="comma list of fp32, bf16, fp16 (default: fp32,bf16 on CPU; fp32,fp16,bf16 on "
                               "CUDA, bf16 only where the GPU supports it)")
    variants.add_argument("--channels-last", choices=["no", "yes", "both"], default="no",
                          help="NHWC memory format for model and input (default: no)")
    variants.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                          help="torch.compile the model (default: no; compiling takes minutes on a CPU)")
    variants.add_argument("--cudnn-benchmark", action="store_true",
                          help="torch.backends.cudnn.benchmark = True for every variant")
    variants.add_argument("--variants", default=None, metavar="NAME,...",
                          help="measure exactly these variants instead of the product above, the first being the "
                               "baseline of the speed-up column: PRECISION[+cl][+cudnn][+compile][+dp], where +cl "
                               "is channels_last, +cudnn turns cudnn.benchmark on for that variant only (so it is "
                               "interleaved with variants that have it off), +dp is DataParallel over every "
                               "visible GPU; e.g. fp32,bf16,bf16+cl,bf16+cudnn,bf16+compile")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--batch-size", type=int, default=None, help="default: 2 on CPU, 8 on CUDA")
    timing.add_argument("--steps-per-block", type=int, default=None, help="default: 2 on CPU, 10 on CUDA")
    timing.add_argument("--rounds", type=int, default=None, help="default: 3 on CPU, 5 on CUDA")
    timing.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per variant (default: 1 on CPU, 5 on CUDA; compile adds its own)")
    timing.add_argument("--no-memory-probe", action="store_true", help="CPU: skip the per-variant RSS probes")
    timing.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    add_common_args(parser)
    return parser


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the device-dependent defaults: small and short on a CPU, a real batch on a GPU."""
    on_gpu = device.type == "cuda"
    for name, cpu_value, gpu_value in [("batch_size", 2, 8), ("steps_per_block", 2, 10), ("rounds", 3, 5),
                                       ("warmup", 1, 5)]:
        if getattr(args, name) is None:
            setattr(args, name, gpu_value if on_gpu else cpu_value)
    if args.variants is not None:
        names = [name.strip() for name in args.variants.split(",") if name.strip()]
        if not names:
            raise SystemExit("--variants is empty: give e.g. fp32,bf16")
        for name in names:
            unknown = [option for option in name.split("+")[1:] if option not in VARIANT_OPTIONS]
            if unknown:
                raise SystemExit(f"--variants {args.variants}: {name!r} has unknown options {unknown}; "
                                 f"write PRECISION[+{'][+'.join(VARIANT_OPTIONS)}], e.g. bf16+cl")
            if "+dp" in name and (not on_gpu or torch.cuda.device_count() < 2):
                raise SystemExit(f"--variants {name}: DataParallel needs 2 or more GPUs, "
                                 f"this process sees {torch.cuda.device_count() if on_gpu else 0}")
        args.variants = ",".join(names)
        args.precisions = ",".join(dict.fromkeys(name.split("+")[0] for name in names))
    if args.precisions is None:
        precisions = ["fp32", "fp16", "bf16"] if on_gpu else ["fp32", "bf16"]
        if on_gpu and not torch.cuda.is_bf16_supported():
            precisions.remove("bf16")
        args.precisions = ",".join(precisions)
    unknown = [p for p in args.precisions.split(",") if p not in AMP_DTYPES]
    if unknown:
        raise SystemExit(f"--precisions {args.precisions}: unknown {unknown}; choose from fp32, bf16, fp16")
    if "fp16" in args.precisions.split(",") and not on_gpu:
        raise SystemExit("--precisions fp16 needs a GPU (fp16 autocast on CPU is not a training mode): use bf16")


def variant_names(args: argparse.Namespace) -> list[str]:
    """'fp32', 'bf16+cl', 'fp16+compile', ...: one per combination asked for (or the --variants list)."""
    if args.variants is not None:
        return args.variants.split(",")

    def options(choice: str) -> list[bool]:
        return {"no": [False], "yes": [True], "both": [False, True]}[choice]

    names = []
    for precision, channels_last, compiled in itertools.product(
            args.precisions.split(","), options(args.channels_last), options(args.compile)):
        names.append(precision + ("+cl" if channels_last else "") + ("+compile" if compiled else ""))
    return names


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    return CamoXpert(backbone=args.backbone, num_experts=args.num_experts, top_k=args.top_k,
                     deep_supervision=not args.no_deep_supervision, pretrained=False,
                     gradient_checkpointing=args.gradient_checkpointing)


def make_step(name: str, reference: torch.nn.Module, args: argparse.Namespace, device: torch.device):
    """The training step of one variant, with its own model copy, optimizer and scaler."""
    precision, *options = name.split("+")
    channels_last = "cl" in options
    cudnn_benchmark = args.cudnn_benchmark or "cudnn" in options
    amp_dtype = AMP_DTYPES[precision]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(reference).to(device=device, memory_format=memory_format).train()
    if args.freeze_backbone:
        model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    forward = torch.compile(model) if "compile" in options else model
    if "dp" in options:
        import autoparallel as ap

        runtime = ap.Runtime(mode="dp", device=torch.device("cuda", device.index or 0),
                             device_ids=tuple(range(torch.cuda.device_count())), precision=precision)
        forward = ap.wrap(forward, runtime=runtime)
    criterion = CODLoss()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
    masks = (torch.rand(args.batch_size, 1, args.img_size, args.img_size, generator=generator) > 0.7).float()
    images = images.to(device).contiguous(memory_format=memory_format)
    masks = masks.to(device)

    def step(index: int) -> None:
        # A global flag read by every convolution: set per step, so variants with and without it interleave.
        torch.backends.cudnn.benchmark = cudnn_benchmark
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = forward(images)
            loss, _parts = criterion(output, masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def peak_rss_mib() -> float:
    """This process's high-water resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe(args: argparse.Namespace, device: torch.device) -> int:
    """Child mode: build one variant, run warm-up + 2 steps, print its peak RSS as JSON."""
    step = make_step(args.probe, build_model(args), args, device)
    after_build = peak_rss_mib()
    for index in range(args.warmup + 2):
        step(index)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "rss_after_build_mib": after_build}))
    return 0


def cpu_memory_probes(names: list[str], argv: list[str]) -> dict[str, dict]:
    """Run each variant in a fresh process and collect its peak RSS (one process cannot split its own)."""
    results = {}
    for name in names:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--probe", name, "--no-json"]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            sys.stderr.write(completed.stderr[-3000:])
            raise SystemExit(f"[bench] memory probe for {name} failed (exit {completed.returncode})")
        results[name] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"[probe] {name}: peak RSS {results[name]['peak_rss_mib']:.0f} MiB", flush=True)
    return results


def main(args: argparse.Namespace, argv: list[str]) -> int:
    device = resolve_device(args.device)
    resolve_defaults(args, device)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.probe:
        return probe(args, device)
    info = machine_info()
    print(f"[bench] {describe_machine(info)}")
    names = variant_names(args)
    print(f"[bench] {args.backbone}, {args.img_size} px, batch {args.batch_size}, {args.num_experts} experts, "
          f"deep supervision {not args.no_deep_supervision}, variants: {', '.join(names)}", flush=True)
    load_before = wait_for_quiet(args.wait_load)
    memory: dict[str, dict] = {}
    if device.type == "cpu" and not args.no_memory_probe:
        memory = cpu_memory_probes(names, argv)

    reference = build_model(args)
    parameters = sum(p.numel() for p in reference.parameters())
    steps = {name: make_step(name, reference, args, device) for name in names}
    warmup = args.warmup + (3 if any("+compile" in name for name in names) else 0)
    peaks = {name: 0 for name in names}
    if device.type == "cuda":
        # Peak per variant: the allocator's counters are host-side, so resetting them before every step
        # (no sync needed) and reading them after gives each step's own peak.
        def with_peak(name, step):
            def measured(index: int) -> None:
                torch.cuda.reset_peak_memory_stats(device)
                step(index)
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
            return measured

        steps = {name: with_peak(name, step) for name, step in steps.items()}
    samples = time_interleaved(steps, steps_per_block=args.steps_per_block, rounds=args.rounds,
                               warmup_steps=warmup, device=device)
    load_after = loadavg()[0]
    if device.type == "cuda":
        memory = {name: {"peak_allocated_mib": peak / 2**20} for name, peak in peaks.items()}

    per_step = {name: quantiles(values) for name, values in samples.items()}
    baseline = names[0]
    ratios = {name: paired_ratios(samples, baseline, name) for name in names}  # speed-up vs the first variant
    rows = []
    for name in names:
        q = per_step[name]
        mem = memory.get(name, {})
        mem_text = (f"{mem['peak_allocated_mib']:.0f} (allocated)" if "peak_allocated_mib" in mem
                    else f"{mem['peak_rss_mib']:.0f} (RSS)" if "peak_rss_mib" in mem else "-")
        rows.append([name, f"{q['median'] * 1e3:.0f}", f"{q['p25'] * 1e3:.0f}-{q['p75'] * 1e3:.0f}",
                     f"{args.batch_size / q['median']:.2f}", f"{ratios[name]['median']:.2f}x", mem_text])
    print()
    print(markdown_table(["variant", "ms/step", "IQR ms", "images/s", f"speed vs {baseline}", "peak MiB"], rows))
    print(f"\n[bench] {parameters / 1e6:.1f} M parameters, device {device}, load {load_before:.2f} -> {load_after:.2f}")
    if not args.no_json:
        path = write_json(f"train_step_{device.type}", {
            "machine": info, "args": {k: v for k, v in vars(args).items() if k != "probe"}, "device": str(device),
            "parameters": parameters, "load_1min_before": load_before, "load_1min_after": load_after,
            "per_step_s": per_step, "images_per_s": {n: args.batch_size / per_step[n]["median"] for n in names},
            "speedup_vs_first": ratios, "memory": memory, "samples_s": samples,
        }, args.out)
        print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args(), sys.argv[1:]))
