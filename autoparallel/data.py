"""``loader()``: a DataLoader whose ``batch_size`` is the global batch of one micro-step in every mode. Each of N DDP
processes loads ``batch_size // N``, rank ``r`` taking positions ``r, r + N, ...`` of the epoch's order
(``randperm(seed + epoch)`` or your sampler's), so batches do not depend on how the job was started. The loader keeps
its place (epoch, batches taken) for a mid-epoch resume; ``train=False`` gives each rank a contiguous, unpadded slice
in as many batches as every other rank, so gathers never wait and come out in dataset order."""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from . import group
from .collectives import broadcast_object
from .detect import Runtime
from .errors import UsageError
from .runtime import runtime as current_runtime

__all__ = ["Loader", "default_num_workers", "loader"]


class ShardedSampler(Sampler[int]):
    """This rank's share of each epoch's order: ``randperm(seed + epoch)``, in order, or a user sampler's."""

    def __init__(self, size: int, num_replicas: int, rank: int, *, shuffle: bool, seed: int, drop_last: bool,
                 order: Sampler | None = None) -> None:
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.shuffle, self.seed, self.drop_last, self.order = shuffle, seed, drop_last, order
        self.epoch, self.start = 0, 0
        total = len(order) if order is not None else size
        self.num_samples = total // num_replicas if drop_last else -(-total // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"set_epoch needs an epoch >= 0, got {epoch}")
        self.epoch = int(epoch)
        if self.order is not None and hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # the same draw on every rank
        if self.order is not None:
            if hasattr(self.order, "generator"):  # RandomSampler, WeightedRandomSampler...
                self.order.generator = generator
            indices = list(self.order)
        elif self.shuffle:
            indices = torch.randperm(self.size, generator=generator).tolist()
        else:
            indices = list(range(self.size))
        total = self.num_samples * self.num_replicas
        indices = indices[:total] if self.drop_last else (indices * (-(-total // max(1, len(indices)))))[:total]
        return iter(indices[self.rank:total:self.num_replicas][self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class EvalBatchSampler(Sampler[list[int]]):
    """Contiguous, unpadded shard of ``range(size)`` cut into as many batches as every other rank's."""

    def __init__(self, size: int, num_replicas: int, rank: int, batch_size: int) -> None:
        base, extra = divmod(size, num_replicas)  # the first `extra` ranks hold one sample more
        self.start, mine = base * rank + min(rank, extra), base + (rank < extra)
        # As many batches as the largest shard needs, but no more than the smallest one has samples: no rank is left
        # with an empty batch it could have filled (with fewer samples than ranks, one batch).
        batches = min(-(-(base + bool(extra)) // batch_size), base or 1)
        shard = np.arange(self.start, self.start + mine)
        self.batches = [chunk.tolist() for chunk in np.array_split(shard, batches)] if batches else []

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(batch) for batch in self.batches])

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order never changes; accepted so loops can call it on any sampler."""


def _empty_like(batch: Any) -> Any:
    """The structure of a collated batch with zero rows (a list of strings is a column: names, one per sample)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        empty = {key: _empty_like(value) for key, value in batch.items()}
        try:  # the batch's own mapping type, as default_collate keeps it
            return type(batch)(empty)
        except TypeError:
            return empty
    if isinstance(batch, (list, tuple)) and hasattr(batch, "_fields"):  # a namedtuple: field by field
        return type(batch)(*map(_empty_like, batch))
    if isinstance(batch, (list, tuple)):
        column = bool(batch) and all(isinstance(item, str) for item in batch)
        return type(batch)([] if column else map(_empty_like, batch))
    return batch


class Loader(DataLoader):
    """A ``DataLoader`` that keeps its place: ``epoch`` (being or last iterated), ``batches_remaining`` (None
    outside an iteration) and ``global_batch_size``; ``batch_size`` is the per-process batch. An iteration run
    to its end moves to the next epoch, one left early (a ``break``) does not."""

    def __init__(self, dataset: Dataset, *, global_batch_size: int, seed: int, rank: int, world_size: int,
                 detected: bool = False, **kwargs: Any) -> None:
        self.global_batch_size, self.seed, self.rank = global_batch_size, seed, rank
        self._unsharded_by_detection = detected and world_size == 1
        self.epoch = 0
        self.batches_remaining: int | None = None  # None outside an iteration
        self._resume_batches = 0
        self._taken: int | None = None  # batches of the current epoch taken, while one is being iterated
        self._left_at: int | None = None  # where the last iteration was left (a break), until the next starts
        self._iteration: object | None = None
        super().__init__(dataset, generator=torch.Generator(), **kwargs)
        evaluation = isinstance(self.batch_sampler, EvalBatchSampler)
        self._epoch_sampler: ShardedSampler | EvalBatchSampler = self.batch_sampler if evaluation else self.sampler

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch ``epoch``; a pending mid-epoch resume position is kept for that epoch."""
        sampler = self._epoch_sampler
        if getattr(sampler, "epoch", epoch) != epoch:
            self._resume_batches, self._left_at = 0, None
        sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Where the run is: ``{"epoch", "batch"}`` (batches of that epoch taken, also after a ``break``)."""
        taken = self._taken if self._taken is not None else self._resume_batches or self._left_at or 0
        return {"epoch": int(getattr(self._epoch_sampler, "epoch", 0)), "batch": int(taken)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``: the next iteration is that epoch, starting after the batches already taken."""
        self._epoch_sampler.set_epoch(int(state["epoch"]))
        self._resume_batches, self._left_at = int(state.get("batch", 0)), None

    def __iter__(self) -> Iterator[Any]:
        if self._unsharded_by_detection and group.is_distributed():
            raise UsageError("this loader was built before the process group existed, so it does not shard the data: "
                             "build it after torch.distributed.init_process_group (or ap.runtime())")
        sampler = self._epoch_sampler
        epoch = self.epoch = getattr(sampler, "epoch", 0)
        skip, self._resume_batches, self._left_at = self._resume_batches, 0, None
        if isinstance(sampler, ShardedSampler):
            sampler.start = min(skip * self.batch_size, sampler.num_samples)
        # Workers' seeds: SeedSequence mixes the three numbers well, so (epoch, rank) pairs never share them.
        mixed = np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1, dtype=np.uint64)[0]
        self.generator.manual_seed(int(mixed >> 1))
        total = len(self)
        self.batches_remaining = total
        if isinstance(sampler, EvalBatchSampler) and total and not sampler.batches[0]:
            batches: Iterator[Any] = iter([_empty_like(self.collate_fn([self.dataset[0]]))] * total)
        else:
            batches = super().__iter__()
        self._taken, token = skip, object()
        self._iteration, finished = token, False
        try:
            for batch in batches:
                self.batches_remaining -= 1
                self._taken += 1
                yield batch
            finished = True
        finally:
            if self._iteration is token:  # an abandoned iteration collected late must not reset a newer one
                self._left_at = None if finished else self._taken
                self._taken, self.batches_remaining = None, None
                if isinstance(sampler, ShardedSampler):
                    sampler.start = 0
        if getattr(sampler, "epoch", epoch) == epoch:  # not set to another epoch meanwhile
            sampler.set_epoch(epoch + 1)


def per_process_batch_size(batch_size: int, world_size: int) -> int:
    """The batch each of ``world_size`` processes loads for a global ``batch_size`` (which must divide)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive int (the global batch of one micro-step), got {batch_size!r}")
    if batch_size % world_size:
        lower = batch_size // world_size * world_size
        options = " or ".join(f"batch_size={v} ({v // world_size} per process)" for v in (lower, lower + world_size)
                              if v > 0)
        raise UsageError(f"batch_size={batch_size} is the global batch of one micro-step and must divide by the "
                         f"number of DDP processes, world_size={world_size}: use {options}")
    return batch_size // world_size


def default_num_workers(processes_on_this_node: int = 1) -> int:
    """Loader workers per process: this node's CPUs per process minus one for the process itself, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus // max(1, processes_on_this_node) - 1))


def loader(dataset: Dataset, batch_size: int, *, train: bool = True, shuffle: bool = True,
           sampler: Sampler | None = None, seed: int | None = None, num_workers: int | None = None,
           pin_memory: bool | None = None, persistent_workers: bool | None = None, drop_last: bool | None = None,
           runtime: Runtime | None = None, **dataloader_kwargs: Any) -> Loader:
    """The loader of ``dataset`` for the current mode, called on every rank. ``sampler``: an order to shard
    instead of the shuffle, the same on every rank (one with a ``generator`` is re-seeded with ``seed + epoch``);
    ``seed`` defaults to the script's torch seed, ``num_workers`` to :func:`default_num_workers`, ``pin_memory``
    to on for a GPU, ``drop_last`` to ``train``; other keyword arguments go to ``DataLoader``."""
    detected = runtime is None
    if detected:
        runtime = current_runtime()
    if "generator" in dataloader_kwargs:
        raise UsageError("loader() draws its shuffle and its workers' seeds from seed= (with the epoch and the rank, "
                         "so a resumed run repeats them): pass seed=... instead of generator=")
    if isinstance(dataset, IterableDataset):
        raise TypeError("loader() shards map-style datasets (with __len__ and __getitem__); an IterableDataset "
                        "must shard itself by rank: build a torch.utils.data.DataLoader for it directly")
    world_size, rank = (runtime.world_size, runtime.rank) if runtime.is_distributed else (1, 0)
    process_batch = per_process_batch_size(batch_size, world_size)
    drop_last = train if drop_last is None else drop_last
    if not train and drop_last:
        raise UsageError("loader(train=False, drop_last=True) would skip the last samples of the evaluation set: "
                         "leave drop_last unset so every sample is evaluated exactly once")
    if seed is None and train:  # the script's torch seed, rank 0's so that every rank shuffles alike
        seed = int(broadcast_object(torch.initial_seed() % 2**31))
    seed = int(seed or 0)
    if num_workers is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size) if runtime.is_distributed else 1
        num_workers = default_num_workers(local)
    if num_workers == 0:
        dataloader_kwargs.pop("prefetch_factor", None)  # DataLoader refuses it without workers
    common = dict(global_batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, detected=detected,
                  num_workers=num_workers,
                  pin_memory=runtime.device.type == "cuda" if pin_memory is None else pin_memory,
                  persistent_workers=num_workers > 0 if persistent_workers is None else persistent_workers,
                  **dataloader_kwargs)
    if not train:
        return Loader(dataset, batch_sampler=EvalBatchSampler(len(dataset), world_size, rank, process_batch), **common)
    shard = ShardedSampler(len(dataset), world_size, rank, shuffle=shuffle, seed=seed, drop_last=drop_last,
                           order=sampler)
    if drop_last and len(shard) < process_batch:
        raise UsageError(f"the dataset has {len(dataset)} samples, fewer than one global batch (batch_size="
                         f"{batch_size}), so with drop_last=True an epoch has no batch: lower batch_size or pass "
                         "drop_last=False")
    return Loader(dataset, batch_size=process_batch, sampler=shard, drop_last=drop_last, **common)
