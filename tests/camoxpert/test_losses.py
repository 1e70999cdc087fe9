"""Structure loss against a hand computation, deep supervision weights, the aux term and detached parts."""

from __future__ import annotations

import math

import pytest
import torch

from camoxpert.losses import CODLoss, boundary_weight, structure_loss, structure_loss_parts


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_structure_loss_matches_hand_computation():
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 1.0]]]])
    # On a 2x2 image every 31x31 zero-padded window holds the whole image: local mean = 1/961 everywhere.
    w_fg = 1 + 5 * (1 - 1 / 961)
    w_bg = 1 + 5 * (1 / 961)
    weights = [w_fg, w_bg, w_bg, w_bg]
    targets = [1, 0, 0, 0]
    values = [2.0, -1.0, 0.0, 1.0]
    # BCE with logits: y=1 -> softplus(-x), y=0 -> softplus(x)
    bce = [_softplus(-v) if t else _softplus(v) for v, t in zip(values, targets)]
    expected_bce = sum(w * b for w, b in zip(weights, bce)) / sum(weights)
    probs = [_sigmoid(v) for v in values]
    inter = sum(w * p * t for w, p, t in zip(weights, probs, targets))
    union = sum(w * (p + t) for w, p, t in zip(weights, probs, targets))
    expected_iou = 1 - (inter + 1) / (union - inter + 1)

    torch.testing.assert_close(boundary_weight(mask).flatten(), torch.tensor(weights))
    bce_part, iou_part = structure_loss_parts(logits, mask)
    assert bce_part.item() == pytest.approx(expected_bce, rel=1e-6)
    assert iou_part.item() == pytest.approx(expected_iou, rel=1e-6)
    assert structure_loss(logits, mask).item() == pytest.approx(expected_bce + expected_iou, rel=1e-6)


def test_separable_boundary_weight_equals_the_direct_31x31_pool():
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(3, 1, 40, 56, generator=generator) > 0.7).float()
    direct = 1.0 + 5.0 * (torch.nn.functional.avg_pool2d(mask, 31, stride=1, padding=15) - mask).abs()
    torch.testing.assert_close(boundary_weight(mask), direct)


def test_perfect_prediction_scores_lower_than_wrong_or_uncertain_ones():
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    perfect = structure_loss((mask * 2 - 1) * 20, mask)
    uncertain = structure_loss(torch.zeros_like(mask), mask)
    inverted = structure_loss((1 - 2 * mask) * 20, mask)
    assert perfect.item() < 1e-6
    assert perfect < uncertain < inverted


def test_logits_at_another_size_are_resized_to_the_mask():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    small = (torch.nn.functional.avg_pool2d(mask, 2) * 2 - 1) * 20
    assert structure_loss(small, mask).item() < 1e-3


def test_cod_loss_combines_main_deep_and_aux_terms():
    torch.manual_seed(0)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    main = torch.randn(2, 1, 8, 8, requires_grad=True)
    sides = [torch.randn(2, 1, 8, 8) for _ in range(3)]
    aux = torch.tensor(4.5)
    output = {"mask": main, "aux_loss": aux, "side": sides}
    criterion = CODLoss(deep_weight=0.5, deep_decay=0.5, aux_weight=0.01)
    total, parts = criterion(output, mask)
    expected_deep = 0.5 * structure_loss(sides[0], mask) + 0.25 * structure_loss(sides[1], mask) + 0.125 * (
        structure_loss(sides[2], mask)
    )
    expected_total = structure_loss(main, mask) + expected_deep + 0.01 * 4.5
    torch.testing.assert_close(total, expected_total)
    torch.testing.assert_close(parts["deep"], expected_deep.detach())
    assert set(parts) == {"total", "bce", "iou", "deep", "aux"}
    assert all(p.dim() == 0 and not p.requires_grad for p in parts.values())
    assert parts["aux"].item() == pytest.approx(4.5)
    total.backward()
    assert main.grad is not None
    assert main.grad.abs().sum() > 0


def test_cod_loss_without_sides_or_aux_is_the_structure_loss():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    logits = torch.randn(1, 1, 8, 8)
    total, parts = CODLoss()({"mask": logits, "aux_loss": torch.zeros(()), "side": []}, mask)
    torch.testing.assert_close(total, structure_loss(logits, mask))
    assert parts["deep"].item() == 0.0


def test_aux_vector_from_a_plain_dataparallel_gather_is_averaged():
    mask = torch.zeros(1, 1, 8, 8)
    logits = torch.zeros(1, 1, 8, 8)
    _, parts = CODLoss()({"mask": logits, "aux_loss": torch.tensor([1.0, 3.0]), "side": []}, mask)
    assert parts["aux"].item() == pytest.approx(2.0)


def test_loss_is_float32_under_half_precision_inputs():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    logits = torch.randn(1, 1, 8, 8).half()
    total, _ = CODLoss()({"mask": logits, "aux_loss": torch.ones((), dtype=torch.float16), "side": []}, mask)
    assert total.dtype == torch.float32
    assert torch.isfinite(total)
