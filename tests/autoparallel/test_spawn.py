"""``ap.launch(fn)`` refuses before forking when the forked processes could not use CUDA, and a notebook
kernel reads its GPUs without initialising CUDA (CPU: the GPU queries are simulated)."""
from __future__ import annotations

import pytest
import torch

import autoparallel as ap
from autoparallel import detect, spawn


def _never_called() -> None:
    raise AssertionError("fn ran although the launch should have been refused")


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # read through NVML: leaves CUDA untouched


def test_cuda_used_in_an_earlier_cell_is_refused_before_any_process_starts(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ap.UsageError, match="Restart the kernel and call ap.launch.fn. before anything touches"):
        ap.launch(_never_called, nproc=2)


def test_a_driver_initialised_by_is_available_is_refused_with_the_nvml_setting(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(spawn, "_cuda_driver_initialised", lambda: True)
    with pytest.raises(ap.UsageError, match="PYTORCH_NVML_BASED_CUDA_CHECK=1"):
        ap.launch(_never_called, nproc=2)


def test_the_driver_check_reads_false_where_there_is_no_cuda_driver_or_it_is_untouched():
    if torch.cuda.is_available():
        pytest.skip("this process has initialised CUDA: the check is True by design (see tests/gpu)")
    assert spawn._cuda_driver_initialised() is False


def test_a_kernel_reads_its_gpus_in_a_child_process_and_never_in_itself(two_gpus, monkeypatch):
    monkeypatch.setattr(detect, "in_notebook", lambda: True)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: _never_called())
    monkeypatch.setattr(detect, "_probe_in_child", lambda: [("Tesla T4", 14.56, (7, 5))] * 2)
    assert ap.Hardware.probe() == ap.Hardware.uniform(2, memory_gib=14.56)


def test_a_worker_forked_from_the_kernel_reads_its_gpus_itself(two_gpus, monkeypatch):
    monkeypatch.setattr(detect, "in_notebook", lambda: True)
    monkeypatch.setenv("RANK", "1")  # set by ap.launch(fn) in every worker: CUDA is theirs to initialise
    monkeypatch.setattr(detect, "_probe_in_child", _never_called)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ap.Hardware.probe() == ap.Hardware()


def test_the_child_probe_runs_a_fresh_python_and_parses_what_it_prints():
    found = detect._probe_in_child()
    if torch.cuda.is_available():
        assert [name for name, _, _ in found] == [torch.cuda.get_device_name(i) for i in range(len(found))]
    else:
        assert found == []  # no GPU here: the real child process ran and printed an empty list
