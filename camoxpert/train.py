"""Two-stage training of CamoXpert on whatever autoparallel detects: CPU, one GPU, DataParallel or DDP.

One :class:`Trainer` holds the run's state in plain attributes: the wrapped model, its EMA, ONE AdamW
optimizer with parameter groups (created once and kept across unfreezing), a per-step ``LambdaLR`` over
the whole run (:mod:`camoxpert.schedule`), the grad scaler and the gradient accumulator. Stage 1 and
stage 2 differ only by the unfreeze level, the peak LR and the loader (``--stage2-batch-size``), all
functions of the epoch, so ``--resume-from last.pt`` continues exactly where the run stopped: model,
EMA, optimizer, scheduler, scaler, RNG streams and sampler order.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import autoparallel as ap

from .data import build_train_val
from .evaluate import build_model, inference_module, runtime_from_args, score
from .losses import CODLoss
from .metrics import LOWER_IS_BETTER
from .schedule import (
    UnfreezePlan,
    build_lr_plan,
    build_scheduler,
    fast_forward,
    param_groups,
    set_trainable,
    should_freeze_backbone,
)

try:  # optional: TensorBoard logs when the tensorboard package is installed
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # pragma: no cover - depends on the environment
    SummaryWriter = None


def _seed_everything(seed: int) -> None:
    # No cudnn.deterministic: it made the upstream slow, and the sample order and init are what must repeat.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _describe_batch(global_batch: int, accumulation_steps: int, rt: ap.Runtime) -> str:
    if rt.mode == "ddp":
        share = f"{global_batch // rt.world_size} per process x {rt.world_size} processes"
    elif rt.mode == "dp":
        gpus = len(rt.device_ids)
        share = f"split by DataParallel over {gpus} GPUs, {-(-global_batch // gpus)} on the first"
    else:
        share = "on the CPU" if rt.mode == "cpu" else "on 1 GPU"
    effective = ap.effective_batch_size(global_batch, accumulation_steps)
    return (f"global batch {global_batch} per micro-step ({share}) x {accumulation_steps} accumulation step(s) "
            f"= effective batch {effective} per optimizer step")


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
        backbone_lr_scale = args.backbone_lr_scale
        if backbone_lr_scale is None:
            backbone_lr_scale = 0.1 if self.pretrained_loaded else 1.0
        self.config = {**vars(args), "top_k": model.top_k,
                       "stage2_batch_size": args.stage2_batch_size or args.batch_size,
                       "backbone_lr_scale": backbone_lr_scale, "freeze_stage1": freeze_stage1,
                       "pretrained_loaded": self.pretrained_loaded, "mode": rt.mode, "world_size": rt.world_size,
                       "precision": rt.precision}
        self.config.pop("handler", None)

        self.model = ap.wrap(model, runtime=rt)
        self.ema = ap.EMA(self.model, decay=args.ema_decay) if args.use_ema else None
        self.optimizer = torch.optim.AdamW(
            param_groups(model, lr=args.lr, weight_decay=args.weight_decay, backbone_lr_scale=backbone_lr_scale),
            lr=args.lr, weight_decay=args.weight_decay)

        workers = args.num_workers
        self.loaders = {"stage1": ap.loader(self.train_set, args.batch_size, num_workers=workers, seed=args.seed,
                                            runtime=rt)}
        if self.config["stage2_batch_size"] == args.batch_size:
            self.loaders["stage2"] = self.loaders["stage1"]
        else:
            self.loaders["stage2"] = ap.loader(self.train_set, self.config["stage2_batch_size"], num_workers=workers,
                                               seed=args.seed, runtime=rt)
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
        self.writer = None
        if args.resume_from:
            self.resume(args.resume_from)

    # --- bookkeeping -------------------------------------------------------------------------------------

    def stage(self, epoch: int) -> str:
        return "stage1" if epoch < self.args.stage1_epochs else "stage2"

    def _micro_batches(self, loader: Any) -> int:
        """Micro-batches per epoch: the loader's, capped by --max-steps-per-epoch, a multiple of accumulation.

        Whole windows only, so every optimizer step averages the same number of samples and a resumed run
        starts on a window boundary; the few batches left over are the next epoch's shuffle's.
        """
        available = len(loader)
        if self.args.max_steps_per_epoch is not None:
            available = min(available, self.args.max_steps_per_epoch)
        usable = available - available % self.args.accumulation_steps
        if usable == 0:
            raise ValueError(f"{len(self.train_set)} training images give {available} batch(es) of "
                             f"{loader.global_batch_size} per epoch, fewer than --accumulation-steps "
                             f"{self.args.accumulation_steps}: lower --accumulation-steps or --batch-size")
        return usable

    def steps_before(self, epoch: int) -> int:
        """Optimizer steps done before ``epoch`` starts: the scheduler's index at that epoch."""
        accumulation = self.args.accumulation_steps
        return sum(self.micro_batches[self.stage(e)] // accumulation for e in range(epoch))

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.args.metric in LOWER_IS_BETTER else value > self.best

    def _group_lrs(self) -> dict[str, float]:
        return {group["name"]: group["lr"] for group in self.optimizer.param_groups}

    # --- resume ------------------------------------------------------------------------------------------

    def resume(self, path: str) -> None:
        """Restores a run from ``path``; the upstream's ``best_model.pth`` restores weights and epoch only."""
        info = ap.load_checkpoint(path, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                  scheduler=self.scheduler, scaler=self.scaler, restore_rng=True)
        epoch = info["epoch"]
        self.start_epoch = 0 if epoch is None else int(epoch) + 1
        expected = self.steps_before(self.start_epoch)
        if info["format"] == "autoparallel":
            extra = info["extra"]
            self.best, self.best_epoch = extra.get("best_metric"), extra.get("best_epoch")
            if extra.get("metric") not in (None, self.args.metric):
                self.best, self.best_epoch = None, None
            self.step = int(info["step"] if info["step"] is not None else expected)
            if self.step != expected:
                ap.print(f"note: {path} was saved after {self.step} optimizer steps; this configuration has "
                         f"{expected} before epoch {self.start_epoch + 1}: the LR schedule continues from the former")
        else:
            # Weights only: the optimizer starts fresh and the schedule jumps to where this epoch begins. The
            # upstream's best_iou came from its own batch-pooled metrics, so best selection starts over.
            self.step = expected
            fast_forward(self.scheduler, self.step)
            ap.print(f"{path} is a {info['format']} checkpoint: loaded its weights only (no optimizer, scheduler "
                     "or RNG state)")
        ap.print(f"resumed from {path}: epoch {self.start_epoch + 1}/{self.args.epochs}, step {self.step}, "
                 f"{self.unfreeze.describe(self.start_epoch)}, lr "
                 + ", ".join(f"{name} {lr:.3g}" for name, lr in self._group_lrs().items()))

    # --- one epoch ---------------------------------------------------------------------------------------

    def _scheduler_step(self) -> None:
        if self.accumulator.last_step_skipped:
            # An overflow step the scaler skipped still advances the schedule (it is indexed by step);
            # torch warns that optimizer.step() was not called, which is intended here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        else:
            self.scheduler.step()

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
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
        loss_sum, finite_count, window, window_count, skipped = zero.clone(), zero.clone(), zero.clone(), 0, 0
        self.model.train()
        bar = ap.progress(total=num_micro, desc=f"epoch {epoch + 1}/{args.epochs} [{stage}]", leave=False,
                          dynamic_ncols=True)
        started = time.perf_counter()
        for images, masks in itertools.islice(loader, num_micro):
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
            window += loss
            window_count += 1
            if self.accumulator.step():
                self._scheduler_step()
                self.step += 1
                skipped += int(self.accumulator.last_step_skipped)
                if self.ema is not None and not self.accumulator.last_step_skipped:
                    self.ema.update()
                if self.step % args.log_every == 0:
                    window_loss = (window / window_count).item()  # the only host sync every log_every steps
                    bar.set_postfix(loss=f"{window_loss:.4f}", lr=f"{self.optimizer.param_groups[-1]['lr']:.2e}")
                    if self.writer is not None:
                        self.writer.add_scalar("train/loss", window_loss, self.step)
                        for name, lr in self._group_lrs().items():
                            self.writer.add_scalar(f"lr/{name}", lr, self.step)
                    window, window_count = zero.clone(), 0
            bar.update(1)
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
                "images_per_s": num_micro * self.loaders[stage].global_batch_size / max(elapsed, 1e-9)}

    def validate(self) -> dict[str, float]:
        """Scores the weights that checkpoints call best: the EMA's when --use-ema, else the model's."""
        if self.ema is not None and self.rt.mode == "ddp":
            self._sync_ema_buffers()
        module = inference_module(self.ema.module, self.rt) if self.ema is not None else self.model
        summary, _ = score(module, self.val_loader, self.val_set, self.rt)
        return summary

    @torch.no_grad()
    def _sync_ema_buffers(self) -> None:
        """Gives every rank rank 0's EMA buffers (BatchNorm statistics), the ones its checkpoint saves.

        Each rank's model updates its BatchNorm statistics with its own batch, so each rank's EMA drifts
        apart in its buffers; validating with rank 0's makes every rank score the model that is saved.
        """
        for buffer in self.ema.module.buffers():
            buffer.copy_(ap.all_gather(buffer.detach()[None])[0])

    # --- the run -----------------------------------------------------------------------------------------

    def _print_plan(self) -> None:
        args, cfg = self.args, self.config
        ap.print(f"CamoXpert: backbone {args.backbone} ("
                 + ("pretrained" if self.pretrained_loaded else "random initialisation") + f"), "
                 f"{args.num_experts} experts, top-{cfg['top_k']}, {args.img_size} px, deep supervision "
                 + ("on" if args.deep_supervision else "off"))
        ap.print(f"data: {len(self.train_set)} training / {len(self.val_set)} validation images from "
                 f"{args.dataset_path}")
        ap.print(f"batch: {_describe_batch(args.batch_size, args.accumulation_steps, self.rt)}")
        if cfg["stage2_batch_size"] != args.batch_size:
            ap.print(f"stage-2 batch: {_describe_batch(cfg['stage2_batch_size'], args.accumulation_steps, self.rt)}")
        if not self.pretrained_loaded and args.freeze_backbone == "auto":
            ap.print("no pretrained backbone weights were loaded, so the backbone trains from the first epoch "
                     f"(freezing random features only trains the decoder on noise) at {cfg['backbone_lr_scale']:g} x "
                     "the LR; pass --freeze-backbone always to freeze it in stage 1 anyway")
        if args.progressive_unfreeze and not cfg["freeze_stage1"]:
            ap.print("note: --progressive-unfreeze has no effect, since the backbone is not frozen in stage 1")
        phases = ", ".join(f"{p.name} {p.num_steps} steps at peak LR {p.peak_lr:.3g} (warm-up {p.warmup_steps})"
                           for p in self.plan.phases)
        ap.print(f"schedule: {args.scheduler}, {phases}, min LR {args.min_lr:.3g}, backbone LR x "
                 f"{cfg['backbone_lr_scale']:g}; stage 1 {self.unfreeze.describe(0)}")
        ap.print(f"checkpoints: {self.checkpoint_dir.resolve()} (best by validation {args.metric})")

    def fit(self, num_epochs: int | None = None) -> dict[str, Any]:
        """Trains from ``start_epoch`` to ``--epochs``; returns the best and the last validation results.

        Args:
            num_epochs: stop after this many epochs of this call (a time-boxed session), leaving ``last.pt``
                to resume from; the schedule is still the one of ``--epochs``.
        """
        args = self.args
        end_epoch = args.epochs if num_epochs is None else min(args.epochs, self.start_epoch + num_epochs)
        if self.rt.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (self.checkpoint_dir / "args.json").write_text(json.dumps(self.config, indent=2, default=str) + "\n")
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(self.checkpoint_dir / "tensorboard"))
        self._print_plan()
        last_val: dict[str, float] | None = None
        for epoch in range(self.start_epoch, end_epoch):
            stats = self.train_one_epoch(epoch)
            val = None
            if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
                val = last_val = self.validate()
            is_best = val is not None and self._is_better(val[args.metric])
            if is_best:
                self.best, self.best_epoch = val[args.metric], epoch + 1
            self.keeper.save(is_best=is_best, model=self.model, ema=self.ema, optimizer=self.optimizer,
                             scheduler=self.scheduler, scaler=self.scaler, epoch=epoch, step=self.step,
                             best_metric=self.best, best_epoch=self.best_epoch, metric=args.metric,
                             val_metrics=val, args=self.config)
            record = {"epoch": epoch + 1, "stage": self.stage(epoch), "step": self.step,
                      "unfreeze": self.unfreeze.describe(epoch), "lr": self._group_lrs(), **stats, "val": val,
                      "best": is_best}
            self._log_epoch(record)
        return self._finish(last_val)

    def _log_epoch(self, record: dict[str, Any]) -> None:
        val = record["val"]
        line = f"epoch {record['epoch']}/{self.args.epochs} [{record['stage']}] loss {record['train_loss']:.4f}"
        if val is not None:
            line += " | val " + " ".join(f"{name} {value:.4f}" for name, value in val.items())
        line += f" | lr {self.optimizer.param_groups[-1]['lr']:.3g} | {record['time_s']:.1f} s, " \
                f"{record['images_per_s']:.1f} img/s" + (" | best" if record["best"] else "")
        ap.print(line)
        if not self.rt.is_main:
            return
        with open(self.checkpoint_dir / "history.jsonl", "a") as history:
            history.write(json.dumps(record) + "\n")
        if self.writer is not None and val is not None:
            for name, value in val.items():
                self.writer.add_scalar(f"val/{name}", value, record["epoch"])

    def _finish(self, last_val: dict[str, float] | None) -> dict[str, Any]:
        if self.writer is not None:
            self.writer.close()
        best_text = "none (no validation ran)" if self.best is None else \
            f"{self.best:.4f} at epoch {self.best_epoch}"
        ap.print(f"done: best validation {self.args.metric} {best_text}")
        ap.print(f"checkpoints: best {self.keeper.best or '-'} | last {self.keeper.last or '-'} | history "
                 f"{self.checkpoint_dir / 'history.jsonl'}")
        return {"metric": self.args.metric, "best_metric": self.best, "best_epoch": self.best_epoch,
                "last_val": last_val, "epochs": self.args.epochs, "start_epoch": self.start_epoch,
                "steps": self.step, "checkpoint_dir": str(self.checkpoint_dir)}


def train(args: argparse.Namespace) -> dict[str, Any]:
    """``train_ultimate.py train``: build a :class:`Trainer` (resuming when asked) and run it."""
    return Trainer(args).fit()
