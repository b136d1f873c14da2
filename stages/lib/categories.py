"""Where each COCO category's pixels go under a scheme: the like-for-like test of a label
scheme (are trucks and buses, which person_car leaves as background, predicted car?).

Only pixels covered by exactly one non-crowd instance count: there the category is
unambiguous, whatever the scheme's crowd and overlap rules make of the rest. An instance
counts (and has a recall) when it owns at least one such pixel.

Per image the core gives, for every instance, how many of its pixels each class was
predicted as; everything else (the per-category table, the bootstrap over images) is sums
of those counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

NO_OWNER = -1


@dataclass(frozen=True)
class Instance:
    category_id: int
    rle: dict


def owner_map(instances: list[Instance], height: int, width: int) -> np.ndarray:
    """Per pixel, the index of the one instance covering it, NO_OWNER where none or several
    do (int32, height x width)."""
    owner = np.full((height, width), NO_OWNER, np.int32)
    if not instances:
        return owner
    coverage = np.zeros((height, width), np.uint16)
    for index, instance in enumerate(instances):
        region = mask_utils.decode(instance.rle).astype(bool)
        coverage += region
        owner[region] = index
    owner[coverage != 1] = NO_OWNER
    return owner


def instance_class_pixels(owner: np.ndarray, pred: np.ndarray, n_instances: int,
                          num_classes: int) -> np.ndarray:
    """(n_instances, num_classes) counts: pixels each instance owns, by predicted class."""
    owned = owner >= 0
    if pred.shape != owner.shape:
        raise ValueError(f"prediction is {pred.shape}, the annotations {owner.shape}")
    flat = owner[owned].astype(np.int64) * num_classes + pred[owned].astype(np.int64)
    return np.bincount(flat, minlength=n_instances * num_classes).reshape(
        n_instances, num_classes)


@dataclass
class ImageCategories:
    """One image's counts per category id: pixels by predicted class (C x K), counted
    instances, and instances that reach the threshold (recall or pull)."""

    pixels: np.ndarray      # (C, K) int64
    instances: np.ndarray   # (C,) int64
    hits: np.ndarray        # (C,) int64


def image_categories(instances: list[Instance], counts: np.ndarray, category_ids: list[int],
                     class_of_category: dict[int, int], threshold: float) -> ImageCategories:
    """Sums an image's instance counts into its categories. An instance of a claimed
    category is a hit when at least `threshold` of its pixels are predicted as the claiming
    class; of an unclaimed one, when that share is predicted as any non-background class."""
    row_of = {c: i for i, c in enumerate(category_ids)}
    n_classes = counts.shape[1] if counts.ndim == 2 else 1
    out = ImageCategories(np.zeros((len(category_ids), n_classes), np.int64),
                          np.zeros(len(category_ids), np.int64),
                          np.zeros(len(category_ids), np.int64))
    for instance, by_class in zip(instances, counts):
        total = int(by_class.sum())
        if total == 0:
            continue
        row = row_of[instance.category_id]
        claiming = class_of_category.get(instance.category_id)
        reached = by_class[claiming] if claiming is not None else by_class[1:].sum()
        out.pixels[row] += by_class
        out.instances[row] += 1
        out.hits[row] += int(reached >= threshold * total)
    return out


def category_table(categories: list[dict], class_names: list[str],
                   class_of_category: dict[int, int], pixels: np.ndarray,
                   instances: np.ndarray, hits: np.ndarray) -> pd.DataFrame:
    """metrics/<scheme>.categories.csv from the val set's summed counts (categories in the
    order given, C x K pixels): only categories with at least one counted instance."""
    rows = []
    for i, category in enumerate(categories):
        if instances[i] == 0:
            continue
        claiming = class_of_category.get(category["id"])
        total = pixels[i].sum()
        share = pixels[i] / total if total else np.full(len(class_names), np.nan)
        row = {"category": category["name"], "supercategory": category.get("supercategory", ""),
               "claimed_by": class_names[claiming] if claiming is not None else "",
               "instances": int(instances[i]), "pixels": int(total)}
        row.update({f"pred_{name}": float(v) for name, v in zip(class_names, share)})
        rate = hits[i] / instances[i]
        row["instance_recall"] = float(rate) if claiming is not None else np.nan
        row["instance_pull"] = np.nan if claiming is not None else float(rate)
        rows.append(row)
    columns = ["category", "supercategory", "claimed_by", "instances", "pixels",
               *(f"pred_{name}" for name in class_names), "instance_recall", "instance_pull"]
    return pd.DataFrame(rows, columns=columns)
