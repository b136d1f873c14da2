"""masks: label maps of real sample images against pycocotools' own annToMask, palette
PNGs, and the per-image metadata table."""
from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conftest import SAMPLE
from stages import masks
from stages.download import subset_instances
from stages.lib.cli import StageError
from stages.lib.coco import COCO_CATEGORIES, resolve_scheme
from stages.lib.labels import IGNORE_INDEX, label_image, palette_colours, read_labels, save_labels

# Chosen by searching the sample's annotations (see the coverage test below):
#   train 114692  person/car overlap, truck, grayscale-looking RGB
#   train 204805  person crowd, boats, person/boat overlap (stored here re-encoded as a
#                 single-channel JPEG: the sample has no single-channel image of its own)
#   train 262145  person crowd and an (unclaimed) carrot crowd
#   train 360452  persons and cars overlapping
#   train 73731   cars only;  train 221184  airplanes only (vehicle, not car)
#   val 184324    person crowd, bus, truck, bicycle, car, overlaps
#   val 478721    person/car overlap, trucks;  val 566282  person/car overlap, grayscale RGB
#   val 436738    truck, bus, car;  val 5001  person crowd, bicycle
CHOSEN = {"train": [114692, 204805, 262145, 360452, 73731, 221184],
          "val": [184324, 478721, 566282, 436738, 5001]}
SINGLE_CHANNEL = ("train", 204805)
SCHEMES = ("person_car", "person_vehicle")

# pycocotools 2.0.11 under numpy 2 warns on every decode; not ours to fix.


@pytest.fixture(scope="module")
def cocos(tmp_path_factory) -> dict[str, COCO]:
    folder = tmp_path_factory.mktemp("coco_json")
    with zipfile.ZipFile(SAMPLE / "annotations" / "annotations_trainval2017.zip") as zf:
        zf.extractall(folder)
    return {split: COCO(str(folder / "annotations" / f"instances_{split}2017.json"))
            for split in ("train", "val")}


def claimed_categories(coco: COCO, scheme: dict) -> dict[int, int]:
    """Category id -> class index, worked out from names here (not with resolve_scheme)."""
    out = {}
    for index, claim in enumerate(scheme["classes"].values(), start=1):
        for cat in coco.loadCats(coco.getCatIds()):
            if cat["name"] in claim.get("categories", []) or \
                    cat["supercategory"] in claim.get("supercategories", []):
                out[cat["id"]] = index
    return out


def scheme_with(params: dict, scheme_name: str, crowd: str = "ignore",
                overlap: str = "ignore") -> dict:
    """A scheme's params with other crowd/overlap rules; overlap "first" keeps the classes'
    order as the priority, "last" reverses it."""
    scheme = copy.deepcopy(params["schemes"][scheme_name])
    names = list(scheme["classes"])
    scheme["crowd"] = crowd
    scheme["overlap"] = {"ignore": "ignore", "first": names, "last": names[::-1]}[overlap]
    return scheme


def expected_labels(coco: COCO, image_id: int, scheme: dict) -> tuple[np.ndarray, dict]:
    """The label map from pycocotools' annToMask per annotation, plus what it contained."""
    info = coco.imgs[image_id]
    h, w = info["height"], info["width"]
    class_of = claimed_categories(coco, scheme)
    crowd_rule, overlap = scheme.get("crowd", "ignore"), scheme.get("overlap", "ignore")
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    regions = np.zeros((len(scheme["classes"]) + 1, h, w), bool)
    crowd = np.zeros((h, w), bool)
    for ann in anns:
        cls = class_of.get(ann["category_id"])
        if cls is None:
            continue
        m = coco.annToMask(ann).astype(bool)
        if ann["iscrowd"] and crowd_rule != "class":
            if crowd_rule == "ignore":
                crowd |= m
        else:
            regions[cls] |= m
    count = regions.sum(0)
    labels = np.zeros((h, w), np.uint8)
    overlapping = count > 1
    if overlap == "ignore":
        for cls in range(1, len(regions)):
            labels[regions[cls]] = cls
        labels[overlapping] = IGNORE_INDEX
    else:
        names = list(scheme["classes"])
        for cls in [names.index(n) + 1 for n in overlap]:  # an unset pixel takes the first
            labels[(labels == 0) & regions[cls]] = cls
    labels[crowd] = IGNORE_INDEX
    facts = {"crowd": int((crowd & ~overlapping).sum()), "overlap": int(overlapping.sum()),
             "regions": regions}
    return labels, facts


# ---------------------------------------------------------------- rasterize (pure core)

def test_chosen_images_cover_crowds_overlaps_and_other_vehicles(cocos, params):
    """Guard against a silent pass on trivial images."""
    crowd_images = overlap_images = vehicle_not_car = car_images = 0
    for split, ids in CHOSEN.items():
        coco = cocos[split]
        for image_id in ids:
            _, pc = expected_labels(coco, image_id, params["schemes"]["person_car"])
            _, pv = expected_labels(coco, image_id, params["schemes"]["person_vehicle"])
            crowd_images += pc["crowd"] > 0
            overlap_images += pc["overlap"] > 0
            car_images += pc["regions"][2].any()
            vehicle_not_car += (pv["regions"][2] & ~pc["regions"][2]).any()
    assert crowd_images >= 4
    assert overlap_images >= 3
    assert car_images >= 5
    assert vehicle_not_car >= 5


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("split, image_id", [(s, i) for s, ids in CHOSEN.items() for i in ids])
def test_rasterize_matches_pycocotools(cocos, params, scheme_name, split, image_id):
    coco = cocos[split]
    scheme_params = params["schemes"][scheme_name]
    expected, _ = expected_labels(coco, image_id, scheme_params)
    scheme = resolve_scheme(scheme_name, scheme_params, coco.dataset["categories"])
    info = coco.imgs[image_id]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    got = masks.rasterize(info["height"], info["width"], anns, scheme)
    assert got.dtype == np.uint8 and got.shape == (info["height"], info["width"])
    assert set(np.unique(got).tolist()) <= {0, 1, 2, IGNORE_INDEX}
    assert np.array_equal(got, expected), f"{(got != expected).sum()} pixels differ"


RULES = [(c, o) for c in ("ignore", "class", "background") for o in ("ignore", "first", "last")]


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("crowd, overlap", RULES)
def test_crowd_and_overlap_rules_match_pycocotools(cocos, params, scheme_name, crowd, overlap):
    """Every rule on the chosen real images (crowds, overlaps) against a reference built
    from annToMask; each rule other than the default changes some pixels there."""
    scheme_params = scheme_with(params, scheme_name, crowd, overlap)
    changed = 0
    for split, ids in CHOSEN.items():
        coco = cocos[split]
        plan = masks.make_plan(scheme_name, scheme_params, coco.dataset["categories"], 6.0)
        for image_id in ids:
            info = coco.imgs[image_id]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
            got = masks.rasterize(info["height"], info["width"], anns, plan.scheme, plan.rules)
            expected, _ = expected_labels(coco, image_id, scheme_params)
            assert np.array_equal(got, expected), f"{split} {image_id}: {(got != expected).sum()}"
            default, _ = expected_labels(coco, image_id, params["schemes"][scheme_name])
            changed += int((got != default).sum())
    assert (changed > 0) == ((crowd, overlap) != ("ignore", "ignore"))


def test_vehicle_scheme_labels_other_vehicles_where_car_scheme_has_background(cocos, params):
    coco = cocos["val"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=436738, iscrowd=None))
    cats = coco.dataset["categories"]
    car = masks.rasterize(486, 500, anns,
                          resolve_scheme("person_car", params["schemes"]["person_car"], cats))
    veh = masks.rasterize(486, 500, anns, resolve_scheme(
        "person_vehicle", params["schemes"]["person_vehicle"], cats))
    truck_or_bus = np.zeros((486, 500), bool)
    for ann in anns:
        if coco.cats[ann["category_id"]]["name"] in ("truck", "bus") and not ann["iscrowd"]:
            truck_or_bus |= coco.annToMask(ann).astype(bool)
    only_other = truck_or_bus & (car == 0)
    assert only_other.sum() > 10_000
    assert (veh[only_other] == 2).mean() > 0.95


def test_unclaimed_crowd_is_background_and_claimed_crowd_is_ignore(cocos, params):
    coco = cocos["train"]
    info = coco.imgs[262145]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=262145, iscrowd=None))
    scheme = resolve_scheme("person_car", params["schemes"]["person_car"],
                            coco.dataset["categories"])
    got = masks.rasterize(info["height"], info["width"], anns, scheme)
    person = np.zeros(got.shape, bool)
    for ann in anns:
        if coco.cats[ann["category_id"]]["name"] == "person":
            person |= coco.annToMask(ann).astype(bool)
    for ann in anns:
        if not ann["iscrowd"]:
            continue
        m = coco.annToMask(ann).astype(bool)
        name = coco.cats[ann["category_id"]]["name"]
        if name == "carrot":
            assert (got[m & ~person] == 0).all() and (m & ~person).sum() > 100
        else:
            assert name == "person"
            assert (got[m] == IGNORE_INDEX).all() and m.sum() > 100


def test_all_three_segmentation_encodings(cocos, params):
    """Polygons, uncompressed RLE (the sample's crowds) and compressed RLE (string counts)."""
    coco = cocos["val"]
    info = coco.imgs[184324]
    h, w = info["height"], info["width"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=184324, iscrowd=None))
    kinds = {("poly" if isinstance(a["segmentation"], list) else "rle") for a in anns}
    assert kinds == {"poly", "rle"}
    scheme = resolve_scheme("person_car", params["schemes"]["person_car"],
                            coco.dataset["categories"])
    reference = masks.rasterize(h, w, anns, scheme)
    compressed = []
    for ann in anns:
        ann = copy.deepcopy(ann)
        rle = coco.annToRLE(ann)
        ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        compressed.append(ann)
    assert np.array_equal(masks.rasterize(h, w, compressed, scheme), reference)
    for ann in anns:
        rle = masks.annotation_rle(ann, h, w)
        assert np.array_equal(mask_utils.decode(rle), coco.annToMask(ann))


def test_degenerate_polygon_has_no_area(params):
    scheme = resolve_scheme("person_car", params["schemes"]["person_car"],
                            [{"id": 1, "name": "person", "supercategory": "person"},
                             {"id": 3, "name": "car", "supercategory": "vehicle"}])
    anns = [{"category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 5, 5]]},
            {"category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}]
    got = masks.rasterize(8, 8, anns, scheme)
    assert got[1:4, 1:4].tolist() == [[2] * 3] * 3
    assert (got == 1).sum() == 0


# ---------------------------------------------------------------- rules on known label maps

CATEGORIES = [{"id": i, "name": name, "supercategory": sup}
              for i, (name, sup) in enumerate(COCO_CATEGORIES.items(), start=1)]
CAT_ID = {c["name"]: c["id"] for c in CATEGORIES}


def span_rle(start: int, stop: int, compressed: bool, height: int = 2, width: int = 10) -> dict:
    """An RLE covering columns [start, stop) of every row, compressed or not."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, start:stop] = 1
    if compressed:
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
        return {"size": [height, width], "counts": counts}
    runs, value, run = [], 0, 0
    for v in mask.flatten(order="F").tolist():
        if v != value:
            runs.append(run)
            value, run = v, 0
        run += 1
    return {"size": [height, width], "counts": runs + [run]}


def span_annotations() -> list[dict]:
    """A 2x10 image, both rows alike. Columns: person 1-4 (compressed RLE), car 3-6
    (polygon), a person crowd 6-8, a bus 8-9, a bus crowd 0-1 (crowds: uncompressed RLE)."""
    return [
        {"category_id": CAT_ID["person"], "iscrowd": 0, "segmentation": span_rle(1, 5, True)},
        {"category_id": CAT_ID["car"], "iscrowd": 0, "segmentation": [[3, 0, 7, 0, 7, 2, 3, 2]]},
        {"category_id": CAT_ID["person"], "iscrowd": 1, "segmentation": span_rle(6, 9, False)},
        {"category_id": CAT_ID["bus"], "iscrowd": 0, "segmentation": span_rle(8, 10, True)},
        {"category_id": CAT_ID["bus"], "iscrowd": 1, "segmentation": span_rle(0, 2, False)},
    ]


# (scheme, crowd, overlap) -> the row of labels; "first" = classes in their order
# (person wins), "last" = reversed (car/vehicle wins). In person_vehicle the bus is claimed.
EXACT = {
    ("person_car", "ignore", "ignore"): [0, 1, 1, 255, 255, 2, 255, 255, 255, 0],
    ("person_car", "ignore", "first"): [0, 1, 1, 1, 1, 2, 255, 255, 255, 0],
    ("person_car", "ignore", "last"): [0, 1, 1, 2, 2, 2, 255, 255, 255, 0],
    ("person_car", "class", "ignore"): [0, 1, 1, 255, 255, 2, 255, 1, 1, 0],
    ("person_car", "class", "first"): [0, 1, 1, 1, 1, 2, 1, 1, 1, 0],
    ("person_car", "class", "last"): [0, 1, 1, 2, 2, 2, 2, 1, 1, 0],
    ("person_car", "background", "ignore"): [0, 1, 1, 255, 255, 2, 2, 0, 0, 0],
    ("person_car", "background", "first"): [0, 1, 1, 1, 1, 2, 2, 0, 0, 0],
    ("person_car", "background", "last"): [0, 1, 1, 2, 2, 2, 2, 0, 0, 0],
    ("person_vehicle", "ignore", "ignore"): [255, 255, 1, 255, 255, 2, 255, 255, 255, 2],
    ("person_vehicle", "class", "ignore"): [2, 255, 1, 255, 255, 2, 255, 1, 255, 2],
    ("person_vehicle", "class", "last"): [2, 2, 1, 2, 2, 2, 2, 1, 2, 2],
    ("person_vehicle", "background", "first"): [0, 1, 1, 1, 1, 2, 2, 0, 2, 2],
}


@pytest.mark.parametrize("scheme_name, crowd, overlap", list(EXACT))
def test_rules_on_a_synthetic_image_give_the_exact_label_map(params, scheme_name, crowd, overlap):
    plan = masks.make_plan(scheme_name, scheme_with(params, scheme_name, crowd, overlap),
                           CATEGORIES, 6.0)
    got = masks.rasterize(2, 10, span_annotations(), plan.scheme, plan.rules)
    assert got.tolist() == [EXACT[scheme_name, crowd, overlap]] * 2


def test_label_rules_resolve_class_names_to_indices(params):
    plan = masks.make_plan("person_car", scheme_with(params, "person_car", "class", "last"),
                           CATEGORIES, 6.0)
    assert plan.rules == masks.LabelRules("class", (2, 1))
    default = masks.make_plan("person_car", params["schemes"]["person_car"], CATEGORIES, 6.0)
    assert default.rules == masks.LabelRules("ignore", None) == masks.LabelRules()
    with pytest.raises(ValueError, match=r"schemes\.person_car\.crowd: 'drop'"):
        masks.label_rules({"crowd": "drop"}, plan.scheme)
    with pytest.raises(ValueError, match=r"schemes\.person_car\.overlap"):
        masks.label_rules({"overlap": ["car"]}, plan.scheme)


# ---------------------------------------------------------------- malformed segmentations

SQUARE = [0, 0, 4, 0, 4, 4, 0, 4]   # 16 pixels of an 8x8 image
FLAWED = [  # segmentation, flaw, pixels drawn
    ([SQUARE], None, 16),
    ([[1, 1, 5, 5]], "degenerate", 0),                      # fewer than 3 points
    ([[1, 1, 5, 1, 5, 5, 1]], "degenerate", 0),             # odd coordinate count
    ([SQUARE, [6, 6]], "degenerate", 16),                   # the good part is still drawn
    (SQUARE, "degenerate", 0),                              # flat: not a list of polygons
    ([[0, 0, 4, 0, "x", 4, 0, 4]], "degenerate", 0),        # not numbers
    ([[0, 0, 4, 0, float("nan"), 4, 0, 4]], "degenerate", 0),
    ("polygon", "degenerate", 0),
    ({"size": [8, 9], "counts": [72]}, "degenerate", 0),    # RLE of another size
    ({"size": [8, 8], "counts": [10, 60]}, "degenerate", 0),  # runs past the image
    ({"size": [8, 8], "counts": [10, -2, 56]}, "degenerate", 0),
    ({"size": [8, 8], "counts": mask_utils.encode(np.ones((4, 4), np.uint8, order="F"))[
        "counts"].decode()}, "degenerate", 0),               # compressed runs of a 4x4 mask
    ({"counts": [64]}, "degenerate", 0),                    # no size
    ([], "empty", 0),
    ({}, "empty", 0),
    (None, "empty", 0),
    ([[1, 1, 5, 1, 9, 1]], "zero_area", 0),                 # collinear
    ({"size": [8, 8], "counts": [64]}, "zero_area", 0),     # all background
]


@pytest.mark.parametrize("segmentation, flaw, pixels", FLAWED)
def test_malformed_segmentations_are_classified_not_fatal(params, segmentation, flaw, pixels):
    ann = {"category_id": CAT_ID["person"], "iscrowd": 0, "segmentation": segmentation}
    decoded = masks.decode_annotation(ann, 8, 8)
    assert (decoded.flaw, decoded.pixels) == (flaw, pixels)
    assert mask_utils.decode(masks.annotation_rle(ann, 8, 8)).sum() == pixels
    scheme = resolve_scheme("person_car", params["schemes"]["person_car"], CATEGORIES)
    assert (masks.rasterize(8, 8, [ann], scheme) == 1).sum() == pixels


def test_annotation_without_segmentation_key_is_empty():
    decoded = masks.decode_annotation({"category_id": 1, "area": 5}, 8, 8)
    assert (decoded.flaw, decoded.rle, decoded.pixels, decoded.area) == ("empty", None, 0, 5.0)


def test_flaw_counts_reach_the_metadata_and_the_log_line(tmp_path, params, caplog):
    anns = [{"id": i, "image_id": 1, "category_id": CAT_ID["person"], "iscrowd": 0,
             "segmentation": segm} for i, (segm, _, _) in enumerate(FLAWED, start=1)]
    raw = synthetic_raw(tmp_path / "raw", {"a.jpg": Image.new("RGB", (8, 8), (200, 30, 30))},
                        anns)
    params["masks"]["workers"] = 1
    with caplog.at_level("INFO", logger="masks"):
        summary = masks.run(params, "person_car", raw, tmp_path / "out")
    expected = {f: sum(flaw == f for _, flaw, _ in FLAWED) for f in masks.FLAWS}
    assert expected == {"degenerate": 12, "empty": 3, "zero_area": 2}
    assert dict(summary.flaws) == expected
    row = pd.read_csv(tmp_path / "out" / "metadata.csv").set_index("file_name").loc["a.jpg"]
    assert row.n_annotations == len(FLAWED)
    assert {f: row[f"n_{f}_annotations"] for f in masks.FLAWS} == expected
    assert row.person_instances == 2                        # the ones that drew pixels
    assert row.person_fraction == 16 / 64
    assert "18 annotations: 12 degenerate, 3 empty, 2 zero-area" in caplog.text
    assert "person_car: 2 masks (1 workers)" in caplog.text


# ---------------------------------------------------------------- orientation and colour

def synthetic_raw(root: Path, train: dict[str, Image.Image], anns: list[dict] = (),
                  save: dict[str, dict] | None = None) -> Path:
    """A raw folder of synthetic JPEGs: `train` (ids 1, 2, ... in order) with `anns`, and
    one plain val image. The JSON sizes are the stored ones."""
    val = {"val.jpg": Image.new("RGB", (12, 8), (90, 120, 30))}
    (root / "annotations").mkdir(parents=True)
    for split, files in (("train", train), ("val", val)):
        folder = root / "images" / split
        folder.mkdir(parents=True)
        images = []
        for image_id, (name, image) in enumerate(files.items(), start=1):
            image.save(folder / name, format="JPEG", quality=95, **(save or {}).get(name, {}))
            images.append({"id": image_id, "file_name": name, "width": image.width,
                           "height": image.height})
        doc = {"images": images, "annotations": list(anns) if split == "train" else [],
               "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def rotated_jpeg(width: int, height: int) -> tuple[Image.Image, dict]:
    """An RGB image and the save options that tag it EXIF orientation 6 (viewers rotate
    it 90 degrees; the pixels are stored width x height)."""
    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    image = Image.fromarray(np.stack([ramp, 255 - ramp, np.full_like(ramp, 60)], axis=-1))
    exif = Image.Exif()
    exif[0x0112] = 6
    return image, {"exif": exif.tobytes()}


def test_sample_annotations_refer_to_the_stored_pixel_grid(cocos):
    """COCO's width/height are the stored JPEG size. (No sample JPEG carries an EXIF
    orientation other than 1 today; one that did would have to agree too.)"""
    for split, coco in cocos.items():
        for info in coco.imgs.values():
            with Image.open(SAMPLE / f"{split}2017" / info["file_name"]) as image:
                assert image.size == (info["width"], info["height"]), info["file_name"]


def test_exif_rotated_cmyk_and_grayscale_jpegs_give_masks_on_the_stored_grid(tmp_path, params):
    w, h = 40, 24
    rotated, save = rotated_jpeg(w, h)
    ramp = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    files = {"rotated.jpg": rotated, "cmyk.jpg": Image.new("CMYK", (w, h), (0, 200, 200, 0)),
             "gray.jpg": Image.fromarray(ramp)}
    # a person over columns 2-9 of rows 3-6 of the stored grid, in each image
    anns = [{"id": i, "image_id": i, "category_id": CAT_ID["person"], "iscrowd": 0, "area": 32.0,
             "segmentation": [[2, 3, 10, 3, 10, 7, 2, 7]]} for i in (1, 2, 3)]
    raw = synthetic_raw(tmp_path / "raw", files, anns, save={"rotated.jpg": save})
    folder = raw / "images" / "train"
    with Image.open(folder / "rotated.jpg") as image:
        assert image.getexif()[0x0112] == 6 and image.size == (w, h)
        assert ImageOps.exif_transpose(image).size == (h, w)  # what a viewer would show
    for name, mode in (("cmyk.jpg", "CMYK"), ("gray.jpg", "L")):
        with Image.open(folder / name) as image:
            assert image.mode == mode
    params["masks"]["workers"] = 1
    masks.run(params, "person_car", raw, tmp_path / "masks")
    expected = np.zeros((h, w), np.uint8)
    expected[3:7, 2:10] = 1
    for name in files:
        labels = read_labels(tmp_path / "masks" / "train" / f"{Path(name).stem}.png")
        assert labels.shape == (h, w) and np.array_equal(labels, expected), name
    table = pd.read_csv(tmp_path / "masks" / "metadata.csv").set_index("file_name")
    for name in files:
        row = table.loc[name]
        assert (row.width, row.height, row.person_instances) == (w, h, 1)
        assert row.person_fraction == 32 / (w * h)
        assert row.person_mean_area == 32 / (w * h)
    gray, cmyk = table.loc["gray.jpg"], table.loc["cmyk.jpg"]
    assert gray.is_grayscale and gray.colourfulness == 0 and gray.contrast > 50
    assert not cmyk.is_grayscale and cmyk.colourfulness > 50 and cmyk.contrast < 2


def test_training_loader_reads_an_exif_rotated_jpeg_at_its_stored_size(tmp_path):
    from stages.lib.data import read_image

    image, save = rotated_jpeg(40, 24)
    image.save(tmp_path / "r.jpg", quality=95, **save)
    tensor = read_image(tmp_path / "r.jpg")
    assert tuple(tensor.shape) == (3, 24, 40)
    # the pixels, not only the size: the red ramp still runs along the stored width
    assert tensor[0, 12, 0] < 30 and tensor[0, 12, -1] > 225


def test_report_thumbnail_of_an_exif_rotated_jpeg_keeps_the_stored_aspect(tmp_path):
    from stages import report

    image, save = rotated_jpeg(40, 24)
    image.save(tmp_path / "r.jpg", quality=95, **save)
    uri = report.photo_thumbnail(tmp_path / "r.jpg", 20)
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as thumb:
        assert thumb.size == (20, 12)


# ---------------------------------------------------------------- colour statistics

def test_colour_statistics_on_images_with_known_values():
    red_green = np.zeros((2, 4, 3), np.uint8)
    red_green[:, :2, 0] = 255
    red_green[:, 2:, 1] = 255
    # rg = +-255 (std 255, mean 0); yb = 127.5 everywhere (std 0, mean 127.5)
    assert masks.colourfulness(red_green) == pytest.approx(255 + 0.3 * 127.5)
    luma = (0.299 * 255, 0.587 * 255)
    assert masks.pixel_stats(red_green, 6.0) == {
        "is_grayscale": False, "grayscale_score": 191.25,
        "colourfulness": 293.25, "brightness": round(sum(luma) / 2, 3),
        "contrast": round((luma[1] - luma[0]) / 2, 3)}
    half = np.zeros((2, 4), np.uint8)
    half[:, 2:] = 255
    assert masks.pixel_stats(half, 6.0) == {"is_grayscale": True, "grayscale_score": 0.0,
                                            "colourfulness": 0.0, "brightness": 127.5,
                                            "contrast": 127.5}
    flat = np.full((3, 3, 3), 77, np.uint8)
    assert masks.pixel_stats(flat, 0.0) == {"is_grayscale": True, "grayscale_score": 0.0,
                                            "colourfulness": 0.0, "brightness": 77.0,
                                            "contrast": 0.0}


def reference_colour_stats(pixels: np.ndarray) -> dict:
    """The four colour statistics in float64, straight from their definitions."""
    pixels = pixels.astype(np.float64)
    if pixels.ndim == 2:
        return {"grayscale_score": 0.0, "colourfulness": 0.0, "brightness": pixels.mean(),
                "contrast": pixels.std()}
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    rg, yb = r - g, (r + g) / 2 - b
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    return {"grayscale_score": (np.abs(r - g) + np.abs(g - b)).mean() / 2,
            "colourfulness": (np.sqrt(rg.var() + yb.var())
                              + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)),
            "brightness": luma.mean(), "contrast": luma.std()}


def decoded(path: Path, scale: int) -> np.ndarray:
    """A JPEG as libjpeg decodes it at 1/scale of its size (DCT scaling), in its own mode."""
    with Image.open(path) as image:
        if scale > 1:
            image.draft(image.mode, (image.width // scale, image.height // scale))
        return np.asarray(image)


# What docs/outputs.md states for colour_stats_scale 4 against full resolution, on the
# 160 sample photographs: largest absolute differences (0-255 scale) and rank agreement.
REDUCED_TOLERANCE = {"brightness": 1.5, "grayscale_score": 4.0, "colourfulness": 8.0,
                     "contrast": 12.0}


def test_reduced_colour_statistics_stay_close_to_full_resolution():
    paths = sorted(SAMPLE.glob("*2017/*.jpg"))
    assert len(paths) == 160
    full, reduced = [], []
    for path in paths:
        full.append(reference_colour_stats(decoded(path, 1)))
        pixels, stored = masks.read_pixels(path, path, 4)
        assert pixels.shape[:2] == (-(-stored[0] // 4), -(-stored[1] // 4))
        reduced.append(masks.pixel_stats(pixels, 6.0))
    for key, tolerance in REDUCED_TOLERANCE.items():
        a = np.array([f[key] for f in full])
        b = np.array([r[key] for r in reduced])
        assert np.abs(a - b).max() <= tolerance, key
        ranks = np.corrcoef(a.argsort().argsort(), b.argsort().argsort())[0, 1]
        assert ranks >= 0.97, key
    contrast = (sum(r["contrast"] for r in reduced) / sum(f["contrast"] for f in full))
    assert 0.9 <= contrast < 1.0   # fine texture is lost, never gained


def test_colour_stats_scale_one_is_full_resolution(tmp_path, params, raw):
    params["masks"]["colour_stats_scale"] = 1
    job, tasks = masks.split_job(params, "person_car", raw, "val", tmp_path / "val")
    job.out.mkdir()
    for image, anns in tasks.pairs:
        row = masks.process_image(job, image, anns)
        expected = reference_colour_stats(decoded(raw / "images" / "val" / image["file_name"], 1))
        assert {k: row[k] for k in expected} == pytest.approx(expected, abs=1e-3)


# ---------------------------------------------------------------- palette PNGs

def test_palette_png_round_trip(tmp_path):
    labels = np.array([[0, 1, 2, 255], [3, 254, 0, 255], [7, 8, 9, 1]], np.uint8)
    path = tmp_path / "sub" / "x.png"
    save_labels(path, labels)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "P"
        assert np.array_equal(np.asarray(image), labels)
        palette = np.array(image.getpalette(), np.uint8).reshape(-1, 3)
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[255].tolist() == [255, 255, 255]
    assert np.array_equal(palette, palette_colours()[: len(palette)])
    back = read_labels(path)
    assert back.dtype == np.uint8 and np.array_equal(back, labels)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary left


def test_palette_colours_distinct_for_first_classes():
    colours = palette_colours()
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours[:9]}) == 9
    assert np.array_equal(palette_colours(), colours)  # deterministic
    # The spread after the fixed colours: values in [40, 255] (never near-black), and the
    # same colours as when the masks were first written (written down from that run: a
    # changed seed or range would recolour every saved mask and figure).
    assert colours[9:255].min() == 40 and colours[9:255].max() == 255
    assert colours[[9, 10, 254]].tolist() == [[89, 43, 89], [108, 227, 141], [150, 156, 149]]
    assert colours[255].tolist() == [255, 255, 255]


@pytest.mark.parametrize("level", [None, 1])
def test_save_labels_encodes_like_pillow_at_its_level(tmp_path, level):
    """The PNG's bytes are Pillow's own encoding of the palette image at zlib level 6 (the
    default) or the level asked for, without Pillow's optimize pass; a noisy map so that
    the levels differ."""
    import io

    labels = np.random.default_rng(0).integers(0, 9, (64, 64)).astype(np.uint8)
    path = tmp_path / "x.png"
    save_labels(path, labels) if level is None else save_labels(path, labels, level)
    image = Image.fromarray(labels)
    image.putpalette(palette_colours().tobytes())
    expected = io.BytesIO()
    image.save(expected, format="PNG", compress_level=6 if level is None else level)
    assert path.read_bytes() == expected.getvalue()


def test_read_labels_reads_grey_maps_and_returns_a_writable_copy(tmp_path):
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    Image.fromarray(labels, mode="L").save(tmp_path / "grey.png")
    back = read_labels(tmp_path / "grey.png")
    assert back.dtype == np.uint8 and back.tolist() == labels.tolist()
    back[0, 0] = 3  # callers edit maps in place; Pillow's array view is read-only


def test_every_categorical_colour_comes_from_the_one_okabe_ito_list():
    """Masks' class colours and the report's scheme and cluster colours are drawn from
    labels.OKABE_ITO, each in the order it had as a list of its own (outputs unchanged)."""
    from stages import report
    from stages.lib.labels import OKABE_ITO

    assert list(OKABE_ITO.values()) == ["#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442",
                                        "#0072B2", "#D55E00", "#CC79A7"]
    assert palette_colours()[:9].tolist() == [
        [0, 0, 0], [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66],
        [0, 114, 178], [213, 94, 0], [204, 121, 167], [153, 153, 153]]
    assert report.CATEGORY_COLOURS == ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9",
                                       "#D55E00", "#F0E442", "#000000"]
    # matplotlib's to_hex gives what the hand-written "#%02x%02x%02x" gave
    assert report.colour_ramp("viridis", 3) == ["#440154", "#21918c", "#fde725"]
    assert [s["colour"] for s in report.legend_swatches(["background", "person"])] == [
        "#000000", "#e69f00", "#ffffff"]

def test_label_image_refuses_non_uint8_and_read_labels_refuses_rgb(tmp_path):
    with pytest.raises(ValueError, match="2-D uint8"):
        label_image(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="2-D uint8"):
        label_image(np.zeros((2, 2, 3), np.uint8))
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="mode RGB"):
        read_labels(tmp_path / "rgb.png")


# ---------------------------------------------------------------- run()

@pytest.fixture(scope="module")
def raw(tmp_path_factory, cocos) -> Path:
    """A raw folder as download writes it (merge order), holding only the chosen images."""
    root = tmp_path_factory.mktemp("raw")
    for split, ids in CHOSEN.items():
        coco = cocos[split]
        data = subset_instances(coco.dataset, coco.loadImgs(ids))
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        folder = root / "images" / split
        folder.mkdir(parents=True)
        for info in data["images"]:
            src = SAMPLE / f"{split}2017" / info["file_name"]
            if (split, info["id"]) == SINGLE_CHANNEL:
                with Image.open(src) as image:
                    image.convert("L").save(folder / info["file_name"], quality=95)
            else:
                shutil.copyfile(src, folder / info["file_name"])
    return root


@pytest.fixture(scope="module")
def mask_runs(raw, tmp_path_factory, default_params) -> dict[str, tuple[Path, pd.DataFrame]]:
    out = {}
    for name in SCHEMES:
        folder = tmp_path_factory.mktemp("masks") / name
        table = masks.run(default_params, name, raw, folder)
        out[name] = (folder, table)
    return out


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_run_writes_expected_pngs(mask_runs, cocos, params, scheme_name):
    folder, _ = mask_runs[scheme_name]
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.csv", "train", "val"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    for split, ids in CHOSEN.items():
        pngs = sorted(p.name for p in (folder / split).iterdir())
        assert pngs == sorted(f"{i:012d}.png" for i in ids)
        for image_id in ids:
            expected, _ = expected_labels(cocos[split], image_id, params["schemes"][scheme_name])
            with Image.open(folder / split / f"{image_id:012d}.png") as image:
                assert image.mode == "P"
                got = np.asarray(image)
            assert np.array_equal(got, expected), f"{split} {image_id}"


METADATA_COLUMNS = ["image_id", "file_name", "split", "width", "height", "is_grayscale",
                    "grayscale_score", "colourfulness", "brightness", "contrast",
                    "n_annotations", "n_degenerate_annotations", "n_empty_annotations",
                    "n_zero_area_annotations", "crowd_fraction", "ignore_fraction",
                    "n_unclaimed_objects", "background_fraction"]


def count_columns(coco: COCO, class_of: dict[int, int]) -> list[str]:
    return ["count_" + c["name"].replace(" ", "_")
            for c in sorted(coco.dataset["categories"], key=lambda c: c["id"])
            if c["id"] not in class_of]


@pytest.mark.parametrize("scheme_name, cls", [("person_car", "car"), ("person_vehicle", "vehicle")])
def test_metadata_table(mask_runs, cocos, params, raw, scheme_name, cls):
    folder, summary = mask_runs[scheme_name]
    table = pd.read_csv(folder / "metadata.csv")
    scheme_params = params["schemes"][scheme_name]
    counted = count_columns(cocos["val"], claimed_categories(cocos["val"], scheme_params))
    assert list(table.columns) == METADATA_COLUMNS + [
        "person_fraction", "person_instances", "person_mean_area",
        f"{cls}_fraction", f"{cls}_instances", f"{cls}_mean_area"] + counted
    # every unclaimed COCO category, names with spaces made identifiers
    assert len(counted) == (78 if scheme_name == "person_car" else 71)
    assert {"count_bus", "count_traffic_light", "count_hair_drier"} <= set(counted) or \
        scheme_name == "person_vehicle"
    assert "count_person" not in counted and "count_car" not in counted
    assert len(table) == 11 and summary.n_images == 11 and summary.n_grayscale == 4
    assert summary.n_annotations == table["n_annotations"].sum()
    assert table["split"].tolist() == ["train"] * 6 + ["val"] * 5
    assert table["image_id"].tolist() == sorted(CHOSEN["train"]) + sorted(CHOSEN["val"])
    assert table["is_grayscale"].dtype == bool
    total = table[["background_fraction", "person_fraction", f"{cls}_fraction",
                   "ignore_fraction"]].sum(axis=1)
    np.testing.assert_allclose(total, 1.0, atol=1e-9)
    assert (table[counted].sum(axis=1) == table["n_unclaimed_objects"]).all()
    flaws = ["n_degenerate_annotations", "n_empty_annotations", "n_zero_area_annotations"]
    assert (table[flaws] == 0).all().all()   # real COCO annotations are well-formed
    for row in table.itertuples(index=False):
        coco = cocos[row.split]
        info = coco.imgs[row.image_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=row.image_id, iscrowd=None))
        class_of = claimed_categories(coco, scheme_params)
        expected, _ = expected_labels(coco, row.image_id, scheme_params)
        n = expected.size
        assert (row.file_name, row.width, row.height) == (info["file_name"], info["width"],
                                                          info["height"])
        assert row.n_annotations == len(anns)
        assert row.n_unclaimed_objects == sum(a["category_id"] not in class_of for a in anns)
        for cat in coco.dataset["categories"]:
            if cat["id"] not in class_of:
                column = "count_" + cat["name"].replace(" ", "_")
                assert getattr(row, column) == sum(a["category_id"] == cat["id"] for a in anns)
        assert row.person_fraction == pytest.approx((expected == 1).sum() / n)
        assert getattr(row, f"{cls}_fraction") == pytest.approx((expected == 2).sum() / n)
        assert row.ignore_fraction == pytest.approx((expected == IGNORE_INDEX).sum() / n)
        people = [a for a in anns if class_of.get(a["category_id"]) == 1 and not a["iscrowd"]]
        assert row.person_instances == len(people)
        assert row.person_mean_area == pytest.approx(
            np.mean([a["area"] for a in people]) / n if people else 0.0)
        others = [a for a in anns if class_of.get(a["category_id"]) == 2 and not a["iscrowd"]]
        assert getattr(row, f"{cls}_instances") == len(others)
        crowd = np.zeros(expected.shape, bool)
        for ann in anns:
            if ann["iscrowd"]:
                crowd |= coco.annToMask(ann).astype(bool)
        assert (row.crowd_fraction > 0) == crowd.any()
        assert crowd.sum() / n - 1e-9 <= row.crowd_fraction <= 1.0
        scale = params["masks"]["colour_stats_scale"]
        pixels = decoded(raw / "images" / row.split / row.file_name, scale)
        assert pixels.shape[:2] == (-(-row.height // scale), -(-row.width // scale))
        expected = reference_colour_stats(pixels)
        assert {k: getattr(row, k) for k in expected} == pytest.approx(expected, abs=1e-3)
        assert row.is_grayscale == (expected["grayscale_score"]
                                    <= params["masks"]["grayscale_tolerance"])
    colourful = table.set_index("image_id")["colourfulness"]
    assert colourful[204805] == 0.0 and colourful[360452] > 20 * colourful[114692]


def test_metadata_grayscale_detection(mask_runs, raw, params):
    table = pd.read_csv(mask_runs["person_car"][0] / "metadata.csv").set_index("image_id")
    path = raw / "images" / "train" / "000000204805.jpg"
    with Image.open(path) as image:
        assert image.mode == "L"  # really single-channel
    brightness = decoded(path, params["masks"]["colour_stats_scale"]).mean()
    row = table.loc[204805]
    assert bool(row.is_grayscale) and row.grayscale_score == 0.0
    assert row.brightness == pytest.approx(brightness, abs=1e-3)
    # RGB files whose three channels are equal are grayscale too
    assert table.loc[114692].is_grayscale and table.loc[114692].grayscale_score == 0.0
    assert table.loc[566282].is_grayscale and table.loc[566282].grayscale_score == 0.0
    # colour photographs are not; 184324 is close (6.054 > tolerance 6.0; 6.539 at full
    # resolution: colour_stats_scale 4 averages some chroma noise away)
    assert table.loc[184324].grayscale_score == pytest.approx(6.054, abs=1e-3)
    assert not table.loc[184324].is_grayscale
    assert not table.loc[360452].is_grayscale
    assert table.loc[360452].grayscale_score == pytest.approx(8.677, abs=1e-3)
    # 221184 (airplanes in a grey sky) looks grayscale too: score 0.682 <= 6.0
    assert set(table.index[table["is_grayscale"]]) == {114692, 204805, 221184, 566282}


@pytest.mark.parametrize("split, image_id", [("val", 376322), ("train", 262145)])
def test_crowd_fraction_is_the_fraction_of_crowd_pixels(cocos, params, split, image_id):
    coco = cocos[split]
    info = coco.imgs[image_id]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    crowd = np.zeros((info["height"], info["width"]), bool)
    for ann in anns:
        if ann["iscrowd"]:
            crowd |= coco.annToMask(ann).astype(bool)
    plan = masks.make_plan("person_car", params["schemes"]["person_car"],
                           coco.dataset["categories"], 6.0)
    decoded = [masks.decode_annotation(a, info["height"], info["width"]) for a in anns]
    labels = masks.label_map(info["height"], info["width"], decoded, plan.scheme, plan.rules)
    with Image.open(SAMPLE / f"{split}2017" / info["file_name"]) as image:
        pixels = np.asarray(image.convert("RGB"))
    row = masks.image_metadata(pixels, labels, decoded, plan)
    assert list(row) == plan.columns()[3:]
    assert row["crowd_fraction"] == pytest.approx(crowd.mean(), abs=1e-3)


def test_crowd_images_have_ignore_pixels(mask_runs):
    table = pd.read_csv(mask_runs["person_car"][0] / "metadata.csv").set_index("image_id")
    for image_id in (204805, 262145, 184324, 5001):
        assert table.loc[image_id].crowd_fraction > 0.005
        assert table.loc[image_id].ignore_fraction > 0.005
    for image_id in (73731, 221184, 436738):
        assert table.loc[image_id].crowd_fraction == 0.0
        assert table.loc[image_id].ignore_fraction == 0.0
    assert table.loc[221184].background_fraction == 1.0   # airplanes are background here


def test_main_cli_and_missing_raw_folder(tmp_path, params, raw, caplog):

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    out = tmp_path / "masks"
    missing = tmp_path / "no_such_raw"
    code = masks.main(["--params", str(params_file), "--scheme", "person_car", "--raw",
                       str(missing), "--out", str(out)])
    assert code == 2
    assert f"{missing}/annotations/instances_train.json" in caplog.text
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [params_file]


def test_unknown_scheme_is_a_clear_error(tmp_path, params, raw, caplog):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    code = masks.main(["--params", str(params_file), "--scheme", "person_bus", "--raw",
                       str(raw), "--out", str(tmp_path / "masks")])
    assert code == 2
    assert "'person_bus'" in caplog.text and "person_car" in caplog.text
    assert not (tmp_path / "masks").exists()


def test_image_size_disagreeing_with_annotation_is_an_error(tmp_path, params, raw):
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    target = bad / "images" / "val" / "000000005001.jpg"
    with Image.open(target) as image:
        image.resize((64, 48)).save(target)
    with pytest.raises(StageError, match=r"000000005001\.jpg: stored size 64x48 differs from "
                                         r"the annotation's 640x480"):
        masks.run(params, "person_car", bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad input

def broken_copy(raw: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    return bad


def assert_no_output(tmp_path: Path) -> None:
    """Neither the final folder nor a temporary one beside it is left behind."""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def _without(doc: dict, key: str, index: int, field: str) -> dict:
    doc[key][index].pop(field)
    return doc


def _strict_json_breaker(doc: dict) -> dict:
    """NaN is JSON to the json module only: the file is then grouped in memory."""
    doc["info"] = {"score": float("nan")}
    return doc


# split, damage (the parsed file -> new document or text), message after the file name;
# "+ nan" cases take the in-memory path (json module), the others the streamed scan.
BAD_FILES = {
    "truncated": ("val", lambda doc: '{"images": [{"id": 1,',
                  r"cannot read COCO annotations: .*line 1"),
    "other categories": ("val", lambda doc: {**doc, "categories": [
        c for c in doc["categories"] if c["name"] != "toothbrush"]}, r"categories differ"),
    "annotation without image_id": ("train",
                                    lambda doc: _without(doc, "annotations", 3, "image_id"),
                                    r"annotations\[3\] lacks image_id or category_id"),
    "image without height": ("train", lambda doc: _without(doc, "images", 0, "height"),
                             r"images\[0\]: lacks height"),
    "no annotations": ("train", lambda doc: {k: v for k, v in doc.items() if k != "annotations"},
                       r"missing or non-list key\(s\): annotations$"),
    "images not a list": ("train", lambda doc: {**doc, "images": {"item": doc["images"][0]}},
                          r"missing or non-list key\(s\): images$"),
    "not an object": ("train", lambda doc: [doc], r"expected a JSON object"),
    "annotation without image_id + nan": (
        "train", lambda doc: _strict_json_breaker(_without(doc, "annotations", 3, "image_id")),
        r"annotations\[3\] lacks image_id or category_id"),
    "no annotations + nan": (
        "train", lambda doc: _strict_json_breaker({k: v for k, v in doc.items()
                                                   if k != "annotations"}),
        r"missing or non-list key\(s\): annotations$"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_annotation_file_is_one_clear_error(tmp_path, params, raw, case):
    split, damage, message = BAD_FILES[case]
    bad = broken_copy(raw, tmp_path)
    ann_file = bad / "annotations" / f"instances_{split}.json"
    damaged = damage(json.loads(ann_file.read_text()))
    ann_file.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    with pytest.raises(StageError, match=rf"^{re.escape(str(ann_file))}: {message}") as info:
        masks.run(params, "person_car", bad, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert_no_output(tmp_path)


@pytest.mark.parametrize("workers", [1, 2])
def test_listed_but_missing_image_is_named(tmp_path, params, raw, workers, monkeypatch):
    monkeypatch.setattr(masks, "worker_count", lambda n: n)   # a pool even on one CPU
    params["masks"]["workers"] = workers
    bad = broken_copy(raw, tmp_path)
    target = bad / "images" / "val" / "000000478721.jpg"
    target.unlink()
    ann_file = bad / "annotations" / "instances_val.json"
    with pytest.raises(StageError, match=rf"^{re.escape(str(target))}: missing \(listed in "
                                         rf"{re.escape(str(ann_file))}\)$"):
        masks.run(params, "person_car", bad, tmp_path / "out")
    assert_no_output(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_jpeg_is_named(tmp_path, params, raw, damage, monkeypatch):
    monkeypatch.setattr(masks, "worker_count", lambda n: n)
    params["masks"]["workers"] = 2
    bad = broken_copy(raw, tmp_path)
    target = bad / "images" / "val" / "000000436738.jpg"
    data = target.read_bytes()
    target.write_bytes(b"this is not a JPEG" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(StageError, match=rf"^{re.escape(str(target))}: cannot read image: ") \
            as info:
        masks.run(params, "person_car", bad, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert_no_output(tmp_path)


def test_unreadable_jpeg_through_main_is_one_log_line(tmp_path, params, raw, caplog):
    bad = broken_copy(raw, tmp_path)
    target = bad / "images" / "train" / "000000073731.jpg"
    target.write_bytes(b"\xff\xd8 broken")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    code = masks.main(["--params", str(params_file), "--scheme", "person_car", "--raw", str(bad),
                       "--out", str(tmp_path / "out")])
    assert code == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].getMessage().startswith(f"{target}: cannot read image")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "raw"]


# ---------------------------------------------------------------- workers and streaming

def test_worker_count_is_capped_at_the_usable_cpus():
    assert masks.worker_count(1) == 1
    assert masks.worker_count(10_000) == len(os.sched_getaffinity(0))


def test_one_and_two_workers_write_identical_files(tmp_path, params, raw, monkeypatch):
    monkeypatch.setattr(masks, "worker_count", lambda n: n)
    outputs = {}
    for workers in (1, 2):
        params["masks"]["workers"] = workers
        summary = masks.run(params, "person_vehicle", raw, tmp_path / str(workers))
        assert summary.workers == workers and summary.n_images == 11
        outputs[workers] = {p.relative_to(tmp_path / str(workers)).as_posix(): p.read_bytes()
                            for p in sorted((tmp_path / str(workers)).rglob("*")) if p.is_file()}
    assert len(outputs[1]) == 12 and "metadata.csv" in outputs[1]
    assert outputs[1] == outputs[2]


def test_tasks_in_flight_are_bounded_and_rows_keep_task_order(tmp_path, params, raw):
    job, split_tasks = masks.split_job(params, "person_car", raw, "val", tmp_path / "val")
    tasks = list(split_tasks.pairs)
    job.out.mkdir()
    pulled = 0

    def feed():
        nonlocal pulled
        for image, anns in tasks * 4:
            pulled += 1
            yield "val", image, anns

    ids = []
    for row in masks.map_ordered({"val": job}, feed(), 2):
        assert pulled - len(ids) <= 4 * 2   # never the whole list at once
        ids.append(row["image_id"])
    assert ids == [task[0]["id"] for task in tasks] * 4 and pulled == 20
    assert [task[0]["id"] for task in tasks] == sorted(CHOSEN["val"])


# ---------------------------------------------------------------- streaming the annotations

def test_merge_join_keeps_file_order_and_skips_annotations_of_unlisted_images():
    images = [{"id": 2}, {"id": 5}, {"id": 9}]
    anns = [{"image_id": 1, "id": 1}, {"image_id": 2, "id": 7}, {"image_id": 2, "id": 3},
            {"image_id": 4, "id": 4}, {"image_id": 9, "id": 5}, {"image_id": 12, "id": 6}]
    got = [(im["id"], [a["id"] for a in own]) for im, own in masks.merge_join(images, anns)]
    assert got == [(2, [7, 3]), (5, []), (9, [5])]
    assert list(masks.merge_join(images, [])) == [(im, []) for im in images]


def test_what_download_writes_is_streamed_and_joins_as_in_memory(raw, caplog):
    for split, ids in CHOSEN.items():
        ann_file = raw / "annotations" / f"instances_{split}.json"
        with caplog.at_level("INFO", logger="masks"):
            categories, tasks = masks.split_tasks(ann_file)
        assert f"{ann_file}: {len(ids)} images, annotations streamed" in caplog.text
        data = json.loads(ann_file.read_text())
        assert categories == data["categories"] and tasks.count == len(ids)
        assert list(tasks.pairs) == masks.image_tasks(data, ann_file)


def _reverse(doc: dict, key: str) -> dict:
    doc[key].reverse()
    return doc


def _float_image_id(doc: dict) -> dict:
    doc["annotations"][0]["image_id"] = float(doc["annotations"][0]["image_id"])
    return doc


# How a file can fail merge order, and the start of the reason logged.
UNORDERED = {
    "annotations reversed": (lambda doc: _reverse(doc, "annotations"),
                             r"annotations\[\d+\] \(image_id \d+\) comes after image_id \d+"),
    "images reversed": (lambda doc: _reverse(doc, "images"),
                        r"images\[1\] \(id \d+\) does not follow id \d+"),
    "float image_id": (_float_image_id, r"annotations\[0\]: image_id \d+\.0 is not an integer"),
    "NaN": (_strict_json_breaker, r"not JSON the streaming parser accepts \(lexical error"),
}


@pytest.mark.parametrize("case", list(UNORDERED))
def test_other_orders_are_grouped_in_memory_with_identical_output(tmp_path, params, raw,
                                                                   mask_runs, case, caplog):
    damage, reason = UNORDERED[case]
    bad = broken_copy(raw, tmp_path)
    for split in CHOSEN:
        ann_file = bad / "annotations" / f"instances_{split}.json"
        ann_file.write_text(json.dumps(damage(json.loads(ann_file.read_text()))))
    with caplog.at_level("INFO", logger="masks"):
        masks.run(params, "person_car", bad, tmp_path / "out")
    for split in CHOSEN:
        ann_file = bad / "annotations" / f"instances_{split}.json"
        assert re.search(rf"{re.escape(str(ann_file))}: {reason}.*; grouping the annotations "
                         r"in memory\n", caplog.text), split
    streamed = mask_runs["person_car"][0]
    files = sorted(p.relative_to(streamed) for p in streamed.rglob("*") if p.is_file())
    assert len(files) == 12
    assert sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")
                  if p.is_file()) == files
    for rel in files:
        assert (tmp_path / "out" / rel).read_bytes() == (streamed / rel).read_bytes(), rel


def test_streaming_memory_does_not_grow_with_the_file(tmp_path, raw):
    """Python's peak allocation while reading every task of the fixture's val split
    repeated 4 and 40 times (new ids): the same for both, while parsing the file whole
    grows with it."""
    import tracemalloc

    from benchmarks.bench_masks import replicate

    doc = json.loads((raw / "annotations" / "instances_val.json").read_text())
    peaks = {}
    for factor in (4, 40):
        path = tmp_path / f"instances_val_{factor}.json"
        copies = replicate(doc, doc["images"], factor)
        path.write_text(json.dumps(subset_instances(copies, copies["images"])))
        tracemalloc.start()
        try:
            _, tasks = masks.split_tasks(path)
            assert sum(1 for _ in tasks.pairs) == tasks.count == 5 * factor
            streamed = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            masks.read_instances(path)
            peaks[factor] = streamed, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    (streamed_4, whole_4), (streamed_40, whole_40) = peaks[4], peaks[40]
    assert whole_40 > 8 * whole_4
    assert streamed_40 < 1.1 * streamed_4, peaks
