"""wrap()/unwrap() keep a model a drop-in; the DataParallel scalar rule holds as a unit on CPU tensors."""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict, namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

from autoparallel import Runtime, unwrap, wrap
from autoparallel.dataparallel import DataParallel, dataparallel_split, merge_outputs, split_warning

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_gpus import cpu_parallel_apply, fake_gpus  # noqa: E402

CPU = Runtime(mode="cpu", device="cpu", device_ids=())
# On this CPU-only machine nn.DataParallel is a pass-through, so a "dp" runtime on the CPU builds the real
# wrapper structure (prefixes, attribute access) without GPUs.
DP_ON_CPU = Runtime(mode="dp", device="cpu", device_ids=())
dataparallel_module = sys.modules["autoparallel.dataparallel"]
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="DataParallel is a pass-through only without GPUs")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 1)
        self.num_experts = 7

    def stages(self) -> list[nn.Module]:
        return [self.head, self.backbone]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mask": self.head(self.norm(self.backbone(x))), "aux_loss": self.backbone.weight.pow(2).mean()}


class FakeOurWrapper(nn.Module):
    """Stands in for the DDP helper's wrapper: ours by the class attribute, model at .module."""

    _autoparallel_wrapper = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class HasChildNamedModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(2, 2)


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture(scope="module")
def compiled_net() -> nn.Module:
    torch.manual_seed(0)
    return torch.compile(Net())  # lazy: nothing is compiled until it is called


def test_cpu_runtime_returns_the_model_itself(net):
    assert wrap(net, runtime=CPU) is net


@needs_no_gpu
def test_dp_wraps_in_our_dataparallel_and_forwards(net):
    wrapped = wrap(net, runtime=DP_ON_CPU)
    assert type(wrapped) is DataParallel
    assert isinstance(wrapped, nn.DataParallel)
    assert wrapped.module is net
    x = torch.randn(6, 3)
    net.eval()
    assert torch.equal(wrapped(x)["mask"], net(x)["mask"])


@needs_no_gpu
def test_attribute_get_reaches_the_inner_model(net):
    wrapped = wrap(net, runtime=DP_ON_CPU)
    assert wrapped.backbone is net.backbone
    assert wrapped.num_experts == 7
    assert wrapped.stages() == [net.head, net.backbone]
    assert "num_experts" in dir(wrapped)
    with pytest.raises(AttributeError, match="'Net' object has no attribute 'missing'"):
        _ = wrapped.missing


@needs_no_gpu
def test_attribute_set_reaches_the_inner_model(net):
    wrapped = wrap(net, runtime=DP_ON_CPU)
    wrapped.num_experts = 5
    assert net.num_experts == 5
    assert "num_experts" not in wrapped.__dict__
    new_head = nn.Linear(4, 2)
    wrapped.head = new_head
    assert net.head is new_head
    assert "head." + "weight" in wrapped.state_dict()
    wrapped.stage = "two"  # a new public name goes to the model, so it survives unwrap() and saving
    assert net.stage == "two"
    wrapped._bookkeeping = 1  # a new private name stays on the wrapper
    assert "_bookkeeping" in wrapped.__dict__
    assert not hasattr(net, "_bookkeeping")
    del wrapped.stage
    assert not hasattr(net, "stage")
    wrapped.eval()
    assert (wrapped.training, net.training, net.norm.training) == (False, False, False)


@needs_no_gpu
def test_state_dict_and_names_have_no_prefix(net):
    wrapped = wrap(net, runtime=DP_ON_CPU)
    expected = list(net.state_dict())
    assert list(wrapped.state_dict()) == expected
    assert expected == ["backbone.weight", "backbone.bias", "norm.weight", "norm.bias", "norm.running_mean",
                        "norm.running_var", "norm.num_batches_tracked", "head.weight", "head.bias"]
    assert [name for name, _ in wrapped.named_parameters()] == [name for name, _ in net.named_parameters()]
    assert [name for name, _ in wrapped.named_buffers()] == ["norm.running_mean", "norm.running_var",
                                                            "norm.num_batches_tracked"]
    assert len(list(wrapped.parameters())) == 6


@needs_no_gpu
def test_load_state_dict_takes_plain_keys(net):
    wrapped = wrap(net, runtime=DP_ON_CPU)
    torch.manual_seed(1)
    other = Net()
    result = wrapped.load_state_dict(other.state_dict())
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert torch.equal(net.backbone.weight, other.backbone.weight)


@needs_no_gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_strict_false_reports_keys_by_the_names_state_dict_uses(compiled):
    wrapped = wrap(torch.compile(Net()) if compiled else Net(), runtime=DP_ON_CPU)
    partial = {name: value for name, value in wrapped.state_dict().items() if name != "head.bias"}
    result = wrapped.load_state_dict({**partial, "extra": torch.zeros(1)}, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["head.bias"], ["extra"])


@needs_no_gpu
def test_wrapping_twice_is_a_no_op(net):
    wrapped = wrap(net, runtime=DP_ON_CPU)
    assert wrap(wrapped, runtime=DP_ON_CPU) is wrapped
    assert wrap(wrapped, runtime=CPU) is wrapped


@needs_no_gpu
def test_a_plain_dataparallel_is_replaced_not_nested(net):
    wrapped = wrap(nn.DataParallel(nn.DataParallel(net)), runtime=DP_ON_CPU)
    assert type(wrapped) is DataParallel
    assert wrapped.module is net
    assert wrap(nn.DataParallel(net), runtime=CPU) is net


def test_unwrap_peels_every_wrapper(net):
    assert unwrap(net) is net
    assert unwrap(nn.DataParallel(nn.DataParallel(net))) is net
    assert unwrap(DataParallel(net)) is net
    assert unwrap(FakeOurWrapper(nn.DataParallel(net))) is net


def test_unwrap_leaves_a_child_named_module_alone():
    model = HasChildNamedModule()
    assert unwrap(model) is model


def test_unwrap_compiled_models(compiled_net):
    plain = compiled_net._orig_mod
    assert type(plain) is Net
    assert unwrap(compiled_net) is plain
    assert unwrap(nn.DataParallel(compiled_net)) is plain
    assert unwrap(torch.compile(DataParallel(compiled_net))) is plain


def test_cpu_wrap_of_a_compiled_model_keeps_it(compiled_net):
    assert wrap(compiled_net, runtime=CPU) is compiled_net


@needs_no_gpu
def test_dp_wrap_of_a_compiled_model_is_a_drop_in(compiled_net):
    wrapped = wrap(compiled_net, runtime=DP_ON_CPU)
    assert type(wrapped) is DataParallel
    assert wrapped.module is compiled_net
    assert list(compiled_net.state_dict())[0] == "_orig_mod.backbone.weight"
    assert list(wrapped.state_dict())[0] == "backbone.weight"
    assert wrapped.backbone is compiled_net._orig_mod.backbone
    wrapped.num_experts = 3
    assert compiled_net._orig_mod.num_experts == 3
    assert wrap(wrapped, runtime=DP_ON_CPU) is wrapped
    assert wrap(torch.compile(wrapped), runtime=DP_ON_CPU)._orig_mod is wrapped


@needs_no_gpu
def test_dp_on_several_gpus_wraps_the_uncompiled_model(compiled_net, caplog):
    two_gpus = Runtime(mode="dp", device="cpu", device_ids=(0, 1))  # on the CPU so the test runs anywhere
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        wrapped = wrap(compiled_net, runtime=two_gpus)
    assert wrapped.module is compiled_net._orig_mod
    assert "DataParallel cannot replicate a torch.compile'd model" in caplog.text


@pytest.mark.usefixtures("single_process_group")
def test_ddp_mode_gives_the_ddp_wrapper(net, caplog):
    ddp_cpu = Runtime(mode="ddp", device="cpu", device_ids=(), backend="gloo")
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        wrapped = wrap(net, runtime=ddp_cpu, sync_bn=True)
    assert wrapped.module is net
    assert unwrap(wrapped) is net
    assert "sync_bn=True ignored on cpu" in caplog.text
    assert wrap(wrapped, runtime=ddp_cpu) is wrapped
    with pytest.raises(ValueError, match="wrap\\(\\) got bucket_size, which DistributedDataParallel does not take"):
        wrap(Net(), runtime=ddp_cpu, bucket_size=25)


@pytest.mark.usefixtures("single_process_group")
@pytest.mark.parametrize("flag", [True, False])
def test_ddp_options_reach_torchs_ddp_and_are_ignored_outside_ddp(flag):
    # What they change across 2 ranks: tests/distributed/test_ddp.py (test_ddp_options_given_to_wrap_change_...)
    ddp_cpu = Runtime(mode="ddp", device="cpu", device_ids=(), backend="gloo")
    options = {"find_unused_parameters": flag, "gradient_as_bucket_view": flag, "bucket_cap_mb": 3}
    torch_ddp = wrap(Net(), runtime=ddp_cpu, **options).__dict__["_ddp"]  # the DistributedDataParallel inside
    assert isinstance(torch_ddp, nn.parallel.DistributedDataParallel)
    assert (torch_ddp.find_unused_parameters, torch_ddp.gradient_as_bucket_view) == (flag, flag)
    assert torch_ddp.bucket_bytes_cap == 3 * 1024 * 1024
    assert wrap(Net(), runtime=ddp_cpu, static_graph=True).__dict__["_ddp"].static_graph
    plain = Net()
    assert wrap(plain, runtime=CPU, **options, broadcast_buffers=flag) is plain


def _scalars(values, sizes=None):
    return merge_outputs(values, sizes, torch.cat)


def test_float_scalars_are_means_weighted_by_batch_share():
    result = _scalars([torch.tensor(2.0), torch.tensor(4.0)], [3, 1])
    assert (result.shape, result.item()) == ((), 2.5)
    assert _scalars([torch.tensor(2.0), torch.tensor(4.0)]).item() == 3.0
    half = _scalars([torch.tensor(1.0, dtype=torch.float16), torch.tensor(2.0, dtype=torch.float16)], [1, 1])
    assert (half.dtype, half.item()) == (torch.float16, 1.5)
    with pytest.raises(ValueError, match="2 replica outputs but 3 batch shares"):
        _scalars([torch.tensor(1.0), torch.tensor(2.0)], [1, 1, 1])


def test_integer_scalars_are_counts_and_flags_are_any():
    counts = _scalars([torch.tensor(3), torch.tensor(4)], [2, 1])
    assert (counts.dtype, counts.item()) == (torch.int64, 7)
    flags = _scalars([torch.tensor(False), torch.tensor(True)], [2, 1])
    assert (flags.dtype, flags.item()) == (torch.bool, True)
    assert _scalars([3, 4], [2, 1]) == 7
    assert _scalars([False, False], [2, 1]) is False


def test_gathered_replica_losses_equal_the_full_batch_loss_and_gradient():
    torch.manual_seed(0)
    weight = torch.randn(3, requires_grad=True)
    x, y = torch.randn(5, 3), torch.randn(5)
    full = ((x @ weight - y) ** 2).mean()
    (full_grad,) = torch.autograd.grad(full, weight)
    sizes = dataparallel_split(5, 2)
    assert sizes == [3, 2]
    replica_losses = [((xs @ weight - ys) ** 2).mean() for xs, ys in zip(x.split(sizes), y.split(sizes))]
    gathered = _scalars(replica_losses, sizes)
    (gathered_grad,) = torch.autograd.grad(gathered, weight)
    # Float tolerance: a weighted mean of the parts sums in another order than the full batch's mean.
    torch.testing.assert_close(gathered, full)
    torch.testing.assert_close(gathered_grad, full_grad)
    assert abs(sum(replica_losses).item() / 2 - full.item()) > 1e-3  # a plain mean would be wrong here


Output = namedtuple("Output", ["mask", "aux"])


def test_gather_outputs_keeps_structure_and_scalars():
    def replica(offset: float, rows: int):
        mask = torch.full((rows, 1), offset)
        return (
            mask,
            torch.tensor(offset),
            [mask, torch.tensor(10 * offset)],
            OrderedDict(mask=mask, aux=torch.tensor(offset), nested={"deep": (torch.tensor(offset),)}),
            Output(mask, torch.tensor(offset)),
            None,
            "name",
            offset,
        )

    outputs = [replica(1.0, 3), replica(5.0, 1)]
    merged = merge_outputs(outputs, [3, 1], lambda tensors: torch.cat(tensors, 0))
    expected_mask = torch.tensor([[1.0], [1.0], [1.0], [5.0]])
    assert type(merged) is tuple
    assert torch.equal(merged[0], expected_mask)
    assert merged[1].shape == ()
    assert merged[1].item() == 2.0
    assert type(merged[2]) is list
    assert torch.equal(merged[2][0], expected_mask)
    assert merged[2][1].item() == 20.0
    assert type(merged[3]) is OrderedDict
    assert list(merged[3]) == ["mask", "aux", "nested"]
    assert merged[3]["aux"].shape == ()
    assert merged[3]["nested"]["deep"][0].item() == 2.0
    assert type(merged[4]) is Output
    assert merged[4].aux.item() == 2.0
    assert torch.equal(merged[4].mask, expected_mask)
    assert merged[5:] == (None, "name", 2.0)


def test_gather_outputs_rejects_mismatched_dicts():
    with pytest.raises(ValueError, match="dicts with different keys"):
        merge_outputs([{"a": torch.tensor(1.0)}, {"b": torch.tensor(1.0)}], None, torch.cat)


@pytest.mark.parametrize(("batch", "gpus"), [(8, 2), (5, 2), (5, 4), (1, 2), (7, 3), (16, 5), (3, 8)])
def test_dataparallel_split_matches_torch_chunk(batch, gpus):
    assert dataparallel_split(batch, gpus) == [len(piece) for piece in torch.arange(batch).chunk(gpus)]


def test_split_warnings():
    assert split_warning(8, 2) is None
    assert split_warning(1, 2) == ("DataParallel got a batch of 1 for 2 GPUs: only 1 GPU(s) get work. "
                                   "Use a batch size of at least 2, ideally a multiple of 2")
    assert split_warning(5, 2).startswith("DataParallel split a batch of 5 over 2 GPUs as [3, 2]: ")
    assert split_warning(5, 4).startswith("DataParallel split a batch of 5 over 4 GPUs as [2, 2, 1], "
                                          "leaving 1 GPU(s) idle")


@needs_no_gpu
def test_split_warning_is_logged_once_per_situation(net, monkeypatch, caplog):
    wrapped = wrap(net, runtime=DP_ON_CPU)
    with fake_gpus(monkeypatch, wrapped, 2), caplog.at_level(logging.WARNING, logger="autoparallel"):
        for batch in (5, 5, 8, 5, 7):
            wrapped(torch.randn(batch, 3))
    assert [record.getMessage()[:40] for record in caplog.records] == [
        "DataParallel split a batch of 5 over 2 G", "DataParallel split a batch of 7 over 2 G"]


def test_merging_float_scalars_never_syncs_with_the_host(monkeypatch):
    values = [torch.tensor(2.0), torch.tensor(4.0)]

    def host_sync(*args, **kwargs):
        raise AssertionError("the merge made a tensor from Python data or read a value on the host")

    for name in ("tensor", "equal", "as_tensor"):
        monkeypatch.setattr(torch, name, host_sync)
    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    result = _scalars(values, [3, 1])
    monkeypatch.undo()
    assert (result.shape, result.item()) == ((), 2.5)


class AutocastProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.seen: list[tuple[bool, torch.dtype, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
        return out


@needs_no_gpu
def test_replicas_run_under_the_callers_autocast_dtype(monkeypatch):
    probe = AutocastProbe()
    # fp16 is not CPU autocast's default (bf16), just as bf16 is not CUDA's default (fp16): pytorch #125186
    with torch.autocast("cpu", dtype=torch.float16):
        plain = cpu_parallel_apply([probe, probe], [(torch.randn(1, 2),)] * 2)
    assert {entry[1] for entry in probe.seen} == {torch.bfloat16}  # the bug our wrapper fixes
    assert all(out.dtype == torch.bfloat16 for out in plain)
    probe.seen.clear()
    wrapped = wrap(probe, runtime=DP_ON_CPU)
    with fake_gpus(monkeypatch, wrapped, 2):
        with torch.autocast("cpu", dtype=torch.float16):
            outputs = wrapped.parallel_apply([probe, probe], [(torch.randn(1, 2),)] * 2, None)
        assert probe.seen == [(True, torch.float16, torch.float16)] * 2
        assert [out.dtype for out in outputs] == [torch.float16] * 2
        probe.seen.clear()
        wrapped.parallel_apply([probe, probe], [(torch.randn(1, 2),)] * 2, None)  # no autocast: stays off
    assert [(enabled, out_dtype) for enabled, _, out_dtype in probe.seen] == [(False, torch.float32)] * 2


class AuxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> dict:
        pred = self.linear(x)
        return {"pred": pred, "aux": ((pred - target) ** 2).mean(), "parts": [Output(pred, pred.sum(1)), None]}


@needs_no_gpu
def test_forward_scatters_runs_replicas_and_gathers_like_the_full_batch(monkeypatch, caplog):
    torch.manual_seed(0)
    net = AuxNet()
    wrapped = wrap(net, runtime=DP_ON_CPU)
    x, target = torch.randn(5, 3), torch.randn(5, 2)
    full = net(x, target)
    (full_grad,) = torch.autograd.grad(full["aux"], net.linear.weight)
    replicated = []
    with fake_gpus(monkeypatch, wrapped, 2), caplog.at_level(logging.WARNING, logger="autoparallel"):
        monkeypatch.setattr(wrapped, "replicate", lambda module, ids: replicated.append(list(ids)) or [module] * 2)
        merged = wrapped(x, target=target)
    assert replicated == [[0, 1]]
    assert wrapped._split_sizes == [3, 2]
    assert "split a batch of 5 over 2 GPUs as [3, 2]" in caplog.text
    assert list(merged) == ["pred", "aux", "parts"]
    assert merged["aux"].shape == ()
    # Replicas of 3 and 2 rows against one batch of 5: the kernels may sum in another order, so the float
    # tolerance of assert_close, not bitwise equality.
    torch.testing.assert_close(merged["aux"], full["aux"])
    (merged_grad,) = torch.autograd.grad(merged["aux"], net.linear.weight)
    torch.testing.assert_close(merged_grad, full_grad)
    torch.testing.assert_close(merged["pred"], full["pred"])
    assert type(merged["parts"]) is list
    assert merged["parts"][1] is None
    assert type(merged["parts"][0]) is Output
    torch.testing.assert_close(merged["parts"][0].aux, full["pred"].sum(1))
