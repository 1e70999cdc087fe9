"""Where this process runs: detection of mode, devices, ranks and precision, and process-group set-up.

Detection is a pure function of the requested values, the environment and the hardware
(:func:`detect_runtime`), so any machine can be simulated in a test. :func:`runtime` feeds it the real
``os.environ`` and GPUs, caches the answer for the process, and under DDP initialises
``torch.distributed`` once.

Sources, first match wins: explicit arguments, ``AUTOPARALLEL_STRATEGY`` / ``AUTOPARALLEL_DEVICES`` /
``AUTOPARALLEL_PRECISION``, a launcher's environment (torchrun, ``accelerate launch``, SLURM), the hardware.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import UsageError

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "cpu", "single", "dp", "ddp")
PRECISIONS = ("auto", "no", "fp32", "fp16", "bf16")
MODES = ("cpu", "single", "dp", "ddp")
DEFAULT_TIMEOUT_S = 1800
DEFAULT_MASTER_PORT = 29500
_BF16_MIN_CAPABILITY = (8, 0)  # Ampere: first generation with native bf16 tensor cores
# torchrun always sets these next to RANK/WORLD_SIZE; launchers are read before SLURM because
# SLURM_PROCID is also set when torchrun runs inside a SLURM allocation (Lightning's _get_rank notes this).
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID")


@dataclass(frozen=True)
class Hardware:
    """The GPUs this process can see (after ``CUDA_VISIBLE_DEVICES``), index ``i`` meaning ``cuda:i``."""

    gpu_names: tuple[str, ...] = ()
    gpu_memory_gib: tuple[float, ...] = ()
    capabilities: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not len(self.gpu_names) == len(self.gpu_memory_gib) == len(self.capabilities):
            raise ValueError(
                f"Hardware needs one name, memory and capability per GPU, got {len(self.gpu_names)} names, "
                f"{len(self.gpu_memory_gib)} memories and {len(self.capabilities)} capabilities"
            )

    @property
    def gpu_count(self) -> int:
        """Number of visible GPUs."""
        return len(self.gpu_names)

    @classmethod
    def uniform(
        cls, count: int, name: str = "Tesla T4", memory_gib: float = 15.0, capability: tuple[int, int] = (7, 5)
    ) -> Hardware:
        """``count`` identical GPUs; handy to simulate a machine (e.g. Kaggle's 2 x T4) in a test."""
        return cls((name,) * count, (memory_gib,) * count, (capability,) * count)


def probe_hardware() -> Hardware:
    """Read the visible GPUs from torch; ``CUDA_VISIBLE_DEVICES`` is honoured by CUDA itself."""
    if not torch.cuda.is_available():
        return Hardware()
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return Hardware(
        tuple(p.name for p in props),
        tuple(round(p.total_memory / 2**30, 2) for p in props),
        tuple((p.major, p.minor) for p in props),
    )


@dataclass(frozen=True)
class Runtime:
    """A frozen description of where this process runs; build one by hand in tests, or get it from runtime()."""

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
        """Several processes joined by torch.distributed (mode ddp)."""
        return self.mode == "ddp"

    @property
    def num_processes(self) -> int:
        """Processes in the job (the world size); 1 under cpu, single and dp."""
        return self.world_size

    @property
    def num_gpus(self) -> int:
        """GPUs the job uses on this node (all of them under dp, the node's GPUs under ddp)."""
        return len(self.gpu_names)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype (float16 or bfloat16), None for fp32."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it."""
        return self.precision == "fp16"


@dataclass(frozen=True)
class _Launch:
    """What a launcher's environment says about this process."""

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    node_rank: int
    local_world_size: int | None


def _int_var(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer: unset it or fix it") from None


def _leading_int(value: str | None) -> int | None:
    match = re.match(r"\s*(\d+)", value or "")
    return int(match.group(1)) if match else None


def first_slurm_host(nodelist: str) -> str | None:
    """First host of a SLURM node list (``node[01-04,07],gpu1`` -> ``node01``), without calling scontrol."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not match or not (match.group(1) or match.group(2)):
        return None
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0] if ranges else ""
    return f"{prefix}{first}{suffix}"


def _slurm_master_addr(env: Mapping[str, str]) -> str | None:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    return first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")


def _detect_launch(env: Mapping[str, str]) -> _Launch | None:
    """The launcher's facts, or None when this process was started alone."""
    present = [name for name in _TORCHRUN_VARS if env.get(name, "").strip()]
    if present:
        if len(present) < len(_TORCHRUN_VARS):
            missing = [name for name in _TORCHRUN_VARS if name not in present]
            raise UsageError(
                f"Partially set environment: {', '.join(f'{n}={env[n]}' for n in present)} but "
                f"{', '.join(missing)} missing. Start the script with torchrun (or autoparallel.launch()), "
                f"or unset {', '.join(present)}"
            )
        rank, world_size, local_rank = (_int_var(env, name) for name in _TORCHRUN_VARS)
        local_world_size = _int_var(env, "LOCAL_WORLD_SIZE")
        node_rank = _int_var(env, "GROUP_RANK")
        if node_rank is None:
            node_rank = rank // local_world_size if local_world_size else 0
        if env.get("AUTOPARALLEL_LAUNCHED") == "1":
            launcher = "autoparallel"
        elif any(key.startswith("ACCELERATE_") for key in env):
            launcher = "accelerate"
        else:
            launcher = "torchrun"
    else:
        ntasks = _int_var(env, "SLURM_NTASKS")
        if not ntasks or ntasks < 2 or _int_var(env, "SLURM_PROCID") is None:
            return None  # no SLURM, a single-task job, or an salloc shell outside srun: one process
        if _slurm_master_addr(env) is None:
            logger.warning(
                "SLURM_NTASKS=%s but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set, so the processes cannot "
                "find each other: running this task alone (not distributed). Export MASTER_ADDR to fix.",
                ntasks,
            )
            return None
        launcher, world_size = "slurm", ntasks
        rank, local_rank, node_rank = (_int_var(env, n) or 0 for n in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"))
        local_world_size = _leading_int(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"))
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UsageError(f"{launcher} environment is inconsistent: rank {rank}, local rank {local_rank}, "
                         f"world size {world_size}; expected 0 <= rank < world size")
    return _Launch(launcher, rank, local_rank, world_size, node_rank, local_world_size)


def _pick(value: object, argument: str, env: Mapping[str, str], variable: str) -> tuple[object, str]:
    """The value and where it came from, for error messages naming the source."""
    if value is not None:
        return value, argument
    return env.get(variable, "").strip() or None, variable


def _parse_choice(value: object, source: str, choices: tuple[str, ...]) -> str:
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
                         f"such as '0,1' (or 'auto' for all visible GPUs)")
    return indices


def _select_gpus(requested: tuple[int, ...] | None, source: str, hardware: Hardware) -> tuple[int, ...]:
    visible = tuple(range(hardware.gpu_count))
    if requested is None:
        return visible
    if not visible:
        logger.warning("%s=%s asks for GPUs but none is visible (torch.cuda.device_count() == 0): running on the CPU",
                       source, ",".join(map(str, requested)))
        return ()
    chosen = tuple(i for i in requested if i < hardware.gpu_count)
    if len(chosen) < len(requested):
        missing = [i for i in requested if i >= hardware.gpu_count]
        shown = ", ".join(f"{i}: {name}" for i, name in enumerate(hardware.gpu_names))
        logger.warning("%s=%s asks for GPU %s but this machine shows %d GPU(s) (%s): using %s", source,
                       ",".join(map(str, requested)), ", ".join(map(str, missing)), hardware.gpu_count, shown,
                       "GPU " + ", ".join(map(str, chosen)) if chosen else "all visible GPUs")
    return chosen or visible


def _resolve_precision(
    requested: str, source: str, device_type: str, gpus: tuple[int, ...], hardware: Hardware
) -> str:
    """fp32 on the CPU, bf16 on Ampere or newer, fp16 below; falls back with a warning where unsupported."""
    requested = "fp32" if requested == "no" else requested
    if device_type == "cpu":
        if requested == "fp16":
            logger.warning("%s=fp16 asked for, but fp16 autocast with a GradScaler needs a GPU and this process "
                           "runs on the CPU: using fp32", source)
            return "fp32"
        return "fp32" if requested == "auto" else requested  # bf16 on the CPU only when asked explicitly
    weakest = min(gpus, key=lambda i: hardware.capabilities[i])
    capability = hardware.capabilities[weakest]
    has_bf16 = capability >= _BF16_MIN_CAPABILITY
    if requested == "auto":
        return "bf16" if has_bf16 else "fp16"
    if requested == "bf16" and not has_bf16:
        logger.warning("%s=bf16 asked for, but %s (compute capability %d.%d) has no native bf16 (needs 8.0+): "
                       "using fp16 with a GradScaler", source, hardware.gpu_names[weakest], *capability)
        return "fp16"
    return requested


def detect_runtime(
    strategy: str | None = None,
    devices: str | Sequence[int] | None = None,
    precision: str | None = None,
    *,
    env: Mapping[str, str],
    hardware: Hardware,
) -> Runtime:
    """Decide how to run from the arguments, an environment mapping and a hardware description.

    Pure apart from logging: it reads nothing global, so tests pass any ``env`` and ``hardware``.
    Asking for what is not there logs a warning saying what was found and what happens instead;
    invalid values raise UsageError naming the argument or variable, the value and the choices.
    """
    strategy_value, strategy_source = _pick(strategy, "strategy", env, "AUTOPARALLEL_STRATEGY")
    chosen_strategy = _parse_choice(strategy_value, strategy_source, STRATEGIES)
    devices_value, devices_source = _pick(devices, "devices", env, "AUTOPARALLEL_DEVICES")
    requested_gpus = parse_devices(devices_value, devices_source)
    precision_value, precision_source = _pick(precision, "precision", env, "AUTOPARALLEL_PRECISION")
    if precision_value is None and env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() in PRECISIONS:
        precision_value, precision_source = env["ACCELERATE_MIXED_PRECISION"], "ACCELERATE_MIXED_PRECISION"
    chosen_precision = _parse_choice(precision_value, precision_source, PRECISIONS)

    launch = _detect_launch(env)
    gpus = _select_gpus(requested_gpus, devices_source, hardware) if chosen_strategy != "cpu" else ()
    if launch is not None and (chosen_strategy in ("auto", "ddp") or launch.world_size > 1):
        return _ddp_runtime(launch, chosen_strategy, strategy_source, gpus, chosen_precision, precision_source,
                            hardware)

    launcher = launch.launcher if launch else None
    if chosen_strategy in ("single", "dp") and not gpus:
        logger.warning("%s=%s asks for GPUs but none is visible (torch.cuda.device_count() == 0): running on the CPU",
                       strategy_source, chosen_strategy)
    if not gpus:
        mode = "cpu"
    elif chosen_strategy == "single" or len(gpus) == 1:
        mode = "single"
    else:
        mode = "dp"
    if chosen_strategy == "dp" and mode == "single":
        logger.warning("%s=dp asks for DataParallel but only 1 GPU is visible (%s): running on that single GPU",
                       strategy_source, hardware.gpu_names[gpus[0]])
    if chosen_strategy == "ddp":
        logger.warning("%s=ddp asks for DistributedDataParallel but no distributed launcher started this script "
                       "(no RANK/WORLD_SIZE/LOCAL_RANK or SLURM variables): running in one process as %r. Call "
                       "autoparallel.launch() at the top of the script, or start it with "
                       "torchrun --nproc_per_node=NUM_GPUS script.py", strategy_source, mode)
    if mode == "cpu":
        used: tuple[int, ...] = ()
        device = torch.device("cpu")
    else:
        used = gpus[:1] if mode == "single" else gpus
        device = torch.device("cuda", used[0])
    return Runtime(
        mode=mode,
        device=device,
        device_ids=used,
        precision=_resolve_precision(chosen_precision, precision_source, device.type, used, hardware),
        launcher=launcher,
        gpu_names=tuple(hardware.gpu_names[i] for i in used),
        gpu_memory_gib=tuple(hardware.gpu_memory_gib[i] for i in used),
    )


def _ddp_runtime(
    launch: _Launch, strategy: str, strategy_source: str, gpus: tuple[int, ...], precision: str,
    precision_source: str, hardware: Hardware,
) -> Runtime:
    """One process of a launched job: it drives GPU ``gpus[local_rank]``, or the CPU with gloo."""
    if strategy in ("single", "dp"):
        logger.warning("%s=%s ignored: %s started %d processes, so each one drives a single device under "
                       "DistributedDataParallel", strategy_source, strategy, launch.launcher, launch.world_size)
    # srun --gpus-per-task binds one GPU to each task, which then sees it as cuda:0 whatever its local rank.
    per_task_gpu = launch.launcher == "slurm" and len(gpus) == 1
    if gpus and not per_task_gpu and launch.local_world_size and launch.local_world_size > len(gpus):
        logger.warning("%s started %d processes on this node but only %d GPU(s) are visible: running DDP on the CPU "
                       "with gloo. Start one process per GPU (--nproc_per_node=%d) to use the GPUs",
                       launch.launcher, launch.local_world_size, len(gpus), len(gpus))
        gpus = ()
    if gpus and not per_task_gpu and launch.local_rank >= len(gpus):
        raise UsageError(f"LOCAL_RANK={launch.local_rank} but only {len(gpus)} GPU(s) are visible on this node: "
                           f"start one process per GPU (torchrun --nproc_per_node={len(gpus)})")
    if gpus:
        index = gpus[0] if per_task_gpu else gpus[launch.local_rank]
        device, device_ids, backend = torch.device("cuda", index), (index,), "nccl"
    else:
        device, device_ids, backend = torch.device("cpu"), (), "gloo"
    return Runtime(
        mode="ddp",
        device=device,
        device_ids=device_ids,
        rank=launch.rank,
        local_rank=launch.local_rank,
        world_size=launch.world_size,
        node_rank=launch.node_rank,
        backend=backend,
        precision=_resolve_precision(precision, precision_source, device.type, device_ids, hardware),
        launcher=launch.launcher,
        gpu_names=tuple(hardware.gpu_names[i] for i in gpus),
        gpu_memory_gib=tuple(hardware.gpu_memory_gib[i] for i in gpus),
    )


def distributed_env_defaults(runtime: Runtime, env: Mapping[str, str]) -> dict[str, str]:
    """The ``env://`` rendezvous variables that are missing from ``env`` (SLURM sets none of them)."""
    master_addr = _slurm_master_addr(env) if runtime.launcher == "slurm" else env.get("MASTER_ADDR")
    if not master_addr:
        if runtime.world_size > 1:
            raise UsageError(f"{runtime.launcher} started {runtime.world_size} processes but MASTER_ADDR is not "
                               "set: export MASTER_ADDR (rank 0's host name) and MASTER_PORT, or use torchrun")
        master_addr = "127.0.0.1"
    job_id = _int_var(env, "SLURM_JOB_ID")
    # A port derived from the job id keeps two SLURM jobs sharing a node from colliding on 29500.
    port = DEFAULT_MASTER_PORT if job_id is None or runtime.launcher != "slurm" else 10000 + job_id % 20000
    wanted = {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(port),
        "RANK": str(runtime.rank),
        "WORLD_SIZE": str(runtime.world_size),
        "LOCAL_RANK": str(runtime.local_rank),
    }
    return {key: value for key, value in wanted.items() if not env.get(key)}


def process_group_timeout(env: Mapping[str, str]) -> timedelta:
    """``AUTOPARALLEL_TIMEOUT`` seconds (default 1800): how long a collective waits for a slow rank."""
    value = env.get("AUTOPARALLEL_TIMEOUT", "").strip()
    if not value:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise UsageError(f"AUTOPARALLEL_TIMEOUT={value!r} is not a positive number of seconds, e.g. 1800")
    return timedelta(seconds=seconds)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # DDP reducers left in reference cycles hold the group and its threads; destroying the group
        # first and leaving them to the interpreter's final teardown sometimes aborted the process
        # ("terminate called without an active exception", about 1 run in 6 of a DDP job that rebuilt DDP)
        gc.collect()
        dist.destroy_process_group()


def _init_process_group(runtime: Runtime, environ: MutableMapping[str, str]) -> None:
    """Join the job's process group once; a group someone else created (accelerate, the user) is reused."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed, which DDP needs: install a standard torch wheel")
    if dist.is_initialized():
        return
    for key, value in distributed_env_defaults(runtime, environ).items():
        environ[key] = value
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    dist.init_process_group(backend=runtime.backend, init_method="env://", timeout=process_group_timeout(environ))
    atexit.register(_destroy_process_group)
    logger.info("joined process group: rank %d of %d, backend %s", runtime.rank, runtime.world_size, runtime.backend)


_cached: Runtime | None = None  # the process's runtime, written only by runtime() and reset_runtime()


def runtime(
    strategy: str | None = None, devices: str | Sequence[int] | None = None, precision: str | None = None
) -> Runtime:
    """The runtime of this process, detected once and cached.

    Explicit arguments re-detect and replace the cache. Under ``ddp`` the first call joins the process
    group (nccl on GPU, gloo on CPU, ``env://`` rendezvous, timeout ``AUTOPARALLEL_TIMEOUT``) and registers
    its destruction at exit.

    Args:
        strategy: ``auto``, ``cpu``, ``single``, ``dp`` or ``ddp``; overrides ``AUTOPARALLEL_STRATEGY``.
        devices: GPU indices such as ``"0,1"`` or ``[0, 1]``; overrides ``AUTOPARALLEL_DEVICES``.
        precision: ``auto``, ``no``/``fp32``, ``fp16`` or ``bf16``; overrides ``AUTOPARALLEL_PRECISION``.
    """
    global _cached
    if _cached is not None and strategy is None and devices is None and precision is None:
        return _cached
    detected = detect_runtime(strategy, devices, precision, env=os.environ, hardware=probe_hardware())
    if detected.mode == "ddp":
        _init_process_group(detected, os.environ)
    _cached = detected
    logger.debug("detected %s", detected)
    return detected


def reset_runtime() -> None:
    """Forget the cached runtime so the next runtime() call detects again. For tests only."""
    global _cached
    _cached = None


def is_main_process() -> bool:
    """Whether this process is rank 0, without detecting or initialising anything (safe to call anywhere)."""
    if _cached is not None:
        return _cached.is_main
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    rank = _int_var(os.environ, "RANK")
    if rank is None and (_int_var(os.environ, "SLURM_NTASKS") or 1) > 1:
        rank = _int_var(os.environ, "SLURM_PROCID")
    return not rank
