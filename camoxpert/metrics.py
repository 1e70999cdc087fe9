"""Standard COD metrics, per image at the mask's original resolution, through ``pysodmetrics``.

Every metric is computed per image, on the ground truth at its original size, then averaged over the data set,
as the COD literature (and PySODEvalToolkit) does, so the numbers compare with papers:

* ``IoU``: intersection over union of ``pred >= 0.5`` with the mask. An image whose mask is empty
  scores 1.0 when the prediction is empty too and 0.0 otherwise (an empty/empty pair is a perfect
  answer, not a division by zero).
* ``S-measure`` (alpha 0.5), mean ``E-measure`` (the mean over the 256 thresholds of the
  enhanced-alignment curve), ``weighted-F`` (beta 1) and ``MAE``: ``py_sod_metrics``, fed exactly as
  when evaluating the PNG a user saves: the probability quantised to uint8, then ``py_sod_metrics``'
  own normalisation (min-max scaling of the prediction, ground truth > 128).

One row per image lets DDP ranks score their shares and :func:`summarize` average the gathered rows: every
image counts once, whatever the world size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from py_sod_metrics import MAE, Emeasure, Smeasure, WeightedFmeasure

__all__ = ["METRIC_NAMES", "LOWER_IS_BETTER", "image_metrics", "summarize", "to_uint8"]

METRIC_NAMES = ("IoU", "S-measure", "E-measure", "weighted-F", "MAE")
LOWER_IS_BETTER = frozenset({"MAE"})
"""Metrics where smaller is better (for choosing the best checkpoint by another metric than IoU)."""


def to_uint8(pred: np.ndarray) -> np.ndarray:
    """Quantise a probability map in [0, 1] to the uint8 PNG a user would save (uint8 passes through).

    Rounding keeps ``p >= 0.5`` equivalent to ``to_uint8(p) >= 128``.
    """
    pred = np.asarray(pred)
    if pred.dtype == np.uint8:
        return pred
    if pred.dtype == bool:
        return pred.astype(np.uint8) * 255
    pred = pred.astype(np.float64)
    if pred.size and (not np.isfinite(pred).all() or pred.min() < 0.0 or pred.max() > 1.0):
        raise ValueError(
            f"prediction values must be probabilities in [0, 1], got range [{np.nanmin(pred)}, {np.nanmax(pred)}]: "
            "apply sigmoid to the logits first"
        )
    return np.rint(pred * 255.0).astype(np.uint8)


def _gt_uint8(gt: np.ndarray) -> np.ndarray:
    gt = np.asarray(gt)
    if gt.dtype == bool:
        return gt.astype(np.uint8) * 255
    if gt.dtype != np.uint8:
        raise TypeError(f"ground truth must be uint8 (0/255) or bool, got {gt.dtype}: pass ds.original_mask(i)")
    return gt


def image_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Score one prediction against its ground truth; both HxW at the mask's original resolution.

    Args:
        pred: Probability map, float in [0, 1] (after sigmoid, resized to the mask's size), or uint8 0-255.
        gt: Ground-truth mask, uint8 (binarised at > 128, as ``py_sod_metrics`` does) or bool.

    Returns:
        ``{name: value}`` for every name in :data:`METRIC_NAMES`, plain Python floats.
    """
    pred_u8, gt_u8 = to_uint8(pred), _gt_uint8(gt)
    if pred_u8.shape != gt_u8.shape or pred_u8.ndim != 2:
        raise ValueError(
            f"prediction shape {pred_u8.shape} differs from mask shape {gt_u8.shape}: resize the prediction to "
            "the mask's original size (ds.original_size(i)) before scoring"
        )
    pred_fg, gt_fg = pred_u8 >= 128, gt_u8 > 128
    union = np.count_nonzero(pred_fg | gt_fg)
    iou = 1.0 if union == 0 else np.count_nonzero(pred_fg & gt_fg) / union
    sm, em, wfm, mae = Smeasure(), Emeasure(), WeightedFmeasure(), MAE()
    for metric in (sm, em, wfm, mae):
        metric.step(pred_u8, gt_u8)
    return {
        "IoU": float(iou),
        "S-measure": float(sm.get_results()["sm"]),
        "E-measure": float(np.mean(em.get_results()["em"]["curve"])),
        "weighted-F": float(wfm.get_results()["wfm"]),
        "MAE": float(mae.get_results()["mae"]),
    }


def summarize(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average per-image rows over the data set (each image weighs the same).

    Args:
        rows: Rows from :func:`image_metrics`, gathered from every rank.

    Returns:
        ``{name: mean}`` for every name in :data:`METRIC_NAMES`.
    """
    if len(rows) == 0:
        raise ValueError("no per-image metric rows to summarise: the evaluation split is empty")
    return {name: float(np.mean([row[name] for row in rows], dtype=np.float64)) for name in METRIC_NAMES}
