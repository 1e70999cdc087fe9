"""A training script written the way pytorch/examples, timm's train.py and Accelerate's examples are,
with the one added line ``model = ap.wrap(model)``. Run by test_ddp_idioms.py under torchrun (2 gloo
processes) and, for comparison, as plain ``python``; ``--case`` picks the idiom. Rank 0 prints one
``RESULT {json}`` line with what a user would look at.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

import autoparallel as ap

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "distributed"))
from _emit import emit  # noqa: E402


class Numbers(Dataset):
    """Sample i is (features of i, i): the label is the index, so a script can see which samples it got."""

    def __init__(self, size: int) -> None:
        self.features = torch.randn(size, 6, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int):
        return self.features[index], index


class Net(nn.Module):
    def __init__(self, reentrant: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        # BatchNorm normalises each rank's half batch by itself, which no single process reproduces: the
        # checkpointing case, compared with one process, leaves it out.
        norm = nn.Identity() if reentrant else nn.BatchNorm1d(8)
        self.body = nn.Sequential(nn.Linear(8, 8), norm, nn.ReLU())
        self.fc = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x):
        features = self.stem(x)
        if self.reentrant:  # activation checkpointing as torch's tutorials write it
            return self.fc(checkpoint(self.body, features, use_reentrant=True))
        return self.fc(self.body(features))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checksum(module: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def per_rank(value: float) -> list[float]:
    """The value of every rank (a user would print it on each rank and compare)."""
    return ap.all_gather(torch.tensor([value], dtype=torch.float64)).tolist()


def train_steps(model, loader, steps: int, lr: float = 0.1) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    done = 0
    while done < steps:
        for features, labels in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(features), labels % 3)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                return


def case_loader_epochs() -> dict:
    """Rank 0 logs one batch; the standard loader.sampler.set_epoch(epoch) resumes at epoch 2."""
    data = Numbers(16)
    loader = ap.loader(data, batch_size=4, num_workers=0)
    if rank() == 0:
        print("first batch:", next(iter(loader))[1].tolist())  # a common line: look at one batch
    seen = []
    for _epoch in range(3):
        labels = torch.cat([batch_labels for _, batch_labels in loader])
        seen.append(sorted(ap.all_gather(labels).tolist()))
    uninterrupted = ap.loader(data, batch_size=4, num_workers=0)
    orders = [torch.cat([b for _, b in uninterrupted]).tolist() for _ in range(3)]
    resumed = ap.loader(data, batch_size=4, num_workers=0)
    resumed.sampler.set_epoch(2)  # pytorch/examples' resume: for epoch in range(start_epoch, ...)
    resumed_order = torch.cat([b for _, b in resumed]).tolist()
    again = ap.loader(data, batch_size=4, num_workers=0)
    explicit = []
    for epoch in range(3):
        again.sampler.set_epoch(epoch)  # the idiom every DDP tutorial writes
        explicit.append(torch.cat([b for _, b in again]).tolist())
    return {"epochs_cover_all": [s == list(range(16)) for s in seen],
            "resumed_equals_epoch_2": resumed_order == orders[2],
            "explicit_equals_automatic": explicit == orders,
            "orders_differ_between_epochs": orders[0] != orders[1]}


def _eval_loop(model, loader, no_grad: bool):
    model.eval()
    outputs, labels = [], []
    context = torch.no_grad() if no_grad else torch.enable_grad()
    with context:
        for features, batch_labels in loader:
            outputs.append(model(features).detach())
            labels.append(batch_labels)
    return torch.cat(outputs), torch.cat(labels)


def case_eval_without_no_grad() -> dict:
    """pytorch/examples' evaluate() without torch.no_grad() on a BatchNorm model, uneven shards (7 samples)."""
    torch.manual_seed(0)
    model = ap.wrap(Net())
    train_steps(model, ap.loader(Numbers(16), batch_size=4, num_workers=0), steps=2)
    eval_loader = ap.loader(Numbers(7), batch_size=2, train=False, num_workers=0)
    outputs, labels = _eval_loop(model, eval_loader, no_grad=False)
    gathered = ap.all_gather(labels)
    reference = ap.unwrap(model)(Numbers(7).features).detach()  # one process scoring everything
    return {"labels": gathered.tolist(),
            "max_difference": float((ap.all_gather(outputs) - reference).abs().max())}


def case_gather_per_batch() -> dict:
    """Accelerate's gather_for_metrics idiom: gather predictions and labels batch by batch."""
    torch.manual_seed(0)
    model = ap.wrap(Net())
    eval_loader = ap.loader(Numbers(7), batch_size=2, train=False, num_workers=0)
    model.eval()
    predictions, references, local_count = [], [], 0
    with torch.no_grad():
        for features, labels in eval_loader:
            logits = model(features)
            predictions.append(ap.all_gather(logits.argmax(dim=1)))
            references.append(ap.all_gather(labels))
            local_count += len(labels)
    references = torch.cat(references)
    mixed = ap.all_gather({"count": local_count, "loss": 0.5, "parts": [1.0, torch.tensor([2.0])]})
    return {"labels": sorted(references.tolist()), "predictions": len(torch.cat(predictions)),
            "mixed": {"count": mixed["count"].tolist(), "loss": mixed["loss"].tolist(),
                      "loss_dtype": str(mixed["loss"].dtype), "parts": [p.tolist() for p in mixed["parts"]]},
            "reduced": ap.all_reduce({"correct": 3, "total": 4.0})["total"].item()}


def case_ema_on_main_only(directory: str) -> dict:
    """timm's idiom: the EMA is updated (and evaluated) on the main process only."""
    torch.manual_seed(0)
    model = ap.wrap(Net())
    ema = ap.EMA(model, decay=0.5) if rank() == 0 else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = ap.loader(Numbers(16), batch_size=4, num_workers=0)
    for features, labels in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features), labels % 3).backward()
        optimizer.step()
        if rank() == 0:
            ema.update()
    if rank() == 0:
        with torch.no_grad():
            ema.module(Numbers(4).features)  # validate the EMA on rank 0
    path = os.path.join(directory, "ema.pt")
    ap.save_checkpoint(path, model=model, ema=ema)
    loaded = ap.EMA(Net(), decay=0.5)
    ap.load_checkpoint(path, model=Net(), ema=loaded)
    return {"ema_updates": loaded.num_updates,
            "ema_differs_from_model": checksum(loaded.module) != checksum(ap.unwrap(model)),
            "model_checksums": per_rank(checksum(model))}


def case_head_replaced() -> dict:
    """Fine-tuning: the classifier is replaced after wrapping, through attribute access."""
    torch.manual_seed(0)
    model = ap.wrap(Net())
    model.fc = nn.Linear(8, 3)  # timm's reset_classifier / torchvision's model.fc = ... idiom
    torch.manual_seed(10 + rank())  # each rank's new head starts differently, like an unseeded script
    with torch.no_grad():
        model.fc.weight.normal_()
    train_steps(model, ap.loader(Numbers(16), batch_size=4, num_workers=0), steps=3)
    return {"head_checksums": per_rank(checksum(ap.unwrap(model).fc)), "model_checksums": per_rank(checksum(model))}


def case_double_ddp() -> dict:
    """Half-migrated code: ap.wrap and then the DistributedDataParallel line it used to have."""
    model = ap.wrap(Net())
    try:
        nn.parallel.DistributedDataParallel(model)
        return {"error": None}
    except Exception as error:  # noqa: BLE001 - the test reads the message
        return {"error": f"{type(error).__name__}: {error}"}


def case_reentrant_checkpoint() -> dict:
    """Reentrant activation checkpointing (torch.utils.checkpoint's classic form) under DDP."""
    torch.manual_seed(0)
    model = ap.wrap(Net(reentrant=True))
    torch.manual_seed(0)
    train_steps(model, ap.loader(Numbers(16), batch_size=4, num_workers=0), steps=3)
    torch.manual_seed(0)
    single = Net(reentrant=True)
    train_steps(single, ap.loader(Numbers(16), batch_size=4, num_workers=0,
                                  runtime=ap.Runtime(mode="cpu", device="cpu", device_ids=())), steps=3)
    return {"model_checksums": per_rank(checksum(model)), "single_process": checksum(single),
            "body_trained": checksum(ap.unwrap(model).body) != checksum(Net().body)}


def case_nan_loss_on_one_rank() -> dict:
    """A batch that gives rank 1 a NaN loss, in fp32 without clipping: the commonest way a run diverges."""
    torch.manual_seed(0)
    model = ap.wrap(Net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = ap.GradientAccumulator(model, optimizer)
    before, skipped = checksum(model), []
    for features, labels in ap.loader(Numbers(16), batch_size=4, num_workers=0, shuffle=False):
        with step.micro_step():
            loss = nn.functional.cross_entropy(model(features), labels % 3)
            step.backward(loss * float("nan") if rank() == 1 and not skipped else loss)
        step.step()
        skipped.append(step.last_step_skipped)
        if len(skipped) == 1:
            after_nan = checksum(model)
    return {"skipped": per_rank(float(skipped[0])), "unchanged_by_nan": per_rank(float(after_nan == before)),
            "later_steps_skipped": per_rank(float(any(skipped[1:]))), "model_checksums": per_rank(checksum(model)),
            "finite": bool(all(torch.isfinite(p).all() for p in model.parameters()))}


CASES = {"loader-epochs": case_loader_epochs, "eval-without-no-grad": case_eval_without_no_grad,
         "gather-per-batch": case_gather_per_batch, "ema-on-main-only": case_ema_on_main_only,
         "head-replaced": case_head_replaced, "double-ddp": case_double_ddp,
         "reentrant-checkpoint": case_reentrant_checkpoint, "nan-loss-on-one-rank": case_nan_loss_on_one_rank}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--directory", default=".")
    args = parser.parse_args()
    ap.runtime()  # joins the process group under torchrun
    case = CASES[args.case]
    result = case(args.directory) if args.case == "ema-on-main-only" else case()
    result["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
    if rank() == 0:
        emit("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
