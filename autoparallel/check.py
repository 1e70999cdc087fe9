"""Is this machine ready for multi-GPU training? (`python -m autoparallel.check`, `python test_multi_gpu.py`)

Reports the software stack and the GPUs, then runs checks that exercise what training really does:
a DataParallel forward *and* backward with an uneven batch split under mixed precision (compared with one
device), and a DDP all-reduce through torch's own launcher. Each check ends PASS, FAIL or SKIP with a
reason. Exit codes: 0 all passed, 1 a check failed, 2 no GPU found (``--allow-cpu`` runs the checks that
mean something on a CPU: wrap() as a pass-through and a two-process gloo all-reduce).

The optional ``--model camoxpert`` step imports the application lazily; the library itself knows
nothing of it.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .detect import Runtime

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
EXIT_OK, EXIT_CHECK_FAILED, EXIT_NO_GPU = 0, 1, 2
_DDP_RESULT_MARKER = "AUTOPARALLEL_CHECK_DDP_RESULT "
_LAUNCH_GRACE_S = 30.0  # on top of the process-group timeout: starting Python and torch in every process
_KAGGLE_ADVICE = (
    "On Kaggle: Settings > Accelerator > 'GPU T4 x2' (not 'GPU T4' or 'GPU P100'), then save and restart "
    "the session; `nvidia-smi --list-gpus` should list 2 GPUs."
)


@dataclass
class CheckResult:
    """One line of the summary table."""

    name: str
    status: str
    reason: str
    seconds: float = 0.0


@dataclass(frozen=True)
class Options:
    """What to run; built from the command line (tests build it directly)."""

    allow_cpu: bool = False
    model: str | None = None
    model_backbone: str = "edgenext_base"
    bandwidth: bool = False
    expect_gpus: int | None = None
    timeout: float = 120.0


# --------------------------------------------------------------------------- environment report


def _on_kaggle(environ: Mapping[str, str]) -> bool:
    return "KAGGLE_KERNEL_RUN_TYPE" in environ or Path("/kaggle/working").is_dir()


def _gpu_info(index: int) -> dict:
    props = torch.cuda.get_device_properties(index)
    return {
        "index": index,
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        # bf16 autocast is fast only from Ampere (sm80) on; older GPUs emulate it.
        "bf16": props.major >= 8,
        "multiprocessors": props.multi_processor_count,
    }


def _nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # CPU-only builds have no NCCL at all
        return None
    return ".".join(str(part) for part in version) if isinstance(version, tuple) else str(version)


def _local_runtime() -> Runtime:
    """What a plain ``python train.py`` would get here; pure detection, no process group is created.

    Only the user's device and precision choices are honoured: a launcher's or a DDP request's variables
    describe other processes, not this diagnostic one.
    """
    from .detect import Hardware, detect_runtime

    env = {key: os.environ[key] for key in ("AUTOPARALLEL_DEVICES", "AUTOPARALLEL_PRECISION") if key in os.environ}
    return detect_runtime(env=env, hardware=Hardware.probe())


def _runtime_banner() -> str:
    try:
        from .output import banner

        return banner(_local_runtime())
    except Exception as error:  # the report must still print when detection itself is broken
        return f"could not detect the runtime: {type(error).__name__}: {error}"


def _launch_plan(environ: Mapping[str, str]) -> str:
    """What autoparallel.launch() (called by train_ultimate.py) would do with this machine and environment."""
    from .launch import requested_processes

    try:
        count = requested_processes(None, environ, _num_gpus())
    except ValueError as error:
        return str(error)
    if count is None:
        return "keeps one process"
    return f"re-runs the script as {count} DDP processes (AUTOPARALLEL_STRATEGY=dp keeps one process)"


def collect_environment(environ: Mapping[str, str] | None = None) -> dict:
    """Versions, GPUs and the runtime autoparallel would pick, as plain data (also the JSON report)."""
    environ = os.environ if environ is None else environ
    cuda_available = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": cuda_available,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": _nccl_version(),
        "cuda_visible_devices": environ.get("CUDA_VISIBLE_DEVICES"),
        "kaggle": _on_kaggle(environ),
        "cpu_count": os.cpu_count(),
        "gpus": [_gpu_info(i) for i in range(torch.cuda.device_count())] if cuda_available else [],
        "runtime": _runtime_banner(),
        "launch": _launch_plan(environ),
    }


# --------------------------------------------------------------------------- checks


def _num_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _precision() -> str:
    """The precision training would use here: the detected runtime's, fp32 on the CPU."""
    return "fp32" if _num_gpus() == 0 else _local_runtime().precision


def check_cuda(options: Options) -> tuple[str, str]:
    if torch.cuda.is_available():
        return PASS, f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s) visible"
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build of torch"
    if options.allow_cpu:
        return SKIP, f"no GPU ({build}); --allow-cpu: running the CPU checks"
    return FAIL, f"no GPU visible to torch ({build})"


def check_device_count(options: Options) -> tuple[str, str]:
    count = _num_gpus()
    if count == 0:
        return SKIP, "no GPU"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))
    advice = f" {_KAGGLE_ADVICE}" if _on_kaggle(os.environ) else ""
    if options.expect_gpus is not None and count < options.expect_gpus:
        return FAIL, f"{count} GPU(s) ({names}), expected {options.expect_gpus}.{advice}"
    if count == 1:
        return PASS, f"1 GPU ({names}): training runs on one device; multi-GPU checks are skipped.{advice}"
    return PASS, f"{count} GPUs: {names}"


def check_peer_access(options: Options) -> tuple[str, str]:
    count = _num_gpus()
    if count < 2:
        return SKIP, "needs 2 or more GPUs"
    notes = []
    for src in range(count):
        for dst in range(count):
            if src == dst:
                continue
            data = torch.randn(4 * 2**20 // 4, device=f"cuda:{src}")  # 4 MiB
            back = data.to(f"cuda:{dst}").to(f"cuda:{src}")
            if not torch.equal(data, back):
                return FAIL, f"a tensor copied cuda:{src} -> cuda:{dst} -> cuda:{src} came back corrupted"
            if not torch.cuda.can_device_access_peer(src, dst):
                notes.append(f"{src}->{dst}")
    if notes:
        return PASS, (f"copies intact; no peer access for {', '.join(notes)}: transfers go through host "
                      "memory (correct, somewhat slower)")
    return PASS, "copies intact; every GPU pair has peer access"


class _Probe(nn.Module):
    """A small conv net that returns a dict with a 0-dim auxiliary loss, like CamoXpert's MoE does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, images: torch.Tensor) -> dict:
        pooled = F.relu(self.conv2(F.relu(self.conv1(images)))).mean(dim=(2, 3))
        return {"logits": self.head(pooled), "aux_loss": pooled.float().pow(2).mean()}


def _probe_step(model: nn.Module, probe: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                runtime: Runtime) -> tuple[torch.Tensor, dict]:
    """Forward and backward through ``model`` (maybe wrapped); gradients are read from ``probe`` itself."""
    from .precision import autocast

    model.zero_grad(set_to_none=True)
    with autocast(runtime):
        output = model(images)
    if output["aux_loss"].dim() != 0:
        raise AssertionError(f"the auxiliary loss came back with shape {tuple(output['aux_loss'].shape)}, "
                             "not as a scalar: wrap()'s scalar rule is broken")
    loss = F.cross_entropy(output["logits"].float(), targets) + output["aux_loss"].float()
    loss.backward()
    grads = {name: param.grad.detach().float().cpu() for name, param in probe.named_parameters()}
    return loss.detach().float().cpu(), grads


def _max_relative_diff(grads: dict, reference: dict) -> float:
    worst = 0.0
    for name, ref in reference.items():
        scale = max(ref.abs().max().item(), 1e-8)
        worst = max(worst, (grads[name] - ref).abs().max().item() / scale)
    return worst


def check_dataparallel(options: Options) -> tuple[str, str]:
    from .detect import Runtime
    from .wrap import wrap

    count = _num_gpus()
    precision = _precision()
    if count >= 2:
        device = torch.device("cuda", 0)
        parallel_rt = Runtime(mode="dp", device=device, device_ids=tuple(range(count)), precision=precision)
        single_rt = Runtime(mode="single", device=device, device_ids=(0,), precision=precision)
        batch = 3 * count - 1  # chunks of 3, the last one 2: an uneven split on any GPU count
        split = "+".join(["3"] * (count - 1) + ["2"])
        setting = f"{count} GPUs, batch {batch} split {split}, {precision}"
    elif count == 1:
        device = torch.device("cuda", 0)
        parallel_rt = single_rt = Runtime(mode="single", device=device, device_ids=(0,), precision=precision)
        batch, setting = 5, f"1 GPU (no DataParallel), batch 5, {precision}"
    else:
        device = torch.device("cpu")
        parallel_rt = single_rt = Runtime(mode="cpu", device=device, device_ids=())
        batch, setting = 5, "CPU: wrap() is a pass-through (DataParallel needs 2 or more GPUs), batch 5, fp32"

    torch.manual_seed(0)
    reference = _Probe()
    candidate = copy.deepcopy(reference)
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.randint(0, 4, (batch,), generator=torch.Generator().manual_seed(2)).to(device)
    ref_loss, ref_grads = _probe_step(reference.to(device), reference, images, targets, single_rt)
    wrapped = wrap(candidate, runtime=parallel_rt)
    if count < 2 and wrapped is not candidate:
        return FAIL, f"with {count} GPU(s) wrap() returned a {type(wrapped).__name__} instead of the model itself"
    wrap_logger = logging.getLogger("autoparallel.wrap")
    level = wrap_logger.level
    wrap_logger.setLevel(logging.ERROR)  # the uneven split is deliberate here: no advice to even it out
    try:
        loss, grads = _probe_step(wrapped, candidate, images, targets, parallel_rt)
    finally:
        wrap_logger.setLevel(level)
    tolerance = 1e-5 if count == 0 else 2e-2  # TF32 / fp16 / bf16 reductions run in a different order
    loss_diff = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-8)
    grad_diff = _max_relative_diff(grads, ref_grads)
    if not torch.isfinite(loss) or loss_diff > tolerance or grad_diff > tolerance:
        return FAIL, (f"{setting}: loss {loss.item():.6f} vs one device {ref_loss.item():.6f}, max relative "
                      f"gradient difference {grad_diff:.2e} (tolerance {tolerance:.0e})")
    return PASS, f"{setting}: loss and gradients match one device (max rel. diff {grad_diff:.1e})"


def _ddp_command(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "autoparallel.check", "--_ddp-worker"]


def _child_environment(timeout: float, on_gpu: bool) -> dict:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("AUTOPARALLEL_")}
    package_root = str(Path(__file__).resolve().parent.parent)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environ.get("PYTHONPATH")]))
    environ.setdefault("OMP_NUM_THREADS", "1")
    environ["AUTOPARALLEL_TIMEOUT"] = str(int(timeout))
    if not on_gpu:
        environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where a broken CUDA stack is installed
    return environ


def check_ddp(options: Options) -> tuple[str, str]:
    count = _num_gpus()
    nproc, backend = (count, "nccl") if count >= 2 else (2, "gloo")
    if count == 1:
        return SKIP, "needs 2 or more GPUs (DDP on one GPU is one process)"
    command = _ddp_command(nproc)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=_child_environment(options.timeout, count >= 2), start_new_session=True)
    try:
        output, _ = process.communicate(timeout=options.timeout + _LAUNCH_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and every worker it started
        process.communicate()
        waited = options.timeout + _LAUNCH_GRACE_S
        return FAIL, (f"{nproc} processes ({backend}) did not finish in {waited:.0f} s: a hang. Retry with "
                      "NCCL_DEBUG=INFO for details; NCCL_P2P_DISABLE=1 helps on some multi-GPU machines; "
                      "--timeout SECONDS waits longer")
    results = [line[len(_DDP_RESULT_MARKER):] for line in output.splitlines() if line.startswith(_DDP_RESULT_MARKER)]
    if process.returncode != 0 or not results:
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-6:])
        return FAIL, f"{nproc} processes ({backend}) exited with status {process.returncode}: {tail}"
    result = json.loads(results[-1])
    if not result["ok"]:
        return FAIL, f"{nproc} processes ({backend}): {result['detail']}"
    return PASS, f"{nproc} processes ({backend}) via torch.distributed.run: {result['detail']}"


def _ddp_worker() -> int:
    """Runs in each process started by check_ddp: all-reduce and an uneven all-gather."""
    from .collectives import all_gather, all_reduce, barrier
    from .runtime import runtime

    rt = runtime(strategy="ddp")
    summed = all_reduce(torch.full((2**20,), float(rt.rank + 1), device=rt.device), op="sum")
    expected = rt.world_size * (rt.world_size + 1) / 2
    gathered = all_gather(torch.full((rt.rank + 1, 2), float(rt.rank), device=rt.device))
    expected_rows = sum(range(1, rt.world_size + 1))
    ok = bool(torch.all(summed == expected)) and tuple(gathered.shape) == (expected_rows, 2)
    barrier()
    if rt.is_main:
        detail = (f"all-reduce of 4 MiB per rank gave {summed[0].item():g} (expected {expected:g}); uneven "
                  f"all-gather gave {gathered.shape[0]} rows (expected {expected_rows}); backend {rt.backend}")
        sys.stdout.write(_DDP_RESULT_MARKER + json.dumps({"ok": ok, "detail": detail}) + "\n")
        sys.stdout.flush()
    return 0 if ok else 1


def check_model(options: Options) -> tuple[str, str]:
    if options.model is None:
        return SKIP, "not asked (--model camoxpert runs one training step of the real model)"
    if options.model != "camoxpert":
        return FAIL, f"unknown --model {options.model!r}: the only choice is 'camoxpert'"
    from camoxpert.losses import CODLoss  # the application, imported only when asked
    from camoxpert.model import CamoXpert

    from .precision import autocast, grad_scaler
    from .wrap import wrap

    rt = _local_runtime()
    batch = max(2, 2 * len(rt.device_ids))
    model = wrap(CamoXpert(backbone=options.model_backbone, pretrained=False, deep_supervision=True), runtime=rt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = grad_scaler(rt)
    images = torch.randn(batch, 3, 64, 64, device=rt.device)
    masks = (torch.rand(batch, 1, 64, 64, device=rt.device) > 0.5).float()
    before = [param.detach().clone() for param in model.parameters()]
    setting = f"backbone {options.model_backbone}, batch {batch} at 64 px, {rt.mode}, {rt.precision}"
    for attempt in range(1, 4):  # fp16: GradScaler skips a step whose gradients overflow, then lowers its scale
        optimizer.zero_grad(set_to_none=True)
        with autocast(rt):
            output = model(images)
        loss, _ = CODLoss()(output, masks)
        if not torch.isfinite(loss):
            return FAIL, f"{setting}: the loss is {loss.item()} on step {attempt}"
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        changed = sum(not torch.equal(old, new.detach()) for old, new in zip(before, model.parameters()))
        if changed:
            return PASS, f"{setting}: loss {loss.item():.4f}, {changed}/{len(before)} parameter tensors updated"
    return FAIL, f"{setting}: no parameter changed in 3 optimizer steps (loss {loss.item():.4f})"


def _synchronize(*devices: int) -> None:
    for device in devices:
        torch.cuda.synchronize(device)


def check_bandwidth(options: Options) -> tuple[str, str]:
    if not options.bandwidth:
        return SKIP, "not asked (--bandwidth measures GPU-to-GPU copies)"
    count = _num_gpus()
    if count < 2:
        return SKIP, "needs 2 or more GPUs"
    size = 256 * 2**20
    rates = []
    for src in range(count):
        for dst in range(count):
            if src == dst:
                continue
            data = torch.empty(size, dtype=torch.uint8, device=f"cuda:{src}")
            target = torch.empty(size, dtype=torch.uint8, device=f"cuda:{dst}")
            target.copy_(data)  # warm-up: first copies set up peer mappings
            _synchronize(src, dst)
            start = time.perf_counter()
            for _ in range(5):
                target.copy_(data)
            _synchronize(src, dst)
            rates.append(f"{src}->{dst} {5 * size / (time.perf_counter() - start) / 1e9:.1f} GB/s")
    return PASS, ", ".join(rates)


# --------------------------------------------------------------------------- running and reporting


def planned_checks() -> list[tuple[str, Callable[[Options], tuple[str, str]]]]:
    """The checks in order; looked up at call time so a test can replace one with monkeypatch."""
    return [
        ("CUDA available", check_cuda),
        ("GPU count", check_device_count),
        ("peer-to-peer", check_peer_access),
        ("DataParallel fwd+bwd", check_dataparallel),
        ("DDP all-reduce", check_ddp),
        ("model step", check_model),
        ("GPU bandwidth", check_bandwidth),
    ]


def run_checks(options: Options) -> list[CheckResult]:
    """Runs every check; an exception inside one is that check's FAIL, never the end of the report."""
    results = []
    no_gpu = _num_gpus() == 0 and not options.allow_cpu
    for name, check in planned_checks():
        if no_gpu and results:
            results.append(CheckResult(name, SKIP, "no GPU (--allow-cpu runs the CPU checks)"))
            continue
        start = time.perf_counter()
        try:
            status, reason = check(options)
        except Exception as error:
            status, reason = FAIL, f"{type(error).__name__}: {error}"
        results.append(CheckResult(name, status, reason, round(time.perf_counter() - start, 2)))
    return results


def exit_code(results: Sequence[CheckResult], options: Options) -> int:
    if _num_gpus() == 0 and not options.allow_cpu:
        return EXIT_NO_GPU
    return EXIT_CHECK_FAILED if any(result.status == FAIL for result in results) else EXIT_OK


def _no_gpu_explanation(environment: dict) -> str:
    build = environment["cuda_build"]
    visible = environment["cuda_visible_devices"]
    lines = [
        "No GPU found: torch cannot see a CUDA device, so training would run on the CPU.",
        f"  - torch {environment['torch']} is "
        + (f"a CUDA {build} build: check the driver with `nvidia-smi`." if build
           else "a CPU-only build: install a CUDA build of torch (https://pytorch.org/get-started/locally/)."),
        "  - CUDA_VISIBLE_DEVICES is not set." if visible is None else
        f"  - CUDA_VISIBLE_DEVICES={visible!r}" + (": an empty value hides every GPU." if not visible.strip() else "."),
        f"  - {_KAGGLE_ADVICE}",
        "To run the checks that work on a CPU (wrap, gloo DDP, the model step): add --allow-cpu.",
    ]
    return "\n".join(lines)


def format_report(environment: dict, results: Sequence[CheckResult], code: int) -> str:
    """The human-readable report: environment, one line per check, the verdict."""
    rows = [
        ("Python", environment["python"]),
        ("torch", environment["torch"]),
        ("CUDA", f"{environment['cuda_build'] or 'none (CPU-only build)'}, available: "
                 f"{'yes' if environment['cuda_available'] else 'no'}"),
        ("cuDNN", str(environment["cudnn"])),
        ("NCCL", str(environment["nccl"])),
        ("CUDA_VISIBLE_DEVICES", "(not set)" if environment["cuda_visible_devices"] is None
         else repr(environment["cuda_visible_devices"])),
    ]
    rows += [(f"GPU {gpu['index']}", f"{gpu['name']}, {gpu['memory_gib']} GiB, compute {gpu['compute_capability']}, "
                                     f"bf16: {'yes' if gpu['bf16'] else 'no'}") for gpu in environment["gpus"]]
    rows += [("runtime", environment["runtime"]), ("launch()", environment["launch"])]
    lines = ["autoparallel environment check", ""] + [f"  {key:<22}{value}" for key, value in rows] + [""]
    width = max(len(result.name) for result in results)
    lines.append(f"  {'check':<{width}}  status  time    reason")
    lines += [f"  {r.name:<{width}}  {r.status:<6}  {r.seconds:5.1f}s  {r.reason}" for r in results]
    lines.append("")
    if code == EXIT_NO_GPU:
        lines.append(_no_gpu_explanation(environment))
    failed = [r.name for r in results if r.status == FAIL]
    verdict = {EXIT_OK: "all checks passed", EXIT_CHECK_FAILED: f"FAILED: {', '.join(failed)}",
               EXIT_NO_GPU: "no GPU found"}[code]
    lines.append(f"Result: {verdict} (exit code {code})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m autoparallel.check",
        description="Check that this machine is ready for (multi-)GPU training. "
                    "Exit code 0: all passed, 1: a check failed, 2: no GPU found.")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a GPU, run the CPU checks (wrap pass-through, gloo DDP) instead of exiting 2")
    parser.add_argument("--model", choices=["camoxpert"], default=None,
                        help="also run one training step of the real model on a tiny input")
    parser.add_argument("--model-backbone", default="edgenext_base",
                        help="timm backbone for --model camoxpert (default: edgenext_base)")
    parser.add_argument("--bandwidth", action="store_true", help="also measure GPU-to-GPU copy bandwidth")
    parser.add_argument("--expect-gpus", type=int, default=None, metavar="N",
                        help="fail the GPU count check with fewer than N GPUs (e.g. 2 on Kaggle's T4 x2)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="process-group timeout for the DDP check (default: 120)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.add_argument("--_ddp-worker", dest="ddp_worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 passed, 1 a check failed, 2 no GPU)."""
    args = build_parser().parse_args(argv)
    if args.ddp_worker:
        return _ddp_worker()
    options = Options(allow_cpu=args.allow_cpu, model=args.model, model_backbone=args.model_backbone,
                      bandwidth=args.bandwidth, expect_gpus=args.expect_gpus, timeout=args.timeout)
    environment = collect_environment()
    results = run_checks(options)
    code = exit_code(results, options)
    if args.json:
        report = {"environment": environment, "checks": [asdict(r) for r in results], "exit_code": code}
        print(json.dumps(report, indent=2))
    else:
        print(format_report(environment, results, code))
    return code


if __name__ == "__main__":
    sys.exit(main())
