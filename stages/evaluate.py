"""evaluate: one confusion matrix over the whole val set, and every score from it.
Writes --out (metrics JSON for `dvc metrics`, null where a class is absent), --confusion
(CSV, rows ground truth, columns prediction, in class order), --confusion-plot (the same
matrix as a PNG, row-normalised) and --samples (per image: the same scores from its own
confusion matrix; the whole-set matrix is the sum of these)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.io import write_csv, write_json
from stages.lib.labels import IGNORE_INDEX, read_labels
from stages.lib.metrics import confusion_matrix, scores
from stages.lib.params import load_params, scheme_class_names, select
from stages.lib.plots import confusion_figure, write_png

log = logging.getLogger("evaluate")


# ---------------------------------------------------------------- pure core

def metrics_document(cm: np.ndarray, ignored: int, class_names: list[str], images: int) -> dict:
    """The metrics JSON: summary figures first, then per-class maps keyed by class name."""
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


def sample_row(cm: np.ndarray, ignored: int, class_names: list[str]) -> dict:
    """Per-image scores from the image's own confusion matrix (NaN where undefined)."""
    s = scores(cm, ignored)
    row = {"pixels_evaluated": int(cm.sum()), "pixels_ignored": int(ignored),
           "miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"],
           "pixel_accuracy_with_ignore": s["pixel_accuracy_with_ignore"],
           "mean_class_accuracy": s["mean_class_accuracy"], "fw_iou": s["fw_iou"]}
    for key in ("iou", "dice", "precision", "recall"):
        row.update({f"{key}_{name}": float(v) for name, v in zip(class_names, s[key])})
    return row


def accumulate(pairs, num_classes: int, rows: list | None = None,
               class_names: list[str] | None = None) -> tuple[np.ndarray, int]:
    """Sum confusion matrices and ignore counts over (gt, pred) label-map pairs; with
    `rows`, append each pair's sample_row to it."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    ignored = 0
    for gt, pred in pairs:
        one = confusion_matrix(gt, pred, num_classes)
        n_ignored = int((gt == IGNORE_INDEX).sum())
        cm += one
        ignored += n_ignored
        if rows is not None:
            rows.append(sample_row(one, n_ignored, class_names))
    return cm, ignored


# ---------------------------------------------------------------- run

# The params this stage reads: run() sees only these (stages.lib.params.select), and dvc.yaml's
# and the rule's `params:` list the same keys. The classes of the scheme it evaluates.
PARAMS = ("schemes.{scheme}",)


def run(params: dict, scheme: str, pred_dir: Path, gt_dir: Path, out: Path,
        confusion_out: Path, confusion_plot: Path | None = None,
        samples_out: Path | None = None) -> dict:
    params = select(params, PARAMS, scheme=scheme)
    class_names = scheme_class_names(params, scheme)
    gt_files = sorted(gt_dir.glob("*.png"))
    if not gt_files:
        raise StageError(f"{gt_dir}: no ground-truth masks")
    rows: list[dict] = []
    cm, ignored = accumulate(_pairs(gt_files, pred_dir), len(class_names), rows, class_names)
    document = metrics_document(cm, ignored, class_names, len(gt_files))
    write_csv(confusion_out, pd.DataFrame(cm, index=class_names, columns=class_names)
              .rename_axis("ground_truth").reset_index())
    if confusion_plot is not None:
        write_png(confusion_plot, confusion_figure(cm, class_names, f"{scheme}: confusion"))
    if samples_out is not None:
        table = pd.DataFrame(rows)
        table.insert(0, "stem", [p.stem for p in gt_files])
        write_csv(samples_out, table)
    write_json(out, document)
    log.info("%s: mIoU %.4f, pixel accuracy %.4f (%.4f counting ignore)", scheme,
             document["miou"], document["pixel_accuracy"], document["pixel_accuracy_with_ignore"])
    return document


def _pairs(gt_files: list[Path], pred_dir: Path):
    for gt_path in gt_files:
        pred_path = pred_dir / gt_path.name
        if not pred_path.is_file():
            raise StageError(f"{pred_path}: prediction missing for ground truth {gt_path}")
        gt, pred = read_labels(gt_path), read_labels(pred_path)
        if gt.shape != pred.shape:
            raise StageError(f"{pred_path}: size {pred.shape} differs from ground truth "
                             f"{gt_path} {gt.shape}")
        yield gt, pred


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("evaluate", __doc__.splitlines()[0])
    parser.add_argument("--scheme", required=True)
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted val masks")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth val masks")
    parser.add_argument("--out", required=True, type=Path, help="metrics JSON to write")
    parser.add_argument("--confusion", required=True, type=Path, help="confusion CSV to write")
    parser.add_argument("--confusion-plot", type=Path, help="confusion PNG to write")
    parser.add_argument("--samples", type=Path, help="per-sample metrics CSV to write")
    args = parser.parse_args(argv)
    return run_main("evaluate", lambda: run(load_params(args.params), args.scheme, args.pred,
                                            args.gt, args.out, args.confusion,
                                            args.confusion_plot, args.samples),
                    outputs=(args.out, args.confusion, args.confusion_plot, args.samples))


if __name__ == "__main__":
    raise SystemExit(main())
