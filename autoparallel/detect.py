"""Where a process runs: :func:`detect_runtime`, a pure function of the request, environment, GPUs and process group,
so any machine can be simulated. First match wins: arguments, ``AUTOPARALLEL_STRATEGY``/``_DEVICES``/``_PRECISION``,
an existing process group, a launcher's environment (torchrun, ``accelerate launch``, ``srun``), the hardware. What is
asked for but not there is logged with what happens instead; an invalid value raises :class:`UsageError`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from .errors import UsageError
from .group import Group

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "cpu", "single", "dp", "ddp")
PRECISIONS = ("auto", "no", "fp32", "fp16", "bf16")
MODES = ("cpu", "single", "dp", "ddp")
# torchrun sets all three; read before SLURM's, whose SLURM_PROCID is also set when torchrun runs inside srun.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Hardware:
    """The GPUs this process can see (after ``CUDA_VISIBLE_DEVICES``), index ``i`` meaning ``cuda:i``."""

    gpu_names: tuple[str, ...] = ()
    gpu_memory_gib: tuple[float, ...] = ()
    capabilities: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not len(self.gpu_names) == len(self.gpu_memory_gib) == len(self.capabilities):
            raise ValueError("Hardware needs one name, memory and capability per GPU")

    @property
    def gpu_count(self) -> int:
        return len(self.gpu_names)

    @classmethod
    def uniform(cls, count: int, name: str = "Tesla T4", memory_gib: float = 15.0,
                capability: tuple[int, int] = (7, 5)) -> Hardware:
        """``count`` identical GPUs, to simulate a machine such as Kaggle's 2 x T4."""
        return cls((name,) * count, (memory_gib,) * count, (capability,) * count)

    @classmethod
    def probe(cls) -> Hardware:
        """The GPUs torch sees in this process. A notebook kernel asks a child process: querying them here
        would initialise the CUDA driver, and processes ``ap.launch(fn)`` forks afterwards could not use it."""
        found = None
        if in_notebook() and "RANK" not in os.environ and torch.cuda.device_count() and \
                not torch.cuda.is_initialized():  # device_count() reads NVML, which leaves CUDA untouched
            found = _probe_in_child()
        if found is None:
            found = [(p.name, round(p.total_memory / 2**30, 2), (p.major, p.minor))
                     for p in map(torch.cuda.get_device_properties, range(visible_gpus()))]
        return cls(*zip(*found)) if found else cls()


def visible_gpus() -> int:
    """How many GPUs this process can use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


_PROBE = ("import json, torch\nprops = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]"
          " if torch.cuda.is_available() else []\nprint(json.dumps([[p.name, round(p.total_memory / 2**30, 2), "
          "[p.major, p.minor]] for p in props]))")


def _probe_in_child() -> list[tuple[str, float, tuple[int, int]]] | None:
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                              check=True)
        return [(name, memory, tuple(capability)) for name, memory, capability in json.loads(done.stdout)]
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        logger.warning("reading the GPUs in a child process failed (%s): reading them in this kernel, after which "
                       "ap.launch(fn) cannot fork processes that use CUDA", error)
        return None


def in_notebook() -> bool:
    """This process is a Jupyter kernel (Jupyter, Kaggle, Colab)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


@dataclass(frozen=True)
class Runtime:
    """Where this process runs (mode ``cpu``, ``single``, ``dp`` or ``ddp``): from :func:`autoparallel.runtime`,
    or built by hand to simulate one."""

    mode: str
    device: torch.device
    device_ids: tuple[int, ...]
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0
    backend: str | None = None
    precision: str = "fp32"
    launcher: str | None = None
    gpu_names: tuple[str, ...] = ()
    gpu_memory_gib: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Runtime(mode={self.mode!r}) is not a mode: choose one of {', '.join(MODES)}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"Runtime(precision={self.precision!r}) is not a precision: choose fp32, fp16 or bf16")
        object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "device_ids", tuple(self.device_ids))

    is_main = property(lambda self: self.rank == 0, doc="Rank 0: the process that prints, logs and saves.")
    is_distributed = property(lambda self: self.mode == "ddp")
    num_processes = property(lambda self: self.world_size)
    num_gpus = property(lambda self: len(self.gpu_names), doc="GPUs the job uses on this node.")
    amp_dtype = property(lambda self: {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision))
    needs_grad_scaler = property(lambda self: self.precision == "fp16",
                                 doc="fp16 gradients underflow without loss scaling; bf16 and fp32 need none.")


@dataclass(frozen=True)
class Launch:
    """What a launcher's environment (or an existing process group) says about this process."""

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    node_rank: int = 0
    local_world_size: int | None = None
    backend: str | None = None


def int_var(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    try:
        return int(value) if value else None
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer: unset it or fix it") from None


def first_slurm_host(nodelist: str) -> str | None:
    """First host of a SLURM node list (``node[01-04,07],gpu1`` -> ``node01``), without calling scontrol."""
    hosts = re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", nodelist.strip(), count=1)  # the first range's first number
    return hosts.split(",")[0] or None


def slurm_master_addr(env: Mapping[str, str]) -> str | None:
    return env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")


def _slurm_launch(env: Mapping[str, str]) -> Launch | None:
    """A task that ``srun`` started with others; None for a batch script or an ``salloc`` shell (one process)."""
    tasks = int_var(env, "SLURM_STEP_NUM_TASKS")  # set by srun for its step, never in the batch script
    if tasks is None:
        if (int_var(env, "SLURM_NTASKS") or 1) > 1 and env.get("SLURM_PROCID", "").strip():
            logger.warning("SLURM allocated %s tasks but this process was not started by srun (no "
                           "SLURM_STEP_NUM_TASKS): running it alone. Start it with `srun python script.py` to run "
                           "one process per task", env["SLURM_NTASKS"])
        return None
    if tasks < 2:
        return None
    if slurm_master_addr(env) is None:
        logger.warning("srun started %d tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set, so they "
                       "cannot find each other: running this task alone. Export MASTER_ADDR to fix", tasks)
        return None
    rank, local_rank, node_rank = (int_var(env, n) or 0 for n in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"))
    per_node = re.match(r"\s*(\d+)", env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
    return Launch("slurm", rank, local_rank, tasks, node_rank, int(per_node.group(1)) if per_node else None)


def detect_launch(env: Mapping[str, str], group: Group | None = None) -> Launch | None:
    """The launcher's facts, or None when this process runs alone; an existing group's rank and size win."""
    present = [name for name in _TORCHRUN_VARS if env.get(name, "").strip()]
    if present and len(present) < len(_TORCHRUN_VARS) and group is None:
        missing = [name for name in _TORCHRUN_VARS if name not in present]
        raise UsageError(f"partially set environment: {', '.join(f'{n}={env[n]}' for n in present)} but "
                         f"{', '.join(missing)} missing. Start the script with torchrun (or autoparallel.launch()), "
                         f"or unset {', '.join(present)}")
    local_world = int_var(env, "LOCAL_WORLD_SIZE")
    if len(present) == len(_TORCHRUN_VARS):
        rank, world_size, local_rank = (int_var(env, name) for name in _TORCHRUN_VARS)
        node_rank = int_var(env, "GROUP_RANK")
        node_rank = node_rank if node_rank is not None else rank // local_world if local_world else 0
        launch: Launch | None = Launch("torchrun", rank, local_rank, world_size, node_rank, local_world)
    else:
        launch = _slurm_launch(env)
    if group is not None:  # whoever made it: the script itself (the DDP tutorial's mp.spawn), or a launcher
        launch = replace(launch or Launch("process group", 0, group.rank, 1), rank=group.rank,
                         world_size=group.world_size, backend=group.backend)
    if launch is None:
        return None
    if env.get("AUTOPARALLEL_LAUNCHED") == "1":
        launch = replace(launch, launcher="autoparallel")
    elif launch.launcher == "torchrun" and any(key.startswith("ACCELERATE_") for key in env):
        launch = replace(launch, launcher="accelerate")
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise UsageError(f"{launch.launcher} environment is inconsistent: rank {launch.rank}, local rank "
                         f"{launch.local_rank}, world size {launch.world_size}; expected 0 <= rank < world size")
    return launch


def _choice(value: object, default_source: str, env: Mapping[str, str], variable: str,
            choices: tuple[str, ...]) -> tuple[str, str]:
    source = default_source if value is not None else variable
    value = value if value is not None else env.get(variable, "").strip() or None
    text = "auto" if value is None else str(value).strip().lower()
    if text not in choices:
        raise UsageError(f"{source}={value!r} is not valid: choose one of {', '.join(choices)}")
    return text, source


def parse_devices(value: object, source: str = "devices") -> tuple[int, ...] | None:
    """GPU indices from ``"0,1"`` or ``[0, 1]``; None (all GPUs) for None, ``""``, ``"auto"`` or ``"all"``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "all")):
        return None
    try:
        indices = tuple(int(str(item).strip()) for item in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        indices = ()
    if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
        raise UsageError(f"{source}={value!r} is not a list of distinct GPU indices: use comma-separated integers "
                         "such as '0,1' (or 'auto' for all visible GPUs)")
    return indices


def _fallback(source: str, value: object, found: str, instead: str) -> None:
    logger.warning("%s=%s asked for, but %s: %s", source, value, found, instead)


def _select_gpus(requested: tuple[int, ...] | None, source: str, hardware: Hardware) -> tuple[int, ...]:
    visible = tuple(range(hardware.gpu_count))
    if requested is None:
        return visible
    chosen = tuple(i for i in requested if i < hardware.gpu_count)
    if not visible:
        _fallback(source, ",".join(map(str, requested)), "no GPU is visible", "running on the CPU")
    elif len(chosen) < len(requested):
        shown = ", ".join(f"{i}: {name}" for i, name in enumerate(hardware.gpu_names))
        _fallback(source, ",".join(map(str, requested)), f"this machine shows {hardware.gpu_count} GPU(s) ({shown})",
                  f"using GPU {','.join(map(str, chosen))}" if chosen else "using all visible GPUs")
    return chosen or visible


def _precision(requested: str, source: str, gpus: tuple[int, ...], hardware: Hardware) -> str:
    """fp32 on the CPU, bf16 on Ampere (compute capability 8.0) or newer, fp16 with a grad scaler below."""
    requested = "fp32" if requested == "no" else requested
    if not gpus:
        if requested == "fp16":
            _fallback(source, "fp16", "fp16 autocast with a GradScaler needs a GPU and this process runs on the CPU",
                      "using fp32")
        return "fp32" if requested in ("auto", "fp16") else requested  # bf16 on the CPU only when asked for
    weakest = min(gpus, key=lambda i: hardware.capabilities[i])
    has_bf16 = hardware.capabilities[weakest] >= (8, 0)
    if requested == "bf16" and not has_bf16:
        _fallback(source, "bf16", f"{hardware.gpu_names[weakest]} (compute capability "
                  f"{'.'.join(map(str, hardware.capabilities[weakest]))}) has no native bf16 (needs 8.0+)",
                  "using fp16 with a GradScaler")
        return "fp16"
    return ("bf16" if has_bf16 else "fp16") if requested == "auto" else requested


def _ddp_gpu(launch: Launch, gpus: tuple[int, ...]) -> tuple[int, ...]:
    """This rank's GPU, or none (gloo on the CPU)."""
    if launch.launcher == "process group":  # no launcher variables: one GPU per rank, if any
        return (gpus[launch.local_rank % len(gpus)],) if gpus else ()
    if launch.launcher == "slurm" and len(gpus) == 1:  # srun --gpus-per-task: each task sees its GPU as cuda:0
        return gpus
    if gpus and launch.local_world_size and launch.local_world_size > len(gpus):
        _fallback(f"{launch.launcher} --nproc_per_node", launch.local_world_size,
                  f"only {len(gpus)} GPU(s) are visible on this node", "running DDP on the CPU with gloo (start one "
                  f"process per GPU, --nproc_per_node={len(gpus)}, to use the GPUs)")
        return ()
    if gpus and launch.local_rank >= len(gpus):
        raise UsageError(f"LOCAL_RANK={launch.local_rank} but only {len(gpus)} GPU(s) are visible on this node: "
                         f"start one process per GPU (torchrun --nproc_per_node={len(gpus)})")
    return (gpus[launch.local_rank],) if gpus else ()


def detect_runtime(strategy: str | None = None, devices: str | Sequence[int] | None = None,
                   precision: str | None = None, *, env: Mapping[str, str], hardware: Hardware,
                   group: Group | None = None) -> Runtime:
    """How this process runs, from the arguments, an environment, the GPUs and the default process ``group``
    (when one exists, this process is one rank of that job, whoever created it)."""
    chosen, strategy_source = _choice(strategy, "strategy", env, "AUTOPARALLEL_STRATEGY", STRATEGIES)
    devices_source = "devices" if devices is not None else "AUTOPARALLEL_DEVICES"
    requested = parse_devices(devices if devices is not None else env.get("AUTOPARALLEL_DEVICES"), devices_source)
    accelerate = precision is None and not env.get("AUTOPARALLEL_PRECISION") and \
        env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() in PRECISIONS
    wanted, precision_source = _choice(precision, "precision", env, "ACCELERATE_MIXED_PRECISION" if accelerate
                                       else "AUTOPARALLEL_PRECISION", PRECISIONS)
    launch = detect_launch(env, group)
    gpus = _select_gpus(requested, devices_source, hardware) if chosen != "cpu" else ()
    if launch is not None and (chosen in ("auto", "ddp") or launch.world_size > 1 or group is not None):
        if chosen in ("single", "dp"):
            _fallback(strategy_source, chosen, f"{launch.launcher} started {launch.world_size} processes",
                      "each one drives a single device under DistributedDataParallel")
        used = _ddp_gpu(launch, gpus)
        node_gpus = gpus if used else ()
        return Runtime("ddp", torch.device("cuda", used[0]) if used else "cpu", used, launch.rank, launch.local_rank,
                       launch.world_size, launch.node_rank, launch.backend or ("nccl" if used else "gloo"),
                       _precision(wanted, precision_source, used, hardware), launch.launcher,
                       tuple(hardware.gpu_names[i] for i in node_gpus),
                       tuple(hardware.gpu_memory_gib[i] for i in node_gpus))
    if chosen in ("single", "dp") and not gpus:
        _fallback(strategy_source, chosen, "no GPU is visible (torch.cuda.device_count() == 0)", "running on the CPU")
    mode = "cpu" if not gpus else "single" if chosen == "single" or len(gpus) == 1 else "dp"
    if chosen == "dp" and mode == "single":
        _fallback(strategy_source, "dp", f"only 1 GPU is visible ({hardware.gpu_names[gpus[0]]})",
                  "running on that single GPU")
    if chosen == "ddp":
        _fallback(strategy_source, "ddp", "no distributed launcher started this script (no RANK/WORLD_SIZE, srun or "
                  "process group)", f"running in one process as {mode!r}. Call autoparallel.launch() at the top of "
                  "the script, or start it with torchrun --nproc_per_node=NUM_GPUS script.py")
    used = () if mode == "cpu" else gpus[:1] if mode == "single" else gpus
    return Runtime(mode, torch.device("cuda", used[0]) if used else "cpu", used,
                   precision=_precision(wanted, precision_source, used, hardware),
                   launcher=launch.launcher if launch else None, gpu_names=tuple(hardware.gpu_names[i] for i in used),
                   gpu_memory_gib=tuple(hardware.gpu_memory_gib[i] for i in used))
