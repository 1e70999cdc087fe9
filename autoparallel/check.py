"""Is this machine ready for multi-GPU training? ``python -m autoparallel.check`` reports the stack, the GPUs and the
runtime autoparallel would pick, then runs what training does (a DataParallel step with an uneven split under mixed
precision, compared with one device; a DDP all-reduce through torchrun), each ending PASS, FAIL or SKIP with its
reason. Exit 0: all passed, 1: a check failed, 2: no GPU. An application adds checks, flags and advice via main()."""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import group
from .collectives import all_gather, all_reduce
from .detect import Hardware, Runtime, detect_runtime
from .detect import visible_gpus as gpus
from .launch import requested_processes
from .output import banner
from .precision import autocast
from .runtime import runtime

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
Check = Callable[[argparse.Namespace], "tuple[str, str]"]
_MARKER = "AUTOPARALLEL_CHECK_DDP_RESULT "
_GRACE_S = 30.0  # on top of the process-group timeout: starting Python and torch in every process
KNOBS = ("AUTOPARALLEL_TIMEOUT", "TORCH_DISTRIBUTED_DEBUG", "NCCL_DEBUG", "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE")


@dataclass
class Result:
    name: str
    status: str
    reason: str
    seconds: float = 0.0


def local_runtime() -> Runtime:
    """What a plain ``python train.py`` would get here (device and precision choices only; no process group)."""
    env = {key: os.environ[key] for key in ("AUTOPARALLEL_DEVICES", "AUTOPARALLEL_PRECISION") if key in os.environ}
    return detect_runtime(env=env, hardware=Hardware.probe())


def collect_environment() -> dict[str, Any]:
    """Versions, GPUs, the runtime and launch autoparallel would pick, and the debugging knobs, as plain data."""
    def attempt(what: Callable[[], Any]) -> Any:  # the report must print even when one part of it fails
        try:
            return what()
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    count = attempt(lambda: requested_processes(None, os.environ, gpus()))
    knobs = {name: os.environ.get(name, "(not set)") for name in KNOBS}
    knobs.update({name: f"{value} (set by autoparallel for nccl jobs)"
                  for name, value in group.debug_environment(os.environ).items()})
    props = [torch.cuda.get_device_properties(i) for i in range(gpus())]
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "nccl": attempt(lambda: ".".join(map(str, torch.cuda.nccl.version()))) if gpus() else None,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "cpu_count": os.cpu_count(),
            "gpus": [{"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                      "compute_capability": f"{p.major}.{p.minor}", "bf16": p.major >= 8} for i, p in enumerate(props)],
            "runtime": attempt(lambda: banner(local_runtime())),
            "launch": count if isinstance(count, str) else
            "keeps one process" if count is None else f"re-runs the script as {count} DDP processes",
            "debugging": knobs}


def check_cuda(args: argparse.Namespace) -> tuple[str, str]:
    if torch.cuda.is_available():
        return PASS, f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s) visible"
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build of torch"
    return (SKIP, f"no GPU ({build}); --allow-cpu: running the CPU checks") if args.allow_cpu else \
        (FAIL, f"no GPU visible to torch ({build})")


def check_device_count(args: argparse.Namespace) -> tuple[str, str]:
    """The GPUs, and which pairs lack peer access (their copies go through host memory: correct, slower)."""
    count = gpus()
    if count == 0:
        return SKIP, "no GPU"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))
    if args.expect_gpus is not None and count < args.expect_gpus:
        return FAIL, f"{count} GPU(s) ({names}), expected {args.expect_gpus}"
    if count == 1:
        return PASS, f"1 GPU ({names}): training runs on one device"
    no_peer = [f"{a}->{b}" for a in range(count) for b in range(count)
               if a != b and not torch.cuda.can_device_access_peer(a, b)]
    return PASS, f"{count} GPUs: {names}; " + (f"no peer access {', '.join(no_peer)}" if no_peer else "peer access")


class _Probe(nn.Module):
    """A small conv net returning a dict with a 0-dim auxiliary loss, as mixture-of-experts models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(16, 4)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = F.relu(self.conv(images)).mean(dim=(2, 3))
        return {"logits": self.head(pooled), "aux_loss": pooled.float().pow(2).mean()}


def _step(model: nn.Module, probe: nn.Module, images: torch.Tensor, targets: torch.Tensor,
          rt: Runtime) -> tuple[float, dict[str, torch.Tensor]]:
    with autocast(rt):
        output = model(images)
    if output["aux_loss"].dim() != 0:
        raise AssertionError(f"the auxiliary loss came back with shape {tuple(output['aux_loss'].shape)}")
    loss = F.cross_entropy(output["logits"].float(), targets) + output["aux_loss"].float()
    loss.backward()
    return loss.item(), {name: p.grad.float().cpu() for name, p in probe.named_parameters()}


def check_dataparallel(args: argparse.Namespace) -> tuple[str, str]:
    from .wrap import wrap  # looked up per call, so a patched autoparallel.wrap.wrap is the one checked

    count = gpus()
    precision, device = (local_runtime().precision, "cuda:0") if count else ("fp32", "cpu")
    one = Runtime(mode="single" if count else "cpu", device=device, device_ids=(0,) if count else (),
                  precision=precision)
    spread = replace(one, mode="dp", device_ids=tuple(range(count))) if count > 1 else one
    batch = 3 * count - 1 if count > 1 else 5  # chunks of 3, the last one 2: an uneven split on any GPU count
    setting = (f"{count} GPUs, batch {batch}, {precision}" if count > 1 else
               f"1 GPU (no DataParallel), batch 5, {precision}" if count else
               "CPU: wrap() is a pass-through (DataParallel needs 2 or more GPUs), batch 5, fp32")
    torch.manual_seed(0)
    reference = _Probe().to(device)
    candidate = copy.deepcopy(reference)
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.randint(0, 4, (batch,), generator=torch.Generator().manual_seed(2)).to(device)
    ref_loss, ref_grads = _step(reference, reference, images, targets, one)
    wrapped = wrap(candidate, runtime=spread)
    if count < 2 and wrapped is not candidate:
        return FAIL, f"with {count} GPU(s) wrap() returned a {type(wrapped).__name__} instead of the model itself"
    loss, grads = _step(wrapped, candidate, images, targets, spread)
    tolerance = 1e-5 if count == 0 else 2e-2  # TF32 / fp16 / bf16 reductions run in another order
    grad_diff = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-8)).item() for n, g in ref_grads.items())
    if not abs(loss - ref_loss) / max(abs(ref_loss), 1e-8) <= tolerance or not grad_diff <= tolerance:
        return FAIL, (f"{setting}: loss {loss:.6f} vs one device {ref_loss:.6f}, max relative gradient difference "
                      f"{grad_diff:.2e} (tolerance {tolerance:.0e})")
    return PASS, f"{setting}: loss and gradients match one device (max rel. diff {grad_diff:.1e})"


def ddp_command(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "autoparallel.check", "--_ddp-worker"]


def check_ddp(args: argparse.Namespace) -> tuple[str, str]:
    count = gpus()
    if count == 1:
        return SKIP, "needs 2 or more GPUs (DDP on one GPU is one process)"
    nproc, backend = (count, "nccl") if count >= 2 else (2, "gloo")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AUTOPARALLEL_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        env.get("PYTHONPATH")])),
               AUTOPARALLEL_TIMEOUT=str(int(args.timeout)), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    if count < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where a broken CUDA stack is installed
    process = subprocess.Popen(ddp_command(nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=args.timeout + _GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return FAIL, (f"{nproc} processes ({backend}) did not finish in {args.timeout + _GRACE_S:.0f} s: a hang. Retry "
                      "with NCCL_DEBUG=INFO for details; NCCL_P2P_DISABLE=1 helps on some multi-GPU machines; "
                      "--timeout SECONDS waits longer")
    results = [line[len(_MARKER):] for line in output.splitlines() if line.startswith(_MARKER)]
    if process.returncode != 0 or not results:
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-6:])
        return FAIL, f"{nproc} processes ({backend}) exited with status {process.returncode}: {tail}"
    ok, detail = json.loads(results[-1])
    return (PASS if ok else FAIL), f"{nproc} processes ({backend}) via torch.distributed.run: {detail}"


def _ddp_worker() -> int:
    """In each process check_ddp starts: an all-reduce and an uneven all-gather."""
    rt = runtime(strategy="ddp")
    summed = all_reduce(torch.full((2**20,), float(rt.rank + 1), device=rt.device))
    gathered = all_gather(torch.full((rt.rank + 1, 2), float(rt.rank), device=rt.device))
    expected, rows = rt.world_size * (rt.world_size + 1) / 2, sum(range(1, rt.world_size + 1))
    ok = bool(torch.all(summed == expected)) and tuple(gathered.shape) == (rows, 2)
    if rt.is_main:
        detail = (f"all-reduce of 4 MiB per rank gave {summed[0].item():g} (expected {expected:g}); uneven all-gather "
                  f"gave {gathered.shape[0]} rows (expected {rows}); backend {rt.backend}")
        sys.stdout.write(_MARKER + json.dumps([ok, detail]) + "\n")
    return 0 if ok else 1


def check_bandwidth(args: argparse.Namespace) -> tuple[str, str]:
    if not args.bandwidth or gpus() < 2:
        return SKIP, "needs 2 or more GPUs" if args.bandwidth else "not asked (--bandwidth measures GPU-to-GPU copies)"
    rates = []
    for src, dst in ((a, b) for a in range(gpus()) for b in range(gpus()) if a != b):
        data = torch.empty(256 * 2**20, dtype=torch.uint8, device=f"cuda:{src}")
        target = torch.empty_like(data, device=f"cuda:{dst}")
        for copies in (1, 5):  # the first copy sets up the peer mapping: not timed
            torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
            start = time.perf_counter()
            for _ in range(copies):
                target.copy_(data)
            torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
        rates.append(f"{src}->{dst} {5 * data.numel() / (time.perf_counter() - start) / 1e9:.1f} GB/s")
    return PASS, ", ".join(rates)


CHECKS: list[tuple[str, Check]] = [("CUDA available", check_cuda), ("GPU count", check_device_count),
                                   ("DataParallel fwd+bwd", check_dataparallel), ("DDP all-reduce", check_ddp),
                                   ("GPU bandwidth", check_bandwidth)]


def run_checks(args: argparse.Namespace, checks: Sequence[tuple[str, Check]]) -> list[Result]:
    """Every check in order; an exception inside one is that check's FAIL, never the end of the report."""
    results = []
    for name, check in checks:
        if gpus() == 0 and not args.allow_cpu and results:
            results.append(Result(name, SKIP, "no GPU (--allow-cpu runs the CPU checks)"))
            continue
        start = time.perf_counter()
        try:
            status, reason = check(args)
        except Exception as error:
            status, reason = FAIL, f"{type(error).__name__}: {error}"
        results.append(Result(name, status, reason, round(time.perf_counter() - start, 2)))
    return results


def format_report(environment: dict[str, Any], results: Sequence[Result], code: int, advice: Sequence[str]) -> str:
    build, visible = environment["cuda_build"], environment["cuda_visible_devices"]
    rows = [("Python / torch", f"{environment['python']} / {environment['torch']}"),
            ("CUDA", f"{build or 'none (CPU-only build)'}, available: "
                     f"{'yes' if environment['cuda_available'] else 'no'}"),
            ("cuDNN / NCCL", f"{environment['cudnn']} / {environment['nccl']}"),
            ("CUDA_VISIBLE_DEVICES", "(not set)" if visible is None else repr(visible))]
    rows += [(f"GPU {g['index']}", f"{g['name']}, {g['memory_gib']} GiB, compute {g['compute_capability']}, bf16: "
                                   f"{'yes' if g['bf16'] else 'no'}") for g in environment["gpus"]]
    rows += [("runtime", environment["runtime"]), ("ap.launch()", environment["launch"]),
             *environment["debugging"].items()]
    width = max(len(result.name) for result in results)
    lines = ["autoparallel environment check", "", *(f"  {key:<28}{value}" for key, value in rows), "",
             f"  {'check':<{width}}  status  time    reason",
             *(f"  {r.name:<{width}}  {r.status:<6}  {r.seconds:5.1f}s  {r.reason}" for r in results), ""]
    if code == 2:
        lines += ["No GPU found: torch cannot see a CUDA device, so training would run on the CPU.",
                  f"  - torch {environment['torch']} is " + (f"a CUDA {build} build: check the driver with "
                                                             "`nvidia-smi`." if build else "a CPU-only build."),
                  "  - CUDA_VISIBLE_DEVICES is not set." if visible is None else f"  - CUDA_VISIBLE_DEVICES={visible!r}"
                  + (": an empty value hides every GPU." if not visible.strip() else "."),
                  "To run the checks that work on a CPU: add --allow-cpu."]
    failed = ", ".join(r.name for r in results if r.status == FAIL)
    verdict = {0: "all checks passed", 1: f"FAILED: {failed}", 2: "no GPU found"}[code]
    return "\n".join([*lines, *advice, f"Result: {verdict} (exit code {code})"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autoparallel.check", description="Check that this machine is "
                                     "ready for (multi-)GPU training. Exit 0: all passed, 1: a check failed, "
                                     "2: no GPU.")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a GPU, run the CPU checks (wrap pass-through, gloo DDP) instead of exiting 2")
    parser.add_argument("--bandwidth", action="store_true", help="also measure GPU-to-GPU copy bandwidth")
    parser.add_argument("--expect-gpus", type=int, default=None, metavar="N",
                        help="fail the GPU count check with fewer than N GPUs (e.g. 2 on Kaggle's T4 x2)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="process-group timeout for the DDP check (default: 120)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.add_argument("--_ddp-worker", dest="ddp_worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, *, checks: Sequence[tuple[str, Check]] = (),
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
         advice: Callable[[dict[str, Any], list[Result]], list[str]] | None = None) -> int:
    """The command line; ``checks``, ``add_arguments`` and ``advice`` are an application's additions."""
    parser = build_parser()
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        return _ddp_worker()
    environment = collect_environment()
    results = run_checks(args, [*CHECKS, *checks])
    code = 2 if gpus() == 0 and not args.allow_cpu else 1 if any(r.status == FAIL for r in results) else 0
    extra = advice(environment, results) if advice is not None else []
    print(json.dumps({"environment": environment, "checks": [asdict(r) for r in results], "advice": extra,
                      "exit_code": code}, indent=2) if args.json else format_report(environment, results, code, extra))
    return code


if __name__ == "__main__":
    sys.exit(main())
