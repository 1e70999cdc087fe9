"""The report of bench/gpu_suite.py: the rows that decide the GPU defaults, and the markdown table.

Every speed-up here is a ratio measured in one run of one benchmark, paired per interleaved round (the
baseline's step time over the variant's, median and interquartile range), never a ratio of two runs.
"""
from __future__ import annotations

import math
from typing import Any

from _gpu_suite_plan import paired_speedup
from _machine import describe_gpus


def _items(document: dict) -> dict[str, dict]:
    return {record["name"]: record for record in document.get("items", [])}


def _fmt(q: dict[str, float] | None, suffix: str = "x") -> str:
    if not q:
        return "-"
    return f"{q['median']:.3f}{suffix} ({q['p25']:.3f}-{q['p75']:.3f})"


def _not_measured(record: dict | None) -> str:
    if record is None:
        return "not measured: not in this run"
    return f"not measured: {record['status']}" + (f" ({record['reason']})" if record.get("reason") else "")


OPTION_NAMES = {"cl": "channels_last", "cudnn": "cudnn.benchmark", "compile": "torch.compile",
                "dp": "DataParallel (2+ GPUs)"}
TRAIN_STEP_ITEMS = {"precision": "train_step_precision", "cl": "train_step_channels_last",
                    "cudnn": "train_step_cudnn_benchmark", "compile": "train_step_compile",
                    "dp": "train_step_dataparallel"}


def _train_step_rows(items: dict[str, dict], option: str) -> list[dict]:
    """One row per variant with `option` (or per mixed precision): its speed-up over the same precision without
    the option and over fp32, both from the item's own interleaved run."""
    name = TRAIN_STEP_ITEMS[option]
    default = "mixed precision" if option == "precision" else OPTION_NAMES[option]
    record = items.get(name)
    if record is None or record["status"] != "ok":
        return [{"default": default, "variant": "-", "model": "-", "vs_plain": _not_measured(record), "vs_fp32": "-",
                 "item": name}]
    numbers = record["numbers"]
    samples = numbers["samples_s"]
    rows = []
    for variant in samples:
        precision, *options = variant.split("+")
        if option == "precision" and (options or variant == numbers["baseline"]):
            continue
        if option != "precision" and option not in options:
            continue
        plain = "+".join([precision, *(o for o in options if o != option)])
        rows.append({"default": default, "variant": variant, "model": numbers["model"],
                     "vs_plain": _fmt(paired_speedup(samples, plain, variant)) if plain != variant else "-",
                     "vs_fp32": _fmt(paired_speedup(samples, "fp32", variant)) if "fp32" in samples else "-",
                     "item": name})
    return rows


def _ddp_row(items: dict[str, dict]) -> dict:
    record = items.get("ddp_scaling_cuda")
    value = _not_measured(record)
    if record is not None and record["status"] == "ok":
        ratio = record["numbers"]["ratio_ddp_over_single"]
        value = f"{ratio['median']:.3f}x throughput ({ratio['min']:.3f}-{ratio['max']:.3f})"
    return {"default": "DDP (2+ GPUs)", "variant": "DDP on 2 GPUs vs 1 GPU", "model": "ConvNet (bench/_common.py)",
            "vs_plain": value, "vs_fp32": "-", "item": "ddp_scaling_cuda"}


def _library_rows(items: dict[str, dict], machine: dict) -> list[dict]:
    rows: list[dict] = []
    for name, pairs in (("overhead", ("autoparallel / bare", "ap+ema / bare+ema")),
                        ("vs_accelerate", ("autoparallel / accelerate", "accelerate / bare"))):
        record = items.get(name)
        if record is None or record["status"] != "ok":
            rows.append({"measure": f"{name} (time ratio)", "value": _not_measured(record), "item": name})
            continue
        numbers = record["numbers"]
        for pair in pairs:
            target = " (target <= 1.01)" if pair.endswith(("/ bare", "/ bare+ema")) else ""
            rows.append({"measure": f"{pair}, step time at {numbers['precision']}{target}",
                         "value": _fmt(numbers["ratios"].get(pair), ""), "item": name})
        for model, ema in numbers.get("ema_update", {}).items():
            rows.append({"measure": f"EMA update alone, {model} ({ema['tensors']} tensors): ap.EMA / hand foreach",
                         "value": f"{ema['ratio']:.2f} ({ema['us']['ap.EMA']:.0f} vs {ema['us']['hand EMA']:.0f} us)",
                         "item": name})
    rows.append(_pipeline_row(items, machine))
    record = items.get("moe_dispatch")
    if record is None or record["status"] != "ok":
        rows.append({"measure": "MoE dispatch vs the per-image loop", "value": _not_measured(record),
                     "item": "moe_dispatch"})
    else:
        variants = record["numbers"]["variants"]
        rows.append({"measure": "MoE dispatch, speed-up vs the per-image loop",
                     "value": ", ".join(f"{name} {row['speedup_vs_loop']:.2f}x" for name, row in variants.items()
                                        if name != "loop"), "item": "moe_dispatch"})
    return rows


def _pipeline_row(items: dict[str, dict], machine: dict) -> dict:
    """Cores of loading the GPU needs: images/s the GPU trains (the mixed-precision step) over one core's rate."""
    measure = "data loading: CPU cores needed to feed one GPU (cached pipeline)"
    pipeline, step = items.get("data_pipeline"), items.get("train_step_precision")
    if pipeline is None or pipeline["status"] != "ok":
        return {"measure": measure, "value": _not_measured(pipeline), "item": "data_pipeline"}
    if step is None or step["status"] != "ok":
        return {"measure": measure, "value": _not_measured(step), "item": "train_step_precision"}
    rates = pipeline["numbers"]["images_per_s_per_core"]
    cached = next((rate for name, rate in rates.items() if name.startswith("train, cached (")), None)
    uncached = next((rate for name, rate in rates.items() if name.startswith("train, no cache")), None)
    variants = step["numbers"]["variants"]
    fastest = max(variants, key=lambda name: variants[name]["images_per_s"])
    consumed = variants[fastest]["images_per_s"]
    cores = machine.get("cpu_affinity") or machine.get("cpu_count")
    if not cached:
        return {"measure": measure, "value": "not measured: no cached training rate", "item": "data_pipeline"}
    value = (f"{math.ceil(consumed / cached)} core(s): the GPU trains {consumed:.0f} img/s ({fastest}, "
             f"{step['numbers']['model']}), a core serves {cached:.0f} cached"
             + (f" / {uncached:.0f} uncached" if uncached else "") + f" at {pipeline['numbers']['img_size']} px; "
             f"this machine has {cores}")
    return {"measure": measure, "value": value, "item": "data_pipeline + train_step_precision"}


def decision_rows(document: dict) -> dict[str, list[dict]]:
    """The rows from which the app's GPU defaults are decided (filled with 'not measured: why' when an item is
    missing, so every row is always there)."""
    items = _items(document)
    options = ("precision", "cl", "cudnn", "compile", "dp")
    defaults = [row for option in options for row in _train_step_rows(items, option)]
    defaults.append(_ddp_row(items))
    return {"defaults": defaults, "library": _library_rows(items, document.get("machine", {}))}


# ----------------------------------------------------------------------------- markdown


def summarize(record: dict) -> str:
    """One cell: the item's headline numbers."""
    numbers: dict[str, Any] = record.get("numbers") or {}
    name = record["name"]
    if record["status"] not in ("ok", "failed"):
        return record.get("reason", "")
    if name == "multi_gpu_check" and "checks" in numbers:
        statuses = [check["status"] for check in numbers["checks"].values()]
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in ("PASS", "FAIL", "SKIP") if s in statuses)
        return f"{len(statuses)} checks: {counts}"
    if name == "gpu_tests" and "tests" in numbers:
        return f"{numbers['passed']} passed, {numbers['failed']} failed, {numbers['skipped']} skipped"
    if "variants" in numbers and "samples_s" in numbers:
        cells = [f"{variant} {row['ms']:.1f} ms"
                 + (f" ({row['speedup']:.2f}x)" if variant != numbers["baseline"] else "")
                 for variant, row in numbers["variants"].items()]
        return f"{numbers['model']}: " + ", ".join(cells)
    if "ratios" in numbers:
        return ", ".join(f"{pair} {q['median']:.3f}" for pair, q in numbers["ratios"].items())
    if "images_per_s_per_core" in numbers:
        rates = numbers["images_per_s_per_core"]
        return ", ".join(f"{label.split(' (')[0]} {rate:.0f}" for label, rate in rates.items()) + " img/s per core"
    if name == "moe_dispatch" and "variants" in numbers:
        return ", ".join(f"{variant} {row['ms']:.1f} ms" for variant, row in numbers["variants"].items())
    if "ratio_ddp_over_single" in numbers:
        return (f"DDP/single {numbers['ratio_ddp_over_single']['median']:.3f}, parameters equal to "
                f"{numbers['equivalence']['max_abs_diff']:.1e}")
    return record.get("reason", "")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell).replace("|", "/").replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(document: dict) -> str:
    machine = document.get("machine", {})
    where = describe_gpus(machine)
    packages = ", ".join(f"{name} {version}" for name, version in machine.get("packages", {}).items() if version)
    missing = ", ".join(name for name, version in machine.get("packages", {}).items() if not version)
    lines = [f"# GPU suite: {where}", "",
             f"`{document['command']}`, {document.get('started', '')}, {document.get('wall_s', 0):.0f} s"
             + (f" of a {document['budget_s']:.0f} s budget" if document.get("budget_s") else "")
             + f"; torch {machine.get('torch')}, Python {machine.get('python')}, {machine.get('cpu')} "
             f"({machine.get('cpu_affinity') or machine.get('cpu_count')} cores), git {machine.get('git_commit')}.",
             "", f"Packages: {packages}" + (f"; not installed: {missing}" if missing else "") + ".", ""]
    records = document.get("items", [])
    lines.append(_table(["item", "status", "seconds (limit)", "result"],
                        [[r["name"], r["status"], f"{r.get('seconds', 0):.1f} ({r.get('limit_s', 0):.0f})",
                          summarize(r)] for r in records]))
    decisions = document.get("decisions") or decision_rows(document)
    lines += ["", "## Rows for the GPU defaults", "",
              "Speed-up of the variant (above 1: faster): per interleaved round, the other variant's step time over "
              "this one's, median (interquartile range), all within the one run of the item named.", "",
              _table(["default", "variant", "model", "vs the same without it", "vs fp32, same run", "item"],
                     [[r["default"], r["variant"], r["model"], r["vs_plain"], r["vs_fp32"], r["item"]]
                      for r in decisions["defaults"]]),
              "", "## Library overhead and data pipeline", "",
              _table(["measure", "value", "item"],
                     [[r["measure"], r["value"], r["item"]] for r in decisions["library"]])]
    problems = [r for r in records if r["status"] in ("failed", "timeout")]
    if problems:
        lines += ["", "## Failed or timed out", ""]
        lines += [f"- `{r['name']}` ({r['status']}): {r.get('reason', '')}" for r in problems]
    return "\n".join(lines) + "\n"
