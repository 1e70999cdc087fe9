"""EMA: the average, its warm-up, buffers, wrappers, placement and state dict."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import autoparallel as ap
from autoparallel import EMA, CheckpointMismatchError

DP_ON_CPU = ap.Runtime(mode="dp", device="cpu", device_ids=())
CPU_DDP = ap.Runtime(mode="ddp", device="cpu", device_ids=(), backend="gloo")


def _scalar_model(value: float) -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)


def test_update_is_the_exponential_average():
    model = _scalar_model(0.0)
    ema = EMA(model, decay=0.75, warmup=False)
    for value, expected in [(4.0, 1.0), (4.0, 1.75), (-8.0, -0.6875)]:
        _set(model, value)
        ema.update()
        assert ema.module.weight.item() == expected
    assert ema.num_updates == 3


def test_warmup_starts_by_copying_and_grows_to_the_decay():
    model = _scalar_model(0.0)
    ema = EMA(model, decay=0.5)
    decays = []
    for value in (8.0, 16.0, 0.0):
        decays.append(ema.current_decay())
        _set(model, value)
        ema.update()
    assert decays[0] == 0.0  # the first update copies the model
    assert decays[1] == pytest.approx(1 - 2 ** (-2 / 3))
    assert decays[2] == 0.5  # 1 - 3^(-2/3) = 0.52, capped at the decay
    assert ema.module.weight.item() == pytest.approx((8 + (16 - 8) * 2 ** (-2 / 3)) * 0.5)
    assert ema.num_updates == 3


def test_warmup_decay_follows_the_power_form_and_is_capped():
    ema = EMA(_scalar_model(0.0), decay=0.999)
    for step, expected in [(0, 0.0), (1, 1 - 2 ** (-2 / 3)), (7, 0.75), (999, 0.99), (10**6, 0.999)]:
        ema.num_updates = step
        assert ema.current_decay() == pytest.approx(expected, abs=1e-12)
    assert EMA(_scalar_model(0.0), decay=0.9, warmup=False).current_decay() == 0.9


def test_buffers_are_averaged_and_integer_buffers_copied():
    model = nn.BatchNorm1d(2)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.running_mean.fill_(4.0)
        model.num_batches_tracked.fill_(7)
    ema.update()
    assert ema.module.running_mean.tolist() == [2.0, 2.0]
    assert ema.module.num_batches_tracked.item() == 7
    assert ema.module.num_batches_tracked.dtype == torch.int64


def test_frozen_parameters_are_tracked_too():
    model = nn.Sequential(_scalar_model(0.0), _scalar_model(0.0))
    model[0].requires_grad_(False)
    ema = EMA(model, decay=0.5, warmup=False)
    _set(model[0], 2.0)  # e.g. a frozen backbone loaded from pretrained weights later
    _set(model[1], 4.0)
    ema.update()
    assert [ema.module[0].weight.item(), ema.module[1].weight.item()] == [1.0, 2.0]


def test_module_is_an_independent_eval_copy():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    model(torch.ones(1, 2)).sum().backward()
    ema = EMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad and p.grad is None for p in ema.module.parameters())
    assert all(p is not q for p, q in zip(ema.module.parameters(), model.parameters()))
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _train_and_average(kind: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    wrapped = {"plain": lambda: net, "dp": lambda: nn.DataParallel(net), "compiled": lambda: torch.compile(net),
               "ddp": lambda: nn.parallel.DistributedDataParallel(net),
               "ap_dp": lambda: ap.wrap(net, runtime=DP_ON_CPU),
               "ap_ddp": lambda: ap.wrap(net, runtime=CPU_DDP)}[kind]()
    ema = EMA(wrapped, decay=0.9)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 4, generator=data)
        # a compiled model is never run here (compiling takes seconds): it gets the same steps unwrapped
        out = (net if kind == "compiled" else wrapped)(x)
        optimizer.zero_grad()
        out.pow(2).mean().backward()
        optimizer.step()
        ema.update()
    assert list(ema.state_dict()["module"]) == list(net.state_dict())  # clean keys whatever the wrapper
    return ema.module.state_dict()


@pytest.mark.parametrize("kind", ["dp", "compiled", "ddp", "ap_dp", "ap_ddp"])
def test_same_average_whatever_the_wrapper(kind, request):
    if kind.endswith("ddp"):
        request.getfixturevalue("process_group")
    reference = _train_and_average("plain")
    result = _train_and_average(kind)
    assert all(torch.equal(result[key], reference[key]) for key in reference)


def test_update_communicates_with_nobody(process_group, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("EMA.update() issued a collective: it would hang when only rank 0 calls it")

    for name in ("broadcast", "all_reduce", "all_gather", "barrier"):
        monkeypatch.setattr(dist, name, refuse)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # so a `world size > 1` guard would call one
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model[1].running_mean.fill_(4.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update()
    assert ema.module[1].running_mean.tolist() == [2.0, 2.0]
    assert ema.module[1].num_batches_tracked.item() == 7


def test_the_average_of_a_half_precision_model_is_kept_in_fp32():
    model = nn.Linear(4, 4).to(torch.float16)
    ema = EMA(model, decay=0.9999, warmup=False)
    assert {p.dtype for p in ema.module.parameters()} == {torch.float32}
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    # 1e-4 of a step of 1.0: representable in fp32, lost entirely by an fp16 lerp (its spacing near 0.5 is 5e-4).
    torch.testing.assert_close(ema.module.weight - before, torch.full((4, 4), 1e-4), rtol=1e-2, atol=0)


def test_cpu_placement():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.5, device="cpu")
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update()
    assert {p.device.type for p in ema.module.parameters()} == {"cpu"}
    assert torch.equal(ema.module.weight, model.weight)  # first update copies


def test_follows_the_model_to_another_dtype():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5, warmup=False)
    model.double()
    ema.update()
    assert ema.module.weight.dtype == torch.float32  # the average keeps its own precision


def test_state_dict_round_trip_restores_weights_and_step():
    model = _scalar_model(1.0)
    ema = EMA(nn.DataParallel(model), decay=0.9)
    for value in (2.0, 3.0):
        _set(model, value)
        ema.update()
    state = ema.state_dict()
    assert list(state) == ["module", "step"]
    assert list(state["module"]) == ["weight"]
    other = EMA(_scalar_model(-5.0), decay=0.9)
    other.load_state_dict(state)
    assert other.num_updates == 2
    assert torch.equal(other.module.weight, ema.module.weight)


def test_load_a_bare_prefixed_state_dict():
    ema = EMA(_scalar_model(0.0), decay=0.99)
    ema.load_state_dict({"module._orig_mod.weight": torch.full((1, 1), 3.0)})
    assert ema.module.weight.item() == 3.0
    assert ema.num_updates == 999  # unknown history: warm-up counted as done, so the decay is 0.99 at once
    assert ema.current_decay() == 0.99


def test_load_mismatch_names_the_keys_and_changes_nothing():
    ema = EMA(nn.Linear(2, 2), decay=0.5)
    before = ema.module.weight.clone()
    with pytest.raises(CheckpointMismatchError, match=r"EMA state does not match the EMA: 1 missing key \(bias\), "
                                                      r"1 with another shape \(weight: checkpoint \[3, 2\] vs model "
                                                      r"\[2, 2\]\)"):
        ema.load_state_dict({"module": {"weight": torch.zeros(3, 2)}, "step": 4})
    assert torch.equal(ema.module.weight, before)
    assert ema.num_updates == 0


def test_structure_change_after_creation_is_reported():
    model = nn.Sequential(nn.Linear(2, 2))
    ema = EMA(model)
    model.append(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="the model now has 4 parameters and buffers, its EMA 2"):
        ema.update()


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_invalid_decay(decay):
    with pytest.raises(ValueError, match=f"EMA decay must be in \\[0, 1\\], got {decay}"):
        EMA(nn.Linear(1, 1), decay=decay)


def test_buffers_replaced_after_the_ema_was_made_are_the_ones_averaged():
    # `self.buf = tensor` (a module that re-binds a buffer) and .half() (which replaces every buffer) leave the
    # EMA's listed tensors stale unless it notices: it would go on averaging the old buffers, silently.
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.5, warmup=False)
    ema.update()
    model[1].running_mean = torch.full((2,), 4.0)
    ema.update()
    assert ema.module[1].running_mean.tolist() == [2.0, 2.0]  # halfway from 0 to the new buffer's 4
    model.half()
    with torch.no_grad():
        model[1].running_mean.fill_(8.0)
    ema.update()
    assert ema.module[1].running_mean.tolist() == [5.0, 5.0]  # halfway from 2 to 8: the half model's buffer
