"""The GPU paths in one command: test_multi_gpu.py, the tests marked `gpu` and the GPU rows of every benchmark.

    python bench/gpu_suite.py --device cuda --out bench/results/gpu_suite      # one GPU: under 8 minutes
    python bench/gpu_suite.py --device cpu --quick --out bench/results/gpu_suite_cpu   # the same plan on a CPU
    python bench/gpu_suite.py --device cuda --only train_step_compile --out bench/results/gpu_suite  # rerun rows
    python bench/gpu_suite.py --device cuda --dry-run                           # print the plan only

GPU time is lent rarely and for minutes, so every item is a subprocess with its own time limit and the
suite goes on when one fails, times out or cannot start: the item is recorded (status, reason, seconds,
the tail of its output) and the next one starts. `--out DIR` gets `gpu_suite.json` (machine: GPU name,
compute capability, torch / CUDA / cuDNN versions, packages; per item: command, status, seconds and its
numbers) and `gpu_suite.md` (the items table and the rows that decide the GPU defaults, each a ratio
measured in one interleaved run), both rewritten after every item so that a run cut short still leaves
what it measured; `DIR/items/` holds each item's log and result file. `--only NAME,...` reruns some items
and merges them into an existing `gpu_suite.json` of the same device. The whole plan is capped by
`--budget` (480 s): an item gets at most what is left. The limits are estimates for an H100/H200 until a
GPU has run the suite; `--limit-scale 2` doubles them on a slower GPU.

Items that cannot run here are skipped with the reason: fp16 / GradScaler, cudnn.benchmark and
torch.compile on a CPU, bf16 below compute capability 8.0, DataParallel and DDP with fewer than 2 GPUs,
and any item whose packages are missing (named, e.g. accelerate or pytest). None of the items imports
`camoxpert.metrics`, so pysodmetrics (and its scipy / scikit-image / OpenCV wheels) is not needed.

On a lent GPU machine (torch, timm, accelerate and tqdm installed, no network, so nothing installs from
an index), pytest is the only package the suite needs that may be missing (without it `gpu_tests` is
skipped, naming it). Bring it as pure-Python wheels (2 MiB) in a git-ignored folder that the device tool
carries, and install them into another git-ignored folder (no write to the machine's site-packages):

    # here, with the package index (--python-version 3.9 instead where the device's Python is 3.9):
    python -m pip download --only-binary=:all: --python-version 3.10 -d bench/results/wheels \\
        pytest exceptiongroup tomli
    # on the device machine: the device tool's run, carry ["bench/results/wheels"], timeout_s 600:
    python -c "import pytest" 2>/dev/null || python -m pip install -q --no-index \\
        --find-links bench/results/wheels --target bench/results/pylib pytest
    PYTHONPATH=$PWD/bench/results/pylib python bench/gpu_suite.py --device cuda --out $OUT/gpu_suite

`$OUT/gpu_suite/gpu_suite.md` is the table for docs/benchmarks.md; `--only NAME,...` with the same `--out`
reruns what failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib import metadata, util
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpu_suite_plan import PLAN, Context, Item  # noqa: E402
from _gpu_suite_report import decision_rows, render_markdown  # noqa: E402
from _machine import cpu_model, describe_gpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "gpu_suite"
DEFAULT_BUDGET_S = 480.0
MIN_ITEM_S = 5.0  # an item with less time than this left in the budget is skipped, not started
KILL_GRACE_S = 5.0
PACKAGES = ("torch", "torchvision", "timm", "accelerate", "tqdm", "numpy", "pillow", "pytest", "pysodmetrics")
FIRST_PARTY = ("autoparallel", "camoxpert", "_common", "_gpu_suite_plan", "_gpu_suite_report")

# Runs in a child so that this process never creates a CUDA context (which would hold GPU memory all along).
MACHINE_PROBE = r"""
import json, platform
info = {"python": platform.python_version(), "platform": platform.platform()}
try:
    import torch
except Exception as error:
    info["torch_error"] = f"{type(error).__name__}: {error}"
else:
    info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                gpus=[])
    if info["cuda_available"]:
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["nccl"] = ".".join(str(part) for part in torch.cuda.nccl.version())
        except Exception:
            info["nccl"] = None
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append({"name": props.name, "capability": [props.major, props.minor],
                                 "memory_gib": round(props.total_memory / 2**30, 1),
                                 "multiprocessors": props.multi_processor_count})
print(json.dumps(info))
"""


# ----------------------------------------------------------------------------- the machine


def child_environment(device: str) -> dict[str, str]:
    """This environment for every item: the repo importable, no AUTOPARALLEL_* or launcher settings of the
    caller (they would change what is measured), unbuffered output, and no GPU at all for --device cpu."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AUTOPARALLEL_", "TORCHELASTIC_")) and key not in ("RANK", "WORLD_SIZE",
                                                                                      "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")  # backbones are built with pretrained=False; never wait on a hub
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def probe_machine(device: str) -> dict:
    """GPUs, versions and packages; torch is asked in a child process (30 s at most)."""
    info: dict = {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                  "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                  "packages": package_versions()}
    try:
        done = subprocess.run([sys.executable, "-c", MACHINE_PROBE], capture_output=True, text=True, timeout=60,
                              env=child_environment(device), cwd=REPO)
        info.update(json.loads(done.stdout.strip().splitlines()[-1]))
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        info["torch_error"] = f"the machine probe failed: {type(error).__name__}: {error}"
    info.setdefault("gpus", [])
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def describe_machine(machine: dict) -> str:
    text = describe_gpus(machine)
    return (f"{text}, torch {machine.get('torch', machine.get('torch_error'))}, Python {machine.get('python')}, "
            f"{machine['cpu']} ({machine.get('cpu_affinity') or machine['cpu_count']} cores)")


# ----------------------------------------------------------------------------- running one item


def missing_module(output: str) -> str | None:
    """The third-party module a child could not import, from its traceback (first-party ones are bugs)."""
    for name in re.findall(r"ModuleNotFoundError: No module named '([\w.]+)'", output):
        if name.split(".")[0] not in FIRST_PARTY:
            return name.split(".")[0]
    return None


def last_line(output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:400] if lines else "(no output)"


def run_child(argv: list[str], log: Path, limit_s: float, env: dict[str, str]) -> tuple[str, int | None, float]:
    """Runs argv with its output in `log`; ('done', rc) or ('timeout', None) after killing its whole session."""
    start = time.monotonic()
    with log.open("w") as stream:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=limit_s)
            return "done", returncode, time.monotonic() - start
        except subprocess.TimeoutExpired:
            outcome = "timeout"
        except KeyboardInterrupt:
            outcome = "interrupted"
        for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        if outcome == "interrupted":
            raise KeyboardInterrupt
        return outcome, None, time.monotonic() - start


def run_item(item: Item, ctx: Context, limit_s: float, env: dict[str, str], budget_left: float | None = None) -> dict:
    """Plan, run and judge one item; never raises for what the child did."""
    planned = item.plan(ctx)
    record: dict = {"name": item.name, "what": item.what, "limit_s": round(limit_s, 1), "seconds": 0.0,
                    "run_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "numbers": dict(planned.notes)}
    if planned.skip:
        return {**record, "status": "skipped", "reason": planned.skip, "command": None}
    missing = [module for module in (*item.needs, *planned.needs) if util.find_spec(module) is None]
    command = " ".join(planned.argv).replace(sys.executable, "python").replace(str(REPO) + "/", "")
    record["command"] = command
    if missing:
        return {**record, "status": "skipped",
                "reason": f"needs the Python package(s) {', '.join(missing)}, not installed here"}
    if budget_left is not None and budget_left < MIN_ITEM_S:
        return {**record, "status": "skipped",
                "reason": f"the suite's --budget was spent before this item ({budget_left:.0f} s left)"}
    log = ctx.items_dir / f"{item.name}.log"
    outcome, returncode, seconds = run_child(planned.argv, log, limit_s, env)
    output = log.read_text(errors="replace")
    record.update(seconds=round(seconds, 1), returncode=returncode, output_tail=output[-2500:])
    if outcome == "timeout":
        return {**record, "status": "timeout", "reason": f"ran past its limit of {limit_s:.3g} s and was killed "
                                                         f"(last line: {last_line(output)})"}
    try:
        numbers = item.parse(ctx, output)
    except Exception as error:  # a result that cannot be read is the item's failure, not the suite's
        numbers = {"parse_error": f"{type(error).__name__}: {error}"}
    record["numbers"].update(numbers)
    skip_line = next((line for line in output.splitlines() if line.startswith("SKIP:")), None)
    module = missing_module(output)
    if returncode == 0 and skip_line:
        return {**record, "status": "skipped", "reason": skip_line[5:].strip()}
    if returncode != 0 and module:
        return {**record, "status": "skipped", "reason": f"needs the Python package {module}, not installed here"}
    verdict = item.judge(returncode, numbers, output)
    return {**record, **verdict}


# ----------------------------------------------------------------------------- the suite


def selected_items(only: str | None) -> list[Item]:
    if not only:
        return list(PLAN)
    names = [name.strip() for name in only.split(",") if name.strip()]
    known = {item.name for item in PLAN}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"--only {only}: unknown item(s) {', '.join(unknown) or '(none given)'}; the items are "
                         f"{', '.join(item.name for item in PLAN)}")
    return [item for item in PLAN if item.name in names]


def print_plan(items: list[Item], ctx: Context, limits: dict[str, float], budget: float | None) -> None:
    print(f"[suite] {describe_machine(ctx.machine)}", flush=True)
    plans = {item.name: item.plan(ctx) for item in items}
    running = [item.name for item in items if not plans[item.name].skip]
    mode = f"--device {ctx.device}{' --quick' if ctx.quick else ''}"
    print(f"[suite] plan for {mode}: {len(running)} of {len(items)} items run here, their limits add up to "
          f"{sum(limits[name] for name in running):.0f} s, budget {'none' if budget is None else f'{budget:.0f} s'}",
          flush=True)
    for index, item in enumerate(items, 1):
        planned = plans[item.name]
        action = f"skip: {planned.skip}" if planned.skip else \
            " ".join(planned.argv).replace(sys.executable, "python").replace(str(REPO) + "/", "")
        print(f"  {index:2d}. {item.name:<27} {limits[item.name]:5.0f} s  {action}", flush=True)


def write_report(out: Path, document: dict) -> None:
    document["decisions"] = decision_rows(document)
    (out / "gpu_suite.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    (out / "gpu_suite.md").write_text(render_markdown(document))


def previous_items(out: Path, device: str, quick: bool) -> dict[str, dict]:
    """Items of an earlier run into the same folder with the same device and size, kept by --only."""
    path = out / "gpu_suite.json"
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if document.get("device") != device or document.get("quick") != quick:
        return {}
    return {record["name"]: record for record in document.get("items", [])}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: the first GPU (and all visible GPUs for the 2-GPU rows); cpu: the same plan "
                             "with every GPU hidden, skipping what needs one (default: cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, sizes and iterations: checks that every path runs, measures nothing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for gpu_suite.json, gpu_suite.md and items/ (default: bench/results/gpu_suite)")
    parser.add_argument("--only", default=None, metavar="NAME,...",
                        help="run only these items, merged into DIR/gpu_suite.json of an earlier run")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help=f"the whole plan's time cap; an item gets at most what is left (default: "
                             f"{DEFAULT_BUDGET_S:.0f}; 0 for none)")
    parser.add_argument("--limit-scale", type=float, default=1.0, metavar="FACTOR",
                        help="multiply every item's time limit (default: 1; e.g. 2 on a T4)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its limits, run nothing")
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM too: stop the running item's whole process group, keep what was measured


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        items = selected_items(args.only)
    except ValueError as error:
        parser.error(str(error))
    out = args.out.resolve()
    budget = args.budget if args.budget > 0 else None
    machine = probe_machine(args.device)
    if args.dry_run and args.device == "cuda" and not machine["gpus"]:
        print("[suite] no CUDA device here: the plan below assumes one GPU of compute capability 9.0 (H100/H200)")
        machine = {**machine, "gpus": [{"name": "(assumed) H100/H200", "capability": [9, 0], "memory_gib": 80.0,
                                        "multiprocessors": 132}]}
    ctx = Context(device=args.device, quick=args.quick, machine=machine, items_dir=out / "items",
                  python=sys.executable)
    limits = {item.name: item.limit(ctx) * args.limit_scale for item in PLAN}
    print_plan(items, ctx, {item.name: limits[item.name] for item in items}, budget)
    if args.dry_run:
        return 0
    ctx.items_dir.mkdir(parents=True, exist_ok=True)
    kept = previous_items(out, args.device, args.quick) if args.only else {}
    records = {item.name: kept.get(item.name, {"name": item.name, "what": item.what, "status": "not_run",
                                               "reason": "not selected by --only", "command": None,
                                               "limit_s": round(limits[item.name], 1), "seconds": 0.0,
                                               "numbers": {}})
               for item in PLAN}
    started = time.monotonic()
    document = {"suite": "gpu_suite", "version": 1, "device": args.device, "quick": args.quick,
                "command": " ".join(["python", "bench/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget, "machine": machine,
                "plan": [item.name for item in PLAN], "items": list(records.values())}
    if args.device == "cuda" and not machine["gpus"]:
        reason = (f"--device cuda but torch sees no CUDA device ({machine.get('torch_error') or 'cuda available: no'}"
                  "): run on a GPU machine, or pass --device cpu --quick")
        for item in items:
            records[item.name] = {**records[item.name], "status": "skipped", "reason": reason}
        document["items"] = list(records.values())
        write_report(out, document)
        print(f"[suite] {reason}", file=sys.stderr)
        return 2
    env = child_environment(args.device)
    for index, item in enumerate(items, 1):
        left = None if budget is None else budget - (time.monotonic() - started)
        limit_s = limits[item.name] if left is None else max(0.0, min(limits[item.name], left))
        print(f"[suite] {index}/{len(items)} {item.name} (limit {limit_s:.0f} s) ...", flush=True)
        try:
            record = run_item(item, ctx, limit_s, env, left)
        except KeyboardInterrupt:
            records[item.name] = {**records[item.name], "status": "failed", "reason": "interrupted (Ctrl-C)"}
            document.update(items=list(records.values()), interrupted=True)
            write_report(out, document)
            raise
        records[item.name] = record
        document.update(items=list(records.values()), wall_s=round(time.monotonic() - started, 1),
                        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_report(out, document)  # after every item: a run cut short keeps what it measured
        print(f"[suite]   {record['status']} in {record['seconds']:.1f} s"
              f"{': ' + record['reason'] if record.get('reason') else ''}", flush=True)
    print()
    print((out / "gpu_suite.md").read_text())
    print(f"[suite] wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} in {document['wall_s']:.0f} s")
    bad = [item.name for item in items if records[item.name]["status"] in ("failed", "timeout")]
    if bad:
        print(f"[suite] failed or timed out: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
