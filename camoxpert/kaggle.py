"""``kaggle_2gpu_train.py``: pick a preset for this machine, find the data set, train in-process.

The seed's launcher hard-coded Kaggle paths, shelled out with ``os.system`` and always exited 0. Here
the hardware picks the preset (:mod:`camoxpert.presets`), the data set is searched for, training runs
through :func:`camoxpert.cli.main` in this process (DDP re-launches this script through
``autoparallel.launch``), and the exit code is training's. With no data set anywhere, a short demo on a
generated synthetic data set runs instead, so the first command of the README works on any machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import autoparallel as ap
from autoparallel import Hardware, Runtime, detect_runtime, probe_hardware, requested_processes

from . import presets
from .synthetic import MARKER_FILE, generate_dataset

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "node_modules", "checkpoints", "Image", "GT_Object", "GT_Edge",
              "GT_Instance", "Imgs", "GT"}
_DEMO_DATA = Path("data") / "synthetic-cod"


@dataclass(frozen=True)
class DatasetChoice:
    """The data set to train on, or None (then the demo runs), and where it was looked for."""

    path: Path | None
    source: str
    searched: tuple[str, ...]


def on_kaggle(environ: Mapping[str, str], kaggle_working: Path = KAGGLE_WORKING) -> bool:
    return "KAGGLE_KERNEL_RUN_TYPE" in environ or kaggle_working.is_dir()


def is_cod10k_root(folder: Path) -> bool:
    """COD10K-v3 layout (Train/Image + Train/GT_Object), not written by camoxpert.synthetic."""
    train = folder / "Train"
    return (train / "Image").is_dir() and (train / "GT_Object").is_dir() and not (folder / MARKER_FILE).exists()


def _search(top: Path, max_depth: int) -> list[Path]:
    """COD10K roots under ``top`` (itself included), breadth first, at most ``max_depth`` levels down."""
    found, level = [], [top]
    for _ in range(max_depth + 1):
        below = []
        for folder in level:
            if is_cod10k_root(folder):
                found.append(folder)
                continue  # its own Train/Test folders hold no further data set
            try:
                entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
            except OSError:  # unreadable or vanished: not a data set
                continue
            below += [Path(e.path) for e in entries
                      if e.is_dir() and not e.name.startswith(".") and e.name not in _SKIP_DIRS]
        level = below
    # A folder named like COD10K wins over other matches (e.g. a CAMO copy in the same input), then depth.
    return sorted(found, key=lambda p: ("cod10k" not in p.name.lower(), len(p.parts), str(p)))


def find_dataset(explicit: str | None, *, kaggle_input: Path = KAGGLE_INPUT, cwd: Path | None = None) -> DatasetChoice:
    """``--dataset-path``, else COD10K-v3 under /kaggle/input, else one in the working folder, else None.

    Raises:
        FileNotFoundError: ``explicit`` names a folder that does not exist (no silent fallback to the demo).
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--dataset-path {explicit} does not exist: pass the folder that holds Train/ and "
                                    "Test/ (e.g. /kaggle/input/cod10k-dataset/COD10K-v3), or leave it out to search")
        return DatasetChoice(path, "--dataset-path", (str(path),))
    cwd = Path.cwd() if cwd is None else cwd
    searched = (f"{kaggle_input} (4 levels)", f"{cwd} (2 levels)")
    for top, depth, source in ((kaggle_input, 4, "/kaggle/input"), (cwd, 2, "working folder")):
        matches = _search(top, depth) if top.is_dir() else []
        if matches:
            return DatasetChoice(matches[0], source, searched)
    return DatasetChoice(None, "none", searched)


def _default_checkpoint_dir(environ: Mapping[str, str], work_root: Path, demo: bool) -> Path:
    if environ.get("CHECKPOINT_DIR", "").strip():
        return Path(environ["CHECKPOINT_DIR"].strip())
    return work_root / "checkpoints" / ("demo" if demo else "")


def _runtime_arguments(device: str) -> dict:
    """train_ultimate.py's --device as detect_runtime arguments ('cpu', 'cuda', 'cuda:1', '0,1')."""
    text = device.strip().lower()
    if text == "cpu":
        return {"strategy": "cpu"}
    if text in ("auto", "cuda", "gpu"):
        return {}
    return {"devices": text[len("cuda:"):] if text.startswith("cuda:") else text}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaggle_2gpu_train.py",
        description="Train CamoXpert with a preset for this machine's GPUs. Without a data set: a short demo on a "
                    "generated synthetic one. Environment variables (seed 000 style) override the preset: "
                    + ", ".join(presets.ENV_OVERRIDES) + ", DATASET_PATH, CHECKPOINT_DIR; flags override those.",
        epilog="Arguments after -- go unchanged to 'train_ultimate.py train' (example: -- --use-ema).")
    data = parser.add_argument_group("Data and checkpoints")
    data.add_argument("--dataset-path", default=None,
                      help="data set root (default: $DATASET_PATH, else COD10K-v3 found under /kaggle/input, else a "
                           "COD10K-layout folder in the working folder, else the synthetic demo)")
    data.add_argument("--checkpoint-dir", default=None,
                      help="default: $CHECKPOINT_DIR, else /kaggle/working/checkpoints on Kaggle, ./checkpoints "
                           "elsewhere (checkpoints/demo for the demo)")
    data.add_argument("--resume", action="store_true", help="continue from last.pt in the checkpoint folder")
    data.add_argument("--demo", action="store_true", help="run the synthetic demo even if a data set is found")
    data.add_argument("--demo-small", action="store_true",
                      help="a tiny demo (a dozen 64 px images, two steps; about a minute on 2 CPU cores): a smoke "
                           "test of the whole pipeline")
    run = parser.add_argument_group("Where to run")
    run.add_argument("--strategy", default="auto", choices=("auto", "dp", "ddp"),
                     help="auto: as train_ultimate.py (DDP on 2+ GPUs, re-launched through autoparallel); dp: one "
                          "process with DataParallel; ddp: one process per GPU (default: auto)")
    run.add_argument("--device", default="auto",
                     help="'auto', 'cpu', 'cuda', 'cuda:1' or GPU ids '0,1' (default: auto)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the preset and the equivalent train_ultimate.py command, then exit 0")
    run.add_argument("--simulate", default=None, metavar="MACHINE",
                     help="with --dry-run: the preset on another machine, e.g. 2xT4, 1xT4, 2xP100, 1xA100, cpu")
    over = parser.add_argument_group("Preset overrides (flags beat environment variables)")
    over.add_argument("--batch-size", type=int, default=None,
                      help="GLOBAL batch of one micro-step ($GLOBAL_BATCH_SIZE)")
    over.add_argument("--per-gpu-batch-size", type=int, default=None, help="batch per GPU ($TRAIN_BATCH_SIZE)")
    over.add_argument("--accumulation-steps", type=int, default=None, help="($GRADIENT_ACCUMULATION_STEPS)")
    over.add_argument("--img-size", type=int, default=None, help="square side in pixels ($IMG_SIZE)")
    over.add_argument("--epochs", type=int, default=None, help="($EPOCHS)")
    over.add_argument("--num-workers", type=int, default=None, help="loader workers per process ($NUM_WORKERS)")
    over.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"), help="($MIXED_PRECISION)")
    return parser


_FLAG_KEYS = {"batch_size": "--batch-size", "per_gpu_batch": "--per-gpu-batch-size",
              "accumulation_steps": "--accumulation-steps", "img_size": "--img-size", "epochs": "--epochs",
              "num_workers": "--num-workers", "precision": "--precision"}


def collect_overrides(args: argparse.Namespace, environ: Mapping[str, str]) -> dict:
    """Flags first, then environment variables; a batch given by flag hides both batch variables."""
    found = presets.overrides_from_env(environ)
    flag_values = {key: getattr(args, "per_gpu_batch_size" if key == "per_gpu_batch" else key) for key in _FLAG_KEYS}
    if flag_values["batch_size"] is not None and flag_values["per_gpu_batch"] is not None:
        raise ValueError("--batch-size (global) and --per-gpu-batch-size both given: keep one")
    if flag_values["batch_size"] is not None or flag_values["per_gpu_batch"] is not None:
        for key in ("batch_size", "per_gpu_batch"):
            found.pop(key, None)
    for key, value in flag_values.items():
        if value is not None:
            if key != "precision" and value < (0 if key == "num_workers" else 1):
                raise ValueError(f"{_FLAG_KEYS[key]} {value} is too small")
            found[key] = (value, f"{_FLAG_KEYS[key]} {value}")
    return found


def _detect(args: argparse.Namespace, environ: Mapping[str, str], hardware: Hardware | None) -> tuple[Runtime, int]:
    """The runtime this process gets and how many processes training will use (launch()'s rule).

    Detection is autoparallel's pure ``detect_runtime``, so nothing is initialised here and a simulated
    machine (``--simulate``, or ``hardware`` in tests) goes through exactly the same rules as a real one.
    """
    if args.simulate:
        hardware = presets.parse_simulated(args.simulate)
        environ = {key: value for key, value in environ.items() if key.startswith("AUTOPARALLEL_")}
    elif hardware is None:
        hardware = probe_hardware()
    wanted = _runtime_arguments(args.device)
    if any(environ.get(name, "").strip() for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        rt = detect_runtime(**wanted, env=environ, hardware=hardware)  # a DDP worker
        return rt, rt.world_size
    requested = args.strategy if args.strategy != "auto" else environ.get("AUTOPARALLEL_STRATEGY", "").strip().lower()
    # Without a launcher, DDP only decides how many processes launch() starts: this process detects as one.
    env = {key: value for key, value in environ.items() if key != "AUTOPARALLEL_STRATEGY"}
    if requested in ("dp", "single", "cpu"):
        wanted.setdefault("strategy", requested)
    rt = detect_runtime(**wanted, env=env, hardware=hardware)
    if rt.mode == "single" or requested in ("dp", "single", "cpu"):
        return rt, 1
    if requested == "ddp":
        env["AUTOPARALLEL_STRATEGY"] = "ddp"
    return rt, requested_processes(None, env, len(rt.device_ids)) or 1


def _print(text: str = "") -> None:
    ap.print(text, flush=True)


def _find_resume(checkpoint_dir: Path) -> str:
    last = checkpoint_dir / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"--resume: no last.pt in {checkpoint_dir}. Train once without --resume, or pass "
                                "--checkpoint-dir with the folder of the run to continue")
    return str(last)


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
    _print(f"Generating the synthetic data set ({config.num_train} train + {config.num_test} test images, "
           f"{config.source_size} px) in {root} ...")
    # Written beside the target and renamed when complete, so an interrupted run leaves no half data set.
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    generate_dataset(partial, num_train=config.num_train, num_test=config.num_test, size=config.source_size,
                     seed=config.seed)
    if marker.is_file():  # an earlier demo's set with other settings: ours to replace
        shutil.rmtree(root)
    partial.rename(root)


def _demo_table(config: presets.DemoConfig, rt: Runtime, workers: int) -> str:
    rows = [("backbone", f"{config.backbone} ({'pretrained' if config.pretrained else 'random init'}), "
                         f"{config.num_experts} experts"),
            ("data", f"{config.num_train} train / {config.num_test} test synthetic scenes, {config.source_size} px"),
            ("image size", config.img_size), ("global batch", config.batch_size), ("epochs", config.epochs),
            ("precision", rt.precision), ("workers per process", workers)]
    return "\n".join(f"  {name:<20}  {value}" for name, value in rows)


def _strategy_text(rt: Runtime, processes: int) -> str:
    if processes > 1:
        where = " on the CPU (gloo)" if rt.device.type == "cpu" else ", one per GPU"
        return f"DDP, {processes} processes{where} (re-launched through torch.distributed.run)"
    return {"cpu": "CPU, one process", "single": "one GPU, one process", "ddp": "DDP (this is one of its processes)",
            "dp": f"DataParallel over {len(rt.device_ids)} GPUs in one process"}[rt.mode]


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
        status = cli_main(["predict", *common, "--output-dir", str(predictions)])
    if status == 0 and ap.is_main_process():
        metrics = json.loads(metrics_file.read_text()).get("metrics", {}) if metrics_file.is_file() else {}
        _print("\nDemo finished.")
        _print("  test metrics:      " + " | ".join(f"{name} {value:.3f}" for name, value in metrics.items()))
        _print(f"  checkpoints:       {checkpoint_dir} (best.pt, last.pt, history.jsonl)")
        _print(f"  metrics file:      {metrics_file}")
        _print(f"  predicted masks:   {predictions}")
        _print("Train on real data: python kaggle_2gpu_train.py --dataset-path /path/to/COD10K-v3")
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
    strategy: str  # passed to train_ultimate.py
    train_argv: list[str]


def resolve_job(args: argparse.Namespace, extra: Sequence[str], *, environ: Mapping[str, str],
                hardware: Hardware | None, kaggle_input: Path, kaggle_working: Path, cwd: Path) -> Job:
    """Hardware, preset, data set, checkpoint folder and the train_ultimate.py arguments.

    Raises:
        ValueError: an invalid override; FileNotFoundError: a missing --dataset-path or --resume checkpoint.
    """
    rt, processes = _detect(args, environ, hardware)
    plan = presets.build_plan(rt, processes=processes, overrides=collect_overrides(args, environ))
    dataset = find_dataset(args.dataset_path or environ.get("DATASET_PATH", "").strip() or None,
                           kaggle_input=kaggle_input, cwd=cwd)
    demo = presets.DEMO_SMALL if args.demo_small else presets.DEMO if args.demo or dataset.path is None else None
    demo_reason = "asked for (--demo-small)" if args.demo_small else "asked for (--demo)" if args.demo else (
        "no data set found (looked in " + ", ".join(dataset.searched) + ")")
    work_root = kaggle_working if on_kaggle(environ, kaggle_working) else cwd
    checkpoint_dir = (Path(args.checkpoint_dir) if args.checkpoint_dir
                      else _default_checkpoint_dir(environ, work_root, demo is not None))
    resume_from = _find_resume(checkpoint_dir) if args.resume else None
    strategy = "ddp" if processes > 1 else ("dp" if args.strategy == "dp" else "auto")
    data_root = work_root / _DEMO_DATA
    if demo is not None:
        workers = plan.value("num_workers") if rt.device.type == "cuda" else 0  # the demo's images are cached
        train_argv = presets.demo_arguments(demo, dataset_path=str(data_root), checkpoint_dir=str(checkpoint_dir),
                                            num_workers=workers, strategy=strategy, device=args.device,
                                            resume_from=resume_from)
    else:
        train_argv = presets.train_arguments(plan, dataset_path=str(dataset.path), checkpoint_dir=str(checkpoint_dir),
                                             strategy=strategy, device=args.device, resume_from=resume_from)
    return Job(rt, processes, plan, dataset, demo, demo_reason, data_root, checkpoint_dir, strategy,
               train_argv + list(extra))


def describe_job(job: Job) -> str:
    """The text printed before training: strategy, demo or data set, preset table, checkpoints, command."""
    lines = [f"Strategy: {_strategy_text(job.runtime, job.processes)}", ""]
    if job.demo is not None:
        workers = int(job.train_argv[job.train_argv.index("--num-workers") + 1])
        lines += [f"DEMO: {job.demo_reason}. Training a small model on a generated synthetic data set:",
                  _demo_table(job.demo, job.runtime, workers), "",
                  "With a real data set (--dataset-path) this machine's preset would be:"]
    else:
        lines.append(f"Data set: {job.dataset.path} (from {job.dataset.source})")
    lines += [presets.format_plan(job.plan), ""]
    resume = job.train_argv[job.train_argv.index("--resume-from") + 1] if "--resume-from" in job.train_argv else None
    lines.append(f"Checkpoints: {job.checkpoint_dir}" + (f" (resuming from {resume})" if resume else ""))
    lines.append("Command: python train_ultimate.py " + shlex.join(job.train_argv))
    return "\n".join(lines)


def _split_extra(argv: Sequence[str] | None) -> tuple[list[str] | None, list[str]]:
    """Arguments after ``--`` are for train_ultimate.py."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1:]


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None,
         hardware: Hardware | None = None, kaggle_input: Path | None = None, kaggle_working: Path = KAGGLE_WORKING,
         cwd: Path | None = None) -> int:
    """Entry point of ``kaggle_2gpu_train.py``; returns training's exit code (0 for --dry-run).

    The keyword arguments stand in for the machine in tests: environment, GPUs, /kaggle/input,
    /kaggle/working and the working folder.
    """
    environ = os.environ if environ is None else environ
    parser = build_parser()
    own_argv, extra = _split_extra(argv)
    args = parser.parse_args(own_argv)
    if args.simulate and not args.dry_run:
        parser.error("--simulate only describes another machine: add --dry-run")
    kaggle_input = Path(environ.get("CAMOXPERT_KAGGLE_INPUT", KAGGLE_INPUT)) if kaggle_input is None else kaggle_input
    try:
        job = resolve_job(args, extra, environ=environ, hardware=hardware, kaggle_input=kaggle_input,
                          kaggle_working=kaggle_working, cwd=Path.cwd() if cwd is None else cwd)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    relaunched = environ.get("AUTOPARALLEL_LAUNCHED") == "1"
    if not relaunched:  # a re-launched worker: the parent printed all this already
        _print(describe_job(job) + "\n")
    if args.dry_run:
        return 0
    if job.demo is not None:
        try:
            _prepare_demo_data(job.demo, job.data_root, environ)
        except FileExistsError as error:
            parser.error(str(error))
    if job.processes > 1:
        ap.launch(job.processes)  # does not return here: the job's exit status becomes this process's
    elif not relaunched:
        # cli.main() calls launch() too, which would turn 2+ visible GPUs into DDP: keep what was decided here.
        os.environ["AUTOPARALLEL_STRATEGY"] = job.runtime.mode
    from .cli import main as cli_main

    status = cli_main(job.train_argv)
    if job.demo is not None and status == 0:
        status = _run_demo_followups(job.checkpoint_dir, args.device, job.strategy)
    return status
