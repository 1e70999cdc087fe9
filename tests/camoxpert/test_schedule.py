"""LR schedule per parameter group, across warm-up, unfreezing and resume; the freezing rules."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from camoxpert.schedule import (
    UnfreezePlan,
    build_lr_plan,
    build_scheduler,
    fast_forward,
    param_groups,
    set_trainable,
    should_freeze_backbone,
)


class TinyNet(nn.Module):
    """A backbone of three stages (deepest last) and a head, like CamoXpert's structure."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))
        self.head = nn.Conv2d(4, 1, 1)

    def backbone_stages(self) -> list[nn.Module]:
        return [self.backbone[3], self.backbone[2], nn.ModuleList([self.backbone[0], self.backbone[1]])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _plan(**overrides):
    kwargs = dict(lr=1e-3, stage2_lr=5e-4, min_lr=1e-5, scheduler="cosine", warmup_epochs=1, stage1_epochs=2,
                  epochs=4, stage1_steps_per_epoch=4, stage2_steps_per_epoch=2)
    return build_lr_plan(**{**kwargs, **overrides})


def _cosine(peak, floor, t, n):
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t / n))


def test_plan_warmup_then_cosine_in_each_stage():
    plan = _plan()
    assert [(p.name, p.start_step, p.num_steps, p.warmup_steps) for p in plan.phases] == [
        ("stage1", 0, 8, 4), ("stage2", 8, 4, 2)]
    assert plan.total_steps == 12
    expected = [1e-3 * (t + 1) / 4 for t in range(4)]                    # stage 1 warm-up: 4 steps
    expected += [_cosine(1e-3, 1e-5, t, 4) for t in range(4)]            # stage 1 cosine
    expected += [5e-4 * (t + 1) / 2 for t in range(2)]                   # stage 2 warm-up at --stage2-lr
    expected += [_cosine(5e-4, 1e-5, t, 2) for t in range(2)]
    assert [plan.lr_at(step) for step in range(12)] == pytest.approx(expected, rel=1e-12)
    assert plan.lr_at(12) == pytest.approx(1e-5)  # the end of the run is at --min-lr
    assert plan.multiplier(8) == pytest.approx(0.25)  # 5e-4 * 1/2 relative to --lr


def test_single_phase_and_constant_schedule():
    plan = _plan(stage1_epochs=0, scheduler="none", warmup_epochs=0)
    assert [p.name for p in plan.phases] == ["stage2"]
    assert {plan.lr_at(step) for step in range(8)} == {5e-4}


def test_onecycle_rises_from_peak_over_25_and_ends_at_min_lr():
    plan = _plan(scheduler="onecycle", warmup_epochs=0, stage1_epochs=4, stage1_steps_per_epoch=10)
    assert plan.phases[0].num_steps == 40
    assert plan.lr_at(0) == pytest.approx(1e-3 / 25)
    assert plan.lr_at(4) == pytest.approx(1e-3)  # 10 % of 40 steps
    assert max(plan.lr_at(s) for s in range(40)) == pytest.approx(1e-3)
    assert plan.lr_at(40) == pytest.approx(1e-5)


def test_plan_rejects_unknown_scheduler():
    with pytest.raises(ValueError, match="cosine_restart.*cosine, onecycle, none"):
        _plan(scheduler="cosine_restart")


def test_param_groups_split_backbone_and_exclude_norms_and_biases_from_decay():
    model = TinyNet()
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.1)
    summary = [(g["name"], len(g["params"]), g["lr"], g["weight_decay"]) for g in groups]
    assert summary == [("backbone", 3, pytest.approx(1e-4), 0.05), ("backbone_no_decay", 5, pytest.approx(1e-4), 0.0),
                       ("head", 1, 1e-3, 0.05), ("head_no_decay", 1, 1e-3, 0.0)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def _optimizer_and_scheduler(model, plan):
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.1), lr=1e-3)
    return optimizer, build_scheduler(optimizer, plan)


def _train_steps(model, optimizer, scheduler, steps):
    lrs = []
    for _ in range(steps):
        model(torch.randn(2, 3, 6, 6)).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        lrs.append([g["lr"] for g in optimizer.param_groups])
    return lrs


def test_every_group_keeps_its_ratio_through_warmup_decay_and_stage_change():
    torch.manual_seed(0)
    model, plan = TinyNet(), _plan()
    optimizer, scheduler = _optimizer_and_scheduler(model, plan)
    lrs = [[g["lr"] for g in optimizer.param_groups]] + _train_steps(model, optimizer, scheduler, 11)
    for step, (backbone, backbone_nd, head, head_nd) in enumerate(lrs):
        assert head == pytest.approx(plan.lr_at(step), rel=1e-12)
        assert head_nd == head
        assert backbone == pytest.approx(0.1 * head, rel=1e-12)  # also during warm-up (the upstream lost this)
        assert backbone_nd == backbone


def test_resume_continues_at_the_same_lr_with_the_same_optimizer_state():
    torch.manual_seed(0)
    model, plan = TinyNet(), _plan()
    optimizer, scheduler = _optimizer_and_scheduler(model, plan)
    _train_steps(model, optimizer, scheduler, 5)
    saved = (optimizer.state_dict(), scheduler.state_dict(), {k: v.clone() for k, v in model.state_dict().items()})
    straight = _train_steps(model, optimizer, scheduler, 6)

    resumed_model = TinyNet()
    resumed_model.load_state_dict(saved[2])
    optimizer2, scheduler2 = _optimizer_and_scheduler(resumed_model, plan)
    optimizer2.load_state_dict(saved[0])
    scheduler2.load_state_dict(saved[1])
    assert scheduler2.last_epoch == 5
    assert [g["lr"] for g in optimizer2.param_groups] == pytest.approx([0.1 * plan.lr_at(5)] * 2 + [plan.lr_at(5)] * 2)
    assert _train_steps(resumed_model, optimizer2, scheduler2, 6) == straight


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_fast_forward_sets_the_lr_of_a_fresh_scheduler():
    model, plan = TinyNet(), _plan()
    optimizer, scheduler = _optimizer_and_scheduler(model, plan)
    fast_forward(scheduler, 9)
    assert scheduler.last_epoch == 9
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-5] * 2 + [5e-4] * 2, rel=1e-12)
    scheduler.step()
    assert optimizer.param_groups[2]["lr"] == pytest.approx(plan.lr_at(10), rel=1e-12)


def test_unfreeze_level_is_a_function_of_the_epoch():
    # The seed's command: 140 epochs, 30 in stage 1, progressive unfreezing of 4 stages.
    plan = UnfreezePlan(epochs=140, stage1_epochs=30, num_stages=4, freeze_stage1=True, progressive=True)
    levels = [plan.level(epoch) for epoch in range(140)]
    assert levels[:30] == [0] * 30
    changes = [(epoch, levels[epoch]) for epoch in range(30, 140) if levels[epoch] != levels[epoch - 1]]
    assert changes == [(30, 1), (55, 2), (79, 3), (104, None)]  # whole backbone for the last third
    assert plan.level(79) == UnfreezePlan(140, 30, 4, True, True).level(79)  # no state: resume gets the same
    assert UnfreezePlan(140, 30, 4, True, progressive=False).level(30) is None
    assert {UnfreezePlan(140, 30, 4, freeze_stage1=False, progressive=True).level(e) for e in range(140)} == {None}
    assert plan.describe(60) == "backbone: deepest 2/4 stages trainable"


@pytest.mark.parametrize(("mode", "pretrained", "expected"), [
    ("auto", True, True), ("auto", False, False), ("always", False, True), ("never", True, False)])
def test_stage1_freezes_only_pretrained_backbones_by_default(mode, pretrained, expected):
    assert should_freeze_backbone(mode, pretrained) is expected


def test_frozen_stages_get_no_grad_and_the_same_optimizer_trains_them_once_unfrozen():
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-2, weight_decay=0.05, backbone_lr_scale=0.1), lr=1e-2)
    stages = model.backbone_stages()
    assert set_trainable(model.backbone, stages, 0) is True
    assert set_trainable(model.backbone, stages, 0) is False  # unchanged: no DDP rebuild needed
    before = [p.detach().clone() for p in model.backbone.parameters()]
    model(torch.randn(2, 3, 6, 6)).mean().backward()
    optimizer.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))  # not even weight decay

    assert set_trainable(model.backbone, stages, 1) is True  # the deepest stage only
    assert [p.requires_grad for p in model.backbone.parameters()] == [False] * 4 + [False, False, True, True]
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(2, 3, 6, 6)).mean().backward()
    optimizer.step()
    assert not torch.equal(before[-2], model.backbone[3].weight)
    assert torch.equal(before[0], model.backbone[0].weight)
    set_trainable(model.backbone, stages, None)
    assert all(p.requires_grad for p in model.backbone.parameters())
