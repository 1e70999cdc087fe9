"""Deciding where a process runs: a pure function of the request, the environment, the GPUs and the group.

:func:`detect_runtime` reads nothing global, so any machine (Kaggle's 2 x T4, a SLURM node, a torchrun
worker) can be simulated in a test. Sources, first match wins: explicit arguments, ``AUTOPARALLEL_STRATEGY``
/ ``AUTOPARALLEL_DEVICES`` / ``AUTOPARALLEL_PRECISION``, a process group that already exists, a launcher's
environment (torchrun, ``accelerate launch``, ``srun``), the hardware. Asking for what is not there logs
what was found and what happens instead; an invalid value raises :class:`UsageError` naming it.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from .errors import UsageError
from .group import Group

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "cpu", "single", "dp", "ddp")
PRECISIONS = ("auto", "no", "fp32", "fp16", "bf16")
MODES = ("cpu", "single", "dp", "ddp")
_BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with native bf16
# torchrun sets all three; they are read before SLURM's because SLURM_PROCID is also set when torchrun
# runs inside an allocation.
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
        """The GPUs torch sees in this process."""
        if not torch.cuda.is_available():
            return cls()
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        return cls(tuple(p.name for p in props), tuple(round(p.total_memory / 2**30, 2) for p in props),
                   tuple((p.major, p.minor) for p in props))


@dataclass(frozen=True)
class Runtime:
    """Where this process runs; get it from :func:`autoparallel.runtime`, or build one by hand in tests."""

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

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and saves."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.mode == "ddp"

    @property
    def num_processes(self) -> int:
        return self.world_size

    @property
    def num_gpus(self) -> int:
        """GPUs the job uses on this node."""
        return len(self.gpu_names)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it."""
        return self.precision == "fp16"


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
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer: unset it or fix it") from None


def first_slurm_host(nodelist: str) -> str | None:
    """First host of a SLURM node list (``node[01-04,07],gpu1`` -> ``node01``), without calling scontrol."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not match or not (match.group(1) or match.group(2)):
        return None
    prefix, ranges, suffix = match.groups()
    return f"{prefix}{ranges.split(',')[0].split('-')[0] if ranges else ''}{suffix}"


def slurm_master_addr(env: Mapping[str, str]) -> str | None:
    return env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")


def _slurm_launch(env: Mapping[str, str]) -> Launch | None:
    """A task started by ``srun`` with others; None for a batch script or an ``salloc`` shell (one process)."""
    allocated = int_var(env, "SLURM_NTASKS") or 1
    tasks = int_var(env, "SLURM_STEP_NUM_TASKS")  # set by srun for its step, never in the batch script
    if tasks is None:
        if allocated > 1 and env.get("SLURM_PROCID", "").strip():
            logger.warning("SLURM allocated %d tasks but this process was not started by srun (no "
                           "SLURM_STEP_NUM_TASKS): running it alone. Start it with `srun python script.py` to run "
                           "one process per task", allocated)
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
        launch = Launch("torchrun", rank, local_rank, world_size,
                        node_rank if node_rank is not None else rank // local_world if local_world else 0, local_world)
    else:
        launch = _slurm_launch(env)
    if group is not None:  # whoever made it (the script itself, as the DDP tutorial does, or a launcher)
        local_rank = launch.local_rank if launch else group.rank
        launch = replace(launch or Launch("process group", 0, 0, 1), rank=group.rank, local_rank=local_rank,
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


def _pick(value: object, argument: str, env: Mapping[str, str], variable: str) -> tuple[object, str]:
    """The value and where it came from, for messages that name the source."""
    if value is not None:
        return value, argument
    return env.get(variable, "").strip() or None, variable


def _choice(value: object, source: str, choices: tuple[str, ...]) -> str:
    if value is None:
        return "auto"
    text = str(value).strip().lower()
    if text not in choices:
        raise UsageError(f"{source}={value!r} is not valid: choose one of {', '.join(choices)}")
    return text


def parse_devices(value: object, source: str = "devices") -> tuple[int, ...] | None:
    """GPU indices from ``"0,1"`` or ``[0, 1]``; None (all GPUs) for None, ``""``, ``"auto"`` or ``"all"``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "all")):
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        indices = tuple(int(str(item).strip()) for item in items)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        indices = ()
    if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
        raise UsageError(f"{source}={value!r} is not a list of distinct GPU indices: use comma-separated integers "
                         "such as '0,1' (or 'auto' for all visible GPUs)")
    return indices


def _fallback(source: str, value: object, found: str, instead: str) -> None:
    """The one shape of every "asked for what is not there" message: the request, what is there, what happens."""
    asked = source if value is None else f"{source}={value}"
    logger.warning("%s asked for, but %s: %s", asked, found, instead)


def _select_gpus(requested: tuple[int, ...] | None, source: str, hardware: Hardware) -> tuple[int, ...]:
    visible = tuple(range(hardware.gpu_count))
    if requested is None:
        return visible
    if not visible:
        _fallback(source, ",".join(map(str, requested)), "no GPU is visible", "running on the CPU")
        return ()
    chosen = tuple(i for i in requested if i < hardware.gpu_count)
    if len(chosen) < len(requested):
        shown = ", ".join(f"{i}: {name}" for i, name in enumerate(hardware.gpu_names))
        _fallback(source, ",".join(map(str, requested)), f"this machine shows {hardware.gpu_count} GPU(s) ({shown})",
                  f"using GPU {','.join(map(str, chosen))}" if chosen else "using all visible GPUs")
    return chosen or visible


def _precision(requested: str, source: str, device_type: str, gpus: tuple[int, ...], hardware: Hardware) -> str:
    """fp32 on the CPU, bf16 on Ampere or newer, fp16 below, with a message where the request cannot hold."""
    requested = "fp32" if requested == "no" else requested
    if device_type == "cpu":
        if requested == "fp16":
            _fallback(source, "fp16", "fp16 autocast with a GradScaler needs a GPU and this process runs on the CPU",
                      "using fp32")
            return "fp32"
        return "fp32" if requested == "auto" else requested  # bf16 on the CPU only when asked for
    weakest = min(gpus, key=lambda i: hardware.capabilities[i])
    has_bf16 = hardware.capabilities[weakest] >= _BF16_MIN_CAPABILITY
    if requested == "auto":
        return "bf16" if has_bf16 else "fp16"
    if requested == "bf16" and not has_bf16:
        major, minor = hardware.capabilities[weakest]
        _fallback(source, "bf16", f"{hardware.gpu_names[weakest]} (compute capability {major}.{minor}) has no "
                  "native bf16 (needs 8.0+)", "using fp16 with a GradScaler")
        return "fp16"
    return requested


def _ddp_device(launch: Launch, gpus: tuple[int, ...]) -> tuple[tuple[int, ...], str]:
    """This rank's GPU (or none) and the backend; an existing group's backend is kept."""
    if launch.launcher == "process group":  # no launcher variables: one GPU per local rank, if any
        used = (gpus[launch.local_rank % len(gpus)],) if gpus else ()
        return used, launch.backend or ("nccl" if used else "gloo")
    # srun --gpus-per-task binds one GPU to each task, which then sees it as cuda:0 whatever its local rank.
    if launch.launcher == "slurm" and len(gpus) == 1:
        used: tuple[int, ...] = gpus
    elif gpus and launch.local_world_size and launch.local_world_size > len(gpus):
        _fallback(f"{launch.launcher} --nproc_per_node", launch.local_world_size,
                  f"only {len(gpus)} GPU(s) are visible on this node", "running DDP on the CPU with gloo (start one "
                  f"process per GPU, --nproc_per_node={len(gpus)}, to use the GPUs)")
        used = ()
    elif gpus and launch.local_rank >= len(gpus):
        raise UsageError(f"LOCAL_RANK={launch.local_rank} but only {len(gpus)} GPU(s) are visible on this node: "
                         f"start one process per GPU (torchrun --nproc_per_node={len(gpus)})")
    else:
        used = (gpus[launch.local_rank],) if gpus else ()
    return used, launch.backend or ("nccl" if used else "gloo")


def detect_runtime(strategy: str | None = None, devices: str | Sequence[int] | None = None,
                   precision: str | None = None, *, env: Mapping[str, str], hardware: Hardware,
                   group: Group | None = None) -> Runtime:
    """Decide how this process runs from the arguments, an environment mapping, the GPUs and the process group.

    ``group`` is the default process group when one exists (:func:`autoparallel.group.current`): then this
    process is one rank of that job, whoever created the group.
    """
    strategy_value, strategy_source = _pick(strategy, "strategy", env, "AUTOPARALLEL_STRATEGY")
    chosen = _choice(strategy_value, strategy_source, STRATEGIES)
    devices_value, devices_source = _pick(devices, "devices", env, "AUTOPARALLEL_DEVICES")
    requested_gpus = parse_devices(devices_value, devices_source)
    precision_value, precision_source = _pick(precision, "precision", env, "AUTOPARALLEL_PRECISION")
    if precision_value is None and env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() in PRECISIONS:
        precision_value, precision_source = env["ACCELERATE_MIXED_PRECISION"], "ACCELERATE_MIXED_PRECISION"
    wanted_precision = _choice(precision_value, precision_source, PRECISIONS)

    launch = detect_launch(env, group)
    gpus = _select_gpus(requested_gpus, devices_source, hardware) if chosen != "cpu" else ()
    if launch is not None and (chosen in ("auto", "ddp") or launch.world_size > 1 or group is not None):
        if chosen in ("single", "dp"):
            _fallback(strategy_source, chosen, f"{launch.launcher} started {launch.world_size} processes",
                      "each one drives a single device under DistributedDataParallel")
        used, backend = _ddp_device(launch, gpus)
        node_gpus = gpus if used else ()
        return Runtime("ddp", torch.device("cuda", used[0]) if used else torch.device("cpu"), used, launch.rank,
                       launch.local_rank, launch.world_size, launch.node_rank, backend,
                       _precision(wanted_precision, precision_source, "cuda" if used else "cpu", used, hardware),
                       launch.launcher, tuple(hardware.gpu_names[i] for i in node_gpus),
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
    device = torch.device("cuda", used[0]) if used else torch.device("cpu")
    return Runtime(mode, device, used, precision=_precision(wanted_precision, precision_source, device.type, used,
                                                             hardware),
                   launcher=launch.launcher if launch else None, gpu_names=tuple(hardware.gpu_names[i] for i in used),
                   gpu_memory_gib=tuple(hardware.gpu_memory_gib[i] for i in used))
