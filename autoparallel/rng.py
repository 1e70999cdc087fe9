"""The random states of a process (Python, numpy, torch, CUDA), as plain data a checkpoint can hold."""
from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import group

logger = logging.getLogger(__name__)


def capture() -> dict[str, Any]:
    """This process's random states; CUDA's only where CUDA is already in use (reading it would start it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda: dict[int, torch.Tensor] = {}
    if torch.cuda.is_initialized():
        # Under DDP a rank only touches its own GPU; reading all of them would create a context on each.
        devices = [torch.cuda.current_device()] if group.is_distributed() else range(torch.cuda.device_count())
        cuda = {index: torch.cuda.get_rng_state(index) for index in devices}
    return {"python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(), "cuda": cuda}


def restore(states: Any, path: Any) -> None:
    """Restore this rank's entry of the per-rank list that :func:`capture` states were gathered into."""
    if isinstance(states, Mapping):
        states = [states]
    if not states:
        logger.warning("checkpoint %s has no random states; random streams are not restored", path)
        return
    rank, world = group.rank(), group.world_size()
    if len(states) != world:
        logger.warning("checkpoint %s holds the random states of %d process(es), this job has %d: every process gets "
                       "rank 0's, so random streams will not match the original run", path, len(states), world)
    state = states[rank] if len(states) == world else states[0]
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].cpu().numpy().astype(np.uint32), saved["pos"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for index, cuda_state in state.get("cuda", {}).items():
            if int(index) < torch.cuda.device_count():
                torch.cuda.set_rng_state(cuda_state.cpu(), int(index))
