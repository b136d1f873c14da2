"""evaluate's category table ("where each COCO category's pixels go") on the real sample's
val images, against an independent count made with pycocotools' own COCO API, with a
planted confusion (every vehicle predicted car) and without one."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools.coco import COCO

from conftest import write_predictions
from stages import evaluate
from stages.lib.categories import Instance, category_table, image_categories
from stages.lib.cli import StageError


def evaluate_categories(val_truth: dict, pred: Path, out: Path) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    evaluate.run(val_truth["params"], "person_car", pred, val_truth["root"] / "masks" / "person_car"
                 / "val", out / "m.json", out / "c.csv", annotations=val_truth["annotations"],
                 categories_out=out / "categories.csv", per_image_out=out / "per_image.npz")
    return pd.read_csv(out / "categories.csv", keep_default_na=True)


def oracle(annotations: Path, pred: Path, claims: dict[str, int], threshold: float,
           num_classes: int) -> dict[str, dict]:
    """The same table from pycocotools' COCO index and annToMask, counted per pixel."""
    coco = COCO(str(annotations))
    pixels: dict[str, np.ndarray] = {}
    instances: dict[str, list[int]] = {}
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        predicted = np.asarray(Image.open(pred / f"{Path(info['file_name']).stem}.png"))
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))]
        regions = [coco.annToMask(a).astype(bool) for a in anns]
        if not regions:
            continue
        once = np.sum(regions, axis=0) == 1
        for ann, region in zip(anns, regions):
            owned = predicted[region & once]
            if owned.size == 0:
                continue
            name = coco.loadCats(ann["category_id"])[0]["name"]
            counts = np.bincount(owned, minlength=num_classes)
            pixels[name] = pixels.get(name, 0) + counts
            target = counts[claims[name]] if name in claims else counts[1:].sum()
            found = instances.setdefault(name, [0, 0])
            found[0] += 1
            found[1] += int(target >= threshold * owned.size)
    return {name: {"pixels": int(p.sum()), "shares": p / p.sum(), "instances": instances[name][0],
                   "rate": instances[name][1] / instances[name][0]}
            for name, p in pixels.items()}


@pytest.mark.parametrize("source", ["person_car", "person_vehicle"])
def test_category_table_equals_pycocotools_count(val_truth, tmp_path, source):
    pred = write_predictions(val_truth, source, tmp_path / "pred")
    table = evaluate_categories(val_truth, pred, tmp_path / "out").set_index("category")
    expected = oracle(val_truth["annotations"], pred, {"person": 1, "car": 2}, 0.5, 3)
    assert {"car", "truck", "bus", "person"} <= set(table.index)
    assert set(table.index) == set(expected)
    for name, want in expected.items():
        row = table.loc[name]
        assert (row["pixels"], row["instances"]) == (want["pixels"], want["instances"]), name
        got = row[["pred_background", "pred_person", "pred_car"]].to_numpy(float)
        np.testing.assert_allclose(got, want["shares"], rtol=0, atol=1e-12, err_msg=name)
        column = "instance_recall" if name in ("person", "car") else "instance_pull"
        other = "instance_pull" if column == "instance_recall" else "instance_recall"
        assert row[column] == pytest.approx(want["rate"], abs=1e-12) and np.isnan(row[other])


def test_planted_vehicle_confusion_is_found_and_absent_without_it(val_truth, tmp_path):
    planted = evaluate_categories(val_truth, write_predictions(val_truth, "person_vehicle",
                                                            tmp_path / "p1"), tmp_path / "o1")
    clean = evaluate_categories(val_truth, write_predictions(val_truth, "person_car",
                                                          tmp_path / "p2"), tmp_path / "o2")
    planted, clean = planted.set_index("category"), clean.set_index("category")
    for name in ("truck", "bus"):
        assert planted.loc[name, "claimed_by"] != planted.loc[name, "claimed_by"]  # NaN: none
        assert planted.loc[name, "pred_car"] > 0.95 and planted.loc[name, "instance_pull"] > 0.9
        assert clean.loc[name, "pred_car"] == 0 and clean.loc[name, "instance_pull"] == 0
        assert clean.loc[name, "pred_background"] == 1
    assert clean.loc["car", "claimed_by"] == "car" and clean.loc["car", "instance_recall"] > 0.9


def test_per_image_counts_sum_to_the_tables(val_truth, tmp_path):
    pred = write_predictions(val_truth, "person_vehicle", tmp_path / "pred")
    table = evaluate_categories(val_truth, pred, tmp_path / "out").set_index("category")
    with np.load(tmp_path / "out" / "per_image.npz") as npz:
        stems, confusion = npz["stems"], npz["confusion"]
        names, pixels = list(npz["category_names"]), npz["category_pixels"]
        instances, seeds = npz["category_instances"], npz["seeds"]
    assert len(stems) == 80 and list(stems) == sorted(stems)
    # image axis first, then one entry per train seed (a one-seed study here)
    assert list(seeds) == [0] and confusion.shape == (80, 1, 3, 3)
    assert pixels.shape == (80, 1, len(names), 3) and instances.shape == (80, len(names))
    cm = pd.read_csv(tmp_path / "out" / "c.csv")[["background", "person", "car"]].to_numpy()
    np.testing.assert_array_equal(confusion[:, 0].sum(0), cm)
    truck = names.index("truck")
    assert pixels[:, 0, truck].sum() == table.loc["truck", "pixels"]
    assert instances[:, truck].sum() == table.loc["truck", "instances"]
    assert json.loads((tmp_path / "out" / "m.json").read_text())["images"] == 80


def test_an_image_without_annotation_entry_is_named(val_truth, tmp_path):
    pred = write_predictions(val_truth, "person_car", tmp_path / "pred")
    gt = tmp_path / "gt"
    gt.mkdir()
    for path in (val_truth["root"] / "masks" / "person_car" / "val").glob("*.png"):
        (gt / path.name).write_bytes(path.read_bytes())
    (gt / "stray.png").write_bytes(next(gt.glob("0*.png")).read_bytes())
    (pred / "stray.png").write_bytes((gt / "stray.png").read_bytes())
    with pytest.raises(StageError, match=r"stray\.png: image not in .*instances_val\.json; "
                                         r"re-run masks"):
        evaluate.run(val_truth["params"], "person_car", pred, gt, tmp_path / "m.json",
                     tmp_path / "c.csv", annotations=val_truth["annotations"],
                     categories_out=tmp_path / "cat.csv")
    assert not (tmp_path / "cat.csv").exists() and not (tmp_path / "m.json").exists()


def test_instance_counts_by_hand():
    # Two instances of category 3 (claimed by class 2) and one of 8 (unclaimed), K = 3.
    counts = np.array([[1, 0, 3],    # 3 of 4 predicted class 2: recall hit at 0.5
                       [2, 1, 1],    # 1 of 4: a miss
                       [2, 0, 2],    # exactly half: a hit ("at least")
                       [0, 0, 0],    # owns no pixel (all shared): not counted
                       [1, 2, 2]])   # 4 of 5 non-background: pulled
    found = image_categories([Instance(3, {})] * 4 + [Instance(8, {})], counts,
                             [3, 8, 9], {3: 2}, 0.5)
    np.testing.assert_array_equal(found.pixels, [[5, 1, 6], [1, 2, 2], [0, 0, 0]])
    np.testing.assert_array_equal(found.instances, [3, 1, 0])
    np.testing.assert_array_equal(found.hits, [2, 1, 0])
    table = category_table([{"id": 3, "name": "car", "supercategory": "vehicle"},
                            {"id": 8, "name": "truck", "supercategory": "vehicle"},
                            {"id": 9, "name": "boat", "supercategory": "vehicle"}],
                           ["background", "person", "car"], {3: 2}, found.pixels,
                           found.instances, found.hits)
    assert table["category"].tolist() == ["car", "truck"]     # boat: no instance, no row
    car, truck = table.iloc[0], table.iloc[1]
    assert (car["claimed_by"], car["pixels"], car["pred_car"]) == ("car", 12, 0.5)
    assert car["instance_recall"] == 2 / 3 and np.isnan(car["instance_pull"])
    assert truck["claimed_by"] == "" and truck["pred_person"] == 0.4
    assert truck["instance_pull"] == 1.0 and np.isnan(truck["instance_recall"])
