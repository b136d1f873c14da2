"""Segmentation scores from a confusion matrix (rows ground truth, columns prediction).

Written with numpy rather than a metrics library because every figure here must come
from one matrix accumulated over the whole val set, and the two pixel accuracies (ignore
pixels excluded / counted as errors) are not offered by torchmetrics.
"""
from __future__ import annotations

import numpy as np

from stages.lib.labels import IGNORE_INDEX


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts over the pixels whose ground truth is not IGNORE_INDEX."""
    gt = np.asarray(gt).ravel()
    pred = np.asarray(pred).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth has {gt.size} pixels, prediction {pred.size}")
    if gt.dtype == np.uint8 and pred.dtype == np.uint8:
        return _confusion_uint8(gt, pred, num_classes)
    keep = gt != IGNORE_INDEX
    gt, pred = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    gt_bad = (gt < 0) | (gt >= num_classes)
    pred_bad = (pred < 0) | (pred >= num_classes)
    if gt_bad.any() or pred_bad.any():
        values = np.unique(np.concatenate([gt[gt_bad], pred[pred_bad]]))
        raise ValueError(f"label values {values.tolist()} outside 0..{num_classes - 1}")
    return np.bincount(num_classes * gt + pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def _confusion_uint8(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """The same counts for label maps as stored (uint8), in one pass: every (gt, pred) byte
    pair is counted in a 256 x 256 table, with no masking or int64 copies of the inputs
    (several times faster at full image size; inference scores every image with it)."""
    table = np.bincount((gt.astype(np.uint16) << 8) | pred, minlength=256 * 256).reshape(256, 256)
    table[IGNORE_INDEX] = 0
    inside = table[:num_classes, :num_classes]
    if table.sum() != inside.sum():
        rows, cols = np.nonzero(table)
        values = np.unique(np.concatenate([rows[rows >= num_classes], cols[cols >= num_classes]]))
        raise ValueError(f"label values {values.tolist()} outside 0..{num_classes - 1}")
    return inside.astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def per_class_iou(cm: np.ndarray) -> np.ndarray:
    """NaN for a class absent from both ground truth and prediction. cm is K x K, or a
    stack of them (..., K, K): the bootstrap scores a thousand resampled matrices at once."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    return _ratio(tp, cm.sum(-2) + cm.sum(-1) - tp)


def scores(cm: np.ndarray, ignored_pixels: int = 0) -> dict[str, object]:
    """All summary figures; per-class lists keep NaN for absent classes (json_safe -> null).
    mIoU is the mean over classes present in the ground truth or the prediction; precision
    is NaN for a class never predicted, recall (= class accuracy) for one absent from the
    ground truth."""
    tp = np.diag(cm).astype(float)
    gt_count = cm.sum(1).astype(float)
    pred_count = cm.sum(0).astype(float)
    total = cm.sum()
    iou = per_class_iou(cm)
    freq = gt_count / total if total else np.zeros_like(gt_count)
    present = ~np.isnan(iou)
    return {
        "iou": iou,
        "miou": float(np.nanmean(iou)) if present.any() else np.nan,
        "pixel_accuracy": float(tp.sum() / total) if total else np.nan,
        "pixel_accuracy_with_ignore": (float(tp.sum() / (total + ignored_pixels))
                                       if total + ignored_pixels else np.nan),
        "class_accuracy": _ratio(tp, gt_count),
        "mean_class_accuracy": (float(np.nanmean(_ratio(tp, gt_count)))
                                if (gt_count > 0).any() else np.nan),
        "fw_iou": float(np.nansum(freq * iou)) if total else np.nan,
        "dice": _ratio(2 * tp, gt_count + pred_count),
        "precision": _ratio(tp, pred_count),
        "recall": _ratio(tp, gt_count),
    }


def metrics_document(cm: np.ndarray, ignored: int, class_names: list[str], images: int) -> dict:
    """evaluate's metrics JSON (and analyze's leak-free metrics, the same keys): summary
    figures first, then per-class maps keyed by class name."""
    s = scores(cm, ignored)
    by_class = lambda values: dict(zip(class_names, (float(v) for v in values)))  # noqa: E731
    return {
        "miou": s["miou"],
        "pixel_accuracy": s["pixel_accuracy"],
        "pixel_accuracy_with_ignore": s["pixel_accuracy_with_ignore"],
        "mean_class_accuracy": s["mean_class_accuracy"],
        "fw_iou": s["fw_iou"],
        "iou": by_class(s["iou"]),
        "dice": by_class(s["dice"]),
        "class_accuracy": by_class(s["class_accuracy"]),
        "precision": by_class(s["precision"]),
        "recall": by_class(s["recall"]),
        "images": images,
        "pixels_evaluated": int(cm.sum()),
        "pixels_ignored": int(ignored),
    }
