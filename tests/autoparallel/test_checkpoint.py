"""save_checkpoint / load_checkpoint / CheckpointKeeper: format, layouts, errors, atomicity, security."""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoparallel as ap
from autoparallel import (
    EMA,
    CheckpointKeeper,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UntrustedCheckpointError,
    load_checkpoint,
    save_checkpoint,
    unwrap,
)

DP_ON_CPU = ap.Runtime(mode="dp", device="cpu", device_ids=())
CPU_DDP = ap.Runtime(mode="ddp", device="cpu", device_ids=(), backend="gloo")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _assert_same(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def _clone(state: dict) -> dict:
    return {key: value.clone() for key, value in state.items()}


@pytest.fixture
def process_group(tmp_path_factory):
    """A one-process gloo group, so that DDP wrappers can be built inside the test process."""
    store = tmp_path_factory.mktemp("store") / "file"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------- portability

KINDS = ["plain", "dp", "ddp", "compiled", "ap_dp", "ap_ddp", "ema"]


def _wrapped(kind: str, net: nn.Module) -> nn.Module:
    if kind == "dp":
        return nn.DataParallel(net)
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(net)
    if kind == "compiled":
        return torch.compile(net)  # built only, never run: compiling would take seconds
    if kind == "ap_dp":
        return ap.wrap(net, runtime=DP_ON_CPU)
    if kind == "ap_ddp":
        return ap.wrap(net, runtime=CPU_DDP)
    return net


@pytest.mark.parametrize("target", KINDS)
@pytest.mark.parametrize("source", KINDS)
def test_portability_matrix(source, target, request, tmp_path):
    if any(kind.endswith("ddp") for kind in (source, target)):
        request.getfixturevalue("process_group")
    net = _net(0)
    wrapped = _wrapped("plain" if source == "ema" else source, net)
    ema = EMA(wrapped, decay=0.5)
    with torch.no_grad():
        for step in range(3):
            for param in net.parameters():
                param.add_(0.25 * (step + 1))
            net[1].running_mean.add_(1.0)
            net[1].num_batches_tracked.add_(1)
            ema.update()
    # "ema" exports the EMA weights as the model, as the application does for its best model
    saved = ema.module if source == "ema" else wrapped
    expected_model = _clone(unwrap(saved).state_dict())
    expected_ema = _clone(ema.module.state_dict())
    path = save_checkpoint(tmp_path / "c.pt", model=saved, ema=ema, epoch=4)
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in torch.load(path)["model"])

    fresh = _net(1)
    if target == "ema":
        target_ema = EMA(fresh, decay=0.5)
        info = load_checkpoint(path, ema=target_ema)
    else:
        model = _wrapped(target, fresh)
        target_ema = EMA(model, decay=0.5)
        info = load_checkpoint(path, model=model, ema=target_ema)
        _assert_same(fresh.state_dict(), expected_model)
    _assert_same(target_ema.module.state_dict(), expected_ema)
    assert target_ema.num_updates == 3
    assert info == {"epoch": 4, "step": None, "extra": {}, "loader": None, "format": "autoparallel"}


# --------------------------------------------------------------------------------------- the format


def test_format_is_plain_data_that_loads_with_weights_only(tmp_path):
    net = _net(0)
    ema = EMA(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    args = argparse.Namespace(lr=0.1, out=Path("/runs/a"), sizes=(1, 2))
    path = save_checkpoint(tmp_path / "sub" / "c.pt", model=nn.DataParallel(net), ema=ema, optimizer=optimizer,
                           scheduler=scheduler, scaler=scaler, epoch=3, step=30, args=args,
                           best_iou=np.float64(0.75), curve=np.arange(3))
    assert path == tmp_path / "sub" / "c.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint) == ["format", "version", "torch_version", "model", "ema", "optimizer", "scheduler",
                                "scaler", "loader", "epoch", "step", "rng", "extra", "digest"]
    assert (checkpoint["format"], checkpoint["version"], checkpoint["epoch"], checkpoint["step"]) == (
        "autoparallel", 2, 3, 30)
    assert checkpoint["loader"] is None
    assert len(checkpoint["digest"]) == 32  # 128-bit BLAKE2b, hex
    assert list(checkpoint["model"]) == list(net.state_dict())
    assert checkpoint["ema"]["step"] == 0
    assert list(checkpoint["ema"]["module"]) == list(net.state_dict())
    assert checkpoint["scaler"]["scale"] == 8.0
    assert checkpoint["scheduler"]["base_lrs"] == [0.1]
    extra = checkpoint["extra"]
    assert extra["args"] == {"lr": 0.1, "out": "/runs/a", "sizes": (1, 2)}
    assert extra["best_iou"] == 0.75
    assert type(extra["best_iou"]) is float
    assert torch.equal(extra["curve"], torch.arange(3))
    (rng,) = checkpoint["rng"]
    assert set(rng) == {"python", "numpy", "torch", "cuda"}
    assert rng["numpy"]["kind"] == "MT19937"
    assert rng["numpy"]["keys"].shape == (624,)


def test_save_refuses_extra_that_would_need_pickle(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['hook'\] of type function"):
        save_checkpoint(tmp_path / "c.pt", model=_net(), hook=lambda: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("saving", ["save_checkpoint", "keeper"])
@pytest.mark.parametrize("given", [None, "state_dict"])
def test_saving_without_the_model_itself_says_what_to_pass_and_writes_nothing(saving, given, tmp_path):
    model = None if given is None else _net().state_dict()
    keeper = CheckpointKeeper(tmp_path)
    save = keeper.save if saving == "keeper" else lambda **kw: save_checkpoint(tmp_path / "c.pt", **kw)
    with pytest.raises(TypeError, match=r"needs model=<your nn.Module>.*got (NoneType|OrderedDict).*not its"):
        save(model=model, epoch=0)
    assert list(tmp_path.iterdir()) == []

def test_load_without_objects_returns_metadata(tmp_path):
    save_checkpoint(tmp_path / "c.pt", model=_net(), epoch=2, step=7, best_iou=0.5)
    info = load_checkpoint(tmp_path / "c.pt")
    assert info == {"epoch": 2, "step": 7, "extra": {"best_iou": 0.5}, "loader": None, "format": "autoparallel"}


def test_read_checkpoint_once_then_load_what_was_read(tmp_path):
    save_checkpoint(tmp_path / "c.pt", model=_net(1), epoch=3, args={"width": 4})
    checkpoint = ap.read_checkpoint(tmp_path / "c.pt")
    assert checkpoint["extra"] == {"args": {"width": 4}}  # enough to build the model before loading it
    (tmp_path / "c.pt").unlink()  # loading what was read needs the file no more
    model = _net(0)
    assert load_checkpoint(checkpoint, model=model)["epoch"] == 3
    for name, value in _net(1).state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(TypeError, match="file path or what read_checkpoint.*not a state dict"):
        load_checkpoint(_net(1).state_dict(), model=model)


def test_restore_rng_replays_python_numpy_and_torch(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "c.pt", model=_net())
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    load_checkpoint(tmp_path / "c.pt", restore_rng=True)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == again[:2]
    assert torch.equal(expected[2], again[2])


def test_rng_capture_leaves_an_uninitialised_cuda_alone(tmp_path, monkeypatch):
    def creates_a_context(*args):
        raise AssertionError("reading a CUDA generator would initialise CUDA in a CPU run")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a 2-GPU machine, running on the CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", creates_a_context)
    save_checkpoint(tmp_path / "cpu.pt", model=_net())
    assert torch.load(tmp_path / "cpu.pt")["rng"][0]["cuda"] == {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # a GPU run: every visible GPU is saved
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda index: torch.full((2,), index, dtype=torch.uint8))
    save_checkpoint(tmp_path / "gpu.pt", model=_net())
    assert {index: state.tolist() for index, state in torch.load(tmp_path / "gpu.pt")["rng"][0]["cuda"].items()} == {
        0: [0, 0], 1: [1, 1]}


# ------------------------------------------------------------------------------------- other layouts


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_raw_state_dict_with_wrapper_prefixes_loads_into_plain_model(prefix, tmp_path):
    source = _net(0)
    torch.save({prefix + key: value for key, value in source.state_dict().items()}, tmp_path / "raw.pth")
    target = _net(1)
    info = load_checkpoint(tmp_path / "raw.pth", model=target)
    _assert_same(target.state_dict(), source.state_dict())
    assert info == {"epoch": None, "step": None, "extra": {}, "loader": None, "format": "raw"}


class _WithBackbone(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.backbone = _net(seed)
        self.head = nn.Linear(3, 1)


def test_prefix_at_depth_loads(tmp_path):
    source = _WithBackbone(0)
    source.backbone = nn.DataParallel(source.backbone)  # keys "backbone.module.0.weight", ...
    torch.save({"state_dict": source.state_dict()}, tmp_path / "deep.pth")
    target = torch.compile(_WithBackbone(1))
    assert load_checkpoint(tmp_path / "deep.pth", model=target)["format"] == "state_dict"
    _assert_same(unwrap(target).backbone.state_dict(), source.backbone.module.state_dict())
    # and saving a model with a wrapped submodule writes clean keys
    path = save_checkpoint(tmp_path / "c.pt", model=source)
    assert "backbone.0.weight" in torch.load(path)["model"]


class _RealModuleAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(2, 2)
        self.other = nn.Linear(2, 2)


def test_a_submodule_really_named_module_still_loads(tmp_path):
    torch.manual_seed(0)
    source = _RealModuleAttribute()
    torch.save(source.state_dict(), tmp_path / "raw.pt")
    torch.manual_seed(1)
    target = nn.DataParallel(_RealModuleAttribute())
    load_checkpoint(tmp_path / "raw.pt", model=target)
    _assert_same(target.module.state_dict(), source.state_dict())


def test_tutorial_layout_with_parameter_only_ema_loads_model_ema_and_metadata(tmp_path):
    model, ema_source = _net(0), _net(2)
    shadow = {f"module.{name}": p.detach().clone() for name, p in ema_source.named_parameters()}  # params only
    args = {"backbone": "edgenext_base", "num_experts": 7, "lr": 0.00025}
    torch.save({"epoch": 41, "model_state_dict": model.state_dict(), "ema_state_dict": shadow,
                "best_iou": 0.7123, "args": args}, tmp_path / "best_model.pth")
    target = nn.DataParallel(_net(1))
    ema = EMA(target, decay=0.999)
    info = load_checkpoint(tmp_path / "best_model.pth", model=target, ema=ema)
    assert info == {"epoch": 41, "step": None, "extra": {"best_iou": 0.7123, "args": args}, "loader": None,
                    "format": "tutorial"}
    _assert_same(target.module.state_dict(), model.state_dict())
    for name, param in ema.module.named_parameters():
        assert torch.equal(param, shadow[f"module.{name}"]), name
    for name, buffer in ema.module.named_buffers():  # upstream kept no buffers: taken from the model
        assert torch.equal(buffer, model.state_dict()[name]), name
    assert ema.num_updates == 31622  # unknown history: warm-up treated as finished, 1 - (1 + t)^-2/3 >= 0.999
    assert ema.current_decay() == 0.999


def test_timm_checkpoint_with_namespace_needs_trust(tmp_path):
    model, ema_model = _net(0), _net(2)
    torch.save({"epoch": 9, "arch": "mlp", "state_dict": model.state_dict(), "state_dict_ema": ema_model.state_dict(),
                "args": argparse.Namespace(lr=0.1), "version": 2}, tmp_path / "timm.pth.tar")
    with pytest.raises(UntrustedCheckpointError) as refused:
        load_checkpoint(tmp_path / "timm.pth.tar", model=_net(1))
    assert str(tmp_path / "timm.pth.tar") in str(refused.value)
    assert "argparse.Namespace" in str(refused.value)
    target, ema = _net(1), EMA(_net(1))
    info = load_checkpoint(tmp_path / "timm.pth.tar", model=target, ema=ema, trusted=True)
    _assert_same(target.state_dict(), model.state_dict())
    _assert_same(ema.module.state_dict(), ema_model.state_dict())
    assert info["format"] == "state_dict"
    assert info["epoch"] == 9
    assert info["extra"] == {"arch": "mlp", "args": argparse.Namespace(lr=0.1), "version": 2}


def test_torchvision_reference_checkpoint_restores_optimizer(tmp_path):
    model = _net(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}, tmp_path / "tv.pth")
    target = _net(1)
    target_optimizer = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    assert load_checkpoint(tmp_path / "tv.pth", model=target, optimizer=target_optimizer)["format"] == "model"
    assert target_optimizer.param_groups[0]["lr"] == 0.5
    first = next(iter(target_optimizer.state.values()))["momentum_buffer"]
    assert torch.equal(first, next(iter(optimizer.state.values()))["momentum_buffer"])


def test_load_reads_to_the_cpu_and_the_optimizer_state_follows_the_parameters(tmp_path, monkeypatch):
    model = _net(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=optimizer)
    read_to = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        read_to.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    target = _net(1)
    target_optimizer = torch.optim.Adam(target.parameters(), lr=0.1)
    load_checkpoint(path, model=target, optimizer=target_optimizer)
    # "cpu", not the runtime's device: reading to a GPU would leave Adam's step counters there
    assert read_to == ["cpu"]
    assert type(read_to[0]) is str
    for param, state in zip(target.parameters(), (target_optimizer.state[p] for p in target.parameters())):
        assert (state["step"].device.type, state["step"].item()) == ("cpu", 1.0)
        assert state["exp_avg"].device == param.device
        assert state["exp_avg_sq"].device == param.device
    device = torch.device("cpu")
    load_checkpoint(path, model=target, map_location=device)
    assert read_to[1] is device  # an explicit choice is passed through


# -------------------------------------------------------------------------------------------- errors


def test_missing_file_names_it_and_lists_what_is_there(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as missing:
        load_checkpoint(tmp_path / "best.pt")
    assert isinstance(missing.value, CheckpointNotFoundError)
    assert str(missing.value) == (f"checkpoint {tmp_path / 'best.pt'} does not exist; "
                                  f"checkpoint files in {tmp_path}: last.pt")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=f"checkpoint {tmp_path} is a folder"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_gets_its_own_error(damage, tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", model=_net())
    data = {"truncated": path.read_bytes()[: path.stat().st_size // 2], "garbage": b"not a checkpoint at all",
            "empty": b""}[damage]
    path.write_bytes(data)
    model = _net(1)
    before = _clone(model.state_dict())
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {path} "):
        load_checkpoint(path, model=model)
    _assert_same(model.state_dict(), before)


def test_a_flipped_byte_is_refused_or_changes_nothing_never_a_silently_different_model(tmp_path):
    saved = _net()
    path = save_checkpoint(tmp_path / "c.pt", model=saved, optimizer=torch.optim.SGD(saved.parameters(), lr=0.1))
    original, refused = path.read_bytes(), 0
    for position in range(0, len(original), max(1, len(original) // 200)):  # 200 places, headers to data
        damaged = bytearray(original)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        model = _net(1)
        before = _clone(model.state_dict())
        try:
            load_checkpoint(path, model=model)
        except CorruptCheckpointError as error:
            assert f"checkpoint {path} " in str(error)  # noqa: PT017 (a refusal is one of two right outcomes)
            _assert_same(model.state_dict(), before)  # refused: nothing loaded
            refused += 1
        else:  # a byte nothing reads (a zip header's timestamp, alignment padding): the saved values exactly
            _assert_same(model.state_dict(), saved.state_dict())
    assert refused > 100  # most bytes are tensor data and pickled structure


@pytest.mark.parametrize("mark", [b"X\x06\x00\x00\x00digest", b"X\x06\x00\x00\x00format"])  # pickled key names
def test_a_damaged_digest_or_format_name_does_not_turn_the_digest_check_off(mark, tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", model=_net())
    data = path.read_bytes()
    assert data.count(mark) == 1  # the key, in the zip's uncompressed data.pkl
    path.write_bytes(data.replace(mark, mark[:-1] + b"_"))
    with pytest.raises(CorruptCheckpointError, match="do not match the digest"):
        load_checkpoint(path, model=_net(1))


def test_a_well_formed_file_whose_values_changed_is_refused_by_its_digest(tmp_path):
    # What a container check cannot see: a valid file whose tensors are not the ones saved (a bad copy, a
    # tool that rewrote it); the digest saved with the values is what catches it.
    path = save_checkpoint(tmp_path / "c.pt", model=_net())
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["model"]))
    payload["model"][name] = payload["model"][name] + 1
    torch.save(payload, path)
    model = _net(1)
    before = _clone(model.state_dict())
    with pytest.raises(CorruptCheckpointError, match="do not match the digest"):
        load_checkpoint(path, model=model)
    _assert_same(model.state_dict(), before)


def test_architecture_mismatch_lists_keys_and_loads_nothing(tmp_path):
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 7))
    path = save_checkpoint(tmp_path / "best.pt", model=saved)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5), nn.Linear(5, 2))
    before = _clone(model.state_dict())
    with pytest.raises(CheckpointMismatchError) as mismatch:
        load_checkpoint(path, model=model)
    assert str(mismatch.value).startswith(
        f"checkpoint {path} does not match the model: 2 missing keys (2.weight, 2.bias), "
        "2 with another shape (1.weight: checkpoint [7, 8] vs model [5, 8], 1.bias: checkpoint [7] vs model [5])")
    _assert_same(model.state_dict(), before)


def test_mismatch_lists_a_few_names_and_a_count(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", model=nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)]))
    with pytest.raises(CheckpointMismatchError, match=r"8 unexpected \(0\.weight, 0\.bias, 1\.weight, and 5 more\)"):
        load_checkpoint(path, model=nn.Identity())


def test_strict_false_loads_what_matches_and_logs_the_rest(tmp_path, caplog):
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 7))
    path = save_checkpoint(tmp_path / "c.pt", model=saved)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5))
    kept = _clone(model[1].state_dict())
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        load_checkpoint(path, model=model, strict=False)
    _assert_same(model[0].state_dict(), saved[0].state_dict())
    _assert_same(model[1].state_dict(), kept)
    assert "loading 2 matching tensors; skipped 2 with another shape (1.weight" in caplog.text


def test_strict_false_reports_what_the_ema_left_out_once(tmp_path, caplog):
    saved = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 7))
    path = save_checkpoint(tmp_path / "c.pt", model=saved, ema=EMA(saved), step=3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5))
    ema = EMA(model)
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        load_checkpoint(path, model=model, ema=ema, strict=False)
    _assert_same(ema.module[0].state_dict(), saved[0].state_dict())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # one for the model, one for the EMA
    assert ["EMA" in m and "skipped 2 with another shape" in m for m in messages] == [False, True], messages


def test_ema_mismatch_leaves_the_model_untouched(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", model=_net(0), ema=EMA(_net(0)))
    model = _net(1)
    before = _clone(model.state_dict())
    with pytest.raises(CheckpointMismatchError, match=f"checkpoint {path} does not match the EMA"):
        load_checkpoint(path, model=model, ema=EMA(nn.Linear(6, 3)))
    _assert_same(model.state_dict(), before)


def test_optimizer_mismatch_leaves_the_model_untouched(tmp_path):
    saved = _net(0)
    path = save_checkpoint(tmp_path / "c.pt", model=saved, optimizer=torch.optim.AdamW(saved.parameters()))
    model = _net(1)
    before = _clone(model.state_dict())
    optimizer = torch.optim.AdamW(list(model.parameters())[:2])  # a frozen-backbone optimizer
    with pytest.raises(CheckpointMismatchError, match=f"checkpoint {path}: optimizer group 0 has 6 parameters in "
                                                      "the checkpoint, 2 in the optimizer"):
        load_checkpoint(path, model=model, optimizer=optimizer)
    _assert_same(model.state_dict(), before)


def test_newer_format_version_is_refused(tmp_path):
    torch.save({"format": "autoparallel", "version": 3, "model": {}}, tmp_path / "new.pt")
    with pytest.raises(CheckpointMismatchError, match=f"checkpoint {tmp_path / 'new.pt'} has format version 3"):
        load_checkpoint(tmp_path / "new.pt")


def test_unrecognised_content(tmp_path):
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointMismatchError, match="holds no model weights I recognise; its top-level keys are "
                                                      "weights"):
        load_checkpoint(tmp_path / "odd.pt", model=_net())


# ------------------------------------------------------------------------------------------ security


class _CreatesFile:
    """Unpickling this object opens (creates) a file: what a malicious checkpoint could do."""

    def __init__(self, target: Path, via_shell: bool) -> None:
        self.target, self.via_shell = target, via_shell

    def __reduce__(self):
        if self.via_shell:
            return (os.system, (f"touch {self.target}",))
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("via_shell", [False, True])
def test_checkpoint_that_runs_code_is_refused_and_runs_nothing(via_shell, tmp_path):
    victim = tmp_path / "pwned"
    torch.save({"model_state_dict": _net().state_dict(), "payload": _CreatesFile(victim, via_shell)},
               tmp_path / "evil.pth")
    model = _net(1)
    before = _clone(model.state_dict())
    with pytest.raises(UntrustedCheckpointError) as refused:
        load_checkpoint(tmp_path / "evil.pth", model=model)
    message = str(refused.value)
    assert f"checkpoint {tmp_path / 'evil.pth'} needs pickled Python objects" in message
    assert ("posix.system" if via_shell else "io.open") in message
    assert "arbitrary code" in message
    assert "trusted=True" in message
    assert not victim.exists()
    _assert_same(model.state_dict(), before)


def test_trusted_legacy_pickle_loads(tmp_path):
    model = _net(0)
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "ema_state_dict": None, "best_iou": 0.5,
                "args": argparse.Namespace(backbone="edgenext_base")}, tmp_path / "legacy.pth")
    target = _net(1)
    info = load_checkpoint(tmp_path / "legacy.pth", model=target, trusted=True)
    _assert_same(target.state_dict(), model.state_dict())
    assert info["extra"] == {"best_iou": 0.5, "args": argparse.Namespace(backbone="edgenext_base")}


# -------------------------------------------------------------------------------- keeper, atomicity


def test_keeper_keeps_last_best_and_the_last_epochs(tmp_path):
    keeper = CheckpointKeeper(tmp_path / "run", keep_last=2)
    assert keeper.last is None
    assert keeper.best is None
    model = _net()
    for epoch, is_best in enumerate([True, False, True, False]):
        assert keeper.save(model=model, epoch=epoch, is_best=is_best, best_iou=0.1 * epoch) == tmp_path / "run/last.pt"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "epoch_0002.pt", "epoch_0003.pt",
                                                                    "last.pt"]
    assert load_checkpoint(keeper.last)["epoch"] == 3
    assert load_checkpoint(keeper.best)["epoch"] == 2
    assert load_checkpoint(keeper.epoch_files()[0])["epoch"] == 2
    with pytest.raises(ValueError, match="pass epoch="):
        keeper.save(model=model)


def _dead_pid() -> int:
    """The pid of a process that has exited (a fixed number such as 123 may be a live kernel thread)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_save_removes_temporaries_left_by_a_killed_save(tmp_path):
    stale = tmp_path / f".c.pt.{_dead_pid()}-deadbeef.tmp"
    stale.write_bytes(b"partial")
    save_checkpoint(tmp_path / "c.pt", model=_net())
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_temporary_of_a_running_process_is_left_alone(tmp_path):
    live = tmp_path / f".c.pt.{os.getpid()}-deadbeef.tmp"  # perhaps another job saving into this folder now
    live.write_bytes(b"in progress")
    save_checkpoint(tmp_path / "c.pt", model=_net())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "c.pt"])


def test_a_new_keeper_removes_temporaries_left_by_a_killed_save_before_anything_is_saved(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"kept")  # not a temporary: left alone
    stale = tmp_path / f".last.pt.{_dead_pid()}-deadbeef.tmp"
    stale.write_bytes(b"partial" * 1000)
    CheckpointKeeper(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def _save_versions(path: Path, first_version: int, pipe: int, pause_after_bytes: int | None) -> None:
    """Child process: saves versions first_version, first_version + 1, ... reporting each one on ``pipe``.

    With ``pause_after_bytes`` it stops inside the next save, once that many bytes are out, says so on the
    pipe and waits to be killed: a kill in the middle of a write that does not depend on timing.
    """
    torch.set_num_threads(1)
    model = nn.Linear(700, 700)  # about 2 MB
    if pause_after_bytes is not None:
        real_save = torch.save

        def pausing_save(obj, handle, *args, **kwargs):
            class Pausing:  # the handle, with writes counted
                written = 0

                def write(self, data):
                    result = handle.write(data)
                    Pausing.written += len(data)
                    if Pausing.written >= pause_after_bytes:
                        handle.flush()
                        os.write(pipe, b"m")
                        time.sleep(600)
                    return result

                def __getattr__(self, name):
                    return getattr(handle, name)

            return real_save(obj, Pausing(), *args, **kwargs)

        torch.save = pausing_save
    version = first_version
    while True:
        with torch.no_grad():
            model.weight.fill_(version)
            model.bias.fill_(version)
        save_checkpoint(path, model=model, step=version)
        os.write(pipe, b"s")
        version += 1


def _wait_for(read_end: int, wanted: bytes) -> None:
    import select

    # Bounds a hang only: a child that never reports within 60 s is broken, not slow.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if ready and wanted in os.read(read_end, 64):
            return
    raise AssertionError(f"the saving child never reported {wanted!r}")


def test_sigkill_during_save_always_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    model = nn.Linear(700, 700)
    with torch.no_grad():
        model.weight.fill_(0)
        model.bias.fill_(0)
    save_checkpoint(path, model=model, step=0)
    context = multiprocessing.get_context("fork")  # starts at once: the child inherits the imported torch
    # Half the kills land in the middle of writing a file (the child pauses there); the others at random
    # moments after at least one more save completed, wherever the child then is.
    plans = [(1_000_000, 0.0) if k % 2 == 0 else (None, random.Random(k).uniform(0.0, 0.05)) for k in range(10)]
    version = 0
    for pause_after_bytes, delay_s in plans:
        read_end, write_end = os.pipe()
        child = context.Process(target=_save_versions, args=(path, version + 1, write_end, pause_after_bytes),
                                daemon=True)
        child.start()
        _wait_for(read_end, b"m" if pause_after_bytes else b"s")
        time.sleep(delay_s)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        os.close(read_end)
        os.close(write_end)
        assert child.exitcode == -signal.SIGKILL
        if pause_after_bytes:
            assert list(tmp_path.glob(".c.pt.*.tmp")), "the kill should have left a half-written temporary file"
        loaded = nn.Linear(700, 700)
        info = load_checkpoint(path, model=loaded)
        assert info["step"] >= version + (0 if pause_after_bytes else 1)
        version = info["step"]
        assert bool((loaded.weight == version).all())
        assert bool((loaded.bias == version).all())
    assert version >= 5  # the children did overwrite the file


# ------------------------------------------------------------------------------------- exact resume


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _training_objects(seed: int, steps_total: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    ema = EMA(model, decay=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    warmup = 4

    def warmup_cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (steps_total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=4)
    return model, ema, optimizer, scheduler, scaler


def _train_epochs(objects, dataset, epochs) -> None:
    model, ema, optimizer, scheduler, scaler = objects
    model.train()
    for epoch in epochs:
        # a resumable loader re-seeds its shuffling generator from the epoch (as autoparallel.loader does)
        order = torch.Generator().manual_seed(1000 + epoch)
        for x, y in DataLoader(dataset, batch_size=8, shuffle=True, generator=order):
            jitter = 0.01 * random.random() + 0.01 * float(np.random.rand())  # python and numpy RNG matter too
            loss = F.mse_loss(model(x + jitter), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            ema.update()


@pytest.mark.parametrize("restore_rng", [True, False])
def test_resume_is_exact(restore_rng, tmp_path):
    data = torch.Generator().manual_seed(7)
    dataset = TensorDataset(torch.randn(48, 6, generator=data), torch.randn(48, 2, generator=data))
    epochs, stop = 4, 2
    total_steps = epochs * len(dataset) // 8

    _seed_everything(0)
    straight = _training_objects(0, total_steps)
    _train_epochs(straight, dataset, range(epochs))

    _seed_everything(0)
    first = _training_objects(0, total_steps)
    _train_epochs(first, dataset, range(stop))
    model, ema, optimizer, scheduler, scaler = first
    save_checkpoint(tmp_path / "last.pt", model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                    scaler=scaler, epoch=stop - 1, step=stop * len(dataset) // 8)
    del first, model, ema, optimizer, scheduler, scaler

    _seed_everything(123)  # a new process: other seeds, other initial weights
    resumed = _training_objects(5, total_steps)
    model, ema, optimizer, scheduler, scaler = resumed
    info = load_checkpoint(tmp_path / "last.pt", model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, restore_rng=restore_rng)
    assert (info["epoch"], info["step"]) == (stop - 1, 12)
    _train_epochs(resumed, dataset, range(info["epoch"] + 1, epochs))

    same = [torch.equal(a, b) for a, b in zip(straight[0].state_dict().values(), model.state_dict().values())]
    if not restore_rng:  # dropout and jitter differ: the comparison below can fail
        assert not all(same)
        return
    assert all(same)
    _assert_same(ema.module.state_dict(), straight[1].module.state_dict())
    assert ema.num_updates == straight[1].num_updates == 24
    for mine, theirs in zip(optimizer.state.values(), straight[2].state.values()):
        assert all(torch.equal(mine[name], theirs[name]) for name in ("step", "exp_avg", "exp_avg_sq"))
    assert scheduler.state_dict() == straight[3].state_dict()
    assert scaler.state_dict() == straight[4].state_dict()
    assert scaler.get_scale() > 2.0**10


def test_ema_weights_load_into_a_plain_module(tmp_path):
    source = _net(0)
    ema = EMA(source, decay=0.5)
    with torch.no_grad():
        source[0].weight.add_(1.0)
    ema.update()
    path = save_checkpoint(tmp_path / "c.pt", model=source, ema=ema)
    evaluation_copy = nn.DataParallel(_net(1))  # e.g. another library's EMA module
    load_checkpoint(path, ema=evaluation_copy)
    _assert_same(evaluation_copy.module.state_dict(), ema.module.state_dict())
