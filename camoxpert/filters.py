"""Box averages as two depthwise 1-D convolutions: the same numbers as ``avg_pool2d``, several times faster on a CPU.

A 31 x 31 pool of a 16 x 1 x 128 x 128 batch takes 124 ms with ``avg_pool2d`` and 8 ms this way (11 x 11 on
16 x 64 x 32 x 32: 60 ms against 14 ms, 2 cores); on a GPU both are fast.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["box_mean"]


def _separable_mean(x: Tensor, kernel: int) -> Tensor:
    """Sum over the zero-padded ``kernel x kernel`` window divided by ``kernel**2``, per channel."""
    channels, pad = x.shape[1], kernel // 2
    column = x.new_full((channels, 1, kernel, 1), 1.0 / kernel)
    x = F.conv2d(x, column, padding=(pad, 0), groups=channels)
    return F.conv2d(x, column.transpose(2, 3), padding=(0, pad), groups=channels)


def box_mean(x: Tensor, kernel: int, *, count_include_pad: bool) -> Tensor:
    """Equals ``F.avg_pool2d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=...)`` for odd ``kernel``.

    Without ``count_include_pad`` the average is over the window's pixels inside the image: the zero-padded mean
    divided by the share of the window that is inside (the same for every channel, computed on one plane).
    """
    if kernel % 2 != 1:
        raise ValueError(f"box_mean needs an odd kernel to keep the size, got {kernel}")
    mean = _separable_mean(x, kernel)
    if count_include_pad:
        return mean
    inside = _separable_mean(x.new_ones((1, 1, *x.shape[-2:])), kernel)
    return mean / inside
