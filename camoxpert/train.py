"""Two-stage training of CamoXpert on whatever autoparallel detects: CPU, one GPU, DataParallel or DDP.

One :class:`Trainer` holds the run's state: the wrapped model, its EMA, one AdamW optimizer kept across
unfreezing, a per-step ``LambdaLR`` over the whole run, the grad scaler and the gradient accumulator. The
stages differ only by functions of the epoch (unfreeze level, peak LR, loader), so ``--resume-from``
continues exactly where a run stopped.
"""
from __future__ import annotations

import argparse
import itertools
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import autoparallel as ap

from . import console, run_dir
from .data import build_train_val
from .errors import UserError
from .evaluate import inference_module, score
from .losses import CODLoss
from .metrics import LOWER_IS_BETTER
from .model import build_model
from .placement import runtime_from_args
from .schedule import (
    UnfreezePlan,
    build_lr_plan,
    build_scheduler,
    fast_forward,
    param_groups,
    set_trainable,
    should_freeze_backbone,
)

LOSS_REFRESH_S = 2.0
"""Seconds between loss updates in the progress bar (each costs one host sync), besides every --log-every steps."""


def _seed_everything(seed: int) -> None:
    # No cudnn.deterministic: it costs speed, and the sample order and init are what must repeat.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything a run needs from the ``train`` arguments; :meth:`fit` runs it.

    Attributes worth reading (tests do): ``start_epoch``, ``step`` (optimizer steps done), ``optimizer``,
    ``scheduler``, ``model``, ``ema``, ``unfreeze`` and ``config`` (the resolved arguments saved with
    every checkpoint and in ``args.json``).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rt = rt = runtime_from_args(args)
        ap.print_banner(rt)
        _seed_everything(args.seed)
        self.checkpoint_dir = Path(args.checkpoint_dir)
        self.train_set, self.val_set = build_train_val(args.dataset_path, img_size=args.img_size,
                                                       val_fraction=args.val_fraction, seed=args.seed,
                                                       keep_noncam=args.keep_noncam,
                                                       augment=args.augment)
        model = build_model(vars(args), pretrained=args.pretrained or args.pretrained_path is not None,
                            pretrained_path=args.pretrained_path)
        # Same initial weights on every rank (above); from here each rank draws its own augmentations.
        _seed_everything(args.seed + rt.rank)
        self.pretrained_loaded = bool(model.pretrained_loaded)
        self.stages = model.backbone_stages()
        freeze_stage1 = should_freeze_backbone(args.freeze_backbone, self.pretrained_loaded)
        self.unfreeze = UnfreezePlan(epochs=args.epochs, stage1_epochs=args.stage1_epochs,
                                     num_stages=len(self.stages), freeze_stage1=freeze_stage1,
                                     progressive=args.progressive_unfreeze)
        default_scale = 0.1 if self.pretrained_loaded else 1.0  # pretrained features move slower than the decoder
        backbone_lr_scale = default_scale if args.backbone_lr_scale is None else args.backbone_lr_scale
        self.config = {**vars(args), "top_k": model.top_k,
                       "stage2_batch_size": args.stage2_batch_size or args.batch_size,
                       "backbone_lr_scale": backbone_lr_scale, "freeze_stage1": freeze_stage1,
                       "pretrained_loaded": self.pretrained_loaded, "mode": rt.mode, "world_size": rt.world_size,
                       "precision": rt.precision}
        for key in ("handler", "overwrite", "trust_checkpoint", "time_budget", "save_every"):  # how, not what
            self.config.pop(key, None)

        # An expert idle at any step needs find_unused_parameters=True, which a first step may not show (DDP only)
        ddp_options = {"find_unused_parameters": True} if model.leaves_experts_idle(rt.device) else {}
        self.model = ap.wrap(model, runtime=rt, **ddp_options)
        self.ema = ap.EMA(self.model, decay=args.ema_decay) if args.use_ema else None
        self.optimizer = torch.optim.AdamW(
            param_groups(model, lr=args.lr, weight_decay=args.weight_decay, backbone_lr_scale=backbone_lr_scale),
            lr=args.lr, weight_decay=args.weight_decay)

        workers = args.num_workers
        batches = {"stage1": args.batch_size, "stage2": self.config["stage2_batch_size"]}
        made = {size: ap.loader(self.train_set, size, num_workers=workers, seed=args.seed, runtime=rt)
                for size in dict.fromkeys(batches.values())}
        self.loaders = {stage: made[size] for stage, size in batches.items()}  # one loader when the sizes match
        self.micro_batches = {stage: self._micro_batches(loader) for stage, loader in self.loaders.items()}
        self.val_loader = ap.loader(self.val_set, args.batch_size, train=False, num_workers=workers, runtime=rt)

        accumulation = args.accumulation_steps
        self.plan = build_lr_plan(
            lr=args.lr, stage2_lr=args.stage2_lr, min_lr=args.min_lr, scheduler=args.scheduler,
            warmup_epochs=args.warmup_epochs, stage1_epochs=args.stage1_epochs, epochs=args.epochs,
            stage1_steps_per_epoch=self.micro_batches["stage1"] // accumulation,
            stage2_steps_per_epoch=self.micro_batches["stage2"] // accumulation)
        self.scheduler = build_scheduler(self.optimizer, self.plan)
        self.scaler = ap.grad_scaler(rt)
        self.accumulator = ap.GradientAccumulator(self.model, self.optimizer, accumulation_steps=accumulation,
                                                  scaler=self.scaler, max_grad_norm=args.max_grad_norm or None)
        self.criterion = CODLoss()
        self.keeper = ap.CheckpointKeeper(self.checkpoint_dir)
        self.start_epoch, self.step = 0, 0
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.partial: dict[str, Any] | None = None  # where a checkpoint saved mid-epoch left that epoch
        self.stop: ap.StopRequest | None = None
        every = str(args.save_every or "").strip()  # --save-every: optimizer steps, or a duration
        self.save_every_steps, self.save_every_time = (int(every), None) if every.isdigit() else (None, every or None)
        if args.resume_from:
            self.resume(args.resume_from)

    def stage(self, epoch: int) -> str:
        """The phase ``epoch`` belongs to: ``stage1`` or ``stage2`` (whose flags, e.g. --stage2-lr, apply)."""
        return "stage1" if epoch < self.args.stage1_epochs else "stage2"

    def stage_label(self, epoch: int) -> str:
        """``stage 1/2`` or ``stage 2/2`` in a two-stage run; empty when the run has one stage."""
        if len(self.plan.phases) == 1:
            return ""
        return "stage 1/2" if self.stage(epoch) == "stage1" else "stage 2/2"

    def _micro_batches(self, loader: Any) -> int:
        """Micro-batches per epoch, capped by --max-steps-per-epoch, in whole accumulation windows (every step
        averages as many samples; a resumed run starts on a window boundary)."""
        available = len(loader)
        if self.args.max_steps_per_epoch is not None:
            available = min(available, self.args.max_steps_per_epoch)
        usable = available - available % self.args.accumulation_steps
        if usable == 0:
            raise UserError(f"{len(self.train_set)} training images give {available} batch(es) of "
                             f"{loader.global_batch_size} per epoch, fewer than --accumulation-steps "
                             f"{self.args.accumulation_steps}: lower --accumulation-steps or --batch-size")
        return usable

    def steps_before(self, epoch: int) -> int:
        """Optimizer steps done before ``epoch`` starts: the scheduler's index at that epoch."""
        accumulation = self.args.accumulation_steps
        return sum(self.micro_batches[self.stage(e)] // accumulation for e in range(epoch))

    def _is_better(self, value: float) -> bool:
        lower = self.args.metric in LOWER_IS_BETTER
        return self.best is None or (value < self.best if lower else value > self.best)

    def _group_lrs(self) -> dict[str, float]:
        return {group["name"]: group["lr"] for group in self.optimizer.param_groups}

    def resume(self, path: str) -> None:
        """Restores a run from ``path``; a weights-only file (``best_model.pth``) restores weights and epoch."""
        info = ap.load_checkpoint(path, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                  scheduler=self.scheduler, scaler=self.scaler, restore_rng=True,
                                  trusted=self.args.trust_checkpoint)
        epoch, extra = info["epoch"], info["extra"]
        self.partial = extra.get("partial_epoch") if info["format"] == "autoparallel" else None
        self.start_epoch = 0 if epoch is None else int(epoch) + (self.partial is None)
        expected = self.steps_before(self.start_epoch)
        if self.partial is not None:  # saved mid-epoch: that epoch continues after its last saved step
            self.loaders[self.stage(self.start_epoch)].load_state_dict(info["loader"])
            expected += self.partial["micro_done"] // self.args.accumulation_steps
        if info["format"] == "autoparallel":
            self.best, self.best_epoch = extra.get("best_metric"), extra.get("best_epoch")
            if extra.get("metric") not in (None, self.args.metric):
                self.best, self.best_epoch = None, None
            self.step = int(info["step"] if info["step"] is not None else expected)
            if self.step != expected:
                ap.print(f"note: {path} was saved after {self.step} optimizer steps; this configuration has "
                         f"{expected} before epoch {self.start_epoch + 1}: the LR schedule continues from the former")
        else:
            # Weights only: the optimizer starts fresh and the schedule jumps to where this epoch begins. Its
            # best_iou, if any, came from batch-pooled metrics, not these, so best selection starts over.
            self.step = expected
            fast_forward(self.scheduler, self.step)
            ap.print(f"{path} is a {info['format']} checkpoint: loaded its weights only (no optimizer, scheduler "
                     "or RNG state)")
        within = f" at micro-batch {self.partial['micro_done'] + 1}" if self.partial else ""
        ap.print(f"resumed from {path}: epoch {self.start_epoch + 1}/{self.args.epochs}{within}, step {self.step}, "
                 f"{self.unfreeze.describe(self.start_epoch)}, lr "
                 + ", ".join(f"{name} {lr:.3g}" for name, lr in self._group_lrs().items()))

    def _scheduler_step(self, skipped: bool) -> None:
        # An overflow step the scaler skipped still advances the schedule (it is indexed by step); torch then
        # warns that optimizer.step() was not called, which is intended here.
        with warnings.catch_warnings():
            if skipped:
                warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def train_one_epoch(self, epoch: int, clock: console.RunClock | None = None) -> dict[str, Any]:
        """One epoch of training; ``clock`` (the run's ETA) advances with every micro-batch."""
        rt, args = self.rt, self.args
        stage = self.stage(epoch)
        if set_trainable(ap.unwrap(self.model).backbone, self.stages, self.unfreeze.level(epoch)):
            ap.print(f"epoch {epoch + 1}: {self.unfreeze.describe(epoch)}")
        if stage == "stage2" and self.loaders["stage1"] is not self.loaders["stage2"]:
            self.loaders["stage1"] = None  # lets its persistent workers go
        loader = self.loaders[stage]
        loader.set_epoch(epoch)
        num_micro = self.micro_batches[stage]
        zero = torch.zeros((), device=rt.device)
        loss_sum, finite_count, skipped = zero.clone(), zero.clone(), 0
        partial, self.partial, done = self.partial, None, 0
        if partial is not None:  # resumed mid-epoch: this rank's sums over the micro-batches before the save
            sums = partial["sums"][rt.rank] if len(partial["sums"]) == rt.world_size else partial["sums"][0]
            loss_sum, finite_count = loss_sum + sums[0], finite_count + sums[1]
            done, skipped = partial["micro_done"], partial["skipped"]
        self.model.train()
        label = self.stage_label(epoch)
        bar = ap.progress(total=num_micro, desc=f"epoch {epoch + 1}/{args.epochs}" + (f" [{label}]" if label else ""),
                          leave=False, dynamic_ncols=True)
        shown = console.BarLoss(bar, rt.device, every_steps=args.log_every, every_s=LOSS_REFRESH_S, show=rt.is_main)
        bar.update(done)
        resumed_at, started = done, time.perf_counter()
        for images, masks in itertools.islice(loader, num_micro - done):
            images = images.to(rt.device, non_blocking=True)
            masks = masks.to(rt.device, non_blocking=True)
            with self.accumulator.micro_step():
                with ap.autocast(rt):
                    output = self.model(images)
                    loss, _ = self.criterion(output, masks)
                self.accumulator.backward(loss)
            # A non-finite loss is not fatal: its gradient makes the step non-finite, which the scaler (fp16)
            # or the accumulator (non-finite gradient norm) skips; here it is only left out of the mean.
            loss = loss.detach().float()
            finite = torch.isfinite(loss)
            loss = torch.where(finite, loss, zero)
            loss_sum += loss
            finite_count += finite
            shown.add(loss)
            done += 1
            if clock is not None:
                clock.advance()
            bar.update(1)
            if self.accumulator.step():
                step_skipped = self.accumulator.last_step_skipped  # read once: with a scaler it is a host sync
                self._scheduler_step(step_skipped)
                self.step += 1
                skipped += step_skipped
                if self.ema is not None and not step_skipped:
                    self.ema.update()
                shown.after_step(self.step, self.optimizer.param_groups[-1]["lr"], clock and clock.eta())
                if self._at_step_boundary(epoch, loader, done < num_micro, done, loss_sum, finite_count, skipped):
                    bar.close()
                    return {"stopped": self.stop.agreed}
        bar.close()
        elapsed = time.perf_counter() - started
        totals = ap.all_reduce(torch.stack([loss_sum, finite_count, torch.tensor(float(num_micro), device=rt.device)]))
        loss_total, finite_total, micro_total = totals.tolist()
        nonfinite = int(round(micro_total - finite_total))
        if nonfinite:
            ap.print(f"warning: epoch {epoch + 1}: {nonfinite} micro-batch(es) gave a non-finite loss and "
                     f"{skipped} optimizer step(s) were skipped")
        return {"train_loss": loss_total / max(finite_total, 1.0), "nonfinite_losses": nonfinite,
                "skipped_steps": skipped, "time_s": elapsed,
                "images_per_s": (num_micro - resumed_at) * loader.global_batch_size / max(elapsed, 1e-9)}

    def _at_step_boundary(self, epoch: int, loader: Any, mid_epoch: bool, done: int, loss_sum: torch.Tensor,
                          finite_count: torch.Tensor, skipped: int) -> bool:
        """After an optimizer step: a periodic or stopping save mid-epoch; True when every rank agreed to stop."""
        stop = self.stop is not None and self.stop.should_stop()
        every = self.save_every_steps
        due = stop or (self.stop is not None and self.stop.save_due) or bool(every and self.step % every == 0)
        if due and mid_epoch:  # the end of an epoch saves anyway
            sums = ap.all_gather(torch.stack([loss_sum, finite_count])[None]).tolist()  # every rank's own
            self._save(epoch, loader=loader, partial_epoch={"micro_done": done, "sums": sums, "skipped": skipped})
        return stop

    def _save(self, epoch: int, *, is_best: bool = False, val: dict[str, float] | None = None, **extra: Any) -> None:
        self.keeper.save(is_best=is_best, model=self.model, ema=self.ema, optimizer=self.optimizer,
                         scheduler=self.scheduler, scaler=self.scaler, epoch=epoch, step=self.step,
                         best_metric=self.best, best_epoch=self.best_epoch, metric=self.args.metric, val_metrics=val,
                         args=self.config, **extra)

    def validate(self) -> dict[str, float]:
        """Scores the weights that checkpoints call best: the EMA's when --use-ema (the same on every rank, as the
        weights it averages are), else the model's."""
        module = inference_module(self.ema.module, self.rt) if self.ema is not None else self.model
        summary, _ = score(module, self.val_loader, self.val_set, self.rt)
        return summary

    def fit(self, num_epochs: int | None = None) -> dict[str, Any]:
        """Trains from ``start_epoch`` to ``--epochs`` (or ``num_epochs`` more, leaving ``last.pt`` to resume from,
        on the schedule of ``--epochs``); returns the best and the last validation results."""
        args = self.args
        end_epoch = args.epochs if num_epochs is None else min(args.epochs, self.start_epoch + num_epochs)
        self.run_log = run_dir.RunLog(self.checkpoint_dir, enabled=self.rt.is_main)
        if self.rt.is_main:  # the folder was claimed (run_dir.claim) by every process before any got here
            run_dir.check_free_space(self.checkpoint_dir, run_dir.checkpoint_bytes(ap.unwrap(self.model),
                                                                                  ema=self.ema is not None))
        self.run_log.start(self.config, self.start_epoch)
        for line in console.plan_lines(self):
            ap.print(line)
        clock = console.RunClock(sum(self.micro_batches[self.stage(e)] for e in range(self.start_epoch, args.epochs)))
        last_val: dict[str, float] | None = None
        self.stop = ap.StopRequest(time_budget=args.time_budget, save_every=self.save_every_time)
        for epoch in range(self.start_epoch, end_epoch):
            stats = self.train_one_epoch(epoch, clock)
            if "stopped" in stats:
                return self._stopped(stats["stopped"], epoch)
            val = None
            if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
                val = last_val = self.validate()
            is_best = val is not None and self._is_better(val[args.metric])
            if is_best:
                self.best, self.best_epoch = val[args.metric], epoch + 1
            self._save(epoch, is_best=is_best, val=val)
            record = {"epoch": epoch + 1, "stage": self.stage(epoch), "step": self.step,
                      "unfreeze": self.unfreeze.describe(epoch), "lr": self._group_lrs(), **stats, "val": val,
                      "best": is_best}
            ap.print(console.epoch_line(record, epochs=args.epochs, label=self.stage_label(epoch),
                                        lr=self.optimizer.param_groups[-1]["lr"], eta=clock.eta()))
            self.run_log.add(record)
            if epoch + 1 < end_epoch and self.stop.should_stop():
                return self._stopped(self.stop.agreed, epoch + 1)
        self.stop.close()
        return self._finish(last_val)

    def _stopped(self, reason: str, epoch: int) -> dict[str, Any]:
        """A stop every rank agreed on: last.pt is saved; say how to continue."""
        self.stop.close()
        ap.print(f"stopped ({reason}) in epoch {epoch + 1}/{self.args.epochs} after step {self.step}; "
                 f"{self.keeper.last} holds everything. Continue with the same command plus "
                 f"--resume-from {self.keeper.last}")
        return {**self._finish(None, quiet=True), "stopped": reason}

    def _finish(self, last_val: dict[str, float] | None, quiet: bool = False) -> dict[str, Any]:
        for line in console.summary_lines(self, quiet=quiet):
            ap.print(line)
        return {"metric": self.args.metric, "best_metric": self.best, "best_epoch": self.best_epoch,
                "last_val": last_val, "epochs": self.args.epochs, "start_epoch": self.start_epoch,
                "steps": self.step, "checkpoint_dir": str(self.checkpoint_dir)}


def train(args: argparse.Namespace) -> dict[str, Any]:
    """``train_ultimate.py train``: build a :class:`Trainer` (resuming when asked) and run it."""
    return Trainer(args).fit()
