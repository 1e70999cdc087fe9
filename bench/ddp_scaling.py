"""Throughput of one process against N DDP processes at the same global batch, plus mode equivalence.

    python bench/ddp_scaling.py                          # CPU: 1 process vs 2 gloo processes
    python bench/ddp_scaling.py --launcher torchrun      # same, through `python -m torch.distributed.run`
    python bench/ddp_scaling.py --device cuda            # 1 GPU vs 2 GPUs (nccl), when a machine has 2
    python bench/ddp_scaling.py --wait-load 1.5          # on a shared machine: wait for it to be quiet first

Every run is a fresh worker process (or process group) of this same file, started by the parent:
`single` is a plain `python bench/ddp_scaling.py --worker ...` (autoparallel picks mode cpu or single),
`ddp` is the same command with AUTOPARALLEL_NPROC=N, which `ap.launch()` turns into N processes through
torch.distributed.run (or the explicit torchrun command with --launcher torchrun). The runs alternate
(single, ddp, ddp, single, ...) for --rounds rounds so a neighbour's load hits both modes alike.

Each worker first trains --check-steps steps from seed 0 and saves its parameters; the parent compares
the single-process and DDP parameters (DESIGN promise 1, here as a sanity line, not a test). Then it
times --steps steps after --warmup steps, between two barriers, with data from `ap.loader` over an
in-memory data set (global batch --batch-size, each rank gets batch/N).

On a 2-core CPU, torchrun gives each of 2 processes one thread (OMP_NUM_THREADS=1), while the single
process uses both cores: the ratio is then "what DDP costs", not a speed-up. On N GPUs it is the speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    ConvNet,
    add_common_args,
    describe_machine,
    loadavg,
    machine_info,
    markdown_table,
    quantiles,
    wait_for_quiet,
    write_json,
)

import autoparallel as ap  # noqa: E402

SCRIPT = Path(__file__).resolve()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: gloo processes on the CPU; cuda: one GPU per process (default: cpu)")
    parser.add_argument("--nproc", type=int, default=2, help="DDP processes (default: 2)")
    parser.add_argument("--launcher", choices=["autoparallel", "torchrun"], default="autoparallel",
                        help="how the DDP run is started (default: autoparallel, i.e. AUTOPARALLEL_NPROC=N)")
    parser.add_argument("--batch-size", type=int, default=32, help="GLOBAL batch per step (default: 32)")
    parser.add_argument("--image-size", type=int, default=32, help="default: 32")
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv (default: 32)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing (default: 5)")
    parser.add_argument("--check-steps", type=int, default=3,
                        help="steps trained from seed 0 before the parameters are compared (default: 3)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of (single, ddp) (default: 3)")
    parser.add_argument("--threads-per-process", type=int, default=None,
                        help="OMP/torch threads in every worker (default: torch's choice, 1 under torchrun)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    add_common_args(parser)
    return parser


# ----------------------------------------------------------------------------- worker (one process of a run)


def worker(args: argparse.Namespace) -> int:
    """Train, dump parameters after the check steps (rank 0), time the steps, write a JSON line (rank 0)."""
    ap.launch()  # re-executes this command as AUTOPARALLEL_NPROC processes when asked to; else returns
    if args.threads_per_process:
        torch.set_num_threads(args.threads_per_process)
    runtime = ap.runtime()
    num_samples = args.batch_size * 8
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(num_samples, 3, args.image_size, args.image_size, generator=generator),
                            torch.randint(0, 10, (num_samples,), generator=generator))
    loader = ap.loader(dataset, args.batch_size, train=True, num_workers=0, seed=0, runtime=runtime)

    torch.manual_seed(0)
    model = ap.wrap(ConvNet(width=args.width), runtime=runtime)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def batches():
        while True:
            yield from loader

    stream = batches()

    def train_step() -> None:
        images, labels = next(stream)
        images, labels = images.to(runtime.device, non_blocking=True), labels.to(runtime.device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.check_steps):
        train_step()
    if runtime.is_main:
        state = {name: tensor.detach().cpu().numpy() for name, tensor in ap.unwrap(model).state_dict().items()}
        np.savez(args.result_dir / f"params_{args.tag}.npz", **state)

    for _ in range(args.warmup):
        train_step()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    ap.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    ap.barrier()
    elapsed = time.perf_counter() - start
    if runtime.is_main:
        result = {"mode": runtime.mode, "world_size": runtime.world_size, "backend": runtime.backend,
                  "threads_per_process": torch.get_num_threads(), "seconds_per_step": elapsed / args.steps,
                  "samples_per_s": args.batch_size * args.steps / elapsed}
        (args.result_dir / f"result_{args.tag}.json").write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- parent (starts and compares runs)


def run_once(args: argparse.Namespace, kind: str, tag: str, result_dir: Path) -> dict:
    """Start one worker run (`single` or `ddp`) and return its result JSON."""
    forwarded = ["--worker", "--result-dir", str(result_dir), "--tag", tag,
                 "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
                 "--width", str(args.width), "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--check-steps", str(args.check_steps)]
    if args.threads_per_process:
        forwarded += ["--threads-per-process", str(args.threads_per_process)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("AUTOPARALLEL_")}
    if args.threads_per_process:
        env["OMP_NUM_THREADS"] = str(args.threads_per_process)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif kind == "single":
        env["CUDA_VISIBLE_DEVICES"] = "0"
    command = [sys.executable, str(SCRIPT), *forwarded]
    if kind == "ddp":
        if args.launcher == "torchrun":
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={args.nproc}", str(SCRIPT), *forwarded]
        else:
            env["AUTOPARALLEL_NPROC"] = str(args.nproc)
            env["AUTOPARALLEL_STRATEGY"] = "ddp"
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    result_file = result_dir / f"result_{tag}.json"
    if completed.returncode != 0 or not result_file.exists():
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"[bench] {kind} run {tag} failed (exit {completed.returncode}): {' '.join(command)}")
    return json.loads(result_file.read_text())


def compare_parameters(first: Path, second: Path) -> dict:
    """Largest absolute and relative parameter difference between two saved runs."""
    a, b = np.load(first), np.load(second)
    if sorted(a.files) != sorted(b.files):
        return {"equal_keys": False, "max_abs_diff": float("inf"), "max_rel_diff": float("inf")}
    max_abs = max(float(np.max(np.abs(a[key] - b[key]))) for key in a.files)
    max_rel = max(float(np.max(np.abs(a[key] - b[key]) / (np.abs(a[key]) + 1e-12))) for key in a.files)
    return {"equal_keys": True, "max_abs_diff": max_abs, "max_rel_diff": max_rel}


def main(args: argparse.Namespace) -> int:
    if args.worker:
        return worker(args)
    info = machine_info()
    print(f"[bench] {describe_machine(info)}")
    if args.batch_size % args.nproc:
        raise SystemExit(f"--batch-size {args.batch_size} is the global batch and must divide by --nproc "
                         f"{args.nproc}: pass e.g. --batch-size {args.batch_size - args.batch_size % args.nproc}")
    load_before = wait_for_quiet(args.wait_load)
    runs: dict[str, list[dict]] = {"single": [], "ddp": []}
    with tempfile.TemporaryDirectory(prefix="ddp_scaling_") as tmp:
        result_dir = Path(tmp)
        for round_index in range(args.rounds):
            order = ["single", "ddp"] if round_index % 2 == 0 else ["ddp", "single"]
            for kind in order:
                result = run_once(args, kind, f"{kind}{round_index}", result_dir)
                runs[kind].append(result)
                print(f"[round {round_index + 1}/{args.rounds}] {kind:6s} {result['mode']:6s} "
                      f"x{result['world_size']} ({result['threads_per_process']} threads/process): "
                      f"{result['samples_per_s']:.1f} samples/s   load {loadavg()[0]:.2f}", flush=True)
        equivalence = compare_parameters(result_dir / "params_single0.npz", result_dir / "params_ddp0.npz")
    load_after = loadavg()[0]

    throughput = {kind: quantiles([run["samples_per_s"] for run in results]) for kind, results in runs.items()}
    ratios = quantiles([d["samples_per_s"] / s["samples_per_s"] for s, d in zip(runs["single"], runs["ddp"])])
    equivalent = equivalence["equal_keys"] and equivalence["max_abs_diff"] <= 1e-5
    print()
    rows = [[kind, f"{results[0]['mode']} x{results[0]['world_size']}", results[0]["threads_per_process"],
             f"{throughput[kind]['median']:.1f}", f"{throughput[kind]['min']:.1f}-{throughput[kind]['max']:.1f}"]
            for kind, results in runs.items()]
    print(markdown_table(["run", "mode x processes", "threads/process", "samples/s (median)", "min-max"], rows))
    print(f"\nddp / single throughput: {ratios['median']:.3f} (min {ratios['min']:.3f}, max {ratios['max']:.3f}) "
          f"at global batch {args.batch_size}")
    print(f"mode equivalence after {args.check_steps} steps: {'OK' if equivalent else 'MISMATCH'} "
          f"(max |single - ddp| = {equivalence['max_abs_diff']:.2e}, max relative {equivalence['max_rel_diff']:.2e})")
    print(f"[bench] load {load_before:.2f} -> {load_after:.2f}")
    if not args.no_json:
        path = write_json(f"ddp_scaling_{args.device}", {
            "machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_dir", "tag")},
            "load_1min_before": load_before, "load_1min_after": load_after, "runs": runs,
            "samples_per_s": throughput, "ratio_ddp_over_single": ratios, "equivalence": equivalence,
            "equivalent": equivalent,
        }, args.out)
        print(f"[bench] wrote {path}")
    return 0 if equivalent else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
