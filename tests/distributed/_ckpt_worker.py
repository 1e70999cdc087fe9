"""One rank of tests/distributed/test_checkpoint_ddp.py (started twice, with torchrun's variables).

Usage: python _ckpt_worker.py WORKDIR. Exits non-zero with a traceback when a check fails.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from autoparallel import EMA, load_checkpoint, runtime, save_checkpoint, unwrap


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def main(workdir: Path) -> None:
    rt = runtime()  # joins the gloo group from RANK / WORLD_SIZE / MASTER_ADDR
    assert (rt.mode, rt.world_size) == ("ddp", 2), rt
    rank = dist.get_rank()

    # 1 process -> 2 processes: the test's plain checkpoint loads into DDP on every rank
    model = nn.parallel.DistributedDataParallel(_net(10 + rank))
    load_checkpoint(workdir / "plain.pt", model=model)
    reference = _net(0).state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in unwrap(model).state_dict().items())

    # train a little: each rank sees its own batch, DDP keeps the weights equal
    ema = EMA(model, decay=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        loss = model(torch.randn(8, 6, generator=data)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()

    # each rank has its own random streams; save must keep all of them
    random.seed(200 + rank)
    np.random.seed(200 + rank)
    torch.manual_seed(200 + rank)
    writes = []
    real_save = torch.save

    def counting_save(obj, handle, *args, **kwargs):
        if not isinstance(handle, io.BytesIO):  # collectives of Python objects pickle through torch.save too
            writes.append(handle)
        return real_save(obj, handle, *args, **kwargs)

    torch.save = counting_save
    path = save_checkpoint(workdir / "ddp.pt", model=model, ema=ema, optimizer=optimizer, epoch=0, step=3,
                           world_size=2)
    torch.save = real_save
    assert path.is_file(), "save_checkpoint returned before the file was complete"
    assert len(writes) == (1 if rank == 0 else 0), f"rank {rank} wrote {len(writes)} files"
    expected = _draws()

    # a failure on rank 0 reaches rank 1 instead of leaving it waiting at a barrier
    (workdir / "a_folder.pt").mkdir(exist_ok=True)
    failure = None
    try:
        save_checkpoint(workdir / "a_folder.pt", model=model)
    except (OSError, RuntimeError) as error:
        failure = error
    expected_failure = IsADirectoryError if rank == 0 else RuntimeError
    assert type(failure) is expected_failure, (rank, failure)
    assert rank == 0 or "rank 0 failed to save checkpoint" in str(failure), failure

    # resume on both ranks: weights, EMA, optimizer and each rank's own random streams
    torch.manual_seed(999)
    resumed = nn.parallel.DistributedDataParallel(_net(50))
    resumed_ema = EMA(resumed, decay=0.5)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.05)
    info = load_checkpoint(path, model=resumed, ema=resumed_ema, optimizer=resumed_optimizer, restore_rng=True)
    assert info == {"epoch": 0, "step": 3, "extra": {"world_size": 2}, "loader": None, "format": "autoparallel"}, info
    again = _draws()
    assert again == expected, (rank, again, expected)
    for mine, theirs in [(resumed, model), (resumed_ema.module, ema.module)]:
        # parameters are equal on every rank; BatchNorm buffers are each rank's own (the file holds rank 0's)
        state = dict(unwrap(theirs).named_parameters() if rank else unwrap(theirs).state_dict().items())
        loaded = unwrap(mine).state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in state.items())
    assert resumed_optimizer.state_dict()["state"][0]["step"] == 3

    gathered: list = [None, None]
    dist.all_gather_object(gathered, again)
    assert gathered[0] != gathered[1], "both ranks got the same random streams"
    if rank == 0:
        torch.save({"model": unwrap(model).state_dict(), "ema": ema.module.state_dict()}, workdir / "reference.pt")
    dist.barrier()
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
