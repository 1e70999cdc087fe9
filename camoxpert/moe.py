"""Mixture-of-Experts block: different expert types, per-image top-k routing, vectorised dispatch.

The router's top-k choice becomes a dense ``B x E`` weight matrix (zeros for unselected experts) and the block
mixes whole-batch expert outputs with it, so a forward has a fixed number of kernel launches, no host sync, and
works under DataParallel, DDP and ``torch.compile``; the Switch Transformer balancing loss keeps the router's
probabilities in the graph. Experts use batch-independent normalisation (GroupNorm), so an expert's answer for
one image does not depend on which images were routed with it and every execution gives the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camoxpert.filters import box_mean

__all__ = ["EXPERT_TYPES", "MoEBlock", "build_expert", "default_top_k", "switch_balancing_loss"]


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups that divide ``channels``: batch-independent, unlike BatchNorm."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _conv_norm_act(cin: int, cout: int, kernel: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, groups=groups, bias=False),
        _norm(cout),
        nn.GELU(),
    )


class DilatedExpert(nn.Module):
    """3x3 branches at dilation 1, 2, 4 and 8, a quarter of the channels each: a wide receptive field for the
    price of one 3x3 convolution. (Dense, not depthwise: depthwise backward is several times slower on CPU.)"""

    def __init__(self, channels: int, rates: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        branch = max(channels // len(rates), 4)
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, branch, 3, padding=r, dilation=r, bias=False) for r in rates
        )
        self.fuse = nn.Sequential(_norm(branch * len(rates)), nn.GELU(), nn.Conv2d(branch * len(rates), channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))


class LargeKernelExpert(nn.Module):
    """A 7x7 receptive field from a pair of 1x7 / 7x1 strip convolutions on half the channels: mid-range
    spatial mixing, elongated shapes."""

    def __init__(self, channels: int, kernel: int = 7) -> None:
        super().__init__()
        hidden = max(channels // 2, 4)
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.Conv2d(hidden, hidden, (1, kernel), padding=(0, kernel // 2), bias=False),
            nn.Conv2d(hidden, hidden, (kernel, 1), padding=(kernel // 2, 0), bias=False),
            _norm(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ChannelAttentionExpert(nn.Module):
    """A 3x3 convolution whose channels are re-weighted from global context (squeeze-and-excitation)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.conv = _conv_norm_act(channels, channels, 3)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.GELU(),
                                  nn.Conv2d(hidden, channels, 1), nn.Sigmoid())
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.proj(y * self.gate(y))


class EdgeExpert(nn.Module):
    """Fixed Sobel filters on every channel: boundaries are where a camouflaged object gives itself away."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4.0
        kernels = torch.stack([sobel_x, sobel_x.t()]).unsqueeze(1).repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3)
        self.register_buffer("kernels", kernels, persistent=False)
        self.channels = channels
        self.fuse = nn.Sequential(_conv_norm_act(2 * channels, channels, 1),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        grad = F.conv2d(x, self.kernels.to(x.dtype), padding=1, groups=self.channels)
        gx, gy = grad[:, 0::2], grad[:, 1::2]
        magnitude = torch.sqrt(gx * gx + gy * gy + 1e-6)
        return self.fuse(torch.cat([x, magnitude], dim=1))


class LocalContrastExpert(nn.Module):
    """Feature minus its local average at two scales: what makes a camouflaged object visible is how it differs
    from its immediate surroundings, not its absolute appearance."""

    def __init__(self, channels: int, windows: tuple[int, int] = (5, 11)) -> None:
        super().__init__()
        self.windows = windows
        self.fuse = nn.Sequential(_conv_norm_act(channels * (1 + len(windows)), channels, 1),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        contrasts = [x - box_mean(x, w, count_include_pad=False) for w in self.windows]
        return self.fuse(torch.cat([x, *contrasts], dim=1))


class PyramidPoolingExpert(nn.Module):
    """Context pooled at 1x1, 2x2 and 4x4 grids and broadcast back: scene-level statistics for every pixel."""

    def __init__(self, channels: int, bins: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        hidden = max(channels // 4, 8)
        self.bins = bins
        self.reduce = nn.ModuleList(nn.Conv2d(channels, hidden, 1) for _ in bins)
        self.fuse = nn.Sequential(_conv_norm_act(channels + hidden * len(bins), channels, 1),
                                  nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(F.gelu(reduce(F.adaptive_avg_pool2d(x, b))), size=size, mode="bilinear", align_corners=False)
            for b, reduce in zip(self.bins, self.reduce)
        ]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class PointwiseExpert(nn.Module):
    """A per-pixel MLP (1x1 convolutions): the cheap, nearly-identity choice the router can fall back on."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(_norm(channels), nn.Conv2d(channels, 2 * channels, 1), nn.GELU(),
                                 nn.Conv2d(2 * channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


EXPERT_TYPES: tuple[type[nn.Module], ...] = (
    LocalContrastExpert,
    DilatedExpert,
    LargeKernelExpert,
    EdgeExpert,
    ChannelAttentionExpert,
    PyramidPoolingExpert,
    PointwiseExpert,
)


def build_expert(index: int, channels: int) -> nn.Module:
    """Expert ``index`` has type ``index mod 7``: 7 experts give one of each type, more repeat the cycle."""
    return EXPERT_TYPES[index % len(EXPERT_TYPES)](channels)


def default_top_k(num_experts: int) -> int:
    """``max(2, E // 2)`` (3 for 7 experts, CamoXpert's published setting), clamped to the number of experts."""
    return min(num_experts, max(2, num_experts // 2))


def switch_balancing_loss(router_probs: Tensor, dispatch_mask: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i`` (Fedus et al., 2021, eq. 4).

    ``f_i`` is the fraction of routing picks that went to expert ``i`` (a count: no gradient) and ``P_i`` the mean
    router probability of expert ``i`` over the batch (differentiable). Its minimum, 1.0, is reached when the picks
    are spread uniformly; the gradient pushes probability away from over-used experts.

    Args:
        router_probs: ``B x E`` softmax over all experts.
        dispatch_mask: ``B x E``, 1 where an expert was selected for the image (``k`` ones per row).

    Returns:
        A 0-dim tensor.
    """
    num_experts = router_probs.shape[1]
    mask = dispatch_mask.to(router_probs.dtype)
    fraction = mask.sum(0) / mask.sum().clamp_min(1.0)
    mean_prob = router_probs.mean(0)
    return num_experts * torch.sum(fraction.detach() * mean_prob)


class MoEBlock(nn.Module):
    """``x + sum_k w_k * expert_k(x)`` over each image's top-k experts, chosen from global context.

    Args:
        channels: channels of the feature map (kept).
        num_experts: number of experts; expert ``i`` has type ``i mod 7`` (see :data:`EXPERT_TYPES`).
        top_k: experts per image; default :func:`default_top_k`.
        dispatch: ``"dense"`` runs every expert on the whole batch and masks with the weight matrix (no host sync,
            ``torch.compile``-friendly, ``E/k`` times the expert compute); ``"gather"`` runs each expert only on the
            images that chose it (``k/E`` of the compute, but the index lists have data-dependent sizes, which costs
            one device-to-host sync per expert on a GPU); ``"auto"`` (default) picks, per call, ``"gather"`` for
            CPU tensors, where there is no device to sync with and compute is the bottleneck, and ``"dense"`` on
            accelerators.
    """

    def __init__(self, channels: int, num_experts: int = 7, top_k: int | None = None, dispatch: str = "auto") -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts}: a Mixture-of-Experts needs at least 1 expert")
        top_k = default_top_k(num_experts) if top_k is None else top_k
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} with num_experts={num_experts}: pass a top_k between 1 and {num_experts}")
        if dispatch not in ("auto", "dense", "gather"):
            raise ValueError(f"dispatch={dispatch!r}: choose 'auto', 'dense' or 'gather'")
        self.num_experts = num_experts
        self.top_k = top_k
        self.dispatch = dispatch
        self.experts = nn.ModuleList(build_expert(i, channels) for i in range(num_experts))
        # Router on average- and max-pooled context; a small init starts near uniform routing.
        self.router = nn.Linear(2 * channels, num_experts)
        nn.init.normal_(self.router.weight, std=0.01)
        nn.init.zeros_(self.router.bias)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Routes every image of the batch at once.

        Returns:
            ``weights``: ``B x E`` mixing weights, the softmax over each image's top-k logits, zeros elsewhere;
            ``probs``: ``B x E`` softmax over all experts (for the balancing loss);
            ``selected``: ``B x E`` bool, exactly ``top_k`` True per row.
        """
        context = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        logits = self.router(context).float()
        probs = logits.softmax(dim=1)
        top_logits, top_index = logits.topk(self.top_k, dim=1)
        weights = torch.zeros_like(logits).scatter(1, top_index, top_logits.softmax(dim=1))
        selected = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_index, True)
        return weights, probs, selected

    def dispatch_on(self, device: torch.device) -> str:
        """``"dense"`` or ``"gather"``: what ``dispatch`` means for tensors on ``device``."""
        if self.dispatch != "auto":
            return self.dispatch
        return "gather" if device.type == "cpu" else "dense"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the mixed features and this block's balancing loss (0-dim)."""
        weights, probs, selected = self.route(x)
        aux = switch_balancing_loss(probs, selected)
        weights = weights.to(x.dtype)
        mixed = torch.zeros_like(x)
        if self.dispatch_on(x.device) == "dense":
            for e, expert in enumerate(self.experts):
                mixed = mixed + weights[:, e].view(-1, 1, 1, 1) * expert(x)
        else:
            for e, expert in enumerate(self.experts):
                index = selected[:, e].nonzero().squeeze(1)
                if index.numel() == 0:
                    continue
                out = expert(x.index_select(0, index)) * weights.index_select(0, index)[:, e].view(-1, 1, 1, 1)
                mixed = mixed.index_add(0, index, out)
        return x + mixed, aux

    def forward_per_sample(self, x: Tensor) -> Tensor:
        """Reference execution, image by image and pick by pick (differentiable, without the balancing loss).
        For tests and benchmarks only: it syncs with the host for every image."""
        weights, _, selected = self.route(x)
        outputs = []
        for b in range(x.shape[0]):
            xb = x[b : b + 1]
            yb = xb.clone()
            for e in selected[b].nonzero().flatten().tolist():
                yb = yb + weights[b, e].to(x.dtype) * self.experts[e](xb)
            outputs.append(yb)
        return torch.cat(outputs, dim=0)
