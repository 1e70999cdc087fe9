"""Per-image metrics equal py_sod_metrics called directly; IoU's definition and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from py_sod_metrics import MAE, Emeasure, Smeasure, WeightedFmeasure

from camoxpert.metrics import METRIC_NAMES, image_metrics, summarize, to_uint8


def _pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """Random predictions (float and uint8) and blob-ish masks of different sizes, one empty mask."""
    rng = np.random.default_rng(0)
    pairs = []
    for i, (h, w) in enumerate([(30, 40), (41, 33), (25, 25), (50, 20), (36, 36), (28, 45)]):
        y, x = np.mgrid[0:h, 0:w]
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.35) * min(h, w)
        gt = np.where((y - cy) ** 2 + (x - cx) ** 2 < r * r, 255, 0).astype(np.uint8)
        if i == 4:
            gt[:] = 0
        pred = np.clip(gt / 255 * rng.uniform(0.4, 0.9) + rng.uniform(0, 0.5, (h, w)), 0, 1)
        pairs.append((to_uint8(pred) if i % 2 else pred, gt))
    return pairs


def test_equal_to_py_sod_metrics_over_a_set():
    pairs = _pairs()
    ours = summarize([image_metrics(pred, gt) for pred, gt in pairs])
    sm, em, wfm, mae = Smeasure(), Emeasure(), WeightedFmeasure(), MAE()
    for pred, gt in pairs:
        for metric in (sm, em, wfm, mae):
            metric.step(to_uint8(pred), gt)
    assert ours["S-measure"] == pytest.approx(sm.get_results()["sm"], abs=1e-9)
    assert ours["E-measure"] == pytest.approx(em.get_results()["em"]["curve"].mean(), abs=1e-9)
    assert ours["weighted-F"] == pytest.approx(wfm.get_results()["wfm"], abs=1e-9)
    assert ours["MAE"] == pytest.approx(mae.get_results()["mae"], abs=1e-9)
    ious = []
    for pred, gt in pairs:
        p, g = to_uint8(pred) >= 128, gt > 128
        ious.append(1.0 if not (p | g).any() else (p & g).sum() / (p | g).sum())
    assert ours["IoU"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert set(ours) == set(METRIC_NAMES)
    assert 0.0 < ours["IoU"] < 1.0


def test_iou_values_and_empty_cases():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :2] = 255  # 4 pixels
    pred = np.zeros((4, 4))
    pred[:2, :3] = 0.7  # 6 pixels, 4 of them right
    pred[3, 3] = 0.49  # below the threshold
    assert image_metrics(pred, gt)["IoU"] == pytest.approx(4 / 6, abs=1e-12)
    assert image_metrics(pred, gt.astype(bool))["IoU"] == pytest.approx(4 / 6, abs=1e-12)
    empty = np.zeros((4, 4), np.uint8)
    assert image_metrics(np.zeros((4, 4)), empty)["IoU"] == 1.0  # empty GT, empty prediction: perfect
    assert image_metrics(pred, empty)["IoU"] == 0.0
    perfect = image_metrics(gt / 255.0, gt)
    assert perfect["IoU"] == 1.0
    assert perfect["MAE"] == 0.0
    assert perfect["S-measure"] == pytest.approx(1.0, abs=1e-9)


def test_threshold_is_the_same_for_float_and_uint8():
    values = np.array([[0.4999, 0.5, 0.5001, 1.0]])
    assert to_uint8(values).tolist() == [[127, 128, 128, 255]]
    gt = np.tile(np.array([[0, 255, 255, 255]], np.uint8), (8, 2))
    rows = [image_metrics(np.tile(values, (8, 2)), gt), image_metrics(to_uint8(np.tile(values, (8, 2))), gt)]
    assert rows[0] == rows[1]
    assert rows[0]["IoU"] == 1.0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"shape \(4, 5\) differs from mask shape \(4, 4\)"):
        image_metrics(np.zeros((4, 5)), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="apply sigmoid"):
        image_metrics(np.full((4, 4), 3.0), np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        image_metrics(np.zeros((4, 4)), np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_summarize_is_a_plain_mean_per_image():
    rows = [dict.fromkeys(METRIC_NAMES, 1.0), dict.fromkeys(METRIC_NAMES, 0.0), dict.fromkeys(METRIC_NAMES, 0.5)]
    assert summarize(rows) == dict.fromkeys(METRIC_NAMES, 0.5)
