"""masks: one palette PNG per image (pixel value = class index, 255 = ignore) for one label
scheme, plus a per-image metadata table.

Rules: class 0 is every pixel no class claims; crowd regions of a claimed category and
pixels claimed by two different classes get 255; objects of unclaimed categories,
crowd or not, are background like everything else. Layout written under --out:
  {split}/{file stem}.png   for split in train, val
  metadata.csv              one row per image (both splits)
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.coco import SPLITS, AnnotationError, SchemeMap, read_instances, resolve_scheme
from stages.lib.io import atomic_dir, write_csv
from stages.lib.labels import IGNORE_INDEX, save_labels
from stages.lib.params import load_params, scheme_class_names

log = logging.getLogger("masks")


# ---------------------------------------------------------------- pure core

def annotation_rle(ann: dict, height: int, width: int) -> dict:
    """One compressed RLE for a polygon, uncompressed-RLE or compressed-RLE segmentation
    (the same three cases as pycocotools' COCO.annToRLE, without needing a COCO index)."""
    segm = ann["segmentation"]
    if isinstance(segm, list):
        polygons = [p for p in segm if len(p) >= 6]  # fewer than 3 points has no area
        if not polygons:
            return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def rasterize(height: int, width: int, anns: list[dict], scheme: SchemeMap) -> np.ndarray:
    """The label map of one image under one scheme."""
    labels = np.zeros((height, width), np.uint8)
    claims = np.zeros((height, width), np.uint8)
    crowd = np.zeros((height, width), bool)
    by_class: dict[int, list[dict]] = {}
    for ann in anns:
        cls = scheme.class_of_category.get(ann["category_id"])
        if cls is None:
            continue
        if ann.get("iscrowd", 0):
            crowd |= _decode([annotation_rle(ann, height, width)])
        else:
            by_class.setdefault(cls, []).append(annotation_rle(ann, height, width))
    # One merged RLE per class: instances of the same class never conflict with each other.
    for cls, rles in sorted(by_class.items()):
        region = _decode(rles)
        claims += region
        labels[region] = cls
    labels[(claims > 1) | crowd] = IGNORE_INDEX
    return labels


def _decode(rles: list[dict]) -> np.ndarray:
    merged = rles[0] if len(rles) == 1 else mask_utils.merge(rles)
    return mask_utils.decode(merged).astype(bool)


def grayscale_score(pixels: np.ndarray) -> float:
    """Mean absolute channel difference (0 for a true grayscale image)."""
    if pixels.ndim == 2:
        return 0.0
    rgb = pixels[..., :3].astype(np.int16)
    return float((np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])).mean() / 2)


def image_metadata(pixels: np.ndarray, labels: np.ndarray, anns: list[dict],
                   scheme: SchemeMap, tolerance: float) -> dict:
    """Per-image facts the analysis plots against loss."""
    total = labels.size
    gray = grayscale_score(pixels)
    row = {
        "width": labels.shape[1], "height": labels.shape[0],
        "is_grayscale": bool(gray <= tolerance), "grayscale_score": round(gray, 3),
        "brightness": round(float(pixels.mean()), 3),
        "n_annotations": len(anns),
        "crowd_fraction": 0.0,
        "ignore_fraction": float((labels == IGNORE_INDEX).sum() / total),
        "n_unclaimed_objects": sum(a["category_id"] not in scheme.class_of_category for a in anns),
    }
    crowds = [annotation_rle(a, *labels.shape) for a in anns if a.get("iscrowd", 0)]
    # Decoded, not the `area` field: a crowd RLE's area is not its pixel count, and
    # overlapping crowds must not count twice.
    row["crowd_fraction"] = float(_decode(crowds).sum() / total) if crowds else 0.0
    for index, name in enumerate(scheme.class_names):
        row[f"{name}_fraction"] = float((labels == index).sum() / total)
        if index:
            instances = [a for a in anns if scheme.class_of_category.get(a["category_id"]) == index
                         and not a.get("iscrowd", 0)]
            row[f"{name}_instances"] = len(instances)
            row[f"{name}_mean_area"] = (
                float(np.mean([a["area"] for a in instances]) / total) if instances else 0.0)
    return row


# ---------------------------------------------------------------- run

def run(params: dict, scheme_name: str, raw: Path, out: Path) -> pd.DataFrame:
    tolerance = params["masks"]["grayscale_tolerance"]
    scheme_class_names(params, scheme_name)  # an unknown scheme fails here, by name
    rows = []
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            ann_file = raw / "annotations" / f"instances_{split}.json"
            try:
                data = read_instances(ann_file)
                scheme = resolve_scheme(scheme_name, params["schemes"][scheme_name], data["categories"])
            except AnnotationError as exc:
                raise StageError(str(exc)) from None
            anns_of = _group_annotations(data["annotations"])
            (tmp / split).mkdir()
            for image in tqdm(data["images"], desc=f"masks {scheme_name} {split}", unit="img",
                              disable=None):
                rows.append(_one_image(raw / "images" / split, image, anns_of.get(image["id"], []),
                                       scheme, tolerance, tmp / split, split))
        table = pd.DataFrame(rows)
        write_csv(tmp / "metadata.csv", table)
    log.info("%s: %d masks, %d grayscale", scheme_name, len(table), int(table["is_grayscale"].sum()))
    return table


def _group_annotations(annotations: list[dict]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for ann in annotations:
        grouped.setdefault(ann["image_id"], []).append(ann)
    return grouped


def _one_image(folder: Path, image: dict, anns: list[dict], scheme: SchemeMap,
               tolerance: float, out_folder: Path, split: str) -> dict:
    path = folder / image["file_name"]
    try:
        with Image.open(path) as handle:
            pixels = np.asarray(handle.convert("L" if handle.mode in ("L", "I;16") else "RGB"))
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot read image: {exc}") from None
    height, width = image["height"], image["width"]
    if pixels.shape[:2] != (height, width):
        raise StageError(f"{path}: decoded size {pixels.shape[1]}x{pixels.shape[0]} differs from "
                         f"the annotation's {width}x{height}")
    labels = rasterize(height, width, anns, scheme)
    save_labels(out_folder / f"{Path(image['file_name']).stem}.png", labels)
    meta = image_metadata(pixels, labels, anns, scheme, tolerance)
    return {"image_id": image["id"], "file_name": image["file_name"], "split": split, **meta}


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("masks", __doc__.splitlines()[0])
    parser.add_argument("--scheme", required=True, help="scheme name in params.yaml")
    parser.add_argument("--raw", required=True, type=Path, help="folder written by download")
    parser.add_argument("--out", required=True, type=Path, help="mask folder to create")
    args = parser.parse_args(argv)
    return run_main("masks", lambda: run(load_params(args.params), args.scheme, args.raw, args.out))


if __name__ == "__main__":
    raise SystemExit(main())
