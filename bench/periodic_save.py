"""What periodic checkpoints (`--save-every N` steps, issue 13) cost: training with ap.save_checkpoint every
N steps against the same training without saves, and the time of one save, taken apart.

    python bench/periodic_save.py                       # ConvNet stand-in: every 1, 10, 100 steps, measured
    python bench/periodic_save.py --model camoxpert     # the CPU demo's model: every 1 and 10 steps, measured
    python bench/periodic_save.py --dir /kaggle/working/bench   # where the files go (the disk is part of it)

One training step is what the engine does with --use-ema: forward, loss, backward, AdamW step, LR schedule
step, ap.EMA update, on batches from `ap.loader` over an in-memory data set. A save is what the engine's
periodic save writes (`ap.save_checkpoint`: model, EMA, optimizer, scheduler, loader position, step, the
random states and a dict of arguments) into `last.pt` of a folder of its own, replaced each time: the
file is written to a temporary file, fsync'd, read back and its digest verified, then renamed over the
old one (autoparallel/checkpoint_file.py).

Three measurements, each interleaved (bench/_common.py::time_interleaved: blocks of every variant in
rotated order, ratios paired per round, median and IQR):

1. Training with saves: variants `no saves` and `every N` for each N of --every, blocks of
   --steps-per-block steps (a multiple of every N, so every block holds exactly block/N saves): the
   ratio every N / no saves is the measured cost. Two copies of `no saves` give the noise floor, and
   each ratio is also given against the second copy and against both (their geometric mean per round).
2. One save alone against one training step: the ratio r = save / step predicts every N's cost as
   1 + r / N, and the N at which it reaches 1% (N >= 100 r).
3. Where a save's time goes: --breakdown-saves more saves, with the library's functions wrapped in
   timers by this script (torch.save, fsync, torch.load, the digest): the library is not changed.

Each variant has its own copy of the model (same initial weights), optimizer, EMA, loader and folder.
On a shared machine the file system's cache and the disk are shared too: the JSON records the folder.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    RESULTS_DIR,
    add_common_args,
    describe_machine,
    format_ratio,
    loadavg,
    machine_info,
    markdown_table,
    paired_ratios,
    quantiles,
    synthetic_task,
    time_interleaved,
    wait_for_quiet,
    write_json,
)

import autoparallel as ap  # noqa: E402
from autoparallel import checkpoint_file  # noqa: E402

MODEL_DEFAULTS = {
    "convnet": dict(every="1,10,100", steps_per_block=100, rounds=6, batch_size=16, image_size=32, save_rounds=10),
    "camoxpert": dict(every="1,10", steps_per_block=10, rounds=4, batch_size=16, image_size=128, save_rounds=6),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_DEFAULTS), default="convnet",
                        help="convnet: a CPU-friendly stand-in (bench/_common.py::ConvNet, 0.37 M parameters); "
                             "camoxpert: the CPU demo's model (edgenext_xx_small, 7 experts, deep supervision, "
                             "2.5 M parameters) (default: convnet)")
    parser.add_argument("--backbone", default="edgenext_xx_small", help="camoxpert's backbone (default: the demo's)")
    parser.add_argument("--width", type=int, default=32, help="ConvNet width (default: 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16")
    parser.add_argument("--image-size", type=int, default=None, help="default: 32; camoxpert 128")
    parser.add_argument("--every", default=None, metavar="N,...",
                        help="save intervals in steps, measured directly (default: 1,10,100; camoxpert 1,10: a "
                             "block of 100 demo steps takes minutes here, so N=100 is predicted from the save "
                             "time instead)")
    parser.add_argument("--steps-per-block", type=int, default=None,
                        help="training steps per timed block, a multiple of every N (default: the least common "
                             "multiple of --every)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 6; camoxpert 4)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default: 3)")
    parser.add_argument("--save-rounds", type=int, default=None,
                        help="rounds of one save against one step, alone (default: 10; camoxpert 6)")
    parser.add_argument("--breakdown-saves", type=int, default=5,
                        help="saves timed phase by phase at the end (default: 5; 0 skips it)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder for the checkpoint files, removed afterwards (default: a temporary folder in "
                             "bench/results/, i.e. the repository's disk)")
    add_common_args(parser)
    return parser


def resolve_defaults(args: argparse.Namespace) -> list[int]:
    for name, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    every = [int(n) for n in args.every.split(",") if n.strip()]
    if not every or min(every) < 1:
        raise SystemExit(f"--every {args.every}: give positive step counts, e.g. 1,10,100")
    if args.steps_per_block is None:
        args.steps_per_block = math.lcm(*every)
    wrong = [n for n in every if args.steps_per_block % n]
    if wrong:
        raise SystemExit(f"--steps-per-block {args.steps_per_block} is not a multiple of {wrong}: every block must "
                         f"hold the same number of saves; pass e.g. --steps-per-block {math.lcm(*every)}")
    return every


class Trainer:
    """One variant's training state: model, optimizer, scheduler, EMA, loader; `step()` and `save()`."""

    def __init__(self, reference: torch.nn.Module, dataset: TensorDataset, loss_of, batch_size: int,
                 folder: Path, runtime) -> None:
        self.model = ap.wrap(copy.deepcopy(reference), runtime=runtime)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=1e-4)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=100_000)
        self.ema = ap.EMA(self.model, decay=0.999)
        self.loader = ap.loader(dataset, batch_size, train=True, num_workers=0, seed=0, runtime=runtime)
        self.loss_of, self.folder, self.steps, self.saves = loss_of, folder, 0, 0
        self.args = {"model": type(reference).__name__, "batch_size": batch_size, "lr": 1e-4, "use_ema": True,
                     "output_dir": str(folder)}
        self._stream = self._batches()

    def _batches(self):
        while True:
            yield from self.loader

    def step(self) -> None:
        images, target = next(self._stream)
        loss = self.loss_of(self.model(images), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update()
        self.steps += 1

    def save(self) -> Path:
        self.saves += 1
        return ap.save_checkpoint(self.folder / "last.pt", model=self.model, ema=self.ema, optimizer=self.optimizer,
                                  scheduler=self.scheduler, loader=self.loader, epoch=0, step=self.steps,
                                  args=self.args, best_metric=None)


class PhaseTimers:
    """Wraps torch.save, torch.load, os.fsync and the checkpoint digest in timers while active (this script's
    instrumentation: the library's code runs unchanged, through the wrapped names it looks up at call time)."""

    TARGETS = ((torch, "save", "torch.save (serialise + write)"), (torch, "load", "torch.load (read back)"),
               (os, "fsync", "fsync (file + folder)"), (checkpoint_file, "_digest", "digest (BLAKE2b)"))

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> PhaseTimers:
        for owner, name, label in self.TARGETS:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))

            def timed(*a, _original=original, _label=label, **k):
                start = time.perf_counter()
                try:
                    return _original(*a, **k)
                finally:
                    self.seconds[_label] += time.perf_counter() - start
                    self.calls[_label] += 1

            setattr(owner, name, timed)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def breakdown(trainer: Trainer, saves: int) -> dict:
    """Per save: total, each wrapped phase (ms and calls), and the rest (state dicts, plain data, rename)."""
    totals, phases = [], []
    for _ in range(saves):
        trainer.step()
        with PhaseTimers() as timers:
            start = time.perf_counter()
            trainer.save()
            totals.append(time.perf_counter() - start)
        phases.append((dict(timers.seconds), dict(timers.calls)))
    labels = [label for _, _, label in PhaseTimers.TARGETS]
    rows = {label: {"ms": quantiles([p[0].get(label, 0.0) * 1e3 for p in phases])["median"],
                    "calls": phases[-1][1].get(label, 0)} for label in labels}
    rest = [t - sum(p[0].values()) for t, p in zip(totals, phases)]
    rows["the rest (state dicts, plain data, random states, rename)"] = {
        "ms": quantiles([r * 1e3 for r in rest])["median"], "calls": None}
    return {"total_ms": quantiles([t * 1e3 for t in totals]), "phases": rows}


def main(args: argparse.Namespace) -> int:
    every = resolve_defaults(args)
    info = machine_info()
    print(f"[bench] {describe_machine(info)}")
    runtime = ap.runtime(strategy="cpu")
    make_model, dataset, loss_of, _ = synthetic_task(args)  # each variant's optimizer is the Trainer's AdamW
    torch.manual_seed(0)
    reference = make_model()
    parameters = sum(p.numel() for p in reference.parameters())
    owned = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="periodic_save_", dir=RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                                 or RESULTS_DIR)) if owned else args.dir
    root.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {args.model}, {parameters / 1e6:.2f} M parameters, batch {args.batch_size}, {args.image_size} px; "
          f"saves every {every} steps; blocks of {args.steps_per_block} steps; files in {root}", flush=True)
    try:
        load_before = wait_for_quiet(args.wait_load)

        # 1. Training with saves every N steps against none.
        names = ["no saves", *[f"every {n}" for n in every], "no saves#2"]
        trainers = {name: Trainer(reference, dataset, loss_of, args.batch_size, root / name.replace(" ", "_")
                                  .replace("#", ""), runtime) for name in names}

        def variant(name: str, n: int | None):
            trainer = trainers[name]

            def step(index: int) -> None:
                trainer.step()
                if n is not None and (index + 1) % n == 0:
                    trainer.save()
            return step

        variants = {name: variant(name, int(name.split()[1]) if name.startswith("every") else None) for name in names}
        samples = time_interleaved(variants, steps_per_block=args.steps_per_block, rounds=args.rounds,
                                   warmup_steps=args.warmup, device=runtime.device)
        ratios = {f"{name} / no saves": paired_ratios(samples, name, "no saves") for name in names[1:]}
        # Against both copies of the baseline at once (their geometric mean per round): the two copies differ
        # by the noise floor, and either alone would lend its own bias to every ratio.
        both = [(a * b) ** 0.5 for a, b in zip(samples["no saves"], samples["no saves#2"])]
        against_both = {name: quantiles([v / m for v, m in zip(samples[name], both)]) for name in names[1:-1]}
        against_second = {name: paired_ratios(samples, name, "no saves#2") for name in names[1:-1]}
        saves_done = {name: trainers[name].saves for name in names}
        file_bytes = (root / "every_1" / "last.pt").stat().st_size if 1 in every else None
        if file_bytes is None:
            file_bytes = next(iter(root.glob("every_*/last.pt"))).stat().st_size
        trainers.clear()  # free the variants' models before the next measurement

        # 2. One save alone against one training step.
        alone = Trainer(reference, dataset, loss_of, args.batch_size, root / "alone", runtime)
        pair = {"train step": lambda i: alone.step(), "save": lambda i: alone.save()}
        pair_samples = time_interleaved(pair, steps_per_block=1, rounds=args.save_rounds, warmup_steps=2,
                                        device=runtime.device, log=False)
        save_over_step = paired_ratios(pair_samples, "save", "train step")
        r = save_over_step["median"]
        predicted = {n: 1.0 + r / n for n in sorted({*every, 1, 10, 100, 1000})}
        one_percent = math.ceil(100 * r)

        # 3. Where a save's time goes.
        parts = breakdown(alone, args.breakdown_saves) if args.breakdown_saves else None
        load_after = loadavg()[0]
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)

    per_step = {name: quantiles(values) for name, values in samples.items()}
    save_ms = quantiles(pair_samples["save"])["median"] * 1e3
    step_ms = quantiles(pair_samples["train step"])["median"] * 1e3
    print()
    print(markdown_table(["variant", "ms/step incl. saves (median)", "IQR ms", "saves in the run"],
                         [[name, f"{q['median'] * 1e3:.1f}", f"{q['p25'] * 1e3:.1f}-{q['p75'] * 1e3:.1f}",
                           saves_done[name]] for name, q in per_step.items()]))
    print()
    print(markdown_table(["time ratio (paired per round)", "vs no saves", "vs no saves#2",
                          "vs both (geometric mean)", "predicted 1 + r/N"],
                         [[f"every {n}", format_ratio(ratios[f"every {n} / no saves"]),
                           format_ratio(against_second[f"every {n}"]), format_ratio(against_both[f"every {n}"]),
                           f"{predicted[n]:.4f}"] for n in every] +
                         [["no saves#2 (noise floor)", format_ratio(ratios["no saves#2 / no saves"]), "-", "-", "1"]]))
    print(f"\none save: {save_ms:.1f} ms against one step {step_ms:.1f} ms, r = save / step = "
          f"{format_ratio(save_over_step)}; file {file_bytes / 1e6:.1f} MB")
    print(markdown_table(["every N steps", "predicted cost"],
                         [[n, f"{(v - 1) * 100:.2f}%"] for n, v in predicted.items()]))
    print(f"cost under 1% from N >= {one_percent} steps (every {one_percent * step_ms / 1e3:.0f} s of training "
          f"at this step time)")
    if parts:
        print()
        print(f"one save, phase by phase (median of {args.breakdown_saves}; "
              f"total {parts['total_ms']['median']:.1f} ms):")
        print(markdown_table(["phase", "ms per save", "calls per save"],
                             [[label, f"{row['ms']:.1f}", "-" if row["calls"] is None else row["calls"]]
                              for label, row in parts["phases"].items()]))
    print(f"\n[bench] load {load_before:.2f} -> {load_after:.2f}")
    if not args.no_json:
        path = write_json("periodic_save" + ("" if args.model == "convnet" else f"_{args.model}"), {
            "machine": info, "args": vars(args), "folder": str(root), "parameters": parameters,
            "load_1min_before": load_before, "load_1min_after": load_after, "file_bytes": file_bytes,
            "per_step_s": per_step, "ratios": ratios, "ratios_vs_second_baseline": against_second,
            "ratios_vs_both_baselines": against_both, "saves": saves_done, "samples_s": samples,
            "save_alone_ms": save_ms, "step_alone_ms": step_ms, "save_over_step": save_over_step,
            "save_alone_samples_s": pair_samples, "predicted_ratio": predicted,
            "every_for_one_percent": one_percent, "breakdown": parts,
        }, args.out)
        print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
