"""``kaggle_2gpu_train.py``: pick a preset for this machine, find the data set, train in-process.

The hardware picks the preset (:mod:`camoxpert.presets`), the data set is searched for
(:mod:`camoxpert.discover`), and training runs through :func:`camoxpert.cli.main` in this process, with the
number of processes decided here once (:mod:`camoxpert.placement`); the exit status is training's. With no
data set anywhere, a short demo on a generated synthetic data set runs instead, so the README's first
command works on any machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import autoparallel as ap
from autoparallel import Hardware, Runtime

from . import placement, presets
from .discover import KAGGLE_INPUT, KAGGLE_WORKING, DatasetChoice, find_dataset, on_kaggle
from .errors import UserError, for_cli
from .run_dir import claim
from .synthetic import MARKER_FILE, generate_dataset

__all__ = ["DatasetChoice", "Job", "build_parser", "describe_job", "find_dataset", "main", "resolve_job"]


KAGGLE_TIME_BUDGET = "11h30m"
"""Kaggle ends a session at 12 hours: stopping at 11 h 30 m leaves time to validate, save and write out."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaggle_2gpu_train.py",
        description="Train CamoXpert with a preset for this machine's GPUs. Without a data set: a short demo on a "
                    "generated synthetic one. Environment variables override the preset: "
                    + ", ".join(presets.ENV_OVERRIDES) + ", DATASET_PATH, CHECKPOINT_DIR; flags override those.",
        epilog="Arguments after -- go unchanged to 'train_ultimate.py train' (example: -- --use-ema).")
    data = parser.add_argument_group("Data and checkpoints")
    data.add_argument("--dataset-path", default=None,
                      help="data set root (default: $DATASET_PATH, else COD10K-v3 found under /kaggle/input, else a "
                           "COD10K-layout folder in the working folder, else the synthetic demo)")
    data.add_argument("--checkpoint-dir", default=None,
                      help="default: $CHECKPOINT_DIR, else /kaggle/working/checkpoints on Kaggle, ./checkpoints "
                           "elsewhere (checkpoints/demo and checkpoints/demo-small for the demos)")
    data.add_argument("--resume", action="store_true", help="continue the run in the checkpoint folder (its last.pt)")
    data.add_argument("--time-budget", default=None, metavar="DURATION",
                      help=f"stop cleanly after this long, saving last.pt (continue with --resume); default "
                           f"{KAGGLE_TIME_BUDGET} on Kaggle (its sessions end at 12 h), none elsewhere")
    data.add_argument("--overwrite", action="store_true",
                      help="start over in a checkpoint folder that holds an earlier run, removing its files first")
    data.add_argument("--demo", action="store_true", help="run the synthetic demo even if a data set is found")
    data.add_argument("--demo-small", action="store_true",
                      help="a tiny demo (a dozen 64 px images, two steps; about a minute on 2 CPU cores) in its own "
                           "folders: a smoke test of the whole pipeline")
    run = parser.add_argument_group("Where to run")
    run.add_argument("--strategy", default="auto", choices=("auto", "dp", "ddp"),
                     help="auto: as train_ultimate.py (DDP on 2+ GPUs, re-launched through autoparallel); dp: one "
                          "process with DataParallel; ddp: one process per GPU (default: auto)")
    run.add_argument("--device", default="auto", help=placement.DEVICE_HELP)
    run.add_argument("--dry-run", action="store_true",
                     help="print the preset and the equivalent train_ultimate.py command, then exit 0")
    run.add_argument("--simulate", default=None, metavar="MACHINE",
                     help="with --dry-run: the preset on another machine, e.g. 2xT4, 1xT4, 2xP100, 1xA100, cpu")
    over = parser.add_argument_group("Preset overrides (flags beat environment variables)")
    for key, (label, flag, names) in presets.SETTINGS.items():
        if flag is not None:
            kind = {"choices": ("fp32", "fp16", "bf16")} if key == "precision" else {"type": int, "metavar": "N"}
            over.add_argument(flag, dest=key, default=None, **kind,
                              help=label + (" of one micro-step, split over the GPUs" if key == "batch_size" else "")
                              + f" (${names[0]})")
    return parser


def _detect(args: argparse.Namespace, environ: Mapping[str, str], hardware: Hardware | None) -> tuple[Runtime, int]:
    """The runtime this process gets and how many processes the run uses.

    Detection is autoparallel's pure ``detect_runtime``, so a simulated machine (``--simulate``, or
    ``hardware`` in tests) goes through exactly the rules of a real one, and nothing is initialised here.
    """
    if args.simulate:
        hardware = presets.parse_simulated(args.simulate)
        environ = {key: value for key, value in environ.items() if key.startswith("AUTOPARALLEL_")}
    elif hardware is None:
        hardware = ap.Hardware.probe()
    wanted = placement.device_arguments(args.device)
    if args.strategy == "dp":
        wanted.setdefault("strategy", "dp")
    # Outside a launcher, ddp only says how many processes start; this one detects as the parent it is.
    env = {key: value for key, value in environ.items()
           if not (key == "AUTOPARALLEL_STRATEGY" and value.strip().lower() == "ddp")}
    rt = ap.detect_runtime(**wanted, env=env, hardware=hardware)
    if rt.mode == "ddp":  # a worker under a launcher
        return rt, rt.world_size
    return rt, placement.process_count(args.strategy, args.device, environ, hardware.gpu_count)


def _prepare_demo_data(config: presets.DemoConfig, root: Path, environ: Mapping[str, str]) -> None:
    """Generate the synthetic set once; re-use it while its marker matches the demo's settings."""
    wanted = {"num_train": config.num_train, "num_test": config.num_test, "size": config.source_size,
              "seed": config.seed}
    marker = root / MARKER_FILE
    if environ.get("LOCAL_RANK", "0").strip() not in ("", "0"):  # under a launcher local rank 0 writes it
        deadline = time.monotonic() + 600
        while not marker.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        return
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if all(recorded.get(key) == value for key, value in wanted.items()):
            return
    elif root.exists():
        raise FileExistsError(f"{root} exists and was not written by the demo (no {MARKER_FILE}): move it away, or "
                              "pass --dataset-path to train on it")
    ap.print(f"Generating the synthetic data set ({config.num_train} train + {config.num_test} test images, "
             f"{config.source_size} px) in {root} ...", flush=True)
    # Written beside the target and renamed when complete, so an interrupted run leaves no half data set.
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    generate_dataset(partial, num_train=config.num_train, num_test=config.num_test, size=config.source_size,
                     seed=config.seed)
    if marker.is_file():  # an earlier demo's set with other settings: ours to replace
        shutil.rmtree(root)
    partial.rename(root)


def _run_demo_followups(checkpoint_dir: Path, device: str, strategy: str) -> int:
    """After the demo's training: test-set metrics and predicted masks, then say where everything is."""
    from .cli import main as cli_main

    best = checkpoint_dir / "best.pt"
    checkpoint = best if best.is_file() else checkpoint_dir / "last.pt"
    metrics_file, predictions = checkpoint_dir / "metrics_test.json", checkpoint_dir / "predictions"
    common = ["--checkpoint", str(checkpoint), "--split", "test", "--device", device, "--strategy", strategy,
              "--num-workers", "0"]
    status = cli_main(["evaluate", *common, "--output", str(metrics_file)])
    if status == 0:
        if ap.is_main_process():  # this run's masks only, none left from an earlier one
            for stale in predictions.glob("*.png"):
                stale.unlink()
        ap.barrier()
        status = cli_main(["predict", *common, "--output-dir", str(predictions)])
    if status == 0 and ap.is_main_process():
        metrics = json.loads(metrics_file.read_text()).get("metrics", {}) if metrics_file.is_file() else {}
        rows = [("test metrics", " | ".join(f"{name} {value:.3f}" for name, value in metrics.items())),
                ("checkpoints", f"{checkpoint_dir} (best.pt, last.pt, history.jsonl)"),
                ("curves", checkpoint_dir / "curves.png"), ("metrics file", metrics_file),
                ("predicted masks", predictions)]
        ap.print("\nDemo finished.\n" + "\n".join(f"  {name + ':':<19}{value}" for name, value in rows), flush=True)
        ap.print("Train on real data: python kaggle_2gpu_train.py --dataset-path /path/to/COD10K-v3", flush=True)
    return status


@dataclass(frozen=True)
class Job:
    """Everything decided before training starts; printed by --dry-run."""

    runtime: Runtime
    processes: int
    plan: presets.Plan
    dataset: DatasetChoice
    demo: presets.DemoConfig | None
    demo_reason: str
    data_root: Path
    checkpoint_dir: Path
    resume_from: str | None
    strategy: str  # passed to train_ultimate.py
    train_argv: list[str]


def resolve_job(args: argparse.Namespace, extra: Sequence[str], *, environ: Mapping[str, str],
                hardware: Hardware | None, kaggle_input: Path, kaggle_working: Path, cwd: Path) -> Job:
    """Hardware, preset, data set, checkpoint folder and the train_ultimate.py arguments.

    Raises:
        ValueError: an invalid override or environment value; FileNotFoundError: a missing --dataset-path or
        --resume checkpoint.
    """
    rt, processes = _detect(args, environ, hardware)
    flags = {key: getattr(args, key) for key, (_, flag, _) in presets.SETTINGS.items() if flag is not None}
    plan = presets.build_plan(rt, processes=processes, overrides=presets.collect_overrides(flags, environ))
    dataset = find_dataset(args.dataset_path or environ.get("DATASET_PATH", "").strip() or None,
                           kaggle_input=kaggle_input, cwd=cwd)
    demo = presets.DEMO_SMALL if args.demo_small else presets.DEMO if args.demo or dataset.path is None else None
    demo_reason = "asked for (--demo-small)" if args.demo_small else "asked for (--demo)" if args.demo else (
        "no data set found (looked in " + ", ".join(dataset.searched) + ")")
    work_root = kaggle_working if on_kaggle(environ, kaggle_working) else cwd
    if args.checkpoint_dir or environ.get("CHECKPOINT_DIR", "").strip():
        checkpoint_dir = Path(args.checkpoint_dir or environ["CHECKPOINT_DIR"].strip())
    else:
        checkpoint_dir = work_root / "checkpoints" / (demo.name if demo is not None else "")
    resume_from = None
    if args.resume:
        if not (checkpoint_dir / "last.pt").is_file():
            raise FileNotFoundError(f"--resume: no last.pt in {checkpoint_dir}. Train once without --resume, or pass "
                                    "--checkpoint-dir with the folder of the run to continue")
        resume_from = str(checkpoint_dir / "last.pt")
    strategy = "ddp" if processes > 1 else ("dp" if args.strategy == "dp" else "auto")
    data_root = work_root / "data" / (demo.data_name if demo is not None else "")
    if demo is not None:
        workers = plan.value("num_workers") if rt.device.type == "cuda" else 0  # the demo's images are cached
        train_argv = presets.demo_arguments(demo, dataset_path=str(data_root), checkpoint_dir=str(checkpoint_dir),
                                            num_workers=workers, strategy=strategy, device=args.device,
                                            resume_from=resume_from)
    else:
        train_argv = presets.train_arguments(plan, dataset_path=str(dataset.path), checkpoint_dir=str(checkpoint_dir),
                                             strategy=strategy, device=args.device, resume_from=resume_from)
    train_argv += ["--overwrite"] if args.overwrite else []
    budget = args.time_budget or (KAGGLE_TIME_BUDGET if on_kaggle(environ, kaggle_working) else None)
    train_argv += ["--time-budget", budget] if budget and "--time-budget" not in extra else []
    return Job(rt, processes, plan, dataset, demo, demo_reason, data_root, checkpoint_dir, resume_from, strategy,
               train_argv + list(extra))


def _strategy_text(rt: Runtime, processes: int) -> str:
    if processes > 1:
        where = " on the CPU (gloo)" if rt.device.type == "cpu" else ", one per GPU"
        return f"DDP, {processes} processes{where} (re-launched through torch.distributed.run)"
    return {"cpu": "CPU, one process", "single": "one GPU, one process", "ddp": "DDP (this is one of its processes)",
            "dp": f"DataParallel over {len(rt.device_ids)} GPUs in one process"}[rt.mode]


def describe_job(job: Job) -> str:
    """The text printed before training: strategy, demo or data set, preset table, checkpoints, command."""
    lines = [f"Strategy: {_strategy_text(job.runtime, job.processes)}", ""]
    if job.demo is not None:
        demo = job.demo
        workers = job.train_argv[job.train_argv.index("--num-workers") + 1]
        rows = [("backbone", f"{demo.backbone} ({'pretrained' if demo.pretrained else 'random init'}), "
                             f"{demo.num_experts} experts"),
                ("data", f"{demo.num_train} train / {demo.num_test} test synthetic scenes, {demo.source_size} px"),
                ("image size", demo.img_size), ("global batch", demo.batch_size), ("epochs", demo.epochs),
                ("precision", job.runtime.precision), ("workers per process", workers)]
        lines += [f"DEMO: {job.demo_reason}. Training a small model on a generated synthetic data set:",
                  *(f"  {name:<20}  {value}" for name, value in rows), "",
                  "With a real data set (--dataset-path) this machine's preset would be:"]
    else:
        lines.append(f"Data set: {job.dataset.path} (from {job.dataset.source})")
    lines += [presets.format_plan(job.plan), ""]
    lines.append(f"Checkpoints: {job.checkpoint_dir}" + (f" (resuming from {job.resume_from})" if job.resume_from
                                                         else ""))
    lines.append("Command: python train_ultimate.py " + shlex.join(job.train_argv))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None,
         hardware: Hardware | None = None, kaggle_input: Path | None = None, kaggle_working: Path = KAGGLE_WORKING,
         cwd: Path | None = None) -> int:
    """Entry point of ``kaggle_2gpu_train.py``; returns training's exit status (0 for --dry-run).

    The keyword arguments stand in for the machine in tests: environment, GPUs, /kaggle/input,
    /kaggle/working and the working folder.
    """
    environ = os.environ if environ is None else environ
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    own_argv, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(own_argv)
    if args.simulate and not args.dry_run:
        parser.error("--simulate only describes another machine: add --dry-run")
    kaggle_input = Path(environ.get("CAMOXPERT_KAGGLE_INPUT", KAGGLE_INPUT)) if kaggle_input is None else kaggle_input
    try:
        job = resolve_job(args, extra, environ=environ, hardware=hardware, kaggle_input=kaggle_input,
                          kaggle_working=kaggle_working, cwd=Path.cwd() if cwd is None else cwd)
    except (ValueError, FileNotFoundError) as error:
        parser.error(for_cli(str(error)))
    if job.runtime.launcher != "autoparallel":  # a worker ap.launch() started: the parent printed all this
        ap.print(describe_job(job) + "\n", flush=True)
    if args.dry_run:
        return 0
    try:
        claim(job.checkpoint_dir, resume_from=job.resume_from, overwrite=args.overwrite, resume_flag="--resume")
        if job.demo is not None:
            _prepare_demo_data(job.demo, job.data_root, environ)
    except (UserError, FileExistsError) as error:
        parser.error(str(error))
    status = placement.launch(job.processes)  # the parent of a DDP job gets the job's status here
    if status is not None:
        return status
    from .cli import main as cli_main

    status = cli_main(job.train_argv, processes=job.processes)
    if job.demo is not None and status == 0:
        status = _run_demo_followups(job.checkpoint_dir, args.device, job.strategy)
    return status
