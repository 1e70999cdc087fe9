"""Descriptions of the machine a benchmark ran on, without importing torch (the GPU suite's parent does not)."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or platform.processor() elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_gpus(machine: dict) -> str:
    """``NAME xN (compute capability X.Y, M GiB), CUDA ..., cuDNN ...`` from a machine record, or ``no GPU``."""
    gpus = machine.get("gpus") or []
    if not gpus:
        return "no GPU"
    gpu = gpus[0]
    return (f"{gpu['name']}{f' x{len(gpus)}' if len(gpus) > 1 else ''} (compute capability "
            f"{gpu['capability'][0]}.{gpu['capability'][1]}, {gpu['memory_gib']} GiB), "
            f"CUDA {machine.get('cuda_build')}, cuDNN {machine.get('cudnn')}")
