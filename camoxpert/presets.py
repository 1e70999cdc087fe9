"""Hardware presets for ``kaggle_2gpu_train.py``: batch, accumulation, image size, precision and workers.

The values follow the hardware autoparallel detects, each with the reason it was chosen, and flags or
environment variables (``TRAIN_BATCH_SIZE``, ``IMG_SIZE``, ... see :data:`SETTINGS`) override any of them.
``--batch-size`` is the GLOBAL batch of one micro-step, as in ``train_ultimate.py``; every preset keeps the
effective batch at :data:`TARGET_EFFECTIVE_BATCH`, the batch the recipe's learning rates were set for. The
synthetic demo's configuration lives here too (:data:`DEMO`, and :data:`DEMO_SMALL`, a smoke run).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autoparallel import Hardware, Runtime

TARGET_EFFECTIVE_BATCH = 16
"""Effective batch of the recipe (its kaggle_2gpu_train.py: batch 16, accumulation 1)."""

RECIPE: dict[str, Any] = {  # the published train command; batch, size, precision and workers come from the preset
    "backbone": "edgenext_base", "num_experts": 7, "epochs": 140, "stage1_epochs": 30, "lr": 6.5e-4,
    "stage2_lr": 1.5e-4, "scheduler": "cosine", "min_lr": 1e-5, "warmup_epochs": 10, "progressive_unfreeze": True,
    "deep_supervision": True,
}


@dataclass(frozen=True)
class DemoConfig:
    """The synthetic demo: what a new user sees from ``python kaggle_2gpu_train.py`` with no data set.

    ``name`` names its folders, ``checkpoints/<name>`` and ``data/<data_name>``, so demos never share files.
    """

    name: str = "demo"
    data_name: str = "synthetic-cod"
    backbone: str = "edgenext_xx_small"
    pretrained: bool = False  # random init: the measured configuration, and nothing to download
    num_experts: int = 7
    num_train: int = 320
    num_test: int = 40
    source_size: int = 160  # side of the generated images
    img_size: int = 128  # side the model trains at
    epochs: int = 20
    batch_size: int = 16
    lr: float = 2e-3
    scheduler: str = "onecycle"
    seed: int = 0
    max_steps_per_epoch: int | None = None
    extra: tuple[str, ...] = ("--deep-supervision", "--augment", "light")  # further train_ultimate.py flags


DEMO = DemoConfig()
DEMO_SMALL = DemoConfig(name="demo-small", data_name="synthetic-cod-small", num_experts=2, num_train=12, num_test=4,
                        source_size=64, img_size=64, epochs=1, batch_size=4, max_steps_per_epoch=2)

# Simulated machines for `--simulate 2xT4` (what the preset would be there), as torch reports them.
KNOWN_GPUS: dict[str, tuple[str, float, tuple[int, int]]] = {
    "T4": ("Tesla T4", 14.74, (7, 5)),
    "P100": ("Tesla P100-PCIE-16GB", 15.89, (6, 0)),
    "V100": ("Tesla V100-SXM2-16GB", 15.77, (7, 0)),
    "L4": ("NVIDIA L4", 22.03, (8, 9)),
    "A10G": ("NVIDIA A10G", 22.06, (8, 6)),
    "RTX4090": ("NVIDIA GeForce RTX 4090", 23.99, (8, 9)),
    "A100": ("NVIDIA A100-SXM4-40GB", 39.39, (8, 0)),
    "A100-80GB": ("NVIDIA A100-SXM4-80GB", 79.15, (8, 0)),
    "H100": ("NVIDIA H100 80GB HBM3", 79.19, (9, 0)),
}
LARGE_GPU_GIB = 22.0  # "24 GB" cards (A10G, L4, RTX 4090) report 22-24 GiB to torch

SETTINGS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    # setting: (row of the printed table, kaggle_2gpu_train.py flag, environment variables that override it)
    "batch_size": ("global batch", "--batch-size", ("GLOBAL_BATCH_SIZE",)),
    "per_gpu_batch": ("per-GPU batch", "--per-gpu-batch-size", ("TRAIN_BATCH_SIZE",)),
    "stage2_batch_size": ("stage-2 global batch", None, ()),
    "accumulation_steps": ("accumulation steps", "--accumulation-steps",
                           ("GRADIENT_ACCUMULATION_STEPS", "GRADIENT_ACCUMULATION")),
    "effective_batch": ("effective batch", None, ()),
    "img_size": ("image size", "--img-size", ("IMG_SIZE", "RESOLUTION")),
    "precision": ("precision", "--precision", ("MIXED_PRECISION",)),
    "num_workers": ("workers per process", "--num-workers", ("NUM_WORKERS",)),
    "epochs": ("epochs", "--epochs", ("EPOCHS",)),
    "stage1_epochs": ("stage-1 epochs", None, ()),
    "warmup_epochs": ("warm-up epochs", None, ()),
}
ROW_LABELS = {key: label for key, (label, _, _) in SETTINGS.items()}
ENV_OVERRIDES = {name: key for key, (_, _, names) in SETTINGS.items() for name in names}
_PRECISION_ALIASES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "no": "fp32", "32": "fp32", "16": "fp16"}


@dataclass(frozen=True)
class Setting:
    """One row of the preset table: a value and why it has that value."""

    value: Any
    reason: str


@dataclass(frozen=True)
class Plan:
    """The resolved training configuration for this machine."""

    preset: str
    hardware: str
    replicas: int  # data-parallel copies of the model (GPUs, or 1)
    processes: int  # 1, or one per GPU under DDP
    settings: Mapping[str, Setting] = field(default_factory=dict)

    def value(self, key: str) -> Any:
        return self.settings[key].value


def parse_override(key: str, source: str, value: Any) -> Any:
    """Checks one override (a flag's or a variable's value), with an error that names its source and the fix."""
    if key == "precision":
        if str(value).strip().lower() not in _PRECISION_ALIASES:
            raise ValueError(f"{source}={value!r} is not a precision: use fp16, bf16, fp32 or no")
        return _PRECISION_ALIASES[str(value).strip().lower()]
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{source}={value!r} is not an integer: unset it or set e.g. {source}=8") from None
    smallest = 0 if key == "num_workers" else 1
    if number < smallest:
        raise ValueError(f"{source}={number} is too small: it must be at least {smallest}")
    return number


def overrides_from_env(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """Settings given by environment variables, as ``{setting: (value, "NAME=value (environment)")}``."""
    found: dict[str, tuple[Any, str]] = {}
    for name, key in ENV_OVERRIDES.items():
        if environ.get(name, "").strip() and key not in found:
            text = environ[name].strip()
            found[key] = (parse_override(key, name, text), f"{name}={text} (environment)")
    if "batch_size" in found and "per_gpu_batch" in found:
        raise ValueError("both GLOBAL_BATCH_SIZE and TRAIN_BATCH_SIZE are set: keep one (TRAIN_BATCH_SIZE is per GPU)")
    return found


def collect_overrides(flags: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """Flags (``{setting: value or None}``) over environment variables; a batch flag hides both batch variables."""
    found = overrides_from_env(environ)
    given = {key: value for key, value in flags.items() if value is not None}
    if "batch_size" in given and "per_gpu_batch" in given:
        raise ValueError("--batch-size (global) and --per-gpu-batch-size both given: keep one")
    if "batch_size" in given or "per_gpu_batch" in given:
        found.pop("batch_size", None)
        found.pop("per_gpu_batch", None)
    for key, value in given.items():
        flag = SETTINGS[key][1]
        found[key] = (parse_override(key, flag, value), f"{flag} {value}")
    return found


def parse_simulated(spec: str) -> Hardware:
    """``"2xT4"`` -> two simulated Tesla T4s; ``"cpu"`` -> no GPU. Names are the keys of KNOWN_GPUS."""
    if spec.strip().lower() == "cpu":
        return Hardware()
    count_text, _, name = spec.strip().partition("x")
    if not count_text.isdigit() or int(count_text) < 1 or name.upper() not in {k.upper() for k in KNOWN_GPUS}:
        raise ValueError(f"--simulate {spec!r} is not a machine: use COUNTxGPU with GPU one of "
                         f"{', '.join(KNOWN_GPUS)} (e.g. 2xT4), or cpu")
    gpu_name, memory, capability = next(v for k, v in KNOWN_GPUS.items() if k.upper() == name.upper())
    return Hardware.uniform(int(count_text), gpu_name, memory, capability)


def describe_hardware(rt: Runtime) -> str:
    if not rt.gpu_names:
        return "CPU only"
    return f"{len(rt.gpu_names)} x {rt.gpu_names[0]} ({min(rt.gpu_memory_gib):.1f} GiB each)"


def _preset_for(rt: Runtime) -> tuple[str, int, str]:
    """Name, per-GPU batch and the batch's reason for the detected GPUs (the CPU preset when there are none)."""
    if not (rt.gpu_names and rt.device.type == "cuda"):
        return "CPU", 4, "CPU: 4 images keep a step within seconds; COD10K on a CPU takes days, the demo is the CPU run"
    count, names, memory = len(rt.gpu_names), " ".join(rt.gpu_names).upper(), min(rt.gpu_memory_gib)
    if all("T4" in name.upper() for name in rt.gpu_names) and count in (1, 2):
        return f"{count}xT4", 8, "8 images of 320 px per T4 (15 GiB) in fp16, with room for stage 2"
    if "P100" in names and count == 2:
        return "2xP100", 8, "8 images of 320 px per 16 GiB P100 in fp16, as on a T4"
    if count == 1 and memory >= LARGE_GPU_GIB:
        why = f"{memory:.0f} GiB holds the whole effective batch of {TARGET_EFFECTIVE_BATCH} at 320 px: no accumulation"
        return "1xGPU>=24GB", TARGET_EFFECTIVE_BATCH, why
    per_gpu = 4 if memory < 10 else 8 if memory < LARGE_GPU_GIB else 16
    return f"{count}xGPU", per_gpu, f"{per_gpu} images of 320 px fit {memory:.0f} GiB per GPU"


def _precision_reason(rt: Runtime) -> str:
    if rt.device.type == "cpu":
        return "CPU: fp32 (autocast brings no training speed-up on a CPU)"
    name = rt.gpu_names[0]
    if rt.precision == "bf16":
        return f"{name} has native bf16: fp32's range at half the memory, no grad scaler needed"
    if rt.precision == "fp16":
        return f"{name} has no native bf16 (needs compute capability 8.0+): fp16 with a grad scaler"
    return "fp32 as requested (AUTOPARALLEL_PRECISION)"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity API
        return os.cpu_count() or 1


def build_plan(rt: Runtime, *, processes: int = 1, overrides: Mapping[str, tuple[Any, str]] | None = None,
               cpu_count: int | None = None) -> Plan:
    """Picks the preset for ``rt`` and applies ``overrides`` ({setting: (value, source)}), deriving the rest.

    ``processes`` > 1 means DDP with that many processes, each one a replica (``rt`` is then one of them or
    the parent that launches them). Derived values follow the overrides: a smaller ``TRAIN_BATCH_SIZE``
    raises the accumulation so the effective batch stays at TARGET_EFFECTIVE_BATCH, unless it is given too.

    Raises:
        ValueError: a batch that DDP cannot split evenly over its processes.
    """
    overrides = dict(overrides or {})
    cpus = cpu_count or _cpu_count()
    on_gpu = bool(rt.gpu_names) and rt.device.type == "cuda"
    processes = rt.world_size if rt.mode == "ddp" else processes
    replicas = processes if processes > 1 else max(1, len(rt.device_ids))
    name, per_gpu, why_batch = _preset_for(rt)
    settings: dict[str, Setting] = {}

    def put(key: str, value: Any, reason: str) -> None:
        settings[key] = Setting(*overrides[key]) if key in overrides else Setting(value, reason)

    unit = "GPU" if on_gpu else "process"
    units = f"{replicas} {unit}" + ("" if replicas == 1 else "s" if on_gpu else "es")
    if "batch_size" in overrides:
        global_batch, source = overrides["batch_size"]
        settings["batch_size"] = Setting(global_batch, source)
        share = global_batch / replicas
        shown = int(share) if share == int(share) else f"{math.floor(share)}-{math.ceil(share)}"
        settings["per_gpu_batch"] = Setting(shown, f"global {global_batch} split over {units}")
    else:
        put("per_gpu_batch", per_gpu, why_batch)
        global_batch = settings["per_gpu_batch"].value * replicas
        settings["batch_size"] = Setting(global_batch, f"{settings['per_gpu_batch'].value} per {unit} x {units}; "
                                         "train_ultimate.py's --batch-size is this global batch")
    if processes > 1 and global_batch % replicas:
        raise ValueError(f"global batch {global_batch} does not split evenly over {replicas} DDP processes: "
                         f"use a multiple of {replicas} (e.g. {replicas * max(1, global_batch // replicas)})")
    stage2 = max(replicas, (global_batch * 3 // 4) // replicas * replicas)
    settings["stage2_batch_size"] = Setting(stage2, "3/4 of the stage-1 batch: stage 2 also trains the backbone")
    put("accumulation_steps", max(1, math.ceil(TARGET_EFFECTIVE_BATCH / global_batch)),
        f"keeps the effective batch at {TARGET_EFFECTIVE_BATCH}, the batch the recipe's LR was set for")
    effective = global_batch * settings["accumulation_steps"].value
    settings["effective_batch"] = Setting(effective, "global batch x accumulation: images per optimizer step")
    put("img_size", 320, "the recipe's Kaggle size: 320 px fits the batch above; OOM: IMG_SIZE=288")
    put("precision", rt.precision, _precision_reason(rt))
    if on_gpu:
        workers = max(1, min(8, cpus // processes))
        why = (f"{cpus} CPU cores / {processes} process{'es' if processes > 1 else ''}, at most 8: more workers "
               "than cores only adds contention")
    else:
        workers, why = max(0, min(4, cpus - 1)), f"{cpus} CPU cores: one stays with the training process"
    put("num_workers", workers, why)
    put("epochs", RECIPE["epochs"], "the recipe's")
    scale = settings["epochs"].value / RECIPE["epochs"]
    for key in ("stage1_epochs", "warmup_epochs"):
        settings[key] = Setting(round(RECIPE[key] * scale), f"{RECIPE[key]} of {RECIPE['epochs']} in the recipe, "
                                                            "scaled")
    return Plan(preset=name, hardware=describe_hardware(rt), replicas=replicas, processes=processes,
                settings=settings)


def format_plan(plan: Plan) -> str:
    """The preset as a table: setting, value, reason."""
    width = max(len(label) for label in ROW_LABELS.values())
    labels = dict(ROW_LABELS, per_gpu_batch="per-process batch") if plan.preset == "CPU" else ROW_LABELS
    processes = f"{plan.processes} process" + ("es" if plan.processes > 1 else "")
    lines = [f"Preset {plan.preset}: {plan.hardware}, {processes}", ""]
    lines += [f"  {label:<{width}}  {plan.settings[key].value!s:<6}  {plan.settings[key].reason}"
              for key, label in labels.items() if key in plan.settings]
    return "\n".join(lines)


def _flags(values: Mapping[str, Any]) -> list[str]:
    """``{"img_size": 320, "deep_supervision": True}`` -> ``["--img-size", "320", "--deep-supervision"]``."""
    argv: list[str] = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


def train_arguments(plan: Plan, *, dataset_path: str, checkpoint_dir: str, strategy: str = "auto",
                    device: str = "auto", resume_from: str | None = None) -> list[str]:
    """``train_ultimate.py train`` arguments for the full recipe with this plan's values."""
    keys = ("batch_size", "stage2_batch_size", "accumulation_steps", "img_size", "epochs", "stage1_epochs",
            "warmup_epochs", "num_workers", "precision")
    values = {**RECIPE, **{key: plan.value(key) for key in keys}}
    return ["train", *_flags({"dataset_path": dataset_path, "checkpoint_dir": checkpoint_dir, **values,
                              "strategy": strategy, "device": device, "resume_from": resume_from})]


def demo_arguments(config: DemoConfig, *, dataset_path: str, checkpoint_dir: str, num_workers: int,
                   strategy: str = "auto", device: str = "auto", resume_from: str | None = None) -> list[str]:
    """``train_ultimate.py train`` arguments for the synthetic demo."""
    values = {"dataset_path": dataset_path, "checkpoint_dir": checkpoint_dir, "backbone": config.backbone,
              "pretrained" if config.pretrained else "no_pretrained": True, "num_experts": config.num_experts,
              "img_size": config.img_size, "batch_size": config.batch_size, "epochs": config.epochs,
              "stage1_epochs": 0, "lr": config.lr, "scheduler": config.scheduler, "seed": config.seed,
              "num_workers": num_workers, "strategy": strategy, "device": device,
              "max_steps_per_epoch": config.max_steps_per_epoch}
    return ["train", *_flags(values), *config.extra, *_flags({"resume_from": resume_from})]
