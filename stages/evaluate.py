"""evaluate: one confusion matrix over the whole val set, and every score from it.
Writes --out (metrics JSON for `dvc metrics`, null where a class is absent), --confusion
(CSV, rows ground truth, columns prediction, in class order), --confusion-plot (the same
matrix as a PNG, row-normalised) and --samples (per image: the same scores from its own
confusion matrix; the whole-set matrix is the sum of these). The metrics JSON carries a
bootstrap interval of each headline score (stages/lib/bootstrap.py). With --annotations
(the val COCO instances), also --categories (where each COCO category's pixels go, claimed
by the scheme or not) and --per-image (each image's matrix and category counts, which
compare resamples).

One training per seed (train.seeds): --pred is the scheme's predictions folder, holding
seed<N>/val for each seed. Every file but the JSON's "seeds" block describes the first
seed's model, the one analysed; "seeds" gives each score per seed, its mean, min, max and
the bootstrap interval of the mean, and per_image.npz holds every seed's counts."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.bootstrap import Settings, scheme_interval, seeds_block
from stages.lib.categories import (ImageCategories, Instance, category_table,
                                   image_categories,
                                   instance_class_pixels, owner_map)
from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.coco import AnnotationError, resolve_scheme
from stages.lib.io import atomic_path, write_csv, write_json
from stages.lib.names import seed_dir
from stages.lib.labels import IGNORE_INDEX, read_labels
from stages.lib.metrics import confusion_matrix, metrics_document, scores
from stages.lib.params import load_params, scheme_class_names, select
from stages.lib.plots import confusion_figure, write_png
from stages.masks import decode_annotation, mask_name, split_tasks

log = logging.getLogger("evaluate")


# ---------------------------------------------------------------- pure core

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


# ---------------------------------------------------------------- run

# The params this stage reads: run() sees only these (stages.lib.params.select), and dvc.yaml's
# and the rule's `params:` list the same keys. The classes of the scheme it evaluates, its own
# section, and the bootstrap settings it shares with compare (the same draws of the images).
PARAMS = ("schemes.{scheme}", "train.seeds", "evaluate", "compare.bootstrap")


@dataclass
class Outputs:
    """Where evaluate writes; those left None are not written."""

    metrics: Path
    confusion: Path
    confusion_plot: Path | None = None
    samples: Path | None = None
    categories: Path | None = None
    per_image: Path | None = None


def seed_folders(root: Path, seeds: list[int]) -> dict[int, Path]:
    """Each seed's val predictions under a scheme's predictions folder (infer's, one per
    seed)."""
    return {seed: root / seed_dir(seed) / "val" for seed in seeds}


def _predictions(pred: Path | dict[int, Path], seeds: list[int]) -> list[Path]:
    """The val prediction folders in train.seeds order. A single folder stands for a
    one-seed study's."""
    if isinstance(pred, Path):
        if len(seeds) != 1:
            raise StageError(f"{pred}: one prediction folder, but train.seeds lists "
                             f"{len(seeds)} seeds {seeds}")
        return [pred]
    if list(pred) != list(seeds):
        raise StageError(f"predictions of seeds {list(pred)}, but train.seeds is {seeds}")
    for seed, folder in pred.items():
        if not folder.is_dir():
            raise StageError(f"{folder}: no predictions of seed {seed} (run infer for it)")
    return [pred[seed] for seed in seeds]


def run(params: dict, scheme: str, pred: Path | dict[int, Path], gt_dir: Path, out: Path,
        confusion_out: Path, confusion_plot: Path | None = None,
        samples_out: Path | None = None, annotations: Path | None = None,
        categories_out: Path | None = None, per_image_out: Path | None = None) -> dict:
    params = select(params, PARAMS, scheme=scheme)
    outputs = Outputs(out, confusion_out, confusion_plot, samples_out, categories_out,
                      per_image_out)
    if (categories_out or per_image_out) and annotations is None:
        raise StageError("evaluate: --categories and --per-image need --annotations")
    class_names = scheme_class_names(params, scheme)
    seeds = list(params["train"]["seeds"])
    pred_dirs = _predictions(pred, seeds)
    settings = Settings.from_params(params["compare"]["bootstrap"])
    gt_files = sorted(gt_dir.glob("*.png"))
    if not gt_files:
        raise StageError(f"{gt_dir}: no ground-truth masks")
    if annotations is None:
        scored = [_scored(stem, gt, preds, class_names)
                  for stem, gt, preds in (_image(p.stem, p, pred_dirs) for p in gt_files)]
        return _write(scheme, class_names, seeds, scored, None, settings, outputs)
    try:
        categories, tasks = split_tasks(annotations)
        categories = sorted(categories, key=lambda c: c["id"])
        claims = resolve_scheme(scheme, params["schemes"][scheme], categories)
    except AnnotationError as exc:
        raise StageError(annotation_problem(annotations, exc)) from None
    threshold = params["evaluate"]["instance_threshold"]
    ids = [c["id"] for c in categories]
    scored = []
    for image, anns in tasks.pairs:   # by image id, streamed: one image's arrays at a time
        stem, gt, preds = _image(Path(image["file_name"]).stem,
                                 gt_dir / mask_name(image["file_name"]), pred_dirs)
        instances = val_instances(anns, *gt.shape)
        owner = owner_map(instances, *gt.shape)   # decoded once, scored for every seed
        scored.append(_scored(stem, gt, preds, class_names, [image_categories(
            instances, instance_class_pixels(owner, p, len(instances), len(class_names)),
            ids, claims.class_of_category, threshold) for p in preds]))
    unlisted = sorted({p.stem for p in gt_files} - {s.stem for s in scored})
    if unlisted:
        raise StageError(f"{gt_dir / unlisted[0]}.png: image not in {annotations}; re-run masks")
    return _write(scheme, class_names, seeds, sorted(scored, key=lambda s: s.stem),
                  (categories, claims), settings, outputs)


@dataclass
class Scored:
    """What evaluate keeps of one image once its label maps are dropped: per seed (in
    train.seeds order) its confusion matrix and category counts; the first seed's row."""

    stem: str
    confusion: np.ndarray           # (S, K, K)
    ignored: int
    row: dict
    categories: list[ImageCategories] | None = None


def _scored(stem: str, gt: np.ndarray, preds: list[np.ndarray], class_names: list[str],
            categories: list[ImageCategories] | None = None) -> Scored:
    cms = np.stack([confusion_matrix(gt, pred, len(class_names)) for pred in preds])
    ignored = int((gt == IGNORE_INDEX).sum())
    return Scored(stem, cms, ignored, sample_row(cms[0], ignored, class_names), categories)


def val_instances(anns: list[dict], height: int, width: int) -> list[Instance]:
    """The image's non-crowd instances that decode to at least one pixel."""
    decoded = (decode_annotation(a, height, width) for a in anns)
    return [Instance(d.category_id, d.rle) for d in decoded
            if not d.crowd and d.rle is not None and d.pixels > 0]


def annotation_problem(path: Path, exc: AnnotationError) -> str:
    """The annotation file, then what is wrong in it. The reader's messages start with the
    file already; resolve_scheme's name only the params key, and evaluate's --annotations is
    a second source of categories beside masks' (the file must be named to be found)."""
    message = str(exc)
    return message if message.startswith(f"{path}: ") else f"{path}: {message}"


def _write(scheme: str, class_names: list[str], seeds: list[int], scored: list[Scored],
           categories, settings: Settings, outputs: Outputs) -> dict:
    confusion = np.stack([s.confusion for s in scored])   # (N, S, K, K)
    ignored = np.array([s.ignored for s in scored], np.int64)
    cm = confusion[:, 0].sum(0, dtype=np.int64)
    document = metrics_document(cm, int(ignored.sum()), class_names, len(scored))
    document["interval"] = scheme_interval(confusion[:, 0], ignored, class_names, settings)
    document["seeds"] = seeds_block(confusion, ignored, class_names, seeds, settings)
    write_csv(outputs.confusion, pd.DataFrame(cm, index=class_names, columns=class_names)
              .rename_axis("ground_truth").reset_index())
    if outputs.confusion_plot is not None:
        write_png(outputs.confusion_plot,
                  confusion_figure(cm, class_names, f"{scheme}: confusion"))
    if outputs.samples is not None:
        table = pd.DataFrame([s.row for s in scored])
        table.insert(0, "stem", [s.stem for s in scored])
        write_csv(outputs.samples, table)
    if categories is not None:
        _write_categories(class_names, seeds, scored, *categories, outputs)
    write_json(outputs.metrics, document)
    log.info("%s: mIoU %.4f, pixel accuracy %.4f (%.4f counting ignore)", scheme,
             document["miou"], document["pixel_accuracy"], document["pixel_accuracy_with_ignore"])
    return document


def _write_categories(class_names: list[str], seeds: list[int], scored: list[Scored],
                      categories: list[dict], claims, outputs: Outputs) -> None:
    """The table describes the first seed's model; per_image.npz every seed's counts
    (image axis first, then seed: (N, S, ...))."""
    pixels, hits = _per_seed(scored, "pixels"), _per_seed(scored, "hits")
    instances = np.stack([s.categories[0].instances for s in scored])   # ground truth only
    if outputs.categories is not None:
        write_csv(outputs.categories, category_table(
            categories, class_names, claims.class_of_category, pixels[:, 0].sum(0),
            instances.sum(0), hits[:, 0].sum(0)))
    if outputs.per_image is not None:
        with atomic_path(outputs.per_image) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(
                handle, stems=np.array([s.stem for s in scored]),
                class_names=np.array(class_names), seeds=np.array(seeds, np.int64),
                confusion=np.stack([s.confusion for s in scored]),
                ignored=np.array([s.ignored for s in scored], np.int64),
                category_ids=np.array([c["id"] for c in categories], np.int64),
                category_names=np.array([c["name"] for c in categories]),
                category_claims=np.array([claims.class_of_category.get(c["id"], 0)
                                          for c in categories], np.int64),
                category_pixels=pixels, category_instances=instances, category_hits=hits)


def _per_seed(scored: list[Scored], key: str) -> np.ndarray:
    """One ImageCategories field of every image and seed, stacked (N, S, ...)."""
    return np.stack([[getattr(c, key) for c in s.categories] for s in scored])


def _image(stem: str, gt_path: Path,
           pred_dirs: list[Path]) -> tuple[str, np.ndarray, list[np.ndarray]]:
    """The ground truth and every seed's prediction of one image."""
    if not gt_path.is_file():
        raise StageError(f"{gt_path}: ground truth missing for an annotated image; re-run masks")
    gt = read_labels(gt_path)
    preds = []
    for pred_dir in pred_dirs:
        pred_path = pred_dir / gt_path.name
        if not pred_path.is_file():
            raise StageError(f"{pred_path}: prediction missing for ground truth {gt_path}")
        pred = read_labels(pred_path)
        if gt.shape != pred.shape:
            raise StageError(f"{pred_path}: size {pred.shape} differs from ground truth "
                             f"{gt_path} {gt.shape}")
        preds.append(pred)
    return stem, gt, preds


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("evaluate", __doc__)
    parser.add_argument("--scheme", required=True)
    parser.add_argument("--pred", required=True, type=Path,
                        help="the scheme's predictions folder (infer's): seed<N>/val per seed")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth val masks")
    parser.add_argument("--out", required=True, type=Path, help="metrics JSON to write")
    parser.add_argument("--confusion", required=True, type=Path, help="confusion CSV to write")
    parser.add_argument("--confusion-plot", type=Path, help="confusion PNG to write")
    parser.add_argument("--samples", type=Path, help="per-sample metrics CSV to write")
    parser.add_argument("--annotations", type=Path,
                        help="the val COCO instances JSON (download's), for --categories")
    parser.add_argument("--categories", type=Path,
                        help="CSV to write: where each COCO category's pixels go")
    parser.add_argument("--per-image", type=Path,
                        help="NPZ to write: each image's confusion matrix and category counts")
    args = parser.parse_args(argv)
    outputs = (args.out, args.confusion, args.confusion_plot, args.samples, args.categories,
               args.per_image)

    def body() -> dict:
        params = load_params(args.params)
        return run(params, args.scheme, seed_folders(args.pred, params["train"]["seeds"]),
                   args.gt, args.out, args.confusion, args.confusion_plot, args.samples,
                   args.annotations, args.categories, args.per_image)

    return run_main("evaluate", body, outputs=outputs)


if __name__ == "__main__":
    raise SystemExit(main())
