"""Training loss: the F3Net / SINet-V2 structure loss on the main output and the side outputs, plus the MoE
balancing loss.

The structure loss weights every pixel by ``1 + 5 * |avgpool31(mask) - mask|``: pixels near the object's boundary
count up to six times more, in both the binary cross-entropy and the soft IoU, because that is where camouflaged
objects are lost. It is computed in float32 whatever the autocast precision, and ``CODLoss`` returns its parts as
detached 0-dim tensors, so logging them needs no host sync per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from camoxpert.filters import box_mean

__all__ = ["CODLoss", "boundary_weight", "structure_loss", "structure_loss_parts"]


def boundary_weight(mask: Tensor, kernel: int = 31, strength: float = 5.0) -> Tensor:
    """``1 + strength * |avgpool(mask) - mask|`` with zero padding counted, exactly as in F3Net / SINet-V2.

    The box average is separable (:func:`camoxpert.filters.box_mean`): the direct 31 x 31 pool took 40% of a
    CamoXpert training step at 128 px on a CPU.
    """
    local_mean = box_mean(mask, kernel, count_include_pad=True)
    return 1.0 + strength * (local_mean - mask).abs()


def structure_loss_parts(logits: Tensor, mask: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weighted BCE and weighted soft-IoU loss, each averaged over the batch (0-dim tensors).

    Args:
        logits: ``B x 1 x H x W`` raw predictions; resized to the mask when their sizes differ.
        mask: ``B x 1 x H x W`` ground truth in [0, 1].
        weight: ``boundary_weight(mask)`` when the caller already has it (it depends on the mask only).
    """
    logits = logits.float()
    mask = mask.float()
    if logits.shape[-2:] != mask.shape[-2:]:
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    weight = boundary_weight(mask) if weight is None else weight
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    weighted_bce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(logits)
    intersection = (weight * prob * mask).sum(dim=(2, 3))
    union = (weight * (prob + mask)).sum(dim=(2, 3))
    weighted_iou = 1.0 - (intersection + 1.0) / (union - intersection + 1.0)
    return weighted_bce.mean(), weighted_iou.mean()


def structure_loss(logits: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """Weighted BCE + weighted IoU (F3Net's ``structure_loss``), a 0-dim tensor."""
    bce, iou = structure_loss_parts(logits, mask, weight)
    return bce + iou


class CODLoss:
    """``structure(main) + sum_j deep_weight * decay**j * structure(side_j) + aux_weight * aux_loss``.

    Side outputs come finest first, so the finest side gets ``deep_weight`` and each coarser one ``decay`` times
    the previous (0.5, 0.25, 0.125, ... by default).

    Args:
        deep_weight: weight of the finest side output.
        deep_decay: factor between consecutive side weights.
        aux_weight: weight of the MoE balancing loss (whose minimum is 1.0 per MoE block).
    """

    def __init__(self, deep_weight: float = 0.5, deep_decay: float = 0.5, aux_weight: float = 0.01) -> None:
        self.deep_weight = deep_weight
        self.deep_decay = deep_decay
        self.aux_weight = aux_weight

    def side_weights(self, count: int) -> list[float]:
        return [self.deep_weight * self.deep_decay**j for j in range(count)]

    def __call__(self, output: dict, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the total loss (0-dim, with gradient) and its parts (detached 0-dim tensors):
        ``total``, ``bce``, ``iou`` (main output), ``deep`` (weighted side terms), ``aux`` (unweighted)."""
        weight = boundary_weight(mask.float())  # once for the main and every side output
        bce, iou = structure_loss_parts(output["mask"], mask, weight)
        total = bce + iou
        sides: Sequence[Tensor] = output.get("side") or []
        deep = total.new_zeros(())
        for side_weight, side in zip(self.side_weights(len(sides)), sides):
            deep = deep + side_weight * structure_loss(side, mask, weight)
        aux = output.get("aux_loss")
        aux = total.new_zeros(()) if aux is None else aux.float().mean()  # mean: a plain DataParallel gives a vector
        total = total + deep + self.aux_weight * aux
        parts = {"total": total, "bce": bce, "iou": iou, "deep": deep, "aux": aux}
        return total, {name: value.detach() for name, value in parts.items()}
