"""Make our DataParallel act, on the CPU, as if it drove N GPUs: real scatter, replicas and gather.

torch's DataParallel is a pass-through without CUDA, so the multi-replica path of a user's forward
(scatter the batch, run a replica per device in threads, gather) is exercised here by replacing the
three CUDA-only pieces with their CPU equivalents: chunking, the same module per "device", concatenation.
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

import torch
from torch import nn


class _ChunkScatter:  # torch's Scatter copies each chunk to its GPU; on the CPU a chunk is enough
    @staticmethod
    def apply(target_gpus, chunk_sizes, dim, tensor):
        return tensor.chunk(len(target_gpus), dim)


class _CatGather:
    @staticmethod
    def apply(output_device, dim, *tensors):
        return torch.cat(tensors, dim)


def cpu_parallel_apply(modules, inputs, kwargs_tup=None, devices=None):
    """torch.nn.parallel.parallel_apply on the CPU: one thread per replica, re-entering autocast with only
    ``enabled`` as torch does for CUDA (so the thread-local dtype falls back to the device default)."""
    enabled = torch.is_autocast_enabled("cpu")
    kwargs_tup = kwargs_tup or [{}] * len(modules)
    results = [None] * len(modules)
    errors = []

    def worker(index):
        try:
            with torch.autocast("cpu", enabled=enabled):
                results[index] = modules[index](*inputs[index], **kwargs_tup[index])
        except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread, as torch does
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(modules))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@contextmanager
def fake_gpus(monkeypatch, wrapped: nn.Module, count: int):
    """Within the block, ``wrapped`` (our DataParallel) scatters over ``count`` CPU "devices"."""
    module = sys.modules[type(wrapped).__module__]
    monkeypatch.setattr(torch.nn.parallel.scatter_gather, "Scatter", _ChunkScatter)
    monkeypatch.setattr(module, "Gather", _CatGather)
    monkeypatch.setattr(module, "_parallel_apply", cpu_parallel_apply)
    monkeypatch.setattr(wrapped, "replicate", lambda network, ids: [network] * len(ids))
    settings = {"device_ids": list(range(count)), "src_device_obj": torch.device("cpu"), "output_device": 0,
                "dim": 0}
    for name, value in settings.items():
        wrapped.__dict__[getattr(type(wrapped), "_SETTING_NAMES", {}).get(name, name)] = value
    yield wrapped
