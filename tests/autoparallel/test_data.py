"""autoparallel.loader: the global batch in every mode, epoch re-seeding, exact evaluation shards.

DDP ranks are simulated with hand-built Runtime values (the samplers take rank and world size
explicitly), so these tests need no process group.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from autoparallel import Runtime, UsageError, loader

CPU = Runtime(mode="cpu", device=torch.device("cpu"), device_ids=())


def ddp(rank: int, world_size: int) -> Runtime:
    return Runtime(mode="ddp", device=torch.device("cpu"), device_ids=(), rank=rank, world_size=world_size,
                   backend="gloo")


def numbers(count: int) -> TensorDataset:
    return TensorDataset(torch.arange(count))


def epoch_batches(data) -> list[list[int]]:
    return [batch.tolist() for (batch,) in data]


def test_batch_size_is_global_and_split_over_ddp_ranks() -> None:
    single = loader(numbers(40), 8, num_workers=0, runtime=CPU)
    dataparallel = loader(numbers(40), 8, num_workers=0, runtime=Runtime(
        mode="dp", device=torch.device("cuda", 0), device_ids=(0, 1)))
    rank1 = loader(numbers(40), 8, num_workers=0, runtime=ddp(1, 4))

    assert (single.batch_size, single.global_batch_size, len(single)) == (8, 8, 5)
    assert (dataparallel.batch_size, dataparallel.global_batch_size, len(dataparallel)) == (8, 8, 5)
    assert (rank1.batch_size, rank1.global_batch_size, len(rank1)) == (2, 8, 5)


def test_batch_that_does_not_divide_names_the_nearest_valid_sizes() -> None:
    with pytest.raises(ValueError, match="batch_size=10") as error:
        loader(numbers(40), 10, runtime=ddp(0, 4))
    assert str(error.value) == (
        "batch_size=10 is the global batch of one micro-step and must divide by the number of DDP processes, "
        "world_size=4: use batch_size=8 (2 per process) or batch_size=12 (3 per process)")
    with pytest.raises(ValueError, match=r"use batch_size=4 \(1 per process\)$"):
        loader(numbers(40), 3, runtime=ddp(0, 4))


def test_ddp_ranks_together_load_exactly_the_single_process_batches() -> None:
    single = epoch_batches(loader(numbers(37), 8, seed=5, num_workers=0, runtime=CPU))
    for world_size in (2, 4):
        ranks = [epoch_batches(loader(numbers(37), 8, seed=5, num_workers=0, runtime=ddp(rank, world_size)))
                 for rank in range(world_size)]
        merged = [sorted(sum(parts, [])) for parts in zip(*ranks)]
        assert merged == [sorted(batch) for batch in single]
    assert len(single) == 4  # 37 // 8, drop_last


def test_each_iteration_is_a_new_epoch_and_set_epoch_replays_one() -> None:
    data = loader(numbers(16), 4, seed=7, num_workers=0, runtime=CPU)
    epoch0, epoch1, epoch2 = (sum(epoch_batches(data), []) for _ in range(3))
    expected = [torch.randperm(16, generator=torch.Generator().manual_seed(7 + epoch)).tolist() for epoch in range(3)]

    assert [epoch0, epoch1, epoch2] == expected  # seed + epoch, as DistributedSampler orders it
    assert epoch0 != epoch1 != epoch2
    assert data.epoch == 2
    resumed = loader(numbers(16), 4, seed=7, num_workers=0, runtime=CPU)
    resumed.set_epoch(1)
    assert sum(epoch_batches(resumed), []) == epoch1
    assert sum(epoch_batches(resumed), []) == epoch2


def test_a_loop_left_with_break_is_where_state_dict_resumes_and_a_peek_costs_nothing() -> None:
    data = loader(numbers(24), 4, seed=3, num_workers=0, runtime=CPU)
    whole = epoch_batches(loader(numbers(24), 4, seed=3, num_workers=0, runtime=CPU))
    assert next(iter(data))[0].tolist() == whole[0]  # a peek: the epoch still starts from its first batch
    taken = []
    for (batch,) in data:
        taken.append(batch.tolist())
        if len(taken) == 2:
            break  # a stop request: the script leaves the loop, then saves
    assert data.state_dict() == {"epoch": 0, "batch": 2}

    resumed = loader(numbers(24), 4, seed=3, num_workers=0, runtime=CPU)
    resumed.load_state_dict(data.state_dict())
    assert taken + epoch_batches(resumed) == whole
    assert resumed.state_dict() == {"epoch": 1, "batch": 0}
    assert epoch_batches(data) == whole  # iterating the left loader again starts its epoch over, as DataLoader does


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 3, 7, 10])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_evaluation_shards_cover_every_index_once_in_order_in_as_many_batches(world_size, size, batch) -> None:
    ranks = [epoch_batches(loader(numbers(size), batch * world_size, train=False, num_workers=0,
                                  runtime=ddp(rank, world_size) if world_size > 1 else CPU))
             for rank in range(world_size)]

    assert sum((sum(batches, []) for batches in ranks), []) == list(range(size))  # contiguous, no padding
    assert len({len(batches) for batches in ranks}) == 1  # per-batch gathers never wait for a rank
    assert all(len(b) <= batch + 1 for batches in ranks for b in batches)
    if size >= world_size:
        assert all(batches and all(b for b in batches) for batches in ranks)  # nobody gets an empty batch


def test_evaluation_loader_splits_seven_samples_over_two_ranks() -> None:
    per_rank = [epoch_batches(loader(numbers(7), 2, train=False, num_workers=0, runtime=ddp(rank, 2)))
                for rank in range(2)]

    assert per_rank == [[[0, 1], [2], [3]], [[4], [5], [6]]]


def test_a_rank_without_samples_yields_empty_batches_of_the_right_structure() -> None:
    per_rank = [list(loader(numbers(1), 2, train=False, num_workers=0, runtime=ddp(rank, 2))) for rank in range(2)]
    assert [len(batches) for batches in per_rank] == [1, 1]
    (first,), (empty,) = per_rank[0][0], per_rank[1][0]
    assert first.tolist() == [0]
    assert (empty.shape, empty.dtype) == ((0,), first.dtype)


class NamedImages(Dataset):
    """Samples as dicts with a file name, the way image folders are often loaded."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full((2,), float(index)), "name": f"image-{index}.jpg"}


def test_a_rank_without_samples_yields_no_names_either() -> None:
    from collections import UserDict

    def as_user_dict(samples: list) -> UserDict:  # a Mapping that is not a dict, as tokenizers return
        return UserDict(torch.utils.data.default_collate(samples))

    for collate in (None, as_user_dict):
        options = {"collate_fn": collate} if collate else {}
        (empty,) = loader(NamedImages(), 2, train=False, num_workers=0, runtime=ddp(1, 2), **options)
        assert (empty["image"].shape, list(empty["name"])) == ((0, 2), [])  # a name here would be scored twice


def test_evaluation_refuses_to_drop_samples_and_training_needs_one_batch() -> None:
    with pytest.raises(ValueError, match="would skip the last samples"):
        loader(numbers(7), 2, train=False, drop_last=True, runtime=CPU)
    with pytest.raises(ValueError, match="has 5 samples, fewer than one global batch"):
        loader(numbers(5), 8, runtime=CPU)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


def test_iterable_datasets_are_refused_with_the_alternative() -> None:
    with pytest.raises(TypeError, match="build a torch.utils.data.DataLoader for it directly"):
        loader(Stream(), 2, runtime=CPU)


class RandomDraws(Dataset):
    """Returns a fresh random number per item: shows the worker's seed."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(())


def test_worker_random_streams_depend_on_seed_epoch_and_rank_only() -> None:
    def draws(runtime: Runtime, epoch: int, seed: int = 0) -> list[float]:
        data = loader(RandomDraws(), 2 * runtime.world_size, seed=seed, num_workers=1, persistent_workers=False,
                      runtime=runtime)
        data.set_epoch(epoch)
        return torch.cat(list(data)).tolist()

    first = draws(CPU, epoch=3)
    assert draws(CPU, epoch=3) == first  # reproducible, e.g. after a resume at epoch 3
    assert draws(CPU, epoch=4) != first
    assert draws(CPU, epoch=3, seed=1) != first
    assert draws(ddp(0, 2), epoch=3) != draws(ddp(1, 2), epoch=3)  # ranks augment differently


def test_default_workers_share_the_cpus_between_local_processes(monkeypatch) -> None:
    def workers(runtime: Runtime) -> int:
        return loader(numbers(64), 2 * runtime.world_size, runtime=runtime, persistent_workers=False).num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert workers(CPU) == 8  # capped
    assert workers(ddp(0, 2)) == 7  # 8 CPUs each, one left for the training process
    assert workers(ddp(0, 16)) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 of the 16 processes on this node
    assert workers(ddp(0, 16)) == 7
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert workers(CPU) == 1


def test_defaults_follow_the_device() -> None:
    on_cpu = loader(numbers(8), 2, runtime=CPU, num_workers=0)
    on_gpu = loader(numbers(8), 2, runtime=Runtime(mode="single", device=torch.device("cuda", 0), device_ids=(0,)),
                    num_workers=2)

    assert (on_cpu.pin_memory, on_cpu.persistent_workers, on_cpu.drop_last) == (False, False, True)
    assert (on_gpu.pin_memory, on_gpu.persistent_workers) == (True, True)
    evaluation = loader(numbers(8), 2, train=False, runtime=CPU, num_workers=0)
    assert evaluation.drop_last is False


def test_a_dataloader_generator_is_refused_with_the_seed_to_pass_instead() -> None:
    # A DataLoader idiom for reproducible shuffles; here the seed does that job (and survives a resume).
    with pytest.raises(UsageError, match=r"pass seed=\.\.\. instead of generator="):
        loader(numbers(8), 4, generator=torch.Generator().manual_seed(3), runtime=CPU)
