"""masks: label maps of real sample images against pycocotools' own annToMask, palette
PNGs, and the per-image metadata table."""
from __future__ import annotations

import copy
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conftest import SAMPLE
from stages import masks
from stages.lib.cli import StageError
from stages.lib.coco import resolve_scheme
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


def expected_labels(coco: COCO, image_id: int, scheme: dict) -> tuple[np.ndarray, dict]:
    """The label map from pycocotools' annToMask per annotation, plus what it contained."""
    info = coco.imgs[image_id]
    h, w = info["height"], info["width"]
    class_of = claimed_categories(coco, scheme)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    regions = np.zeros((len(scheme["classes"]) + 1, h, w), bool)
    crowd = np.zeros((h, w), bool)
    for ann in anns:
        cls = class_of.get(ann["category_id"])
        if cls is None:
            continue
        m = coco.annToMask(ann).astype(bool)
        if ann["iscrowd"]:
            crowd |= m
        else:
            regions[cls] |= m
    count = regions.sum(0)
    labels = np.zeros((h, w), np.uint8)
    for cls in range(1, len(regions)):
        labels[regions[cls]] = cls
    overlap = count > 1
    labels[overlap | crowd] = IGNORE_INDEX
    facts = {"crowd": int((crowd & ~overlap).sum()), "overlap": int(overlap.sum()),
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
    """A raw folder as download writes it, holding only the chosen images."""
    root = tmp_path_factory.mktemp("raw")
    for split, ids in CHOSEN.items():
        coco = cocos[split]
        data = {k: v for k, v in coco.dataset.items() if k not in ("images", "annotations")}
        data["images"] = coco.loadImgs(ids)
        data["annotations"] = coco.loadAnns(coco.getAnnIds(imgIds=ids, iscrowd=None))
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
                    "grayscale_score", "brightness", "n_annotations", "crowd_fraction",
                    "ignore_fraction", "n_unclaimed_objects", "background_fraction"]


@pytest.mark.parametrize("scheme_name, cls", [("person_car", "car"), ("person_vehicle", "vehicle")])
def test_metadata_table(mask_runs, cocos, params, raw, scheme_name, cls):
    folder, returned = mask_runs[scheme_name]
    table = pd.read_csv(folder / "metadata.csv")
    assert list(table.columns) == METADATA_COLUMNS + [
        "person_fraction", "person_instances", "person_mean_area",
        f"{cls}_fraction", f"{cls}_instances", f"{cls}_mean_area"]
    assert len(table) == 11 and len(returned) == 11
    assert table["split"].tolist() == ["train"] * 6 + ["val"] * 5
    assert table["image_id"].tolist() == CHOSEN["train"] + CHOSEN["val"]
    assert table["is_grayscale"].dtype == bool
    total = table[["background_fraction", "person_fraction", f"{cls}_fraction",
                   "ignore_fraction"]].sum(axis=1)
    np.testing.assert_allclose(total, 1.0, atol=1e-9)
    scheme_params = params["schemes"][scheme_name]
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
        with Image.open(raw / "images" / row.split / row.file_name) as image:
            pixels = np.asarray(image).astype(np.int64)
        assert row.brightness == pytest.approx(pixels.mean(), abs=1e-3)
        if pixels.ndim == 2:
            score = 0.0
        else:
            score = (np.abs(pixels[..., 0] - pixels[..., 1])
                     + np.abs(pixels[..., 1] - pixels[..., 2])).mean() / 2
        assert row.grayscale_score == pytest.approx(score, abs=1e-3)
        assert row.is_grayscale == (score <= params["masks"]["grayscale_tolerance"])


def test_metadata_grayscale_detection(mask_runs, raw):
    table = pd.read_csv(mask_runs["person_car"][0] / "metadata.csv").set_index("image_id")
    with Image.open(raw / "images" / "train" / "000000204805.jpg") as image:
        assert image.mode == "L"  # really single-channel
        brightness = np.asarray(image).mean()
    row = table.loc[204805]
    assert bool(row.is_grayscale) and row.grayscale_score == 0.0
    assert row.brightness == pytest.approx(brightness, abs=1e-3)
    # RGB files whose three channels are equal are grayscale too
    assert table.loc[114692].is_grayscale and table.loc[114692].grayscale_score == 0.0
    assert table.loc[566282].is_grayscale and table.loc[566282].grayscale_score == 0.0
    # colour photographs are not; 184324 is close (6.54 > tolerance 6.0)
    assert table.loc[184324].grayscale_score == pytest.approx(6.539, abs=1e-3)
    assert not table.loc[184324].is_grayscale
    assert not table.loc[360452].is_grayscale
    assert table.loc[360452].grayscale_score == pytest.approx(9.314, abs=1e-3)
    # 221184 (airplanes in a grey sky) looks grayscale too: score 3.913 <= 6.0
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
    scheme = resolve_scheme("person_car", params["schemes"]["person_car"],
                            coco.dataset["categories"])
    labels = masks.rasterize(info["height"], info["width"], anns, scheme)
    with Image.open(SAMPLE / f"{split}2017" / info["file_name"]) as image:
        pixels = np.asarray(image.convert("RGB"))
    row = masks.image_metadata(pixels, labels, anns, scheme, 6.0)
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
    with pytest.raises(StageError, match=r"000000005001\.jpg: decoded size 64x48 differs from "
                                         r"the annotation's 640x480"):
        masks.run(params, "person_car", bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
