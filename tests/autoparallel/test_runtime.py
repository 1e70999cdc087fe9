"""Runtime detection on simulated machines and environments: no GPU or launcher needed."""

from __future__ import annotations

import logging
import re
from datetime import timedelta

import pytest
import torch

from autoparallel import Hardware, Runtime, detect_runtime, is_main_process, runtime
from autoparallel.detect import first_slurm_host, parse_devices
from autoparallel.runtime import _destroy_process_group, distributed_env_defaults, process_group_timeout, reset_runtime

T4 = dict(name="Tesla T4", memory_gib=15.0, capability=(7, 5))
A100 = dict(name="NVIDIA A100-SXM4-40GB", memory_gib=39.4, capability=(8, 0))
TORCHRUN_RANK1 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
                  "TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SLURM_TASK3 = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
               "SLURM_NODEID": "1",
               "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_ID": "123456"}


def detect(*, gpus: int = 0, gpu: dict | None = None, env: dict | None = None, **kwargs) -> Runtime:
    return detect_runtime(env=env or {}, hardware=Hardware.uniform(gpus, **(gpu or T4)), **kwargs)


@pytest.fixture
def fresh_runtime():
    reset_runtime()
    yield
    reset_runtime()


@pytest.mark.parametrize(
    ("gpus", "mode", "device", "device_ids", "precision"),
    [
        (0, "cpu", "cpu", (), "fp32"),
        (1, "single", "cuda:0", (0,), "fp16"),
        (2, "dp", "cuda:0", (0, 1), "fp16"),
        (4, "dp", "cuda:0", (0, 1, 2, 3), "fp16"),
    ],
)
def test_hardware_alone_picks_the_mode(gpus, mode, device, device_ids, precision):
    rt = detect(gpus=gpus)
    assert (rt.mode, rt.device, rt.device_ids, rt.precision) == (mode, torch.device(device), device_ids, precision)
    assert (rt.rank, rt.world_size, rt.launcher, rt.backend, rt.is_main, rt.is_distributed) == (
        0, 1, None, None, True, False)
    assert rt.num_gpus == gpus
    assert rt.gpu_names == ("Tesla T4",) * gpus


@pytest.mark.parametrize(
    ("gpu", "precision", "dtype", "scaler"),
    [(T4, "fp16", torch.float16, True), (A100, "bf16", torch.bfloat16, False)],
)
def test_auto_precision_follows_compute_capability(gpu, precision, dtype, scaler):
    rt = detect(gpus=2, gpu=gpu)
    assert (rt.precision, rt.amp_dtype, rt.needs_grad_scaler) == (precision, dtype, scaler)


def test_mixed_gpus_use_the_weakest_for_precision():
    hardware = Hardware(("NVIDIA A100", "Tesla V100"), (39.4, 15.8), ((8, 0), (7, 0)))
    assert detect_runtime(env={}, hardware=hardware).precision == "fp16"


@pytest.mark.parametrize(("requested", "expected"), [("no", "fp32"), ("fp32", "fp32"), ("fp16", "fp16")])
def test_explicit_precision_is_kept(requested, expected):
    assert detect(gpus=1, gpu=A100, precision=requested).precision == expected


def test_bf16_on_a_t4_falls_back_to_fp16_with_a_message(caplog):
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        rt = detect(gpus=2, precision="bf16")
    assert rt.precision == "fp16"
    assert "precision=bf16 asked for, but Tesla T4 (compute capability 7.5) has no native bf16" in caplog.text
    assert "using fp16 with a GradScaler" in caplog.text


def test_cpu_precision_is_fp32_unless_bf16_is_asked(caplog):
    assert detect(gpus=0).precision == "fp32"
    assert detect(gpus=0, precision="bf16").precision == "bf16"
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        assert detect(gpus=0, precision="fp16").precision == "fp32"
    assert "precision=fp16 asked for, but fp16 autocast with a GradScaler needs a GPU" in caplog.text
    assert "using fp32" in caplog.text


def test_dp_with_one_gpu_runs_single_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        rt = detect(gpus=1, strategy="dp")
    assert (rt.mode, rt.device_ids) == ("single", (0,))
    assert "strategy=dp asked for, but only 1 GPU is visible (Tesla T4): running on that single GPU" in caplog.text


def test_gpu_strategy_without_gpus_runs_on_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        rt = detect(gpus=0, env={"AUTOPARALLEL_STRATEGY": "single"})
    assert rt.mode == "cpu"
    assert "AUTOPARALLEL_STRATEGY=single asked for, but no GPU is visible" in caplog.text


def test_ddp_without_launcher_points_at_launch(caplog):
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        rt = detect(gpus=2, strategy="ddp")
    assert rt.mode == "dp"
    assert "strategy=ddp asked for, but no distributed launcher started this script" in caplog.text
    assert "running in one process as 'dp'" in caplog.text
    assert "autoparallel.launch()" in caplog.text
    assert "torchrun --nproc_per_node" in caplog.text


def test_missing_device_is_dropped_with_a_message(caplog):
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        rt = detect(gpus=2, devices="1,3")
    assert (rt.mode, rt.device, rt.device_ids) == ("single", torch.device("cuda:1"), (1,))
    assert "devices=1,3 asked for, but this machine shows 2 GPU(s) (0: Tesla T4, 1: Tesla T4): using GPU 1" \
        in caplog.text


def test_only_missing_devices_means_all_visible_gpus(caplog):
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        rt = detect(gpus=2, env={"AUTOPARALLEL_DEVICES": "3"})
    assert rt.device_ids == (0, 1)
    assert "AUTOPARALLEL_DEVICES=3 asked for, but this machine shows 2 GPU(s)" in caplog.text
    assert "using all visible GPUs" in caplog.text


def test_devices_select_gpus_for_dp_and_single():
    assert detect(gpus=4, devices=[2, 3]).device_ids == (2, 3)
    rt = detect(gpus=4, devices="2,3", strategy="single")
    assert (rt.mode, rt.device, rt.device_ids) == ("single", torch.device("cuda:2"), (2,))


def test_arguments_beat_environment_which_beats_hardware():
    env = {"AUTOPARALLEL_STRATEGY": "single", "AUTOPARALLEL_DEVICES": "1", "AUTOPARALLEL_PRECISION": "no"}
    rt = detect(gpus=4, env=env)
    assert (rt.mode, rt.device, rt.precision) == ("single", torch.device("cuda:1"), "fp32")
    rt = detect(gpus=4, env=env, strategy="dp", devices="0,2", precision="fp16")
    assert (rt.mode, rt.device_ids, rt.precision) == ("dp", (0, 2), "fp16")
    assert detect(gpus=4, env={"AUTOPARALLEL_STRATEGY": "cpu"}).mode == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "env", "message"),
    [
        ({"strategy": "foo"}, {}, "strategy='foo' is not valid: choose one of auto, cpu, single, dp, ddp"),
        ({}, {"AUTOPARALLEL_STRATEGY": "foo"}, "AUTOPARALLEL_STRATEGY='foo' is not valid: choose one of auto"),
        ({"precision": "fp8"}, {}, "precision='fp8' is not valid: choose one of auto, no, fp32, fp16, bf16"),
        ({}, {"AUTOPARALLEL_PRECISION": "fp8"}, "AUTOPARALLEL_PRECISION='fp8' is not valid"),
        ({"devices": "a,b"}, {}, "devices='a,b' is not a list of distinct GPU indices"),
        ({}, {"AUTOPARALLEL_DEVICES": "a,b"}, "AUTOPARALLEL_DEVICES='a,b' is not a list of distinct GPU indices"),
        ({"devices": "0,0"}, {}, "devices='0,0' is not a list of distinct GPU indices"),
        ({}, {"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "environment variable RANK='x' is not an integer"),
    ],
)
def test_bad_values_raise_naming_source_value_and_choices(kwargs, env, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        detect(gpus=2, env=env, **kwargs)


def test_partial_launcher_environment_raises():
    with pytest.raises(ValueError, match=r"partially set environment: RANK=0 but WORLD_SIZE, LOCAL_RANK missing"):
        detect(gpus=2, env={"RANK": "0"})


def test_parse_devices_accepts_strings_sequences_and_all():
    assert parse_devices("0, 2") == (0, 2)
    assert parse_devices([1]) == (1,)
    assert parse_devices("all") is None
    assert parse_devices(None) is None


def test_torchrun_on_gpus_gives_one_gpu_per_process():
    rt = detect(gpus=2, env=TORCHRUN_RANK1)
    assert (rt.mode, rt.device, rt.device_ids, rt.backend, rt.launcher) == (
        "ddp", torch.device("cuda:1"), (1,), "nccl", "torchrun")
    assert (rt.rank, rt.local_rank, rt.world_size, rt.node_rank, rt.is_main, rt.is_distributed) == (
        1, 1, 2, 0, False, True)
    assert (rt.num_processes, rt.num_gpus, rt.precision) == (2, 2, "fp16")


def test_torchrun_on_cpu_uses_gloo():
    rt = detect(gpus=0, env={**TORCHRUN_RANK1, "RANK": "0", "LOCAL_RANK": "0"})
    assert (rt.mode, rt.device, rt.device_ids, rt.backend, rt.precision, rt.is_main) == (
        "ddp", torch.device("cpu"), (), "gloo", "fp32", True)


def test_torchrun_overrides_dp_request_with_a_message(caplog):
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        rt = detect(gpus=2, env=TORCHRUN_RANK1, strategy="dp")
    assert rt.mode == "ddp"
    assert "strategy=dp asked for, but torchrun started 2 processes: each one drives a single device" in caplog.text


def test_cpu_strategy_under_torchrun_is_ddp_on_cpu():
    rt = detect(gpus=2, env=TORCHRUN_RANK1, strategy="cpu")
    assert (rt.mode, rt.device, rt.backend) == ("ddp", torch.device("cpu"), "gloo")


def test_devices_map_local_ranks_under_torchrun():
    rt = detect(gpus=4, env=TORCHRUN_RANK1, devices="2,3")
    assert (rt.device, rt.device_ids) == (torch.device("cuda:3"), (3,))


def test_more_processes_than_gpus_runs_ddp_on_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        rt = detect(gpus=1, env={**TORCHRUN_RANK1, "RANK": "0", "LOCAL_RANK": "0"})
    assert (rt.mode, rt.device, rt.backend) == ("ddp", torch.device("cpu"), "gloo")
    assert "torchrun --nproc_per_node=2 asked for, but only 1 GPU(s) are visible on this node" in caplog.text


def test_multi_node_torchrun_reads_group_rank():
    env = {**TORCHRUN_RANK1, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "GROUP_RANK": "2"}
    rt = detect(gpus=2, gpu=A100, env=env)
    assert (rt.rank, rt.local_rank, rt.world_size, rt.node_rank, rt.precision) == (5, 1, 8, 2, "bf16")


def test_accelerate_launch_is_recognised_with_its_precision():
    env = {**TORCHRUN_RANK1, "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "false"}
    rt = detect(gpus=2, env=env)
    assert (rt.launcher, rt.mode, rt.precision) == ("accelerate", "ddp", "fp32")


def test_autoparallel_relaunch_is_named():
    rt = detect(gpus=2, env={**TORCHRUN_RANK1, "AUTOPARALLEL_LAUNCHED": "1"})
    assert (rt.launcher, rt.mode) == ("autoparallel", "ddp")


def test_torchrun_with_one_process_is_still_ddp():
    rt = detect(gpus=1, env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert (rt.mode, rt.world_size, rt.device) == ("ddp", 1, torch.device("cuda:0"))


def test_slurm_multi_task_job_is_ddp():
    rt = detect(gpus=2, env=SLURM_TASK3)
    assert (rt.launcher, rt.mode, rt.rank, rt.local_rank, rt.world_size, rt.node_rank, rt.device) == (
        "slurm", "ddp", 3, 1, 4, 1, torch.device("cuda:1"))


def test_slurm_gpu_per_task_binding_uses_the_one_visible_gpu():
    rt = detect(gpus=1, env=SLURM_TASK3)
    assert (rt.device, rt.backend) == (torch.device("cuda:0"), "nccl")


def test_slurm_single_task_is_not_distributed():
    rt = detect(gpus=2, env={"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    assert (rt.mode, rt.launcher) == ("dp", None)


def test_slurm_without_master_address_is_not_distributed(caplog):
    env = {key: value for key, value in SLURM_TASK3.items() if key != "SLURM_JOB_NODELIST"}
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        rt = detect(gpus=2, env=env)
    assert rt.mode == "dp"
    assert "srun started 4 tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set" in caplog.text


def test_torchrun_inside_slurm_trusts_torchrun():
    rt = detect(gpus=2, env={**SLURM_TASK3, **TORCHRUN_RANK1})
    assert (rt.launcher, rt.rank, rt.world_size) == ("torchrun", 1, 2)


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node01", "node01"), ("node[01-04,07],gpu5", "node01"), ("a[3,5]-ib", "a3-ib"), ("x1,x2", "x1"), ("", None)],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_slurm_rendezvous_variables_are_derived():
    rt = detect(gpus=2, env=SLURM_TASK3)
    assert distributed_env_defaults(rt, SLURM_TASK3) == {
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(10000 + 123456 % 20000), "RANK": "3", "WORLD_SIZE": "4",
        "LOCAL_RANK": "1"}
    assert distributed_env_defaults(detect(gpus=2, env=TORCHRUN_RANK1), TORCHRUN_RANK1) == {}


def test_timeout_from_environment():
    assert process_group_timeout({}) == timedelta(seconds=1800)
    assert process_group_timeout({"AUTOPARALLEL_TIMEOUT": "60"}) == timedelta(seconds=60)
    for value in ("soon", "0", "-5", "nan", "inf"):
        with pytest.raises(ValueError, match=f"AUTOPARALLEL_TIMEOUT='{value}' is not a positive number of seconds"):
            process_group_timeout({"AUTOPARALLEL_TIMEOUT": value})


def test_runtime_is_frozen_and_validated():
    rt = Runtime(mode="cpu", device="cpu", device_ids=())
    with pytest.raises(AttributeError):
        rt.mode = "dp"
    with pytest.raises(ValueError, match="Runtime\\(mode='gpu'\\) is not a mode"):
        Runtime(mode="gpu", device="cpu", device_ids=())


def test_runtime_detects_this_cpu_machine_once_and_caches(fresh_runtime, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "AUTOPARALLEL_STRATEGY", "AUTOPARALLEL_DEVICES",
                 "AUTOPARALLEL_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    first = runtime()
    assert (first.mode, first.device, first.precision) == ("cpu", torch.device("cpu"), "fp32")
    assert runtime() is first
    explicit = runtime(precision="bf16")
    assert explicit.precision == "bf16"
    assert runtime() is explicit
    assert is_main_process()


def test_is_main_process_reads_rank_without_detecting(fresh_runtime, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()


def test_fallback_warning_reaches_stderr_without_logging_config(monkeypatch, capsys):
    # No handler anywhere (as in a plain script): Python's last-resort handler must show the warning.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    assert not logging.getLogger("autoparallel.runtime").hasHandlers()
    detect(gpus=1, strategy="dp")
    assert "strategy=dp asked for, but only 1 GPU is visible (Tesla T4)" in capsys.readouterr().err


def test_runtime_under_a_launcher_joins_the_process_group_once(fresh_runtime, monkeypatch):
    import atexit
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "test",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "AUTOPARALLEL_TIMEOUT": "30"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AUTOPARALLEL_STRATEGY", "AUTOPARALLEL_DEVICES", "AUTOPARALLEL_PRECISION", "AUTOPARALLEL_LAUNCHED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    assert not dist.is_initialized()
    try:
        rt = runtime()
        assert (rt.mode, rt.backend, rt.launcher, rt.world_size) == ("ddp", "gloo", "torchrun", 1)
        assert (dist.is_initialized(), dist.get_backend(), dist.get_world_size(), dist.get_rank()) == (
            True, "gloo", 1, 0)
        again = runtime(precision="bf16")  # re-detection must not initialise a second time
        assert (again.mode, again.precision) == ("ddp", "bf16")
        assert registered == [_destroy_process_group]
    finally:
        _destroy_process_group()
    assert not dist.is_initialized()


@pytest.mark.parametrize(("nproc", "warned"), [("2", True), ("1", False)])
def test_nproc_without_launch_warns_unless_it_asks_for_one_process(nproc, warned, fresh_runtime, monkeypatch, caplog):
    import importlib

    runtime_module = importlib.import_module("autoparallel.runtime")

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "AUTOPARALLEL_STRATEGY", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime_module, "_warned_nproc", False)
    monkeypatch.setenv("AUTOPARALLEL_NPROC", nproc)
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        assert runtime(strategy="cpu").world_size == 1
    assert ("did not start its processes: call ap.launch()" in caplog.text) is warned
