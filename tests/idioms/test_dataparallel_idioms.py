"""What scripts return from ``forward`` comes back from DataParallel with its one-GPU value (or a clear error).

The rule: a 0-dim float tensor or a Python float is a mean (a loss): the replicas' values are averaged,
weighted by their share of the batch; a 0-dim integer tensor or a Python int is a count: summed; a bool
(tensor or Python) is a flag: true when any replica's is; tensors with a batch dimension are
concatenated; dicts, lists, tuples, namedtuples and dataclasses are merged field by field; strings and
None must agree. Anything else that differs between replicas is refused with the fix.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import autoparallel as ap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_gpus import fake_gpus  # noqa: E402

DP_ON_CPU = ap.Runtime(mode="dp", device="cpu", device_ids=())
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the fake GPUs replace CUDA-only pieces on a CPU")


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor


class Counts(nn.Module):
    """Returns what training scripts return: a mean loss, counts, a flag, a batch of logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> dict:
        logits = self.linear(x)
        losses = nn.functional.cross_entropy(logits, target, reduction="none")
        correct = (logits.argmax(1) == target).sum()
        return {"loss": losses.mean(), "correct": correct, "seen": int(x.shape[0]), "loss_value": float(losses.mean()),
                "any_wrong": bool((logits.argmax(1) != target).any()), "wrong_flag": (logits.argmax(1) != target).any(),
                "logits": logits, "output": Output(logits, losses.mean()), "name": "counts"}


def _batch():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(5, 3, generator=generator), torch.randint(0, 2, (5,), generator=generator)


@needs_no_gpu
def test_losses_counts_flags_and_dataclasses_come_back_with_their_one_gpu_values(monkeypatch):
    torch.manual_seed(0)
    model = Counts()
    x, target = _batch()
    one_gpu = model(x, target)
    wrapped = ap.wrap(model, runtime=DP_ON_CPU)
    with fake_gpus(monkeypatch, wrapped, 2):
        merged = wrapped(x, target)  # replicas of 3 and 2 samples
    # Float tolerance: a weighted mean of two partial means sums in another order than one mean.
    torch.testing.assert_close(merged["loss"], one_gpu["loss"])
    assert merged["loss"].dim() == 0
    assert (merged["correct"].item(), merged["correct"].dtype) == (one_gpu["correct"].item(), torch.int64)
    assert merged["seen"] == 5
    assert isinstance(merged["seen"], int)
    assert merged["loss_value"] == pytest.approx(one_gpu["loss_value"], rel=1e-6)  # float: same reason
    assert merged["any_wrong"] is one_gpu["any_wrong"]
    assert (merged["wrong_flag"].dtype, bool(merged["wrong_flag"])) == (torch.bool, bool(one_gpu["wrong_flag"]))
    torch.testing.assert_close(merged["logits"], one_gpu["logits"])
    assert type(merged["output"]) is Output
    torch.testing.assert_close(merged["output"].logits, one_gpu["logits"])
    torch.testing.assert_close(merged["output"].loss, one_gpu["loss"])
    assert merged["name"] == "counts"


class Opaque:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class ReturnsAnObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> Opaque:
        return Opaque(self.linear(x))


@needs_no_gpu
def test_an_output_that_cannot_be_merged_is_refused_instead_of_returning_one_replica(monkeypatch):
    wrapped = ap.wrap(ReturnsAnObject(), runtime=DP_ON_CPU)
    with fake_gpus(monkeypatch, wrapped, 2), pytest.raises(TypeError) as error:
        wrapped(torch.randn(4, 3))
    message = str(error.value)
    assert "DataParallel cannot merge the Opaque objects returned by the 2 replicas" in message
    assert "return a tensor, a dict, a tuple or a dataclass" in message


class HasDim(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dim = 512  # a transformer's width: a common attribute name
        self.output_device = "screen"
        self.device_ids = ["model's own"]
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@needs_no_gpu
def test_the_models_dim_output_device_and_device_ids_win_over_dataparallels(monkeypatch):
    model = HasDim()
    wrapped = ap.wrap(model, runtime=DP_ON_CPU)
    assert (wrapped.dim, wrapped.output_device, wrapped.device_ids) == (512, "screen", ["model's own"])
    wrapped.dim = 256
    assert model.dim == 256
    with fake_gpus(monkeypatch, wrapped, 2):
        assert wrapped(torch.randn(4, 3)).shape == (4, 2)  # still scattered along the batch dimension
    assert model.dim == 256
