"""bench/gpu_suite.py as CI runs it: `--device cpu --quick` runs the whole GPU plan on the CPU in seconds, every
planned item ok or skipped with its reason, into one JSON and one markdown table; so the GPU command cannot rot
between the rare runs on a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "bench/gpu_suite.py", "--device", "cpu", "--quick"]
MUST_RUN_ON_A_CPU = ("multi_gpu_check", "train_step_precision", "train_step_channels_last", "overhead",
                     "data_pipeline", "moe_dispatch")
SKIPPED_ON_A_CPU = {"gpu_tests": "needs a CUDA GPU", "train_step_cudnn_benchmark": "cudnn.benchmark",
                    "train_step_compile": "torch.compile on a CPU", "train_step_dataparallel": "DataParallel needs 2",
                    "ddp_scaling_cuda": "needs 2 or more GPUs"}


def plan_names() -> list[str]:
    spec = importlib.util.spec_from_file_location("_gpu_suite_plan", REPO / "bench" / "_gpu_suite_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_gpu_suite_plan", module)
    spec.loader.exec_module(module)
    return [item.name for item in module.PLAN]


def run_suite(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([*COMMAND, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_suite")
    return run_suite("--out", str(out)), out


def test_dry_run_prints_the_plan_with_per_item_limits() -> None:
    done = run_suite("--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "their limits add up to" in done.stdout
    for name in plan_names():
        assert f" {name} " in done.stdout, name


def load_suite():
    plan_names()  # registers _gpu_suite_plan, which the suite imports by name
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_missing_third_party_module_is_named_and_a_first_party_one_is_a_bug() -> None:
    suite = load_suite()
    output = "Traceback ...\nModuleNotFoundError: No module named 'py_sod_metrics.sod'\n"
    assert suite.missing_module(output) == "py_sod_metrics"
    assert suite.missing_module("ModuleNotFoundError: No module named 'camoxpert.nothing'") is None
    assert suite.missing_module("ImportError: cannot import name 'x'") is None


def test_only_rejects_an_unknown_item() -> None:
    done = run_suite("--only", "train_step_precision,no_such_item", "--dry-run")
    assert done.returncode == 2
    assert "unknown item(s) no_such_item" in done.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_quick_runs_every_planned_item_ok_or_skipped_with_a_reason(suite) -> None:
    done, out = suite
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    document = json.loads((out / "gpu_suite.json").read_text())
    names = plan_names()
    assert document["plan"] == names
    assert (document["device"], document["quick"]) == ("cpu", True)
    assert document["machine"]["gpus"] == []
    records = {record["name"]: record for record in document["items"]}
    assert list(records) == names
    for record in records.values():
        assert record["status"] in ("ok", "skipped"), f"{record['name']}: {record['status']}: {record.get('reason')}"
        if record["status"] == "skipped":
            assert record["reason"], record["name"]
    for name in MUST_RUN_ON_A_CPU:
        assert records[name]["status"] == "ok", f"{name}: {records[name].get('reason')}"
        assert records[name]["command"]
        assert records[name]["seconds"] > 0
        assert (out / "items" / f"{name}.log").is_file()
    for name, reason in SKIPPED_ON_A_CPU.items():
        assert records[name]["status"] == "skipped", name
        assert reason in records[name]["reason"], records[name]["reason"]
    if records["vs_accelerate"]["status"] == "skipped":
        assert "accelerate" in records["vs_accelerate"]["reason"]

    precision = records["train_step_precision"]["numbers"]
    assert list(precision["variants"]) == ["fp32", "bf16"]
    assert "needs CUDA" in precision["dropped_variants"]["fp16"]
    assert set(records["multi_gpu_check"]["numbers"]["checks"]) >= {"CUDA available", "DDP all-reduce", "model step"}
    assert records["gpu_tests"]["numbers"]["skipped"] > 0
    assert records["gpu_tests"]["numbers"]["passed"] == 0

    defaults = {row["default"] for row in document["decisions"]["defaults"]}
    assert defaults >= {"mixed precision", "channels_last", "cudnn.benchmark", "torch.compile",
                        "DataParallel (2+ GPUs)", "DDP (2+ GPUs)"}
    markdown = (out / "gpu_suite.md").read_text()
    assert markdown.startswith("# GPU suite: no GPU")
    for name, record in records.items():
        assert f"| {name} | {record['status']} |" in markdown, name


@pytest.mark.slow
def test_only_reruns_an_item_and_keeps_the_others(suite) -> None:
    done, out = suite
    before = {r["name"]: r for r in json.loads((out / "gpu_suite.json").read_text())["items"]}
    rerun = run_suite("--out", str(out), "--only", "moe_dispatch")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = {r["name"]: r for r in json.loads((out / "gpu_suite.json").read_text())["items"]}
    assert list(after) == list(before)
    assert after["moe_dispatch"]["status"] == "ok"
    assert after["moe_dispatch"]["run_at"] >= before["moe_dispatch"]["run_at"]
    assert after["moe_dispatch"] != before["moe_dispatch"]  # measured again (its timings), not the old record kept
    for name in set(before) - {"moe_dispatch"}:
        assert after[name] == before[name], name


def test_items_that_time_out_are_recorded_and_the_suite_goes_on(tmp_path: Path) -> None:
    done = run_suite("--out", str(tmp_path), "--only", "overhead,moe_dispatch", "--limit-scale", "0.02")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    records = {r["name"]: r for r in json.loads((tmp_path / "gpu_suite.json").read_text())["items"]}
    for name in ("overhead", "moe_dispatch"):
        assert records[name]["status"] == "timeout", records[name]
        assert "ran past its limit of" in records[name]["reason"]
        assert records[name]["seconds"] < 30
    assert {r["status"] for n, r in records.items() if n not in ("overhead", "moe_dispatch")} == {"not_run"}
    assert "## Failed or timed out" in (tmp_path / "gpu_suite.md").read_text()
