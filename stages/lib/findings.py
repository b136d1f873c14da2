"""analyze's findings (issue 17): what the insight cores (duplicates, representation,
segments, insights) are fed with, and what analyze writes of them.

- the images of both splits as download listed them, fingerprinted (file and pixel sha256,
  perceptual hash) a few at a time on threads: decoding and hashing release the GIL;
- infer's latents of the train split, in the order the train images are listed;
- the scores recomputed without the val images that leak (a twin among the train images):
  each kept image's confusion matrix from its prediction and ground-truth PNGs, summed as
  evaluate sums them;
- the ranked records of insights.json from every builder.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib import bootstrap, duplicates, insights
from stages.lib.cli import StageError
from stages.lib.labels import IGNORE_INDEX, read_labels
from stages.lib.metrics import confusion_matrix, metrics_document
from stages.lib.names import check_plain_name
from stages.lib.parallel import ordered_map

SPLITS = ("train", "val")


# ---------------------------------------------------------------- the images of both splits

def split_images(raw: Path, split: str, image_ids) -> pd.DataFrame:
    """image_id, split, path of the given images of one split, from download's annotation
    file (which names each image's file)."""
    ann_file = raw / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise StageError(f"{ann_file}: missing (is {raw} a folder written by download?)")
    names = {int(image["id"]): image["file_name"]
             for image in json.loads(ann_file.read_text())["images"]}
    ids = [int(i) for i in image_ids]
    unknown = [i for i in ids if i not in names]
    if unknown:
        raise StageError(f"{ann_file}: {split} images {unknown[:5]} are not listed "
                         f"({len(unknown)} in all); re-run infer on this data")
    paths = [raw / "images" / split / check_plain_name(names[i], f"{ann_file}: image {i}")
             for i in ids]
    return pd.DataFrame({"image_id": ids, "split": split, "path": paths})


def fingerprints(images: pd.DataFrame, hash_size: int, threads: int) -> pd.DataFrame:
    """`images` with duplicates.fingerprint's sha256, pixel_sha256 and phash of each file.
    At most 4 x threads decoded images wait at any time."""
    def one(path: Path) -> dict:
        if not path.is_file():
            raise StageError(f"{path}: image missing (listed by download's annotations)")
        return duplicates.fingerprint(path, hash_size)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fingerprint") as pool:
        found = list(ordered_map(one, images["path"], pool, 4 * threads,
                                 named_errors=(StageError,)))
    columns = ["sha256", "pixel_sha256", "phash"]
    return pd.concat([images.reset_index(drop=True),
                      pd.DataFrame(found, columns=columns)], axis=1)


def read_train_latents(path: Path, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, latents) of infer's latents_train.npz, checked against the val latents'
    width (the same model's layers)."""
    if not path.is_file():
        raise StageError(f"{path}: missing (run the infer stage first: it embeds the train "
                         "split too)")
    with np.load(path) as npz:
        ids, latents = npz["image_ids"].astype(np.int64), npz["latents"]
    if len(ids) and latents.shape[1:] != (width,):
        raise StageError(f"{path}: latents of shape {latents.shape}, the val latents have "
                         f"{width} columns; re-run infer")
    return ids, latents.reshape(len(ids), width)


# ---------------------------------------------------------------- metrics without the leak

def leak_free_metrics(samples: pd.DataFrame, predictions: Path, masks: Path,
                      class_names: list[str], excluded: list[int],
                      settings: bootstrap.Settings) -> dict:
    """metrics/S.json's headline keys and interval over the val images not in `excluded`
    (each image's matrix from its val/{stem}.png under predictions and masks, summed), and
    `excluded_image_ids`. With every image excluded the scores are null."""
    kept = samples[~samples["image_id"].isin(excluded)]
    k = len(class_names)
    per_image = np.zeros((len(kept), k, k), np.int64)
    ignored = np.zeros(len(kept), np.int64)
    for i, stem in enumerate(kept["stem"].astype(str)):
        gt, pred = _label_pair(predictions / "val" / f"{stem}.png", masks / "val" / f"{stem}.png")
        per_image[i] = confusion_matrix(gt, pred, k)
        ignored[i] = int((gt == IGNORE_INDEX).sum())
    document = metrics_document(per_image.sum(0), int(ignored.sum()), class_names, len(kept))
    document["interval"] = (bootstrap.scheme_interval(per_image, ignored, class_names, settings)
                            if len(kept) else None)
    document["excluded_image_ids"] = sorted(int(i) for i in excluded)
    return document


def _label_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
    for path, stage in ((gt_path, "masks"), (pred_path, "infer")):
        if not path.is_file():
            raise StageError(f"{path}: missing (run the {stage} stage first)")
    gt, pred = read_labels(gt_path), read_labels(pred_path)
    if gt.shape != pred.shape:
        raise StageError(f"{pred_path}: size {pred.shape} differs from ground truth {gt_path} "
                         f"{gt.shape}")
    return gt, pred


# ---------------------------------------------------------------- insights.json

def records(*, clusters: pd.DataFrame, ood: dict, pairs: pd.DataFrame, segments: list,
            issues: pd.DataFrame, loss: pd.Series, settings: bootstrap.Settings) -> list[dict]:
    """Every finding of one scheme as insight records, ranked (insights.rank). `ood`: the
    val image ids, their scores and flags, and k, quantile and threshold."""
    found = insights.from_clusters(clusters, settings.confidence)
    found += insights.from_out_of_distribution(
        ood["image_ids"], ood["flags"], ood["scores"], loss, k=ood["k"],
        quantile=ood["quantile"], threshold=ood["threshold"], settings=settings)
    found += insights.from_duplicates(pairs, loss, settings)
    found += insights.from_segments(segments, settings.confidence)
    found += insights.from_label_issues(issues, settings)
    return insights.rank(found)
