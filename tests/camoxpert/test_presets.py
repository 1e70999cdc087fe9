"""Hardware presets on simulated machines, overrides, and the train_ultimate.py arguments they produce."""
from __future__ import annotations

import pytest

from autoparallel import Hardware, detect_runtime
from camoxpert import presets
from camoxpert.cli import get_args_parser, validate_train_args


def plan_for(hardware: Hardware, *, processes: int = 1, env: dict | None = None, cpu_count: int = 4):
    rt = detect_runtime(env={}, hardware=hardware)
    return presets.build_plan(rt, processes=processes, overrides=presets.overrides_from_env(env or {}),
                              cpu_count=cpu_count)


def values(plan: presets.Plan) -> dict:
    return {key: setting.value for key, setting in plan.settings.items()}


def gpus(spec: str) -> Hardware:
    return presets.parse_simulated(spec)


def test_two_t4_under_dataparallel():
    plan = plan_for(gpus("2xT4"))
    assert (plan.preset, plan.replicas, plan.processes) == ("2xT4", 2, 1)
    assert values(plan) == {"per_gpu_batch": 8, "batch_size": 16, "stage2_batch_size": 12, "accumulation_steps": 1,
                            "effective_batch": 16, "img_size": 320, "precision": "fp16", "num_workers": 4,
                            "epochs": 140, "stage1_epochs": 30, "warmup_epochs": 10}
    assert plan.hardware == "2 x Tesla T4 (14.7 GiB each)"
    assert "no native bf16" in plan.settings["precision"].reason


def test_two_t4_under_ddp_splits_the_workers():
    plan = plan_for(gpus("2xT4"), processes=2)
    assert (plan.processes, plan.value("num_workers"), plan.value("batch_size")) == (2, 2, 16)


def test_one_t4_accumulates_to_the_same_effective_batch():
    plan = plan_for(gpus("1xT4"))
    assert plan.preset == "1xT4"
    assert [plan.value(k) for k in ("batch_size", "accumulation_steps", "effective_batch", "precision")] == [
        8, 2, 16, "fp16"]


def test_two_p100():
    plan = plan_for(gpus("2xP100"))
    assert plan.preset == "2xP100"
    assert [plan.value(k) for k in ("per_gpu_batch", "batch_size", "precision")] == [8, 16, "fp16"]


@pytest.mark.parametrize("spec", ["1xA100", "1xL4", "1xH100"])
def test_one_large_gpu_uses_bf16_without_accumulation(spec):
    plan = plan_for(gpus(spec))
    assert plan.preset == "1xGPU>=24GB"
    assert [plan.value(k) for k in ("batch_size", "accumulation_steps", "precision")] == [16, 1, "bf16"]
    assert "native bf16" in plan.settings["precision"].reason


def test_generic_gpus():
    four = plan_for(gpus("4xA100"))
    assert (four.preset, four.value("per_gpu_batch"), four.value("batch_size"), four.value("stage2_batch_size"),
            four.value("accumulation_steps")) == ("4xGPU", 16, 64, 48, 1)
    small = plan_for(Hardware.uniform(1, "NVIDIA GeForce GTX 1080", 7.9, (6, 1)))
    assert (small.preset, small.value("batch_size"), small.value("accumulation_steps")) == ("1xGPU", 4, 4)


def test_cpu():
    plan = plan_for(Hardware(), cpu_count=2)
    assert plan.preset == "CPU"
    assert [plan.value(k) for k in ("batch_size", "accumulation_steps", "precision", "num_workers")] == [
        4, 4, "fp32", 1]
    assert plan.hardware == "CPU only"


def test_per_gpu_override_keeps_the_effective_batch():
    plan = plan_for(gpus("2xT4"), env={"TRAIN_BATCH_SIZE": "4"})
    assert [plan.value(k) for k in ("per_gpu_batch", "batch_size", "stage2_batch_size", "accumulation_steps")] == [
        4, 8, 6, 2]
    assert plan.settings["per_gpu_batch"].reason == "TRAIN_BATCH_SIZE=4 (environment)"


def test_environment_overrides_and_aliases():
    env = {"GLOBAL_BATCH_SIZE": "6", "GRADIENT_ACCUMULATION": "3", "RESOLUTION": "288", "EPOCHS": "28",
           "NUM_WORKERS": "0", "MIXED_PRECISION": "no"}
    plan = plan_for(gpus("2xT4"), env=env)
    assert values(plan) == {"batch_size": 6, "per_gpu_batch": 3, "stage2_batch_size": 4, "accumulation_steps": 3,
                            "effective_batch": 18, "img_size": 288, "precision": "fp32", "num_workers": 0,
                            "epochs": 28, "stage1_epochs": 6, "warmup_epochs": 2}
    assert plan.settings["img_size"].reason == "RESOLUTION=288 (environment)"


def test_uneven_global_batch_under_dataparallel_is_shown_as_a_range():
    plan = plan_for(gpus("2xT4"), env={"GLOBAL_BATCH_SIZE": "5"})
    assert plan.value("per_gpu_batch") == "2-3"


def test_ddp_refuses_a_batch_it_cannot_split():
    with pytest.raises(ValueError, match="global batch 5 does not split evenly over 2 DDP processes"):
        plan_for(gpus("2xT4"), processes=2, env={"GLOBAL_BATCH_SIZE": "5"})


@pytest.mark.parametrize(("env", "message"), [
    ({"TRAIN_BATCH_SIZE": "eight"}, "TRAIN_BATCH_SIZE='eight' is not an integer"),
    ({"IMG_SIZE": "0"}, "IMG_SIZE=0 is too small"),
    ({"MIXED_PRECISION": "fp8"}, "MIXED_PRECISION='fp8' is not a precision"),
    ({"TRAIN_BATCH_SIZE": "4", "GLOBAL_BATCH_SIZE": "8"}, "both GLOBAL_BATCH_SIZE and TRAIN_BATCH_SIZE"),
])
def test_invalid_environment_values_are_named(env, message):
    with pytest.raises(ValueError, match=message):
        presets.overrides_from_env(env)


def test_simulated_machines():
    assert presets.parse_simulated("2xT4") == Hardware.uniform(2, "Tesla T4", 14.74, (7, 5))
    assert presets.parse_simulated("cpu") == Hardware()
    with pytest.raises(ValueError, match="--simulate '2xK80' is not a machine"):
        presets.parse_simulated("2xK80")


def test_table_lists_every_value_with_its_reason():
    text = presets.format_plan(plan_for(gpus("2xT4"), processes=2))
    lines = text.splitlines()
    assert lines[0] == "Preset 2xT4: 2 x Tesla T4 (14.7 GiB each), 2 processes"
    assert lines[2].split()[:3] == ["global", "batch", "16"]
    assert len(lines) == 2 + len(presets.ROW_LABELS)


def test_train_arguments_are_valid_train_ultimate_flags():
    plan = plan_for(gpus("2xT4"), processes=2)
    argv = presets.train_arguments(plan, dataset_path="/data/COD10K-v3", checkpoint_dir="/ckpt", strategy="ddp",
                                   resume_from="/ckpt/last.pt")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    validate_train_args(parser, args)
    assert (args.batch_size, args.stage2_batch_size, args.accumulation_steps, args.img_size, args.precision,
            args.num_workers, args.strategy, args.resume_from) == (16, 12, 1, 320, "fp16", 2, "ddp", "/ckpt/last.pt")
    assert (args.backbone, args.num_experts, args.epochs, args.stage1_epochs, args.lr, args.stage2_lr) == (
        "edgenext_base", 7, 140, 30, 6.5e-4, 1.5e-4)
    assert args.progressive_unfreeze
    assert args.deep_supervision


@pytest.mark.parametrize("config", [presets.DEMO, presets.DEMO_SMALL])
def test_demo_arguments_are_valid_train_ultimate_flags(config):
    argv = presets.demo_arguments(config, dataset_path="data/synthetic-cod", checkpoint_dir="ckpt", num_workers=0)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    validate_train_args(parser, args)
    assert (args.backbone, args.pretrained, args.img_size, args.epochs, args.batch_size) == (
        config.backbone, config.pretrained, config.img_size, config.epochs, config.batch_size)
