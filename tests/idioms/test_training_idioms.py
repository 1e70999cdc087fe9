"""Training loops as scripts write them: accumulation with epochs that are not whole windows resumes
exactly, and the EMA of a half-precision model moves."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import autoparallel as ap

CPU = ap.Runtime(mode="cpu", device="cpu", device_ids=())


def make_run(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    generator = torch.Generator().manual_seed(2)  # the data must not depend on the model's seed
    data = TensorDataset(torch.randn(28, 5, generator=generator), torch.randn(28, 1, generator=generator))
    loader = ap.loader(data, batch_size=4, seed=1, num_workers=0, runtime=CPU)  # 7 batches per epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    accumulator = ap.GradientAccumulator(model, optimizer, accumulation_steps=2, loader=loader)
    return model, loader, optimizer, accumulator


def run_epochs(model, loader, optimizer, accumulator, epochs: range) -> int:
    steps = 0
    for epoch in epochs:
        loader.set_epoch(epoch)
        for inputs, targets in loader:
            with accumulator.micro_step():
                accumulator.backward(nn.functional.mse_loss(model(inputs), targets))
            steps += accumulator.step()
    return steps


def test_epochs_of_seven_batches_with_accumulation_two_resume_exactly(tmp_path):
    straight = make_run()
    straight_steps = run_epochs(*straight, epochs=range(3))
    assert straight_steps == 12  # 4 steps per epoch: 3 whole windows, then the 7th batch alone

    first = make_run()
    run_epochs(*first, epochs=range(1))
    model, _, optimizer, _ = first
    ap.save_checkpoint(tmp_path / "last.pt", model=model, optimizer=optimizer, epoch=0)
    resumed = make_run(seed=5)  # another initialisation: everything must come from the checkpoint
    info = ap.load_checkpoint(tmp_path / "last.pt", model=resumed[0], optimizer=resumed[2])
    run_epochs(*resumed, epochs=range(info["epoch"] + 1, 3))
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)  # one process, same shapes and order: bitwise


def test_the_ema_of_a_bf16_model_moves():
    torch.manual_seed(0)
    model = nn.Linear(16, 16).to(torch.bfloat16)
    ema = ap.EMA(model, decay=0.999, warmup=False)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        for _ in range(20):
            model.weight.add_(0.01)  # small steps, as an optimizer makes them
            ema.update()
    moved = (ema.module.weight.float() - start.float()).abs().mean().item()
    # 20 updates with weight 0.001 towards weights 0.01-0.2 away: about 2e-3 in fp32; bf16 rounding
    # of each tiny step to nothing would leave 0.
    assert moved > 1e-3
