"""Checkpoints as scripts make them: every file save_checkpoint writes loads back, state dicts of anything
holding our wrapper round-trip, and a mismatch is refused before anything is loaded."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import autoparallel as ap

DP_ON_CPU = ap.Runtime(mode="dp", device="cpu", device_ids=())


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train_step(model: nn.Module, optimizer) -> float:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------- 11: files that load back


def test_numpy_schedules_plateau_scheduler_and_numpy_or_path_keys_load_back(tmp_path):
    model = net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
    for epoch in range(3):
        for group in optimizer.param_groups:  # a numpy cosine schedule, as many scripts compute it
            group["lr"] = np.float64(1e-3) * (1 + np.cos(np.pi * epoch / 3)) / 2
        val_loss = np.float32(train_step(model, optimizer))
        plateau.step(val_loss)  # ReduceLROnPlateau keeps the numpy value as its best
    path = tmp_path / "numpy.pt"
    ap.save_checkpoint(path, model=model, optimizer=optimizer, scheduler=plateau, epoch=np.int64(2),
                       class_weights={np.int64(3): np.float32(0.5)}, files={Path("masks/a.png"): 1},
                       best=np.float64(0.25))
    loaded_model = net()
    loaded_optimizer = torch.optim.AdamW(loaded_model.parameters(), lr=1e-3)
    loaded_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(loaded_optimizer, patience=0)
    info = ap.load_checkpoint(path, model=loaded_model, optimizer=loaded_optimizer, scheduler=loaded_plateau)
    assert same_weights(model, loaded_model)
    assert info["epoch"] == 2
    assert info["extra"] == {"class_weights": {3: 0.5}, "files": {"masks/a.png": 1}, "best": 0.25}
    assert loaded_optimizer.param_groups[0]["lr"] == pytest.approx(float(optimizer.param_groups[0]["lr"]))
    assert loaded_plateau.best == pytest.approx(float(plateau.best))


def test_an_object_that_would_need_pickle_is_refused_at_save_time_and_nothing_is_written(tmp_path):
    class Config:
        lr = 0.1

    with pytest.raises(TypeError, match=r"save_checkpoint cannot store extra\['config'\] of type Config"):
        ap.save_checkpoint(tmp_path / "c.pt", model=net(), config=Config())
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------ 12: state dicts around our wrapper


class Trainer(nn.Module):
    """A container holding the wrapped model, as Lightning modules and training harnesses do."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(2, 1)


def test_a_container_and_torch_compile_around_the_wrapper_round_trip_their_own_state_dict():
    wrapped = ap.wrap(net(), runtime=DP_ON_CPU)
    container = Trainer(wrapped)
    state = container.state_dict()
    assert "model.0.weight" in state  # no "module." inside either
    container.load_state_dict(state)
    assert {name for name, _ in container.named_parameters()} <= set(state)  # the same names everywhere
    modules = {name for name, _ in container.named_modules()}
    parameters = {name.rsplit(".", 1)[0] for name, _ in container.named_parameters()}
    assert parameters <= modules  # named_modules agrees with named_parameters about the names
    compiled = torch.compile(ap.wrap(net(), runtime=DP_ON_CPU), backend="eager")
    compiled.load_state_dict(compiled.state_dict())
    fresh = ap.wrap(net(), runtime=DP_ON_CPU)
    fresh.load_state_dict({f"module.{key}": value for key, value in net().state_dict().items()})  # pre-migration


def test_wrapped_parameter_and_module_names_agree():
    wrapped = ap.wrap(net(), runtime=DP_ON_CPU)
    modules = dict(wrapped.named_modules())
    for name, parameter in wrapped.named_parameters():
        owner, _, attribute = name.rpartition(".")
        assert getattr(modules[owner], attribute) is parameter, name


# ------------------------------------------------- 13: validated before anything is loaded, other layouts


def _saved(tmp_path, optimizer_class=torch.optim.AdamW, groups: int = 1):
    model = net()
    parameters = list(model.parameters())
    param_groups = [{"params": parameters}] if groups == 1 else [{"params": parameters[:2]}, {"params": parameters[2:]}]
    optimizer = optimizer_class(param_groups, lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    train_step(model, optimizer)
    scheduler.step()
    path = tmp_path / "run.pt"
    ap.save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    return path


def test_a_mismatched_scheduler_is_refused_before_the_model_is_touched(tmp_path):
    path = _saved(tmp_path, groups=2)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    with pytest.raises(ap.CheckpointMismatchError, match="scheduler state covers 2 parameter groups"):
        ap.load_checkpoint(path, model=model, scheduler=scheduler)
    with pytest.raises(ap.CheckpointMismatchError, match="optimizer state has 2 parameter groups"):
        ap.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_a_scheduler_of_another_kind_is_refused(tmp_path):
    path = _saved(tmp_path)
    model = net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    with pytest.raises(ap.CheckpointMismatchError, match=r"scheduler state .* another scheduler"):
        ap.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)


def test_adamw_state_is_refused_by_sgd(tmp_path):
    path = _saved(tmp_path, optimizer_class=torch.optim.AdamW)
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with pytest.raises(ap.CheckpointMismatchError, match="another optimizer"):
        ap.load_checkpoint(path, model=model, optimizer=optimizer)


def test_strict_false_that_matches_nothing_is_an_error(tmp_path):
    path = _saved(tmp_path)
    unrelated = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ap.CheckpointMismatchError, match="none of the checkpoint's"):
        ap.load_checkpoint(path, model=unrelated, strict=False)


def test_a_torchvision_references_checkpoint_with_its_ema_loads(tmp_path):
    # torchvision's references/classification/train.py: {"model", "optimizer", "lr_scheduler", "epoch",
    # "model_ema"}, the EMA an AveragedModel whose state dict has "n_averaged" and "module." keys.
    model = net()
    ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        train_step(model, optimizer)
        ema_model.update_parameters(model)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 4,
                "model_ema": ema_model.state_dict()}, tmp_path / "checkpoint.pth")
    mine, ema = net(), ap.EMA(net(), decay=0.9)
    info = ap.load_checkpoint(tmp_path / "checkpoint.pth", model=mine, ema=ema)
    assert info["epoch"] == 4
    assert same_weights(mine, model)
    assert same_weights(ema.module, ema_model.module)
    assert ema.num_updates == 3


def test_a_lightning_checkpoint_loads_its_weights_and_optimizer(tmp_path):
    # Lightning saves the LightningModule's state dict, whose keys start with the attribute holding the
    # network ("model."), and the optimizers as a list.
    model = net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    train_step(model, optimizer)
    torch.save({"epoch": 1, "global_step": 7, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
                "optimizer_states": [optimizer.state_dict()], "lr_schedulers": []}, tmp_path / "last.ckpt")
    mine = net()
    mine_optimizer = torch.optim.AdamW(mine.parameters(), lr=0.01)
    info = ap.load_checkpoint(tmp_path / "last.ckpt", model=mine, optimizer=mine_optimizer)
    assert (info["format"], info["epoch"], info["step"]) == ("lightning", 1, 7)
    assert same_weights(mine, model)
    assert math.isclose(mine_optimizer.state_dict()["state"][0]["step"].item(), 1.0)
