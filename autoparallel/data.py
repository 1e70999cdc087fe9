"""Data loading whose ``batch_size`` means the same thing in every mode.

``loader(dataset, batch_size)`` returns a ``DataLoader`` (subclass) where ``batch_size`` is the
**global** batch of one micro-step: one process (CPU, one GPU, DataParallel, which splits the batch
over its GPUs) loads ``batch_size`` samples per step; each of N DDP processes loads
``batch_size // N``. The number of optimizer steps per epoch and the samples in each step therefore do
not depend on how the job was started.

Training order. Every mode uses torch's ``DistributedSampler`` (with ``num_replicas=1`` outside
DDP, where it is a ``RandomSampler`` seeded with ``seed + epoch``). Its permutation is the same in all
modes and rank ``r`` takes positions ``r, r + N, ...``, so the union of the N per-rank batches of step
``j`` is exactly the single-process batch ``j``: mode equivalence holds by construction. Each
``iter(loader)`` uses the next epoch (0, 1, 2, ...), so the order changes every epoch without the
caller remembering ``set_epoch``. To resume exactly at epoch ``k``, call ``loader.set_epoch(k)``
before iterating: epoch ``k``'s order depends only on ``(seed, k)``.

Worker randomness. The loader's generator is re-seeded from ``(seed, epoch, rank)`` at every
``iter()``; torch derives each worker's ``random``, ``numpy`` and ``torch`` seeds from it. Ranks thus
augment differently and reproducibly. With persistent workers (the default when ``num_workers > 0``)
workers keep their random streams across epochs, so for bit-exact augmentation after a resume pass
``persistent_workers=False``; the sample order is exact either way.

Evaluation (``train=False``). torch's ``DistributedSampler`` pads the last shard with duplicates, which
counts some images twice. :class:`EvalSampler` gives rank ``r`` a **contiguous** slice of the dataset,
the first ``len % N`` ranks one sample more, with no padding: every sample is seen exactly once, and
``autoparallel.all_gather`` of per-rank results (in rank order) is in dataset order. Contiguous rather
than strided shards are chosen for that last property.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from .errors import UsageError

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["EvalSampler", "Loader", "default_num_workers", "loader", "per_process_batch_size"]

_MAX_DEFAULT_WORKERS = 8


class EvalSampler(Sampler[int]):
    """Contiguous, unpadded shard of ``range(len(dataset))`` for rank ``rank`` of ``num_replicas``.

    Sizes differ by at most one between ranks and some ranks may get nothing when the dataset is
    smaller than the number of ranks. Takes ``num_replicas`` and ``rank`` explicitly so it can be
    built and tested without a process group.
    """

    def __init__(self, data_source: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EvalSampler needs 0 <= rank < num_replicas, got rank={rank}, "
                             f"num_replicas={num_replicas}")
        base, extra = divmod(len(data_source), num_replicas)
        self.num_replicas = num_replicas
        self.rank = rank
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (1 if rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start

    def set_epoch(self, epoch: int) -> None:
        """Accepted for symmetry with the training sampler; evaluation order never changes."""


class Loader(DataLoader):
    """A ``DataLoader`` that advances its sampler's epoch on every ``iter()``.

    ``batch_size`` is the per-process batch (what one ``next()`` returns), ``global_batch_size`` the
    batch of one micro-step over all processes, and ``epoch`` the epoch of the latest ``iter()``.
    Build it with :func:`loader`.
    """

    def __init__(self, dataset: Dataset, *, global_batch_size: int, seed: int, rank: int, **kwargs: Any) -> None:
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.epoch: int | None = None
        self._next_epoch = 0
        super().__init__(dataset, generator=torch.Generator(), **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Makes the next ``iter()`` produce epoch ``epoch`` (for resuming); later ones follow on."""
        if epoch < 0:
            raise ValueError(f"set_epoch needs an epoch >= 0, got {epoch}")
        self._next_epoch = epoch

    def __iter__(self) -> Any:
        epoch = self._next_epoch
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(_worker_base_seed(self.seed, epoch, self.rank))
        self._next_epoch = epoch + 1
        self.epoch = epoch
        return super().__iter__()


def _worker_base_seed(seed: int, epoch: int, rank: int) -> int:
    # SeedSequence mixes the three numbers well, so (epoch, rank) pairs never share worker seeds.
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def per_process_batch_size(batch_size: int, world_size: int) -> int:
    """The batch each of ``world_size`` processes loads for a global ``batch_size``.

    Raises:
        ValueError: ``batch_size`` does not divide by ``world_size``; the message names the nearest
            global batch sizes that do.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (the global batch of one micro-step), got {batch_size!r}")
    if batch_size % world_size:
        lower = batch_size // world_size * world_size
        options = [value for value in (lower, lower + world_size) if value > 0]
        suggestion = " or ".join(f"batch_size={v} ({v // world_size} per process)" for v in options)
        raise UsageError(f"batch_size={batch_size} is the global batch of one micro-step and must divide by the "
                         f"number of DDP processes, world_size={world_size}: use {suggestion}")
    return batch_size // world_size


def default_num_workers(processes_on_this_node: int = 1) -> int:
    """Loader workers per process: the CPUs this node gives each process, minus one for the process itself.

    Capped at 8, beyond which image decoding rarely speeds up and memory grows with every worker.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    per_process = cpus // max(1, processes_on_this_node)
    return max(0, min(_MAX_DEFAULT_WORKERS, per_process - 1))


def _processes_on_this_node(rt: Runtime) -> int:
    if rt.mode != "ddp":
        return 1
    local_world = os.environ.get("LOCAL_WORLD_SIZE")  # set by torchrun
    return int(local_world) if local_world else rt.world_size


def loader(dataset: Dataset, batch_size: int, *, train: bool = True, num_workers: int | None = None,
           pin_memory: bool | None = None, persistent_workers: bool | None = None, seed: int = 0,
           collate_fn: Callable[[list[Any]], Any] | None = None, drop_last: bool | None = None,
           runtime: Runtime | None = None) -> Loader:
    """Builds the loader for ``dataset`` in the current mode; see the module docstring for the rules.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``).
        batch_size: the global batch of one micro-step, in every mode.
        train: shuffled, re-seeded every epoch and ``drop_last`` by default; ``False`` gives the
            in-order, unpadded evaluation shards.
        num_workers: default :func:`default_num_workers` for the processes on this node.
        pin_memory: default on when the runtime's device is a GPU.
        persistent_workers: default on when ``num_workers > 0`` (no worker start-up every epoch).
        seed: base of the shuffling and worker seeds; the same on every rank.
        collate_fn: passed to ``DataLoader``.
        drop_last: drop the incomplete last batch; default ``True`` for training. Evaluation refuses
            ``True``, which would skip samples.
        runtime: default ``autoparallel.runtime()``.
    """
    if runtime is None:
        from .runtime import runtime as current_runtime

        runtime = current_runtime()
    if isinstance(dataset, IterableDataset):
        raise TypeError("loader() shards map-style datasets (with __len__ and __getitem__); an IterableDataset "
                        "must shard itself by rank: build a torch.utils.data.DataLoader for it directly")
    distributed = runtime.mode == "ddp"
    world_size, rank = (runtime.world_size, runtime.rank) if distributed else (1, 0)
    process_batch = per_process_batch_size(batch_size, world_size)
    if drop_last is None:
        drop_last = train
    if not train and drop_last:
        raise ValueError("loader(train=False, drop_last=True) would skip the last samples of the evaluation set: "
                         "leave drop_last unset so every sample is evaluated exactly once")

    sampler: Sampler[int]
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=drop_last)
        if drop_last and len(sampler) < process_batch:
            raise UsageError(f"the dataset has {len(dataset)} samples, fewer than one global batch "
                             f"(batch_size={batch_size}), so with drop_last=True an epoch has no batch: "
                             f"lower batch_size or pass drop_last=False")
    else:
        sampler = EvalSampler(dataset, num_replicas=world_size, rank=rank)

    if num_workers is None:
        num_workers = default_num_workers(_processes_on_this_node(runtime))
    if pin_memory is None:
        pin_memory = runtime.device.type == "cuda"
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return Loader(dataset, global_batch_size=batch_size, seed=seed, rank=rank, batch_size=process_batch,
                  sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=persistent_workers, collate_fn=collate_fn, drop_last=drop_last)
