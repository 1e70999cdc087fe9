"""Learning-rate schedule, parameter groups and the backbone freezing plan of two-stage training.

Everything here is a pure function of the configuration and of a step or epoch index, so that a resumed
run lands on exactly the learning rate and the unfreeze level it left, and so that one optimizer (created
once) and one ``LambdaLR`` can drive both stages:

* Stage 1 runs ``stage1_epochs`` epochs at ``--lr`` (the backbone frozen when it holds pretrained
  features, see :func:`should_freeze_backbone`); stage 2 runs the remaining epochs at ``--stage2-lr``.
* Each stage is one *phase* of the step-indexed multiplier: a linear warm-up over ``--warmup-epochs``,
  then cosine down to ``--min-lr`` (or a one-cycle shape, or constant).
* The multiplier is shared by every parameter group, so the backbone group keeps its ratio to the
  decoder group through warm-up and decay, and unfreezing needs no new optimizer.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULERS = ("cosine", "onecycle", "none")
ONECYCLE_PCT_START = 0.1  # the rise's share of the phase, as CamoXpert's published OneCycleLR(pct_start=0.1)
ONECYCLE_DIV_FACTOR = 25.0  # torch.optim.lr_scheduler.OneCycleLR's default initial LR = max_lr / 25


@dataclass(frozen=True)
class Phase:
    """One stage of training: ``num_steps`` optimizer steps starting at ``start_step``, peak LR ``peak_lr``."""

    name: str
    start_step: int
    num_steps: int
    peak_lr: float
    warmup_steps: int


@dataclass(frozen=True)
class LRPlan:
    """The whole run's learning rate as a multiplier of ``base_lr`` (the LR the optimizer groups start from).

    ``multiplier(step)`` is the factor applied to *every* group's initial LR after ``step`` optimizer
    steps, which is what ``torch.optim.lr_scheduler.LambdaLR`` expects.
    """

    base_lr: float
    min_lr: float
    kind: str
    phases: tuple[Phase, ...]

    @property
    def total_steps(self) -> int:
        return sum(phase.num_steps for phase in self.phases)

    def phase_at(self, step: int) -> Phase:
        for phase in self.phases:
            if step < phase.start_step + phase.num_steps:
                return phase
        return self.phases[-1]

    def lr_at(self, step: int) -> float:
        """The LR of a group whose LR scale is 1 (the decoder/head groups) after ``step`` optimizer steps."""
        phase = self.phase_at(step)
        t = min(max(step - phase.start_step, 0), phase.num_steps)
        return _phase_lr(self.kind, phase, t, self.min_lr)

    def multiplier(self, step: int) -> float:
        return self.lr_at(step) / self.base_lr


def _phase_lr(kind: str, phase: Phase, t: int, min_lr: float) -> float:
    peak, n = phase.peak_lr, phase.num_steps
    floor = min(min_lr, peak)
    if kind == "onecycle":
        rise = phase.warmup_steps or max(1, round(ONECYCLE_PCT_START * n))
        start = peak / ONECYCLE_DIV_FACTOR
        if t < rise:
            return start + (peak - start) * 0.5 * (1.0 - math.cos(math.pi * t / rise))
        return _cosine(peak, floor, t - rise, n - rise)
    if t < phase.warmup_steps:
        # (t + 1) / W: the first step already trains, and step W - 1 reaches the peak.
        return peak * (t + 1) / phase.warmup_steps
    if kind == "none":
        return peak
    return _cosine(peak, floor, t - phase.warmup_steps, n - phase.warmup_steps)


def _cosine(peak: float, floor: float, t: int, n: int) -> float:
    if n <= 0:
        return peak
    progress = min(t / n, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_plan(*, lr: float, stage2_lr: float | None, min_lr: float, scheduler: str, warmup_epochs: int,
                  stage1_epochs: int, epochs: int, stage1_steps_per_epoch: int,
                  stage2_steps_per_epoch: int) -> LRPlan:
    """The LR plan of a run: stage 1 (``stage1_epochs``) then stage 2, each with its own warm-up and decay.

    Warm-up is clipped to each phase's length. A run with ``stage1_epochs == 0`` (or ``>= epochs``) has a
    single phase.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if lr <= 0:
        raise ValueError(f"--lr must be positive, got {lr}")
    stage1_epochs = min(max(stage1_epochs, 0), epochs)
    phases: list[Phase] = []
    start = 0
    for name, num_epochs, steps_per_epoch, peak in (
        ("stage1", stage1_epochs, stage1_steps_per_epoch, lr),
        ("stage2", epochs - stage1_epochs, stage2_steps_per_epoch, stage2_lr if stage2_lr is not None else lr),
    ):
        if num_epochs <= 0:
            continue
        num_steps = num_epochs * steps_per_epoch
        warmup = min(max(warmup_epochs, 0) * steps_per_epoch, num_steps)
        phases.append(Phase(name, start, num_steps, float(peak), warmup))
        start += num_steps
    if not phases:
        raise ValueError(f"--epochs must be at least 1, got {epochs}")
    return LRPlan(base_lr=float(lr), min_lr=float(min_lr), kind=scheduler, phases=tuple(phases))


def build_scheduler(optimizer: torch.optim.Optimizer, plan: LRPlan) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step; its state (``last_epoch``) is the step index.

    The lambda is a plain function, so ``LambdaLR.state_dict`` stores no copy of the plan: a resumed run
    follows the plan of its own command line, at the step the checkpoint recorded.
    """

    def lr_lambda(step: int) -> float:
        return plan.multiplier(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def fast_forward(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Move a fresh scheduler to ``step`` and set every group's LR there (resume from weights only)."""
    scheduler.last_epoch = step
    for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


# --- parameter groups ------------------------------------------------------------------------------------


def param_groups(model: nn.Module, *, lr: float, weight_decay: float,
                 backbone_lr_scale: float) -> list[dict]:
    """AdamW groups: backbone at ``backbone_lr_scale x lr``, the rest at ``lr``; no decay on norms and biases.

    Every parameter is in a group, frozen ones included: they simply get no gradient (AdamW skips them)
    until they are unfrozen, so the optimizer is created once for the whole run. Each group carries a
    ``name`` and its ``lr_scale`` so logs and tests can tell them apart.
    """
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for _, param in model.named_parameters():
        part = "backbone" if id(param) in backbone_ids else "head"
        # Biases and normalisation weights are 1-D; decaying them only hurts (timm's param_groups_weight_decay).
        decay = param.ndim > 1
        buckets.setdefault((part, decay), []).append(param)
    groups = []
    for part in ("backbone", "head"):
        scale = backbone_lr_scale if part == "backbone" else 1.0
        for decay in (True, False):
            params = buckets.get((part, decay))
            if params:
                groups.append({
                    "params": params, "name": f"{part}{'' if decay else '_no_decay'}", "lr": lr * scale,
                    "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0,
                })
    return groups


# --- freezing ------------------------------------------------------------------------------------------


def should_freeze_backbone(freeze: str, pretrained_loaded: bool) -> bool:
    """Whether stage 1 freezes the backbone.

    ``auto`` freezes it only when pretrained weights were loaded: stage 1 exists to fit a new decoder to
    good features without disturbing them, and freezing randomly initialised features only trains the
    decoder on noise (measured on CPU from random initialisation: such runs learn far less).
    """
    if freeze == "always":
        return True
    if freeze == "never":
        return False
    if freeze != "auto":
        raise ValueError(f"unknown freeze mode {freeze!r}: choose auto, always or never")
    return pretrained_loaded


@dataclass(frozen=True)
class UnfreezePlan:
    """How many backbone stages (deepest first) train at each epoch; ``None`` means the whole backbone.

    Stage 1 (``epoch < stage1_epochs``) trains none when ``freeze_stage1``. Stage 2 trains all of them,
    or, with ``progressive``, starts with the deepest stage and adds one stage at a time, evenly over the
    first two thirds of stage 2, so the whole backbone trains for the last third. A pure function of the
    epoch, so resume restores the level.
    """

    epochs: int
    stage1_epochs: int
    num_stages: int
    freeze_stage1: bool
    progressive: bool

    def level(self, epoch: int) -> int | None:
        if not self.freeze_stage1:
            return None
        if epoch < self.stage1_epochs:
            return 0
        if not self.progressive or self.num_stages <= 1:
            return None
        stage2_epochs = max(self.epochs - self.stage1_epochs, 1)
        index = epoch - self.stage1_epochs
        unfrozen = 1 + (3 * (self.num_stages - 1) * index) // (2 * stage2_epochs)
        return None if unfrozen >= self.num_stages else unfrozen

    def describe(self, epoch: int) -> str:
        level = self.level(epoch)
        if level is None:
            return "backbone trainable"
        if level == 0:
            return "backbone frozen"
        return f"backbone: deepest {level}/{self.num_stages} stages trainable"


def set_trainable(backbone: nn.Module, stages: Sequence[nn.Module], level: int | None) -> bool:
    """Freeze the backbone except its ``level`` deepest ``stages`` (all of it when ``level`` is None).

    Returns True when any parameter changed state, which is when a DDP wrapper must be rebuilt: DDP
    decides at construction which parameters it reduces.
    """
    stage_params = (p for stage in stages[:level] for p in stage.parameters()) if level is not None else ()
    trainable: Iterable[nn.Parameter] = backbone.parameters() if level is None else stage_params
    trainable_ids = {id(p) for p in trainable}
    changed = False
    for param in backbone.parameters():
        wanted = id(param) in trainable_ids
        if param.requires_grad != wanted:
            param.requires_grad_(wanted)
            changed = True
    return changed
