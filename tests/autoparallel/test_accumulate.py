"""GradientAccumulator in one process on the CPU (DDP as a 1-process gloo group)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autoparallel as ap
from autoparallel import GradientAccumulator

CPU_DDP = ap.Runtime(mode="ddp", device="cpu", device_ids=(), backend="gloo")


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def batch(count: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, 3, generator=generator), torch.randn(count, 1, generator=generator)


def test_four_micro_batches_equal_one_batch_of_four_times_the_size() -> None:
    inputs, targets = batch(8)
    reference = linear_model()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    nn.functional.mse_loss(reference(inputs), targets).backward()
    reference_optimizer.step()

    model = linear_model()
    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=4)
    stepped = []
    for micro_inputs, micro_targets in zip(inputs.split(2), targets.split(2)):
        with accumulator.micro_step():
            accumulator.backward(nn.functional.mse_loss(model(micro_inputs), micro_targets))
        stepped.append(accumulator.step())

    assert stepped == [False, False, False, True]
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        # Float tolerance (assert_close's default): 4 micro-batches of 2 sum the gradient in another order
        # than one batch of 8, and below one ulp at 1.0 (1.2e-7) no bound holds on every CPU.
        torch.testing.assert_close(ours, theirs)
        assert ours.grad is None  # zero_grad(set_to_none=True) after the step


def test_window_runs_on_across_epochs() -> None:
    model = linear_model()
    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=3)
    inputs, targets = batch(2)
    pattern = []
    for _ in range(8):  # two "epochs" of 4 micro-steps
        with accumulator.micro_step():
            accumulator.backward(nn.functional.mse_loss(model(inputs), targets))
        pattern.append(accumulator.step())
    assert pattern == [False, False, True, False, False, True, False, False]


def test_clipping_after_unscaling_reports_the_true_norm() -> None:
    model = linear_model()
    unscaled = copy.deepcopy(model)
    inputs, targets = batch(8)
    nn.functional.mse_loss(unscaled(inputs), targets).backward()
    true_norm = torch.cat([p.grad.reshape(-1) for p in unscaled.parameters()]).norm()
    before = [p.detach().clone() for p in model.parameters()]

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=1.0), scaler=scaler,
                                      max_grad_norm=0.1)
    with accumulator.micro_step():
        accumulator.backward(nn.functional.mse_loss(model(inputs), targets))
    accumulator.step()

    torch.testing.assert_close(accumulator.last_grad_norm, true_norm)  # not 1024 times larger
    update = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())])
    torch.testing.assert_close(update.norm(), torch.tensor(0.1), rtol=1e-4, atol=0)
    assert accumulator.last_step_skipped is False


def test_without_clipping_or_scaler_the_norm_is_reported_and_the_step_is_plain_sgd() -> None:
    model = linear_model()
    reference = copy.deepcopy(model)
    inputs, targets = batch(8)
    nn.functional.mse_loss(reference(inputs), targets).backward()
    true_norm = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).norm()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()

    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.5))
    with accumulator.micro_step():
        accumulator.backward(nn.functional.mse_loss(model(inputs), targets))
    accumulator.step()

    torch.testing.assert_close(accumulator.last_grad_norm, true_norm)  # a sum in another order: float tolerance
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)  # the same gradients, unscaled and unclipped, the same SGD arithmetic


def test_fp16_overflow_skips_the_step_instead_of_raising() -> None:
    model = linear_model()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=1.0), scaler=scaler,
                                      max_grad_norm=1.0)
    inputs, _ = batch(2)
    with accumulator.micro_step():
        accumulator.backward(model(inputs).sum() * float("inf"))

    assert accumulator.step() is True
    assert accumulator.last_step_skipped is True
    assert not torch.isfinite(accumulator.last_grad_norm)
    assert scaler.get_scale() == 512.0  # backed off
    for ours, original in zip(model.parameters(), before):
        assert torch.equal(ours, original)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_non_finite_gradients_without_a_scaler_skip_the_step_with_or_without_clipping(max_grad_norm) -> None:
    model = linear_model()
    before = [p.detach().clone() for p in model.parameters()]
    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=max_grad_norm)
    inputs, _ = batch(2)
    with accumulator.micro_step():
        accumulator.backward(model(inputs).sum() * float("nan"))

    assert accumulator.step() is True
    assert accumulator.last_step_skipped is True
    for ours, original in zip(model.parameters(), before):
        assert torch.equal(ours, original)


@pytest.mark.usefixtures("single_process_group")
def test_only_the_last_micro_step_of_a_window_all_reduces() -> None:
    model = ap.wrap(linear_model(), runtime=CPU_DDP)
    backward_passes_reduced = []

    def count_all_reduce(state, bucket):
        backward_passes_reduced.append(state["micro_step"])
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    state = {"micro_step": -1}
    model.register_comm_hook(state, count_all_reduce)
    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=3)
    inputs, targets = batch(2)
    for micro_step in range(6):
        state["micro_step"] = micro_step
        with accumulator.micro_step():
            accumulator.backward(nn.functional.mse_loss(model(inputs), targets))
        accumulator.step()

    assert backward_passes_reduced == [2, 5]  # one bucket, reduced once per optimizer step
