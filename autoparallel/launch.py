"""``ap.launch()``: when DDP is requested (:func:`requested_processes`), re-run ``python script.py`` under torch's own
launcher (``torch.distributed.run``) and exit with the job's status; in the workers it returns at once, and a worker's
uncaught exception goes to torchrun's error file, so its summary names the rank. ``ap.launch(fn)`` runs a function
instead (:mod:`autoparallel.spawn`).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from . import group
from .detect import in_notebook, parse_devices
from .detect import visible_gpus as _visible_gpus
from .errors import UsageError
from .spawn import run
from .stop import EXIT_RESUMABLE

__all__ = ["launch", "launch_command", "requested_processes"]

logger = logging.getLogger(__name__)


def _under_launcher(env: Mapping[str, str]) -> bool:
    if any(env.get(name, "").strip() for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "AUTOPARALLEL_LAUNCHED")):
        return True
    tasks = env.get("SLURM_STEP_NUM_TASKS", "").strip()  # srun starts every task itself
    return tasks.isdigit() and int(tasks) > 1


def requested_processes(nproc: int | None, env: Mapping[str, str], gpu_count: int) -> int | None:
    """How many DDP processes to start, or None to stay one process (pure: any ``env`` and GPU count). First match
    wins: ``nproc``, ``AUTOPARALLEL_NPROC`` (also on the CPU, with gloo), 2+ GPUs (of ``AUTOPARALLEL_DEVICES``)
    unless ``AUTOPARALLEL_STRATEGY`` asks for another mode than ddp."""
    if nproc is not None:
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise ValueError(f"launch(nproc={nproc!r}) needs a positive number of processes")
        return nproc if nproc > 1 else None
    text = env.get("AUTOPARALLEL_NPROC", "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"AUTOPARALLEL_NPROC={text!r} is not a positive number of processes, e.g. 2")
        return int(text) if int(text) > 1 else None
    listed = parse_devices(env.get("AUTOPARALLEL_DEVICES"), "AUTOPARALLEL_DEVICES")
    if listed is not None:  # the GPUs asked for, of those that exist
        gpu_count = len([index for index in listed if index < gpu_count])
    strategy = env.get("AUTOPARALLEL_STRATEGY", "").strip().lower()
    if strategy == "ddp" and gpu_count < 2:
        logger.warning("AUTOPARALLEL_STRATEGY=ddp but %d GPU(s) visible: not re-launching. Set AUTOPARALLEL_NPROC=N "
                       "to run N processes (gloo on the CPU)", gpu_count)
    return gpu_count if strategy in ("", "auto", "ddp") and gpu_count >= 2 else None


def launch_command(nproc: int, main_module: types.ModuleType | None = None,
                   argv: Sequence[str] | None = None) -> list[str]:
    """The torchrun command that re-runs this script (``script.py``, ``-m package.module`` or a folder)."""
    main_module = sys.modules.get("__main__") if main_module is None else main_module
    argv = list(sys.argv if argv is None else argv)
    spec = getattr(main_module, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":  # python -m package.module
        script = ["-m", spec.name.removesuffix(".__main__"), *argv[1:]]
    elif not argv or argv[0] in ("", "-c", "-"):
        raise UsageError("autoparallel.launch() re-runs the script, and there is none here (python -c or stdin): put "
                         "the code in a file, or call ap.launch(fn) with the training as a function")
    else:
        script = argv
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}",
            *script]


def _child_environment(nproc: int, stop_file: Path) -> dict[str, str]:
    env = dict(os.environ, AUTOPARALLEL_LAUNCHED="1", AUTOPARALLEL_STOP_FILE=str(stop_file))
    # torchrun starts plain `python`: this interpreter's flags travel as their variables.
    if sys.flags.optimize:
        env["PYTHONOPTIMIZE"] = str(sys.flags.optimize)
    if sys.warnoptions:
        env["PYTHONWARNINGS"] = ",".join(filter(None, [*sys.warnoptions, env.get("PYTHONWARNINGS")]))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # torchrun would set 1
    return env


def _record_exceptions() -> None:
    """In a torchrun worker: an uncaught exception goes to torchrun's error file (its summary shows it once)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE") or getattr(sys.excepthook, "_autoparallel", False):
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    handler = get_error_handler()
    handler.initialize()
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: types.TracebackType | None) -> None:
        if not issubclass(exc_type, Exception):
            return previous(exc_type, exc, tb)
        try:  # record_exception formats the exception being handled; explained() adds the rank to a timeout
            with group.explained("a collective (DDP's gradient all-reduce, or one of the script's)"):
                raise exc.with_traceback(tb)
        except Exception as handled:
            try:
                handler.record_exception(handled)
            except Exception as error:  # never hide the real error behind a reporting failure
                sys.stderr.write(f"autoparallel: could not write torchrun's error file: {error}\n")
                previous(type(handled), handled, handled.__traceback__)
        return None

    hook._autoparallel = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _run(command: list[str], env: dict[str, str]) -> int:
    """torchrun's status; a SIGTERM to this process is passed on, so the workers can stop cleanly."""
    process = subprocess.Popen(command, env=env)
    previous_term = signal.signal(signal.SIGTERM, lambda number, _: process.send_signal(number))
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches torchrun directly
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def launch(fn: Callable[..., Any] | None = None, *args: Any, nproc: int | None = None, **kwargs: Any) -> Any:
    """Start the DDP job: ``ap.launch()`` re-runs this script (not in a notebook) and exits with the job's status
    (:data:`EXIT_RESUMABLE` when its ranks agreed on a stop), returning at once under a launcher or when DDP is
    not requested; ``ap.launch(fn, *args, **kwargs)`` returns rank 0's result (one process: just calls ``fn``).
    """
    if fn is not None:
        if not callable(fn):
            raise TypeError(f"ap.launch(fn) needs a function, got {fn!r}; the number of processes is nproc=...")
        # device_count() reads NVML, where is_available() would initialise CUDA and break the forked processes
        count = requested_processes(nproc, os.environ, torch.cuda.device_count())
        return fn(*args, **kwargs) if count is None or _under_launcher(os.environ) else run(fn, args, kwargs, count)
    if _under_launcher(os.environ):
        _record_exceptions()
        return None
    if in_notebook():
        raise UsageError("ap.launch() re-runs the script it is called from, and in a notebook that is the kernel "
                         "itself: put the training in a function and call ap.launch(train) in a cell")
    explicit = nproc is not None or os.environ.get("AUTOPARALLEL_NPROC", "").strip()  # then no GPU count is needed
    count = requested_processes(nproc, os.environ, 0 if explicit else _visible_gpus())
    if count is None:
        return None
    command = launch_command(count)
    logger.info("re-launching as %d processes: %s", count, " ".join(command))
    with tempfile.TemporaryDirectory(prefix="autoparallel-") as scratch:
        stop_file = Path(scratch) / "stopped"
        status = _run(command, _child_environment(count, stop_file))
        if stop_file.is_file():  # also when torchrun, sent the SIGTERM, exits non-zero after its workers stopped
            status = EXIT_RESUMABLE
    sys.exit(status if status >= 0 else 128 - status)  # a negative status is a signal: shells say 128 + N
