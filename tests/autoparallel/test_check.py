"""autoparallel.check: exit codes, the JSON report, and checks that really fail when something is wrong."""
from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from torch import nn

from autoparallel import check

CHECK_NAMES = ["CUDA available", "GPU count", "DataParallel fwd+bwd", "DDP all-reduce", "GPU bandwidth"]


def cli(argv):
    return check.build_parser().parse_args(argv)


def replace_check(monkeypatch, name, function):
    monkeypatch.setattr(check, "CHECKS", [(n, function if n == name else f) for n, f in check.CHECKS])


@pytest.fixture
def no_gpu(monkeypatch):
    """Behave as a machine without GPUs, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fast_ddp(monkeypatch):
    """Replace the multi-process DDP check so that a test starts no processes."""
    replace_check(monkeypatch, "DDP all-reduce", lambda args: (check.PASS, "stubbed"))


def test_without_gpu_exits_2_and_explains(no_gpu, capsys):
    assert check.main([]) == 2
    out = capsys.readouterr().out
    assert "No GPU found" in out
    assert "--allow-cpu" in out
    assert "TORCH_FR_DUMP_TEMP_FILE" in out  # the debugging knobs a job would run with
    assert "Result: no GPU found (exit code 2)" in out


def test_the_report_shows_the_debugging_knobs_without_setting_them_or_making_their_folder(no_gpu, capsys,
                                                                                           monkeypatch, tmp_path):
    import os

    from autoparallel import group

    monkeypatch.setattr(group, "TRACE_PREFIX", str(tmp_path / "trace" / "rank_"))
    for name in group.debug_environment({}):
        monkeypatch.delenv(name, raising=False)
    check.main(["--json"])
    knobs = json.loads(capsys.readouterr().out)["environment"]["debugging"]
    assert knobs["TORCH_FR_DUMP_TEMP_FILE"].startswith(str(tmp_path / "trace" / "rank_"))
    assert "TORCH_FR_DUMP_TEMP_FILE" not in os.environ
    assert not (tmp_path / "trace").exists()


def test_without_gpu_json_lists_every_check(no_gpu, capsys):
    assert check.main(["--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == 2
    assert [c["name"] for c in report["checks"]] == CHECK_NAMES
    assert [c["status"] for c in report["checks"]] == ["FAIL"] + ["SKIP"] * 4
    assert report["environment"]["gpus"] == []
    assert report["environment"]["torch"] == torch.__version__


def test_allow_cpu_passes_with_json(no_gpu, fast_ddp, capsys):
    assert check.main(["--allow-cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {"CUDA available": "SKIP", "GPU count": "SKIP", "DataParallel fwd+bwd": "PASS",
                        "DDP all-reduce": "PASS", "GPU bandwidth": "SKIP"}
    assert report["exit_code"] == 0


def test_a_failing_check_exits_1(no_gpu, fast_ddp, monkeypatch, capsys):
    replace_check(monkeypatch, "DataParallel fwd+bwd", lambda args: (check.FAIL, "gradients differ"))
    assert check.main(["--allow-cpu"]) == 1
    out = capsys.readouterr().out
    assert "Result: FAILED: DataParallel fwd+bwd (exit code 1)" in out


def test_an_exception_in_a_check_is_its_failure(no_gpu, fast_ddp, monkeypatch):
    def broken(args):
        raise RuntimeError("CUDA error: misaligned address")

    replace_check(monkeypatch, "DataParallel fwd+bwd", broken)
    results = check.run_checks(cli(["--allow-cpu"]), check.CHECKS)
    failed = [r for r in results if r.status == check.FAIL]
    assert [(r.name, r.reason) for r in failed] == [
        ("DataParallel fwd+bwd", "RuntimeError: CUDA error: misaligned address")]
    assert len(results) == 5  # the report goes on after the failure


def test_dataparallel_check_on_cpu_compares_gradients(no_gpu):
    status, reason = check.check_dataparallel(cli(["--allow-cpu"]))
    assert status == check.PASS
    assert reason.startswith("CPU: wrap() is a pass-through")
    assert "max rel. diff 0.0e+00" in reason


def test_dataparallel_check_fails_when_wrap_changes_the_result(no_gpu, monkeypatch):
    class Doubling(nn.Module):  # a wrapper that silently changes the model's output
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, images):
            output = self.module(images)
            return {"logits": output["logits"] * 2, "aux_loss": output["aux_loss"]}

    # The module, not the package attribute: autoparallel.wrap is also the name of the function.
    wrap_module = importlib.import_module("autoparallel.wrap")
    monkeypatch.setattr(wrap_module, "wrap", lambda model, runtime=None: Doubling(model))
    status, reason = check.check_dataparallel(cli(["--allow-cpu"]))
    assert status == check.FAIL
    assert "Doubling" in reason  # on the CPU the model must come back unwrapped


def test_one_gpu_and_fewer_than_expected(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    status, reason = check.check_device_count(cli([]))
    assert (status, reason) == (check.PASS, "1 GPU (Tesla T4): training runs on one device")
    status, reason = check.check_device_count(cli(["--expect-gpus", "2"]))
    assert (status, reason) == (check.FAIL, "1 GPU(s) (Tesla T4), expected 2")


def test_ddp_check_reports_a_crashing_job(no_gpu, monkeypatch):
    crash = "import sys; print('NCCL error: unhandled system error'); sys.exit(3)"
    monkeypatch.setattr(check, "ddp_command", lambda nproc: [sys.executable, "-c", crash])
    status, reason = check.check_ddp(cli(["--allow-cpu"]))
    assert status == check.FAIL
    assert reason == "2 processes (gloo) exited with status 3: NCCL error: unhandled system error"


def test_ddp_check_reports_a_hang(no_gpu, monkeypatch):
    monkeypatch.setattr(check, "ddp_command", lambda nproc: [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(check, "_GRACE_S", 0.0)
    status, reason = check.check_ddp(cli(["--allow-cpu", "--timeout", "1"]))
    assert status == check.FAIL
    assert reason.startswith("2 processes (gloo) did not finish in 1 s: a hang.")
    assert "NCCL_DEBUG=INFO" in reason


@pytest.mark.distributed
def test_ddp_check_runs_two_gloo_processes(no_gpu):
    status, reason = check.check_ddp(cli(["--allow-cpu", "--timeout", "60"]))
    assert status == check.PASS, reason
    assert "all-reduce of 4 MiB per rank gave 3 (expected 3)" in reason
    assert "uneven all-gather gave 3 rows (expected 3); backend gloo" in reason
