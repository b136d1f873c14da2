"""metrics: confusion-matrix throughput of stages/lib/metrics.py against torchmetrics'
MulticlassConfusionMatrix (ignore_index=255) on the same label maps, one image at a time
as the evaluate stage accumulates them; the two matrices must be identical.

Ground truth: the sample's val masks (person_car, crowds and overlaps as 255). Predictions:
that ground truth with a seeded 30% of pixels set to a random class, so every cell of the
matrix is filled.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import default_params, images_per_split, prepare_sample

GOAL = "goal: segflow >= torchmetrics"


def label_maps(masks: Path, num_classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from stages.lib.labels import read_labels

    rng = np.random.default_rng(0)
    pairs = []
    for path in sorted((masks / "val").glob("*.png")):
        gt = read_labels(path)
        noise = rng.integers(0, num_classes, gt.shape, dtype=np.uint8)
        pred = np.where(rng.random(gt.shape) < 0.3, noise, np.minimum(gt, num_classes - 1))
        pairs.append((gt, pred.astype(np.uint8)))
    return pairs


def ours(pairs, num_classes: int) -> np.ndarray:
    from stages.lib.metrics import confusion_matrix

    cm = np.zeros((num_classes, num_classes), np.int64)
    for gt, pred in pairs:
        cm += confusion_matrix(gt, pred, num_classes)
    return cm


def torchmetrics_cm(pairs, num_classes: int, validate_args: bool) -> np.ndarray:
    from torchmetrics.classification import MulticlassConfusionMatrix

    metric = MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=255,
                                       validate_args=validate_args)
    for gt, pred in pairs:
        metric.update(torch.from_numpy(pred).long(), torch.from_numpy(gt).long())
    return metric.compute().numpy()


def timed(func, repeats: int):
    func()   # warm-up (imports, first allocation)
    started = time.perf_counter()
    for _ in range(repeats):
        result = func()
    return result, (time.perf_counter() - started) / repeats


def run(scale: float) -> dict:
    import torchmetrics

    num_classes = 3
    repeats = max(1, round(5 * scale))
    with tempfile.TemporaryDirectory(prefix="bench_metrics.") as tmp:
        _, masks, _ = prepare_sample(Path(tmp), default_params(), images_per_split(scale))
        pairs = label_maps(masks, num_classes)
    megapixels = sum(gt.size for gt, _ in pairs) / 1e6
    reference, ours_s = timed(lambda: ours(pairs, num_classes), repeats)
    rows = [{"implementation": "segflow (numpy bincount)", "images": len(pairs),
             "megapixels": round(megapixels, 1), "seconds": ours_s,
             "Mpixel/s": megapixels / ours_s, "vs torchmetrics": None, "identical matrix": "-"}]
    for validate in (True, False):
        cm, seconds = timed(lambda v=validate: torchmetrics_cm(pairs, num_classes, v), repeats)
        identical = bool(np.array_equal(cm, reference))
        if not identical:
            raise AssertionError(f"torchmetrics (validate_args={validate}) disagrees:\n{cm}\n"
                                 f"segflow:\n{reference}")
        rows.append({"implementation": f"torchmetrics {torchmetrics.__version__} "
                                       f"(validate_args={validate})",
                     "images": len(pairs), "megapixels": round(megapixels, 1), "seconds": seconds,
                     "Mpixel/s": megapixels / seconds, "vs torchmetrics": None,
                     "identical matrix": "yes"})
    baseline = rows[1]["Mpixel/s"]
    for row in rows:
        row["vs torchmetrics"] = round(row["Mpixel/s"] / baseline, 2)
    ratio = rows[0]["Mpixel/s"] / baseline
    verdict = "met" if ratio >= 1 else "missed"
    for row in rows:
        row[GOAL] = f"{verdict} ({ratio:.1f}x)" if row is rows[0] else ""
    notes = [f"Goal: segflow >= torchmetrics (throughput ratio >= 1 against torchmetrics with "
             f"its default validate_args=True): {verdict}, segflow runs at {ratio:.1f}x "
             f"torchmetrics ({rows[0]['Mpixel/s'] / rows[2]['Mpixel/s']:.1f}x even with "
             "validate_args=False).",
             f"{len(pairs)} val masks of the sample, {num_classes} classes, mean of the same "
             f"{repeats} repeat(s) each; torch {torch.__version__} with "
             f"{torch.get_num_threads()} threads."]
    return {"title": "metrics: confusion matrix vs torchmetrics", "table": rows, "notes": notes}
