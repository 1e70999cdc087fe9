"""What training prints: the plan before the first epoch, one line per epoch, and the whole run's ETA."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

import autoparallel as ap

if TYPE_CHECKING:
    from .train import Trainer


def duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class RunClock:
    """The time left in the whole run, from the pace of this session so far (validation included).

    Work is counted in training micro-batches: ``advance`` after each, and the estimate is the session's
    elapsed time per micro-batch times the micro-batches left. Host-side only, it never syncs the device.
    """

    def __init__(self, batches_left: int) -> None:
        self.started = time.monotonic()
        self.left, self.done = batches_left, 0

    def advance(self, batches: int = 1) -> None:
        self.done += batches
        self.left -= batches

    def eta(self) -> str | None:
        if self.done == 0:
            return None
        return duration((time.monotonic() - self.started) / self.done * max(self.left, 0))


class BarLoss:
    """The mean loss shown in an epoch's progress bar, with the learning rate and the run's ETA.

    Losses are summed on the device; reading the mean back costs a host sync, so it happens only where the
    bar shows: after the first optimizer step, then every ``every_steps`` steps or ``every_s`` seconds.
    """

    def __init__(self, bar: Any, device: torch.device, *, every_steps: int, every_s: float, show: bool) -> None:
        self.bar, self.every_steps, self.every_s, self.show = bar, every_steps, every_s, show
        self.total, self.count, self.last = torch.zeros((), device=device), 0, float("-inf")

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.count += 1

    def after_step(self, step: int, lr: float, eta: str | None) -> None:
        if not self.show or self.count == 0:
            return
        if step % self.every_steps and time.perf_counter() - self.last < self.every_s:
            return
        postfix = {"loss": f"{(self.total / self.count).item():.4f}", "lr": f"{lr:.2e}"}
        self.bar.set_postfix(postfix if eta is None else {**postfix, "run ETA": eta})
        self.total, self.count, self.last = torch.zeros_like(self.total), 0, time.perf_counter()


def describe_batch(global_batch: int, accumulation_steps: int, rt: ap.Runtime) -> str:
    """How a global batch is split over the processes or GPUs, and the effective batch of one optimizer step."""
    if rt.mode == "ddp":
        share = f"{global_batch // rt.world_size} per process x {rt.world_size} processes"
    elif rt.mode == "dp":
        gpus = len(rt.device_ids)
        share = f"split by DataParallel over {gpus} GPUs, {-(-global_batch // gpus)} on the first"
    else:
        share = "on the CPU" if rt.mode == "cpu" else "on 1 GPU"
    return (f"global batch {global_batch} per micro-step ({share}) x {accumulation_steps} accumulation step(s) "
            f"= effective batch {global_batch * accumulation_steps} per optimizer step")


def plan_lines(trainer: Trainer) -> list[str]:
    """What the run will do, printed before the first epoch."""
    args, cfg = trainer.args, trainer.config
    lines = [f"CamoXpert: backbone {args.backbone} ("
             + ("pretrained" if trainer.pretrained_loaded else "random initialisation")
             + f"), {args.num_experts} experts, top-{cfg['top_k']}, {args.img_size} px, deep supervision "
             + ("on" if args.deep_supervision else "off"),
             f"data: {len(trainer.train_set)} training / {len(trainer.val_set)} validation images from "
             f"{args.dataset_path}",
             f"batch: {describe_batch(args.batch_size, args.accumulation_steps, trainer.rt)}"]
    if cfg["stage2_batch_size"] != args.batch_size:
        lines.append(f"stage-2 batch: {describe_batch(cfg['stage2_batch_size'], args.accumulation_steps, trainer.rt)}")
    if not trainer.pretrained_loaded and args.freeze_backbone == "auto":
        lines.append("no pretrained backbone weights were loaded, so the backbone trains from the first epoch "
                     "(freezing random features only trains the decoder on noise) at "
                     f"{cfg['backbone_lr_scale']:g} x the LR; pass --freeze-backbone always to freeze it in stage 1")
    if args.progressive_unfreeze and not cfg["freeze_stage1"]:
        lines.append("note: --progressive-unfreeze has no effect, since the backbone is not frozen in stage 1")
    phases = trainer.plan.phases
    steps = ", ".join((f"{p.name} " if len(phases) > 1 else "") + f"{p.num_steps} steps at peak LR {p.peak_lr:.3g} "
                      f"(warm-up {p.warmup_steps})" for p in phases)
    start = f"stage 1 {trainer.unfreeze.describe(0)}" if len(phases) > 1 else trainer.unfreeze.describe(0)
    lines.append(f"schedule: {args.scheduler}, {steps}, min LR {args.min_lr:.3g}, backbone LR x "
                 f"{cfg['backbone_lr_scale']:g}; {start}")
    lines.append(f"checkpoints: {trainer.checkpoint_dir.resolve()} (best by validation {args.metric})")
    return lines


def summary_lines(trainer: Trainer, *, quiet: bool) -> list[str]:
    """Where the run's results are; ``quiet`` leaves out the best validation line (a stopped run)."""
    folder, keeper, best = trainer.checkpoint_dir, trainer.keeper, trainer.best
    best_text = "none (no validation ran)" if best is None else f"{best:.4f} at epoch {trainer.best_epoch}"
    lines = [] if quiet else [f"done: best validation {trainer.args.metric} {best_text}"]
    lines.append(f"checkpoints: best {keeper.best or '-'} | last {keeper.last or '-'} | history "
                 f"{folder / 'history.jsonl'}")
    return lines + ([f"curves: {folder / 'curves.png'}"] if trainer.run_log.records else [])


def epoch_line(record: dict[str, Any], *, epochs: int, label: str, lr: float, eta: str | None) -> str:
    """``epoch 3/20 [stage 2/2] loss 0.4123 | val IoU 0.5012 ... | lr 0.002 | 9.8 s, 32.5 img/s | run ETA 2 min``."""
    line = f"epoch {record['epoch']}/{epochs}{f' [{label}]' if label else ''} loss {record['train_loss']:.4f}"
    if record["val"] is not None:
        line += " | val " + " ".join(f"{name} {value:.4f}" for name, value in record["val"].items())
    if record.get("skipped_steps"):
        line += f" | {record['skipped_steps']} step(s) skipped (non-finite)"
    line += f" | lr {lr:.3g} | {record['time_s']:.1f} s, {record['images_per_s']:.1f} img/s"
    if eta is not None and record["epoch"] < epochs:
        line += f" | run ETA {eta}"
    return line + (" | best" if record["best"] else "")
