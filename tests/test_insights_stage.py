"""analyze's insights on real sample images with planted duplicates (issue 17, item 5): three
train images copied byte for byte into val are the leak, and the metrics recomputed without
them leave out exactly those; a resized, re-encoded copy of a val image is its near
duplicate; the train split's latents give each cluster its train share and each val image
its out-of-distribution score. One pipeline run (download, masks, a 1-epoch model at 64 px,
infer, analyze) on a raw folder modified after download, shared by the module."""
from __future__ import annotations

import copy
import hashlib
import io
import json

import jsonschema
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, SAMPLE, small_params
from stages import analyze, download, infer, masks, train
from stages.lib.labels import IGNORE_INDEX, read_labels
from stages.lib.metrics import metrics_document

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEME = "person_car"
N_TRAIN, N_VAL = 12, 10
LEAK_IDS = [900_001, 900_002, 900_003]     # the val copies of the first three train images
RESIZED_ID = 900_010                       # the 0.7x, quality-60 copy of the first val image
SCHEMA = json.loads((ROOT / "docs" / "insights.schema.json").read_text())


def _add_image(raw, split: str, entry: dict, data: bytes, anns: list[dict]) -> None:
    """One more image in download's folder: its file, its entry and annotations (in merge
    order: images by id, annotations by image id, then id) and its manifest line."""
    (raw / "images" / split / entry["file_name"]).write_bytes(data)
    path = raw / "annotations" / f"instances_{split}.json"
    doc = json.loads(path.read_text())
    doc["images"] = sorted(doc["images"] + [entry], key=lambda im: im["id"])
    doc["annotations"] = sorted(doc["annotations"] + anns,
                                key=lambda a: (a["image_id"], a["id"]))
    path.write_text(json.dumps(doc))
    manifest = json.loads((raw / "manifest.json").read_text())
    listed = manifest["splits"][split]
    listed["images"].append({"id": entry["id"], "path": f"images/{split}/{entry['file_name']}",
                             "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    listed["annotations"].update(bytes=path.stat().st_size,
                                 sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (raw / "manifest.json").write_text(json.dumps(manifest, indent=1))


def plant(raw) -> dict:
    """Copies the first three train images (bytes and annotations) into val under new ids,
    and adds a resized, re-encoded copy of the first val image (no annotations: all
    background). Returns which ids are which."""
    train_doc = json.loads((raw / "annotations" / "instances_train.json").read_text())
    val_doc = json.loads((raw / "annotations" / "instances_val.json").read_text())
    next_ann = 1 + max(a["id"] for a in train_doc["annotations"] + val_doc["annotations"])
    sources = sorted(train_doc["images"], key=lambda im: im["id"])[:3]
    for new_id, image in zip(LEAK_IDS, sources):
        anns = [a for a in train_doc["annotations"] if a["image_id"] == image["id"]]
        copied = []
        for a in anns:
            copied.append({**a, "id": next_ann, "image_id": new_id})
            next_ann += 1
        data = (raw / "images" / "train" / image["file_name"]).read_bytes()
        _add_image(raw, "val", {**image, "id": new_id, "file_name": f"{new_id:012d}.jpg"},
                   data, copied)
    original = sorted(val_doc["images"], key=lambda im: im["id"])[0]
    with Image.open(raw / "images" / "val" / original["file_name"]) as photo:
        small = photo.convert("RGB").resize((round(photo.width * 0.7),
                                             round(photo.height * 0.7)), Image.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=60)
    _add_image(raw, "val", {**original, "id": RESIZED_ID, "file_name": f"{RESIZED_ID:012d}.jpg",
                            "width": small.width, "height": small.height},
               buffer.getvalue(), [])
    return {"train_twins": [im["id"] for im in sources], "original": original["id"]}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, default_params, one_torch_thread):
    root = tmp_path_factory.mktemp("insights_stage")
    params = small_params(copy.deepcopy(default_params), train=N_TRAIN, val=N_VAL, size=64)
    params["data"]["base_url"] = str(SAMPLE)
    params["train"]["device"] = params["infer"]["device"] = params["analyze"]["device"] = "cpu"
    # k = 1: a val image whose twin is a train image lies at distance 0 from the train split
    params["analyze"]["representation"]["k"] = 1
    raw, mask_dir, model = root / "raw", root / "masks", root / "model"
    download.run(params, raw)
    ids = plant(raw)
    masks.run(params, SCHEME, raw, mask_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        train.run(params, SCHEME, raw, mask_dir, model)
    infer.run(params, model, raw, mask_dir, root / "pred")
    analyze.run(params, root / "pred", mask_dir, model, raw, root / "analysis")
    return {"params": params, "root": root, "pred": root / "pred", "masks": mask_dir,
            "analysis": root / "analysis", **ids}


def _insights(planted) -> list[dict]:
    records = json.loads((planted["analysis"] / "insights.json").read_text())
    jsonschema.validate(records, SCHEMA)
    return records


def test_the_train_copies_in_val_are_the_leak(planted):
    [leak] = [r for r in _insights(planted) if r["type"] == "leak"]
    assert leak["image_ids"] == LEAK_IDS and leak["size"] == 3
    assert leak["evidence"]["pairs"] == [
        {"image_id_a": twin, "image_id_b": copy_id, "kind": "exact_bytes", "distance": 0.0}
        for twin, copy_id in zip(planted["train_twins"], LEAK_IDS)]
    # effect: their mean loss against the other val images', from infer's losses
    loss = pd.read_csv(planted["pred"] / "samples.csv").set_index("image_id")["loss"]
    inside = loss.index.isin(LEAK_IDS)
    assert leak["effect"] == pytest.approx(loss[inside].mean() - loss[~inside].mean(), rel=1e-9)
    assert leak["q_value"] is None and leak["title"].startswith(
        "3 val images with a copy among the training images (pairs: 3 same bytes): mean loss")


def test_leak_free_metrics_leave_out_exactly_the_leaked_images(planted):
    """Against an independent count: scikit-learn's confusion matrix of the kept images'
    prediction and ground-truth PNGs (ignore pixels left out), IoU by hand."""
    from sklearn.metrics import confusion_matrix

    doc = json.loads((planted["analysis"] / "leak_free_metrics.json").read_text())
    samples = pd.read_csv(planted["pred"] / "samples.csv", dtype={"stem": str})
    kept = samples[~samples["image_id"].isin(LEAK_IDS)]
    assert len(samples) == N_VAL + 4 and len(kept) == N_VAL + 1
    cm, ignored = np.zeros((3, 3), np.int64), 0
    for stem in kept["stem"]:
        gt = read_labels(planted["masks"] / "val" / f"{stem}.png").ravel()
        pred = read_labels(planted["pred"] / "val" / f"{stem}.png").ravel()
        counted = gt != IGNORE_INDEX
        ignored += int((~counted).sum())
        cm += confusion_matrix(gt[counted], pred[counted], labels=[0, 1, 2])
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (cm.sum(0) + cm.sum(1) - tp)
    assert doc["excluded_image_ids"] == LEAK_IDS
    assert (doc["images"], doc["pixels_evaluated"], doc["pixels_ignored"]) == (
        N_VAL + 1, int(cm.sum()), ignored)
    assert doc["pixel_accuracy"] == pytest.approx(tp.sum() / cm.sum(), rel=1e-12)
    assert doc["miou"] == pytest.approx(np.nanmean(iou), rel=1e-12)
    for name, value in zip(["background", "person", "car"], iou):
        assert doc["iou"][name] == (None if np.isnan(value) else pytest.approx(value, rel=1e-12))
    # metrics/S.json's headline keys, an interval of each, and the images left out
    headline = metrics_document(np.eye(3, dtype=np.int64), 0, ["a", "b", "c"], 1)
    assert set(doc) == set(headline) | {"interval", "excluded_image_ids"}
    lo, hi = doc["interval"]["miou"]
    assert lo <= doc["miou"] <= hi


def test_a_resized_reencoded_val_copy_is_a_near_duplicate_and_nothing_else_pairs(planted):
    pairs = pd.read_csv(planted["analysis"] / "duplicates.csv")
    assert list(pairs.columns) == ["image_id_a", "split_a", "image_id_b", "split_b", "kind",
                                   "distance"]
    near = pairs[pairs["kind"] != "exact_bytes"]
    assert near[["image_id_a", "split_a", "image_id_b", "split_b", "kind"]].values.tolist() == [
        [planted["original"], "val", RESIZED_ID, "val", "near_hash"]]
    assert near["distance"].iloc[0] <= planted["params"]["analyze"]["duplicates"]["hash_radius"]
    exact = pairs[pairs["kind"] == "exact_bytes"]
    assert exact[["image_id_a", "split_a", "image_id_b", "split_b"]].values.tolist() == [
        [twin, "train", copy_id, "val"] for twin, copy_id in zip(planted["train_twins"],
                                                                 LEAK_IDS)]
    [duplicate] = [r for r in _insights(planted) if r["type"] == "duplicate"]
    assert duplicate["image_ids"] == [planted["original"], RESIZED_ID]
    assert duplicate["evidence"] == {"split": "val", "kind": "near_hash", "pairs": 1}
    assert duplicate["effect"] is None and duplicate["score"] is None


def test_train_shares_and_out_of_distribution_scores(planted):
    samples = pd.read_csv(planted["analysis"] / "samples.csv").set_index("image_id")
    # k = 1: each leaked copy's nearest train image is its twin, embedded alike
    assert (samples.loc[LEAK_IDS, "ood_score"] < 1e-5).all()
    others = samples.drop(index=LEAK_IDS)["ood_score"]
    assert others.notna().all() and (others > 1e-3).all()
    clusters = pd.read_csv(planted["analysis"] / "clusters.csv")
    assert list(clusters.columns[-3:]) == ["train_images", "train_share", "val_share"]
    assert clusters["train_images"].sum() == N_TRAIN    # k-means: every image in a cluster
    np.testing.assert_allclose(clusters["train_share"], clusters["train_images"] / N_TRAIN)
    np.testing.assert_allclose(clusters["val_share"], clusters["size"] / (N_VAL + 4))
    summary = json.loads((planted["analysis"] / "summary.json").read_text())
    assert summary["train_images"] == N_TRAIN
    none = {"train-train": 0, "val-val": 0, "train-val": 0}
    assert summary["duplicates"] == {
        "pairs": 4, "leaked_val_images": 3,
        "by_kind": {"exact_bytes": 3, "exact_pixels": 0, "near_hash": 1, "near_latent": 0},
        # the three train twins in val, and the resized val copy of a val image
        "by_kind_and_split": {"exact_bytes": {**none, "train-val": 3}, "exact_pixels": none,
                              "near_hash": {**none, "val-val": 1}, "near_latent": none}}
    assert summary["insights"]["records"] == len(_insights(planted))


def test_without_the_planted_copies_the_leak_free_metrics_are_not_written(planted, tmp_path):
    """The same analysis with the copies' pairs gone: no leak, no leak_free_metrics.json."""
    from stages.lib import duplicates

    params = planted["params"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(duplicates, "find_pairs",
                   lambda *a, **k: pd.DataFrame(columns=duplicates.PAIR_COLUMNS))
        analyze.run(params, planted["pred"], planted["masks"], planted["root"] / "model",
                    planted["root"] / "raw", tmp_path / "analysis")
    assert not (tmp_path / "analysis" / "leak_free_metrics.json").exists()
    assert not [r for r in json.loads((tmp_path / "analysis" / "insights.json").read_text())
                if r["type"] in ("leak", "duplicate")]
