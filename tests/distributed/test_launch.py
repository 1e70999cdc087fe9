"""Starting DDP jobs: autoparallel.launch() re-launching a plain script, torchrun, two nodes on
loopback, and failures (a rank that raises, a rank stuck outside a collective).

The multi-process tests run tests/distributed/_ddp_script.py on the CPU (gloo, 2 processes); the first
tests check the launch decision itself, in this process.
"""
from __future__ import annotations

import importlib
import os
import re
import signal
import socket
import sys
import types
from pathlib import Path

import pytest

import autoparallel as ap
from autoparallel import launch, requested_processes
from autoparallel.launch import launch_command

# the module, not the function that autoparallel/__init__.py exports under the same name
launch_module = importlib.import_module("autoparallel.launch")

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "_ddp_script.py"
sys.path.insert(0, str(HERE))
from _ddp_jobs import finish_job, job_environment, run_job, start_job, torchrun_command  # noqa: E402

RESULT = re.compile(r"RESULT rank=(\d) world=(\d) sum=(\S+) launcher=(\S+) mode=(\S+) args=(.*)")


def results(output: str) -> list[tuple[str, ...]]:
    return sorted(match.groups() for match in RESULT.finditer(output))


# -- the launch decision (no processes) -----------------------------------------------------------
@pytest.mark.parametrize(("nproc", "env", "gpus", "expected"), [
    (None, {}, 0, None),                                   # CPU, nothing asked: one process
    (None, {}, 1, None),                                   # one GPU: nothing to spread
    (None, {}, 4, 4),                                      # launch() on a 4-GPU machine opts in
    (None, {"AUTOPARALLEL_STRATEGY": "dp"}, 4, None),      # the user asked for DataParallel
    (None, {"AUTOPARALLEL_STRATEGY": "ddp"}, 2, 2),
    (None, {"AUTOPARALLEL_STRATEGY": "ddp"}, 0, None),     # no GPU: needs AUTOPARALLEL_NPROC
    (None, {"AUTOPARALLEL_NPROC": "2"}, 0, 2),             # how the tests run gloo on the CPU
    (None, {"AUTOPARALLEL_NPROC": "1"}, 4, None),
    (3, {"AUTOPARALLEL_NPROC": "2"}, 0, 3),                # the argument wins
])
def test_requested_processes(nproc, env, gpus, expected) -> None:
    assert requested_processes(nproc, env, gpus) == expected


def test_requested_processes_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"AUTOPARALLEL_NPROC='two' is not a positive number"):
        requested_processes(None, {"AUTOPARALLEL_NPROC": "two"}, 0)
    with pytest.raises(ValueError, match=r"launch\(nproc=0\)"):
        requested_processes(0, {}, 0)


def test_launch_command_for_a_script_and_for_python_dash_m() -> None:
    script_main = types.ModuleType("__main__")
    script_main.__spec__ = None
    assert launch_command(2, script_main, ["train.py", "--epochs", "3"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "train.py", "--epochs", "3"]
    module_main = types.ModuleType("__main__")
    module_main.__spec__ = types.SimpleNamespace(name="tools.train")
    assert launch_command(4, module_main, ["/abs/tools/train.py", "--fast"])[-4:] == [
        "--nproc_per_node=4", "-m", "tools.train", "--fast"]
    with pytest.raises(ap.UsageError, match="there is none here"):
        launch_command(2, script_main, ["-c"])


def test_launch_returns_under_a_launcher_or_when_not_asked(monkeypatch) -> None:
    def no_subprocess(*args, **kwargs):
        raise AssertionError("launch() must not start processes here")

    monkeypatch.setattr(launch_module.subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(launch_module, "_visible_gpus", lambda: 0)
    for name in ("AUTOPARALLEL_NPROC", "AUTOPARALLEL_STRATEGY", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                 "AUTOPARALLEL_LAUNCHED", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                 "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert launch() is None  # CPU, nothing asked
    monkeypatch.setenv("AUTOPARALLEL_NPROC", "2")
    for launcher_var in ("RANK", "AUTOPARALLEL_LAUNCHED"):
        monkeypatch.setenv(launcher_var, "1")
        assert launch() is None  # already a worker of a launched job
        monkeypatch.delenv(launcher_var)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert launch() is None  # srun started the tasks


# -- real jobs ------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_plain_python_relaunches_through_torchrun() -> None:
    status, output = run_job([sys.executable, str(SCRIPT), "--epochs", "2"], job_environment(AUTOPARALLEL_NPROC="2"))

    assert status == 0, output[-4000:]
    assert results(output) == [("0", "2", "3", "autoparallel", "ddp", "--epochs 2"),
                               ("1", "2", "3", "autoparallel", "ddp", "--epochs 2")]


@pytest.mark.distributed
def test_torchrun_starts_the_same_script() -> None:
    status, output = run_job(torchrun_command(SCRIPT.name), job_environment())

    assert status == 0, output[-4000:]
    assert results(output) == [("0", "2", "3", "torchrun", "ddp", ""), ("1", "2", "3", "torchrun", "ddp", "")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.distributed
def test_two_nodes_on_loopback_with_c10d_rendezvous() -> None:
    port = free_port()
    env = job_environment()
    processes = [start_job([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=autoparallel-test",
                            f"--node-rank={node_rank}", str(SCRIPT)], env) for node_rank in (0, 1)]
    try:
        finished = [finish_job(process) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:  # the other node, when the first one failed the test
                os.killpg(process.pid, signal.SIGKILL)

    joined = "\n".join(output for _, output in finished)
    assert [status for status, _ in finished] == [0, 0], joined[-4000:]
    assert results(joined) == [("0", "2", "3", "torchrun", "ddp", ""), ("1", "2", "3", "torchrun", "ddp", "")]


@pytest.mark.distributed
def test_a_rank_that_raises_ends_the_job_with_its_error_once() -> None:
    env = job_environment(AUTOPARALLEL_NPROC="2", AP_TEST_RAISE_RANK="1", AUTOPARALLEL_TIMEOUT="60")
    status, output = run_job([sys.executable, str(SCRIPT)], env)

    assert status != 0
    assert output.count("RuntimeError: deliberate failure on rank 1") == 1, output[-4000:]
    assert "Root Cause" in output
    assert results(output) == []


@pytest.mark.distributed
def test_a_rank_stuck_outside_a_collective_times_out() -> None:
    # Rank 1 sleeps 300 s instead of joining the all-reduce; rank 0 gives up after AUTOPARALLEL_TIMEOUT.
    env = job_environment(AUTOPARALLEL_NPROC="2", AP_TEST_STUCK_RANK="1", AUTOPARALLEL_TIMEOUT="5")
    status, output = run_job([sys.executable, str(SCRIPT)], env)  # fails the test if it hangs

    assert status != 0
    # In the all-reduce; or, when rank 1 started more than 5 s after rank 0 (a loaded machine), in joining the
    # process group: either way rank 0 gave up instead of hanging, and says where and what to try.
    assert re.search(r"rank 0 of 2: (all_reduce|joining the process group at \S+) timed out", output), output[-4000:]
    assert "AUTOPARALLEL_TIMEOUT=<seconds> to wait longer" in output
    assert results(output) == []
