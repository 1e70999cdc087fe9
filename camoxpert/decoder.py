"""Decoder parts: per-scale attention, the FPN path with one MoE block per scale, and the high-resolution path.

Measured on 2 CPU cores from random initialisation (``shared/reference/learning-from-scratch.md``): a backbone's
stride-4-and-coarser features with a plain FPN did not learn the synthetic camouflage task, while a small U-Net
with a full-resolution skip and a dilated middle did. So besides the FPN over the backbone, the decoder runs a
small convolutional stem on the image at full and half resolution and fuses it at the end, and the MoE experts
include wide-receptive-field and local-contrast operators that compare a region with its surroundings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camoxpert.filters import box_mean
from camoxpert.moe import MoEBlock

__all__ = ["ConvBNAct", "FPNDecoder", "HighResolutionPath", "ScaleAttention", "TextureContrast", "upsample_to"]


def upsample_to(x: Tensor, reference: Tensor) -> Tensor:
    """Bilinear resize of ``x`` to ``reference``'s spatial size (a no-op when it already matches)."""
    if x.shape[-2:] == reference.shape[-2:]:
        return x
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


class ConvBNAct(nn.Sequential):
    """Conv, BatchNorm, ReLU: the decoder's plain building block."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> None:
        padding = dilation * (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ScaleAttention(nn.Module):
    """Channel then spatial attention (CBAM-like), kept residual so that a
    randomly initialised gate cannot erase the signal: ``x + x * channel_gate * spatial_gate``."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(hidden, channels, 1), nn.Sigmoid())
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        y = x * self.channel(x)
        y = y * self.spatial(torch.cat([y.mean(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)], dim=1))
        return x + y


class FPNLevel(nn.Module):
    """One decoder scale: lateral projection, attention, fusion with the coarser level, MoE, side head."""

    def __init__(self, in_channels: int, channels: int, num_experts: int, top_k: int | None, top: bool) -> None:
        super().__init__()
        self.lateral = ConvBNAct(in_channels, channels, kernel=1)
        self.attention = ScaleAttention(channels)
        self.fuse = None if top else ConvBNAct(2 * channels, channels, kernel=3)
        self.moe = MoEBlock(channels, num_experts=num_experts, top_k=top_k)
        self.side_head = nn.Conv2d(channels, 1, 1)

    def forward(self, feature: Tensor, coarser: Tensor | None) -> tuple[Tensor, Tensor]:
        x = self.attention(self.lateral(feature))
        if self.fuse is not None and coarser is not None:
            x = self.fuse(torch.cat([x, upsample_to(coarser, x)], dim=1))
        return self.moe(x)


class FPNDecoder(nn.Module):
    """Top-down path over the backbone features, deepest first; every level has attention and an MoE block.

    ``forward`` takes the features shallowest first (timm's order) and returns the finest decoded map, the list
    of decoded maps finest first and the summed balancing loss (0-dim).
    """

    def __init__(self, in_channels: list[int], channels: int, num_experts: int, top_k: int | None) -> None:
        super().__init__()
        last = len(in_channels) - 1
        self.levels = nn.ModuleList(
            FPNLevel(c, channels, num_experts, top_k, top=(i == last)) for i, c in enumerate(in_channels)
        )

    def level_forward(self, index: int, feature: Tensor, coarser: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.levels[index](feature, coarser)


class TextureContrast(nn.Module):
    """Local texture statistics (mean and standard deviation of every channel over a window) standardised per
    image (InstanceNorm): each position then says how its texture differs from the image's typical texture.

    A camouflaged object shares its scene's colours; what gives it away is a different texture scale, contrast
    or a slight colour shift, i.e. different local statistics. Computing them explicitly and comparing them with
    the whole image is a strong prior that a small network trained from scratch otherwise takes long to find.
    """

    def __init__(self, channels: int, windows: tuple[int, ...] = (3, 7)) -> None:
        super().__init__()
        self.windows = windows
        self.standardise = nn.InstanceNorm2d(2 * channels * len(windows))
        self.fuse = ConvBNAct(channels * (1 + 2 * len(windows)), channels, kernel=1)

    def forward(self, x: Tensor) -> Tensor:
        stats = []
        moments = torch.cat([x, x * x], dim=1)
        for w in self.windows:
            mean, square = box_mean(moments, w, count_include_pad=False).chunk(2, dim=1)
            stats += [mean, (square - mean * mean).clamp_min(0.0).add(1e-4).sqrt()]
        return self.fuse(torch.cat([x, self.standardise(torch.cat(stats, dim=1).float()).to(x.dtype)], dim=1))


class HighResolutionPath(nn.Module):
    """A small U-Net on the image itself (half and quarter resolution) into which the FPN's finest map is fused
    at quarter resolution, followed by a dilated context block and the way back up to half resolution.

    This is the part that makes learning from random initialisation work: fine texture and boundaries live at
    stride 2, and the dilated context (rates 2, 4, 8 at stride 4) compares a region with its surroundings, which
    is what reveals a camouflaged object. The prediction is made at stride 2 and upsampled: on 2 CPU cores a
    full-resolution decoder stage cost more than the rest of the model and gained nothing measurable on the
    blob-shaped objects of the synthetic set.
    """

    def __init__(self, decoder_channels: int, widths: tuple[int, int] = (24, 48),
                 context_rates: tuple[int, ...] = (2, 4, 8)) -> None:
        super().__init__()
        half, quarter = widths
        self.enc_half = nn.Sequential(ConvBNAct(3, 16, stride=2), ConvBNAct(16, half))
        self.enc_quarter = nn.Sequential(ConvBNAct(half, quarter, stride=2), ConvBNAct(quarter, quarter),
                                         TextureContrast(quarter))
        self.fuse_quarter = ConvBNAct(quarter + decoder_channels, quarter)
        self.context = nn.ModuleList(ConvBNAct(quarter, quarter, dilation=r) for r in context_rates)
        self.dec_half = ConvBNAct(quarter + half, half)
        self.head = nn.Conv2d(half, 1, 1)

    def stem(self, images: Tensor) -> tuple[Tensor, Tensor]:
        half = self.enc_half(images)
        return half, self.enc_quarter(half)

    def fuse(self, decoded: Tensor, half: Tensor, quarter: Tensor) -> Tensor:
        x = self.fuse_quarter(torch.cat([quarter, upsample_to(decoded, quarter)], dim=1))
        for block in self.context:
            x = x + block(x)
        x = self.dec_half(torch.cat([upsample_to(x, half), half], dim=1))
        return self.head(x)
