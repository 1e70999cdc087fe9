"""Running multi-process jobs from tests: a clean CPU environment and a hang-proof subprocess call."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# A job needs about 10 s on an idle 2-core machine; the limit only turns a hang into a failure.
JOB_TIMEOUT_S = 150
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def job_environment(**extra: str) -> dict[str, str]:
    """This environment without launcher or autoparallel settings, on the CPU, with the repo importable."""
    env = {key: value for key, value in os.environ.items()
           if key not in _LAUNCH_VARS and not key.startswith(("AUTOPARALLEL_", "TORCHELASTIC_", "SLURM_"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def start_job(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), found before anything is killed: torchrun's workers run in
    sessions of their own, so killing torchrun's process group leaves them holding the output pipe."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def finish_job(process: subprocess.Popen, timeout: float = JOB_TIMEOUT_S) -> tuple[int, str]:
    """Waits for ``process``; on timeout kills it and everything it started, and fails the test."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(process.pid), process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(process.args)} did not finish in {timeout:.0f} s (a hang). Output:\n{output[-4000:]}")
    return process.returncode, output


def run_job(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    return finish_job(start_job(command, env))


def torchrun_command(script: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(HERE / script)]


def torchrun_result(script: str) -> dict:
    """Runs ``script`` as 2 processes and returns the JSON of the single ``RESULT`` line rank 0 prints."""
    status, output = run_job(torchrun_command(script), job_environment())
    assert status == 0, output[-4000:]
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, output[-4000:]
    return json.loads(lines[0][len("RESULT "):])
