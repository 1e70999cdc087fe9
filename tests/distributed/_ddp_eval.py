"""Worker for test_ddp.py::test_distributed_evaluation_counts_every_sample_once (torchrun, 2 processes).

7 samples on 2 ranks, a global batch of 2: rank 0 evaluates 4 samples and rank 1 3, each in 3 batches. The
model has BatchNorm and takes one training step under DDP first, which updates each rank's running
statistics from its own shard; the wrapper then gives every rank rank 0's.
"""
from __future__ import annotations

import json

import torch
from _emit import emit  # this folder is sys.path[0] for a script
from torch import nn
from torch.utils.data import Dataset

import autoparallel as ap

NUM_SAMPLES = 7


class IndexedDataset(Dataset):
    """(input, index) pairs, like the application's evaluation datasets."""

    def __init__(self) -> None:
        self.inputs = torch.randn(NUM_SAMPLES, 4, generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int):
        return self.inputs[index], index


def main() -> None:
    rt = ap.runtime()
    torch.manual_seed(0)
    model = ap.wrap(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)), runtime=rt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_inputs = torch.randn(4, 4, generator=torch.Generator().manual_seed(10 + rt.rank))
    model(train_inputs).square().mean().backward()
    optimizer.step()

    model.eval()
    dataset = IndexedDataset()
    eval_loader = ap.loader(dataset, 2, train=False, num_workers=0, runtime=rt)
    predictions, indices, batches = [], [], 0
    with torch.no_grad():
        for inputs, index in eval_loader:
            predictions.append(model(inputs))
            indices.append(index)
            batches += 1
    local_predictions = torch.cat(predictions)
    gathered = ap.all_gather(local_predictions)
    gathered_indices = ap.all_gather(torch.cat(indices))
    squared_sum = ap.all_reduce(local_predictions.double().square().sum(), op="sum")
    count = ap.all_reduce(torch.tensor(len(local_predictions)), op="sum")

    with torch.no_grad():
        reference = ap.unwrap(model)(dataset.inputs)  # this rank evaluates everything alone
    result = {
        "per_rank_batches": ap.all_gather(torch.tensor([batches])).tolist(),
        "gathered_indices": gathered_indices.tolist(),
        "count": int(count),
        "max_difference_to_single_process": (gathered - reference).abs().max().item(),
        "squared_sum_difference": abs(squared_sum.item() - reference.double().square().sum().item()),
        "reference_checksums_per_rank": ap.all_gather(reference.sum().reshape(1)).tolist(),
    }
    try:  # trailing sizes differ between ranks: every rank must get the same clear error, not a hang
        ap.all_gather(torch.zeros(1, rt.rank + 1))
        refused = 0
    except ValueError as error:
        refused = int(str(error).startswith("all_gather needs the same dtype and the same sizes"))
    result["ranks_refusing_mismatched_gather"] = int(ap.all_reduce(torch.tensor(refused)))
    result["broadcast_run_names"] = ap.all_gather(
        torch.tensor([ap.broadcast_object(f"run-{rt.rank}") == "run-0"])).tolist()
    ap.barrier()
    if rt.is_main:
        emit("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
