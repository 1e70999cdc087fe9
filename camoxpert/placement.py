"""Where a command runs: ``--device``, ``--strategy`` and ``--precision`` as autoparallel sees them, and how many
processes the run uses.

Both entry scripts decide through these functions, so ``train_ultimate.py`` and ``kaggle_2gpu_train.py``
cannot disagree: :func:`process_count` is the one rule, :func:`launch` the one way to start the processes.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping

import autoparallel as ap

from .errors import relayed_errors, report

DEVICE_HELP = "'auto', 'cpu', 'cuda', 'cuda:1' or GPU ids like '0,1' (default: auto, every visible GPU)"


def device_arguments(device: str | None) -> dict[str, str]:
    """``--device`` as ``autoparallel.runtime`` arguments: ``{"strategy": "cpu"}``, ``{"devices": "1"}`` or ``{}``."""
    text = (device or "auto").strip().lower()
    if text == "cpu":
        return {"strategy": "cpu"}
    if text in ("auto", "cuda", "gpu"):
        return {}
    return {"devices": text[len("cuda:"):] if text.startswith("cuda:") else text}


def runtime_from_args(args: argparse.Namespace) -> ap.Runtime:
    """The runtime for ``--strategy``, ``--device`` and ``--precision`` (``auto`` leaves the choice to autoparallel)."""
    wanted: dict[str, str | None] = {"strategy": None if args.strategy == "auto" else args.strategy,
                                     "precision": None if args.precision == "auto" else args.precision}
    on_device = device_arguments(args.device)
    if on_device.get("strategy") == "cpu" and wanted["strategy"] in (None, "dp"):
        wanted["strategy"] = "cpu"
    wanted["devices"] = on_device.get("devices")
    return ap.runtime(**wanted)


def process_count(strategy: str, device: str, env: Mapping[str, str], gpu_count: int) -> int:
    """How many processes a run uses: 1, or one DDP process each that :func:`launch` starts.

    ``AUTOPARALLEL_NPROC=N`` always wins (N processes, gloo on the CPU). Otherwise ``--strategy dp`` and
    ``--device cpu`` keep one process, GPUs listed in ``--device`` get one process each, and ``--strategy ddp``
    or ``auto`` (unless ``AUTOPARALLEL_STRATEGY`` says otherwise) give one process per GPU on 2 or more GPUs.
    """
    if env.get("AUTOPARALLEL_NPROC", "").strip():
        return ap.requested_processes(None, env, gpu_count) or 1
    on_device = device_arguments(device)
    if strategy == "dp" or on_device.get("strategy") == "cpu":
        return 1
    if "devices" in on_device:
        return max(1, len([item for item in on_device["devices"].split(",") if item.strip()]))
    if strategy == "ddp":
        return gpu_count if gpu_count >= 2 else 1
    return ap.requested_processes(None, env, gpu_count) or 1


def visible_gpus() -> int:
    """The GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch(processes: int) -> int | None:
    """Re-runs this script as ``processes`` DDP processes when that is more than 1; returns the job's exit status.

    Returns None, at once, when this process is to do the work itself: one process, or a worker that a
    launcher (torchrun, ``accelerate launch``, SLURM, or this function) started. A user error in a worker is
    printed here, once, and gives status 2.
    """
    with relayed_errors() as relay:
        try:
            ap.launch(nproc=processes)
            return None
        except SystemExit as job:
            message = relay.read_text() if relay.is_file() else None
            status = job.code if isinstance(job.code, int) else 1
    return status if message is None else report(message)
