"""The items of bench/gpu_suite.py: for each, the command for this machine (or why it is skipped), its time
limits, how its numbers are read and how its exit is judged.

Limits are seconds on one H100/H200 at full size (`limit_s`) and with --quick (`quick_limit_s`); they are
estimates until a GPU has run the suite, and they add up to at most the suite's 8-minute budget on one GPU.
The order puts the checks first and torch.compile, the longest and least predictable item, last.
"""
from __future__ import annotations

import json
import statistics
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import util
from pathlib import Path
from typing import Any, Callable

CPU_FULL_LIMIT_FACTOR = 4  # --device cpu without --quick runs each benchmark's own (slower) CPU sizes


@dataclass(frozen=True)
class Context:
    """Where the suite runs: the device asked for, the size, and the machine probe's answer."""

    device: str
    quick: bool
    machine: dict
    items_dir: Path
    python: str

    @property
    def gpus(self) -> list[dict]:
        return list(self.machine.get("gpus") or []) if self.device == "cuda" else []

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def capability(self) -> tuple[int, int] | None:
        return tuple(self.gpus[0]["capability"]) if self.gpus else None  # type: ignore[return-value]

    @property
    def amp(self) -> str | None:
        """The mixed precision autoparallel picks here: bf16 from compute capability 8.0, fp16 below, none on a CPU."""
        if self.capability is None:
            return None
        return "bf16" if self.capability >= (8, 0) else "fp16"

    def result(self, name: str, suffix: str = ".json") -> Path:
        return self.items_dir / f"{name}{suffix}"


@dataclass(frozen=True)
class Planned:
    """An item's command on this machine, or the reason it cannot run here."""

    argv: list[str] = field(default_factory=list)
    skip: str | None = None
    needs: tuple[str, ...] = ()
    notes: dict = field(default_factory=dict)


def judge_exit_code(returncode: int, numbers: dict, output: str) -> dict:
    if returncode == 0 and "parse_error" not in numbers:
        return {"status": "ok", "reason": ""}
    if returncode == 0:
        return {"status": "failed", "reason": f"exited 0 but its result could not be read: {numbers['parse_error']}"}
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return {"status": "failed", "reason": f"exit code {returncode}: {lines[-1][:400] if lines else '(no output)'}"}


@dataclass(frozen=True)
class Item:
    name: str
    what: str
    limit_s: float
    quick_limit_s: float
    plan: Callable[[Context], Planned]
    parse: Callable[[Context, str], dict]
    judge: Callable[[int, dict, str], dict] = judge_exit_code
    needs: tuple[str, ...] = ()

    def limit(self, ctx: Context) -> float:
        if ctx.quick:
            return self.quick_limit_s
        return self.limit_s if ctx.device == "cuda" else self.limit_s * CPU_FULL_LIMIT_FACTOR


def quantiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if len(ordered) == 1:
        return {"median": ordered[0], "p25": ordered[0], "p75": ordered[0]}
    p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "p25": p25, "p75": p75}


def paired_speedup(samples: dict[str, list[float]], baseline: str, variant: str) -> dict[str, float] | None:
    """baseline time / variant time, per interleaved round, summarised (above 1: the variant is faster)."""
    if baseline not in samples or variant not in samples:
        return None
    return quantiles([base / other for base, other in zip(samples[baseline], samples[variant])])


def bench(ctx: Context, script: str, *args: str) -> list[str]:
    return [ctx.python, f"bench/{script}", *args]


def has(module: str) -> bool:
    return util.find_spec(module) is not None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} was not written")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- test_multi_gpu.py


def plan_multi_gpu(ctx: Context) -> Planned:
    argv = [ctx.python, "test_multi_gpu.py", "--json"]
    notes = {}
    if ctx.device == "cpu":
        argv.append("--allow-cpu")
    if has("timm"):
        argv += ["--model", "camoxpert"]
        if ctx.quick or ctx.device == "cpu":
            argv += ["--model-backbone", "edgenext_xx_small"]
    else:
        notes["model_step"] = "not run: needs timm"
    if ctx.gpu_count >= 2:
        argv.append("--bandwidth")
    return Planned(argv, notes=notes)


def parse_multi_gpu(ctx: Context, output: str) -> dict:
    lines = output.splitlines()
    start = lines.index("{")
    end = len(lines) - 1 - lines[::-1].index("}")
    report = json.loads("\n".join(lines[start:end + 1]))
    environment = report["environment"]
    return {"checks": {check["name"]: {key: check[key] for key in ("status", "reason", "seconds")}
                       for check in report["checks"]},
            "exit_code": report["exit_code"],
            "environment": {key: environment.get(key) for key in ("cudnn", "nccl", "runtime", "launch", "gpus")}}


def judge_multi_gpu(returncode: int, numbers: dict, output: str) -> dict:
    failed = [f"{name}: {check['reason']}" for name, check in numbers.get("checks", {}).items()
              if check["status"] == "FAIL"]
    if returncode == 0 and "checks" in numbers:
        return {"status": "ok", "reason": ""}
    if returncode == 2:
        return {"status": "failed", "reason": "test_multi_gpu.py found no GPU (exit code 2)"}
    if failed:
        return {"status": "failed", "reason": "; ".join(failed)[:600]}
    return judge_exit_code(returncode, numbers, output)


# ----------------------------------------------------------------------------- pytest -m gpu


def plan_gpu_tests(ctx: Context) -> Planned:
    return Planned([ctx.python, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                    f"--junitxml={ctx.result('gpu_tests', '.xml')}"])


def parse_gpu_tests(ctx: Context, output: str) -> dict:
    tests: dict[str, dict[str, Any]] = {}
    for case in ET.parse(ctx.result("gpu_tests", ".xml")).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        entry: dict[str, Any] = {"seconds": round(float(case.get("time") or 0), 2)}
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            entry.update(outcome="failed", reason=(problem.get("message") or "")[:300])
        elif skipped is not None:
            entry.update(outcome="skipped", reason=(skipped.get("message") or "")[:300])
        else:
            entry["outcome"] = "passed"
        tests[test_id] = entry
    counts = {outcome: sum(entry["outcome"] == outcome for entry in tests.values())
              for outcome in ("passed", "failed", "skipped")}
    return {**counts, "tests": tests}


def judge_gpu_tests(returncode: int, numbers: dict, output: str) -> dict:
    tests = numbers.get("tests", {})
    if returncode == 0 and numbers.get("passed", 0) == 0 and numbers.get("skipped", 0) > 0:
        reasons = sorted({entry["reason"] for entry in tests.values() if entry["outcome"] == "skipped"})
        return {"status": "skipped", "reason": f"all {numbers['skipped']} tests skipped: {' / '.join(reasons)}"}
    if returncode == 0 and numbers.get("passed", 0) > 0:
        return {"status": "ok", "reason": ""}
    if returncode == 5:
        return {"status": "failed", "reason": "pytest collected no test marked gpu under tests/gpu"}
    failed = [name for name, entry in tests.items() if entry["outcome"] == "failed"]
    if failed:
        return {"status": "failed", "reason": f"{len(failed)} failed: {', '.join(failed)}"[:600]}
    return judge_exit_code(returncode, numbers, output)


# ----------------------------------------------------------------------------- bench/train_step.py


def variant_unavailable(variant: str, ctx: Context) -> str | None:
    """Why a train_step variant cannot run on this machine, or None."""
    precision, *options = variant.split("+")
    if ctx.device == "cpu":
        if precision == "fp16":
            return "fp16 autocast with a GradScaler needs CUDA"
        if "cudnn" in options:
            return "cudnn.benchmark chooses cuDNN convolution algorithms: nothing to measure on a CPU"
        if "compile" in options:
            return "torch.compile on a CPU takes minutes (an Inductor C++ build per graph): measured on a GPU only"
        if "dp" in options:
            return "DataParallel needs 2 or more GPUs"
        return None
    if precision == "bf16" and ctx.capability is not None and ctx.capability < (8, 0):
        major, minor = ctx.capability
        return f"bf16 needs compute capability 8.0 or newer; {ctx.gpus[0]['name']} has {major}.{minor}"
    if "dp" in options and ctx.gpu_count < 2:
        return f"DataParallel needs 2 or more GPUs; this machine has {ctx.gpu_count}"
    return None


def train_step_item(name: str, what: str, template: Sequence[str], limit_s: float, quick_limit_s: float,
                    full_args: Sequence[str] = ()) -> Item:
    """An item running bench/train_step.py on `template`'s variants, where 'amp' is this GPU's mixed precision."""

    def plan(ctx: Context) -> Planned:
        dropped: dict[str, str] = {}
        kept: list[str] = []
        for variant in template:
            # On a CPU 'amp' stands for bf16, the only autocast there, to name what else rules a variant out.
            concrete = variant.replace("amp", ctx.amp or "bf16", 1) if variant.startswith("amp") else variant
            reason = variant_unavailable(concrete, ctx)
            if reason is None and variant.startswith("amp") and ctx.amp is None:
                reason = "a CPU trains in fp32 (bf16 autocast is 12x slower there, docs/benchmarks.md section 4)"
            if reason:
                dropped[concrete] = reason
            elif concrete not in kept:
                kept.append(concrete)
        notes = {"dropped_variants": dropped} if dropped else {}
        if len(kept) < 2:
            # the reasons of the variants the item is about (those with options) say why it cannot run
            reasons = [why for name, why in dropped.items() if "+" in name] or list(dropped.values())
            return Planned(skip="; ".join(dict.fromkeys(reasons)) or "nothing to compare", notes=notes)
        args = ["--device", ctx.device, "--variants", ",".join(kept), "--out", str(ctx.result(name))]
        if ctx.quick and ctx.device == "cuda":
            args += ["--backbone", "edgenext_xx_small", "--img-size", "64", "--batch-size", "4",
                     "--steps-per-block", "3", "--rounds", "2", "--warmup", "1"]
        elif ctx.quick:
            args += ["--backbone", "edgenext_xx_small", "--img-size", "32", "--batch-size", "2",
                     "--steps-per-block", "1", "--rounds", "2", "--warmup", "1", "--no-memory-probe"]
        elif ctx.device == "cuda":
            args += list(full_args)
        return Planned(bench(ctx, "train_step.py", *args), needs=("timm",), notes=notes)

    return Item(name, what, limit_s, quick_limit_s, plan, lambda ctx, output: parse_train_step(ctx.result(name)))


def parse_train_step(path: Path) -> dict:
    result = read_json(path)
    args, samples = result["args"], result["samples_s"]
    names = list(samples)
    variants = {}
    for name in names:
        per_step = result["per_step_s"][name]
        memory = result.get("memory", {}).get(name, {})
        speedup = result["speedup_vs_first"][name]
        variants[name] = {"ms": round(per_step["median"] * 1e3, 2),
                          "ms_iqr": [round(per_step["p25"] * 1e3, 2), round(per_step["p75"] * 1e3, 2)],
                          "images_per_s": round(result["images_per_s"][name], 2),
                          "speedup": round(speedup["median"], 3),
                          "speedup_iqr": [round(speedup["p25"], 3), round(speedup["p75"], 3)],
                          "peak_mib": round(memory.get("peak_allocated_mib") or memory.get("peak_rss_mib") or 0)}
    return {"model": f"{args['backbone']}, {args['img_size']} px, batch {args['batch_size']}", "baseline": names[0],
            "variants": variants, "samples_s": samples}


# ----------------------------------------------------------------------------- the other benchmarks


def plan_overhead(ctx: Context) -> Planned:
    args = ["--device", ctx.device, "--precision", ctx.amp or "fp32", "--out", str(ctx.result("overhead"))]
    if ctx.quick:
        args += ["--width", "8", "--image-size", "8", "--batch-size", "2", "--steps-per-block", "5", "--rounds", "3",
                 "--warmup", "1"]
    elif has("timm"):
        args.append("--ema-camoxpert")
    return Planned(bench(ctx, "overhead.py", *args))


def parse_ratio_bench(path_name: str) -> Callable[[Context, str], dict]:
    def parse(ctx: Context, output: str) -> dict:
        result = read_json(ctx.result(path_name))
        numbers = {"ratios": {name: {key: round(value, 4) for key, value in q.items()}
                              for name, q in result["ratios"].items()},
                   "ms_per_step": {name: round(q["median"] * 1e3, 3) for name, q in result["per_step_s"].items()},
                   "precision": result["args"]["precision"]}
        if "ema_update" in result:
            numbers["ema_update"] = {model: {"tensors": row["tensors"],
                                             "us": {name: round(us, 1) for name, us in row["us_per_update"].items()},
                                             "ratio": round(row["ratio"]["median"], 3)}
                                     for model, row in result["ema_update"].items()}
        return numbers

    return parse


def plan_vs_accelerate(ctx: Context) -> Planned:
    args = ["--device", ctx.device, "--precision", ctx.amp or "fp32", "--out", str(ctx.result("vs_accelerate"))]
    if ctx.quick:
        args += ["--width", "8", "--image-size", "8", "--batch-size", "2", "--steps-per-block", "5", "--rounds", "3",
                 "--warmup", "1"]
    return Planned(bench(ctx, "vs_accelerate.py", *args), needs=("accelerate",))


def plan_data_pipeline(ctx: Context) -> Planned:
    args = ["--json", str(ctx.result("data_pipeline"))]
    if ctx.quick:
        args += ["--img-size", "64", "--source-size", "96", "--num-images", "8", "--passes", "1"]
    else:
        args += ["--img-size", "320", "--num-images", "60"]
    return Planned(bench(ctx, "data_pipeline.py", *args), needs=("torchvision", "PIL"))


def parse_data_pipeline(ctx: Context, output: str) -> dict:
    result = read_json(ctx.result("data_pipeline"))
    return {"img_size": result["img_size"], "num_images": result["num_images"],
            "images_per_s_per_core": {name: round(rate, 1)
                                      for name, rate in result["images_per_second_per_core"].items()}}


def plan_moe(ctx: Context) -> Planned:
    args = ["--device", ctx.device, "--out", str(ctx.result("moe_dispatch"))]
    if ctx.quick:
        args += ["--channels", "16", "--size", "16", "--batch-size", "4", "--steps-per-block", "1", "--rounds", "2",
                 "--warmup", "1"]
    elif ctx.device == "cuda":
        args += ["--batch-size", "32", "--size", "80"]
    return Planned(bench(ctx, "moe_dispatch.py", *args))


def parse_moe(ctx: Context, output: str) -> dict:
    result = read_json(ctx.result("moe_dispatch"))
    config_keys = ("channels", "size", "batch_size", "num_experts", "top_k")
    return {"config": {key: result["config"][key] for key in config_keys},
            "variants": {name: {"ms": round(row["seconds_per_step"]["median"] * 1e3, 2),
                                "images_per_s": round(row["images_per_s"], 1),
                                "speedup_vs_loop": round(row["speedup_vs_loop"]["median"], 3)}
                         for name, row in result["results"].items()}}


def plan_ddp(ctx: Context) -> Planned:
    if ctx.gpu_count < 2:
        where = "this is a CPU run" if ctx.device == "cpu" else f"this machine has {ctx.gpu_count}"
        return Planned(skip=f"DDP over GPUs needs 2 or more GPUs and {where} (the CPU's gloo row is "
                            "`python bench/ddp_scaling.py`, docs/benchmarks.md section 3)")
    args = ["--device", "cuda", "--out", str(ctx.result("ddp_scaling_cuda"))]
    if ctx.quick:
        args += ["--steps", "5", "--warmup", "1", "--rounds", "1", "--check-steps", "2"]
    return Planned(bench(ctx, "ddp_scaling.py", *args), needs=("numpy",))


def parse_ddp(ctx: Context, output: str) -> dict:
    result = read_json(ctx.result("ddp_scaling_cuda"))
    return {"ratio_ddp_over_single": {key: round(value, 3) for key, value in result["ratio_ddp_over_single"].items()},
            "samples_per_s": {kind: round(q["median"], 1) for kind, q in result["samples_per_s"].items()},
            "equivalence": result["equivalence"], "equivalent": result["equivalent"]}


def judge_ddp(returncode: int, numbers: dict, output: str) -> dict:
    if returncode == 1 and numbers.get("equivalent") is False:
        return {"status": "failed", "reason": f"1-GPU and DDP parameters differ after the same steps "
                                              f"(max abs {numbers['equivalence']['max_abs_diff']:.2e})"}
    return judge_exit_code(returncode, numbers, output)


PLAN: tuple[Item, ...] = (
    Item("multi_gpu_check", "python test_multi_gpu.py: versions, GPUs, DataParallel fwd+bwd, DDP all-reduce, "
         "one CamoXpert step", 35, 40, plan_multi_gpu, parse_multi_gpu, judge_multi_gpu),
    Item("gpu_tests", "pytest -m gpu tests/gpu: fp16 + GradScaler with an overflow step, bf16, banner, DDP as 2 gloo "
         "processes on one GPU, checkpoints and EMA across devices, CamoXpert steps, channels_last / cudnn.benchmark",
         75, 60, plan_gpu_tests, parse_gpu_tests, judge_gpu_tests, needs=("pytest",)),
    train_step_item("train_step_precision", "CamoXpert train step: fp32 vs fp16 (+GradScaler) vs bf16",
                    ("fp32", "fp16", "bf16"), 45, 30),
    train_step_item("train_step_channels_last", "CamoXpert train step: channels_last, at fp32 and the GPU's "
                    "mixed precision", ("fp32", "fp32+cl", "amp", "amp+cl"), 40, 30),
    train_step_item("train_step_cudnn_benchmark", "CamoXpert train step: cudnn.benchmark on vs off, interleaved",
                    ("fp32", "fp32+cudnn", "amp", "amp+cudnn"), 40, 30),
    Item("overhead", "autoparallel (wrap + GradientAccumulator + autocast, EMA) vs the same bare PyTorch loop",
         30, 20, plan_overhead, parse_ratio_bench("overhead")),
    Item("vs_accelerate", "autoparallel vs Hugging Face Accelerate on the same loop", 20, 25, plan_vs_accelerate,
         parse_ratio_bench("vs_accelerate")),
    Item("data_pipeline", "training images/s one CPU core delivers, cached and not (the GPU's consumption is "
         "train_step_precision's)", 40, 20, plan_data_pipeline, parse_data_pipeline),
    Item("moe_dispatch", "MoE block: dense and gather dispatch vs the per-image loop", 30, 20, plan_moe, parse_moe),
    train_step_item("train_step_dataparallel", "CamoXpert train step: 1 GPU vs DataParallel over every GPU, "
                    "same global batch", ("amp", "amp+dp"), 45, 40, full_args=("--batch-size", "16")),
    Item("ddp_scaling_cuda", "1 GPU vs DDP over 2 GPUs (nccl), ConvNet, with mode equivalence", 60, 60, plan_ddp,
         parse_ddp, judge_ddp),
    train_step_item("train_step_compile", "CamoXpert train step: torch.compile at the GPU's mixed precision",
                    ("fp32", "amp", "amp+compile"), 120, 90),
)
