"""``launch()``: turn ``python script.py`` into a DDP job through torch's own launcher.

Called at the top of a script, before any work::

    import autoparallel as ap
    ap.launch()          # on a machine with 2+ GPUs: re-runs this script as one process per GPU

When DDP is requested and no launcher started this process, the script is run again as
``python -m torch.distributed.run --standalone --nproc_per_node=N <script> <args>`` with
``AUTOPARALLEL_LAUNCHED=1`` in the environment, and this process exits with the job's status. The
children, started by torchrun, find ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set: their ``launch()``
returns at once and ``runtime()`` joins the process group.

DDP is requested by, first match wins: the ``nproc`` argument; ``AUTOPARALLEL_NPROC=N`` (also on the
CPU, where the N processes use gloo: that is how the tests run it); ``AUTOPARALLEL_STRATEGY=ddp`` (one
process per GPU); or, with nothing set, the machine having 2 or more GPUs. Any other
``AUTOPARALLEL_STRATEGY`` (``dp``, ``single``, ``cpu``) keeps the single process.

Failures: torchrun watches the workers and stops all of them as soon as one exits with an error, so
an exception on one rank ends the job with a non-zero status instead of leaving the others waiting
in a collective. In a worker, ``launch()`` installs an exception hook that records the exception in
torchrun's error file (as ``torch.distributed.elastic.multiprocessing.errors.record`` does), so
torchrun's failure summary names the rank and shows its traceback. A rank that is alive but stuck in
a collective fails after ``AUTOPARALLEL_TIMEOUT`` seconds (the process-group timeout ``runtime()``
sets), which then ends the job the same way.
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

from . import group
from .detect import parse_devices
from .errors import UsageError
from .stop import EXIT_RESUMABLE

__all__ = ["launch", "launch_command", "requested_processes"]

logger = logging.getLogger(__name__)

_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "AUTOPARALLEL_LAUNCHED")


def _under_launcher(env: Mapping[str, str]) -> bool:
    if any(env.get(name, "").strip() for name in _LAUNCHER_VARS):
        return True
    # srun with several tasks starts every process itself (runtime() reads the SLURM variables).
    tasks = env.get("SLURM_STEP_NUM_TASKS", "").strip()
    return tasks.isdigit() and int(tasks) > 1


def in_notebook() -> bool:
    """This process is a Jupyter kernel (Jupyter, Kaggle, Colab)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def requested_processes(nproc: int | None, env: Mapping[str, str], gpu_count: int) -> int | None:
    """How many DDP processes to start, or None to stay a single process. Pure, for tests."""
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
        gpu_count = len([index for index in listed if index < gpu_count]) if gpu_count else 0
    strategy = env.get("AUTOPARALLEL_STRATEGY", "").strip().lower()
    if strategy == "ddp":
        if gpu_count < 2:
            logger.warning("AUTOPARALLEL_STRATEGY=ddp but %d GPU(s) visible: not re-launching. Set "
                           "AUTOPARALLEL_NPROC=N to run N processes (gloo on the CPU)", gpu_count)
            return None
        return gpu_count
    if strategy in ("", "auto") and gpu_count >= 2:
        return gpu_count
    return None


def _script_arguments(main_module: types.ModuleType | None, argv: Sequence[str]) -> list[str]:
    """What torchrun must run: ``-m package.module args`` or ``script.py args``."""
    spec = getattr(main_module, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":  # python -m package.module (a folder: __main__)
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return ["-m", name, *argv[1:]]
    if not argv or argv[0] in ("", "-c", "-"):
        raise RuntimeError("autoparallel.launch() re-runs the script, and there is none here (interactive "
                           "session, python -c or stdin): put the code in a file and run python file.py, or "
                           "start it with torchrun --nproc_per_node=N file.py")
    return list(argv)


def launch_command(nproc: int, main_module: types.ModuleType | None = None,
                   argv: Sequence[str] | None = None) -> list[str]:
    """The torchrun command line that re-runs this script as ``nproc`` processes on this machine."""
    if main_module is None:
        main_module = sys.modules.get("__main__")
    script = _script_arguments(main_module, sys.argv if argv is None else argv)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc_per_node={nproc}", *script]


def _child_environment(nproc: int) -> dict[str, str]:
    env = dict(os.environ, AUTOPARALLEL_LAUNCHED="1")
    # torchrun starts plain `python`: the interpreter flags of this process travel as their variables.
    if sys.flags.optimize:
        env["PYTHONOPTIMIZE"] = str(sys.flags.optimize)
    if sys.warnoptions:
        env["PYTHONWARNINGS"] = ",".join(filter(None, [*sys.warnoptions, env.get("PYTHONWARNINGS")]))
    # torchrun would set 1 thread per process and warn; on the CPU that wastes cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _record_exceptions_hook() -> None:
    """In a torchrun worker: hand an uncaught exception to torchrun's error file instead of stderr.

    torchrun prints the recorded traceback once, in its failure summary, under "Root Cause" with the
    rank and host. Without the record it would print "error_file: <N/A>" there while the traceback
    scrolled past among the other ranks' output. When the record cannot be written the exception is
    printed as usual.
    """
    if not os.environ.get("TORCHELASTIC_ERROR_FILE") or getattr(sys.excepthook, "_autoparallel", False):
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    handler = get_error_handler()
    handler.initialize()
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: types.TracebackType | None) -> None:
        recorded = False
        try:  # a timeout raised outside our collectives (DDP's backward) gets the same explanation
            with group.explained("a collective (DDP's gradient all-reduce, or one of the script's)"):
                raise exc.with_traceback(tb)
        except group.CollectiveTimeout as explained:
            exc_type, exc = type(explained), explained
        except BaseException:
            pass
        if issubclass(exc_type, Exception):
            # record_exception formats the exception being handled (traceback.format_exc), so re-raise it;
            # resetting __traceback__ keeps this frame out of the record (Python >= 3.11 reads it from there).
            try:
                raise exc.with_traceback(tb)
            except Exception:
                exc.__traceback__ = tb
                try:
                    handler.record_exception(exc)
                    recorded = True
                except Exception as error:  # never hide the real error behind a reporting failure
                    sys.stderr.write(f"autoparallel: could not write torchrun's error file: {error}\n")
        exc.__traceback__ = tb
        if not recorded:
            previous(exc_type, exc, tb)

    hook._autoparallel = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _run(command: list[str], env: dict[str, str]) -> int:
    """Runs torchrun and returns its status; SIGTERM to this process is passed on so workers stop cleanly."""
    process = subprocess.Popen(command, env=env)

    def forward(signum: int, _frame: object) -> None:
        process.send_signal(signum)

    previous_term = signal.signal(signal.SIGTERM, forward)
    # Ctrl-C reaches torchrun directly (same process group); it stops the workers and exits.
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def launch(fn: Callable[..., Any] | None = None, *args: Any, nproc: int | None = None, **kwargs: Any) -> Any:
    """Start the DDP job: re-run this script (``ap.launch()``), or run ``fn`` in each process (``ap.launch(fn)``).

    ``ap.launch()`` at the top of a script returns at once under a launcher (torchrun, ``accelerate
    launch``, ``srun``, or itself) or when DDP is not requested; otherwise it re-runs the script through
    ``torch.distributed.run`` and exits with the job's status. ``ap.launch(fn, *args, **kwargs)`` runs
    ``fn(*args, **kwargs)`` in every process of the job (see :mod:`autoparallel.spawn`) and returns rank 0's
    result; with one process it simply calls ``fn``. In a notebook only the function form works.

    Args:
        nproc: number of processes; default ``AUTOPARALLEL_NPROC``, else one per GPU when
            ``AUTOPARALLEL_STRATEGY`` is ``ddp`` or unset and 2+ GPUs are visible.
    """
    if fn is not None:
        if not callable(fn):
            raise TypeError(f"ap.launch(fn) needs a function, got {fn!r}; the number of processes is nproc=...")
        from .spawn import run

        count = requested_processes(nproc, os.environ, _visible_gpus())
        return fn(*args, **kwargs) if count is None or _under_launcher(os.environ) else run(fn, args, kwargs, count)
    if _under_launcher(os.environ):
        _record_exceptions_hook()
        return None
    if in_notebook():
        raise UsageError("ap.launch() re-runs the script it is called from, and in a notebook that is the kernel "
                         "itself: put the training in a function and call ap.launch(train) in a cell")
    # Counting GPUs imports torch; skip it when the number is given, to start the job sooner.
    explicit = nproc is not None or os.environ.get("AUTOPARALLEL_NPROC", "").strip()
    count = requested_processes(nproc, os.environ, 0 if explicit else _visible_gpus())
    if count is None:
        return None
    command = launch_command(count)
    logger.info("re-launching as %d processes: %s", count, " ".join(command))
    with tempfile.TemporaryDirectory(prefix="autoparallel-") as scratch:
        stop_file = Path(scratch) / "stopped"
        status = _run(command, {**_child_environment(count), "AUTOPARALLEL_STOP_FILE": str(stop_file)})
        # The ranks agreed on a stop (ap.StopRequest): resumable, also when torchrun itself got the SIGTERM and
        # exits non-zero after its workers stopped.
        if stop_file.is_file():
            status = EXIT_RESUMABLE
    # A negative status is a signal (Popen's convention); shells report those as 128 + signal number.
    sys.exit(status if status >= 0 else 128 - status)
