"""Stage tests on the real sample at low resolution: download -> masks -> train -> infer ->
evaluate -> analyze through each module's main([...]), then the formats of what they wrote."""
from __future__ import annotations

import json
import os
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torchvision import tv_tensors

from conftest import SAMPLE, small_params
from stages import analyze, download, evaluate, infer, masks, train
from stages.lib.cli import StageError, first_sentence
from stages.lib.data import SegmentationDataset, joint_transform, list_samples
from stages.lib.labels import IGNORE_INDEX, read_labels
from stages.lib.model import IMAGENET_MEAN, IMAGENET_STD, SegNet

SCHEME = "person_car"
CLASSES = ["background", "person", "car"]
N_TRAIN, N_VAL, SIZE = 8, 6, 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory, default_params, one_torch_thread):
    """Run every stage once through its CLI; return the folders and the params used."""
    root = tmp_path_factory.mktemp("chain")
    base = json.loads(json.dumps(default_params))
    base["data"]["base_url"] = str(SAMPLE)
    params = small_params(base, train=N_TRAIN, val=N_VAL, size=SIZE, epochs=1)
    params["train"]["device"] = params["infer"]["device"] = "cpu"
    p = str(_write_params(root / "params.yaml", params))
    paths = {"root": root, "params": Path(p), "raw": root / "data" / "raw",
             "masks": root / "data" / "masks" / SCHEME,
             "masks_vehicle": root / "data" / "masks" / "person_vehicle",
             "model": root / "models" / SCHEME / "seed0",
             "pred": root / "predictions" / SCHEME / "seed0",
             "metrics": root / "metrics" / f"{SCHEME}.json",
             "confusion": root / "metrics" / f"{SCHEME}_confusion.csv",
             "confusion_plot": root / "metrics" / f"{SCHEME}.confusion.png",
             "metric_samples": root / "metrics" / f"{SCHEME}.samples.csv",
             "analysis": root / "analysis" / SCHEME}
    deterministic = torch.are_deterministic_algorithms_enabled()
    codes = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # keep DVCLive and anything relative away from the real repo
        codes["download"] = download.main(["--params", p, "--out", str(paths["raw"])])
        for scheme, out in ((SCHEME, paths["masks"]), ("person_vehicle", paths["masks_vehicle"])):
            codes[f"masks {scheme}"] = masks.main(["--params", p, "--scheme", scheme, "--raw",
                                                   str(paths["raw"]), "--out", str(out)])
        codes["train"] = train.main(["--params", p, "--scheme", SCHEME, "--seed", "0",
                                     "--raw", str(paths["raw"]),
                                     "--masks", str(paths["masks"]), "--out", str(paths["model"]),
                                     "--live", str(paths["model"].parent / "live")])
        codes["infer"] = infer.main(["--params", p, "--model", str(paths["model"]), "--raw",
                                     str(paths["raw"]), "--masks", str(paths["masks"]), "--out",
                                     str(paths["pred"])])
        codes["evaluate"] = evaluate.main(["--params", p, "--scheme", SCHEME, "--pred",
                                           str(paths["pred"].parent), "--gt",
                                           str(paths["masks"] / "val"), "--out",
                                           str(paths["metrics"]), "--confusion",
                                           str(paths["confusion"]), "--confusion-plot",
                                           str(paths["confusion_plot"]), "--samples",
                                           str(paths["metric_samples"])])
        codes["analyze"] = analyze.main(["--params", p, "--predictions", str(paths["pred"]),
                                         "--masks", str(paths["masks"]), "--model",
                                         str(paths["model"]), "--raw", str(paths["raw"]),
                                         "--out", str(paths["analysis"])])
    torch.use_deterministic_algorithms(deterministic)  # train.run switches it on globally
    paths["codes"] = codes
    paths["params_dict"] = params
    return paths


@pytest.fixture(scope="module")
def val_images(chain) -> list[dict]:
    data = json.loads((chain["raw"] / "annotations" / "instances_val.json").read_text())
    return sorted(data["images"], key=lambda im: im["id"])


def _no_nan(name):
    raise AssertionError(f"JSON contains {name}")


def test_every_stage_exits_0(chain):
    assert chain["codes"] == {"download": 0, f"masks {SCHEME}": 0, "masks person_vehicle": 0,
                              "train": 0, "infer": 0, "evaluate": 0, "analyze": 0}
    assert sorted(p.name for p in chain["root"].iterdir()) == [
        "analysis", "data", "metrics", "models", "params.yaml", "predictions"]


def test_download_output(chain):
    manifest = json.loads((chain["raw"] / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["images"]) == N_TRAIN
    assert len(manifest["splits"]["val"]["images"]) == N_VAL
    assert len(list((chain["raw"] / "images" / "val").glob("*.jpg"))) == N_VAL


def test_masks_output(chain, val_images):
    for key in ("masks", "masks_vehicle"):
        folder = chain[key]
        assert len(list((folder / "train").glob("*.png"))) == N_TRAIN
        stems = sorted(p.stem for p in (folder / "val").glob("*.png"))
        assert stems == sorted(Path(im["file_name"]).stem for im in val_images)
        table = pd.read_csv(folder / "metadata.csv")
        assert len(table) == N_TRAIN + N_VAL
    assert "vehicle_fraction" in pd.read_csv(chain["masks_vehicle"] / "metadata.csv")


def test_model_loads_with_weights_only(chain):
    assert sorted(p.name for p in chain["model"].iterdir()) == ["curves.png", "model.pt",
                                                                 "train.json"]
    payload = torch.load(chain["model"] / "model.pt", weights_only=True)
    assert payload["class_names"] == CLASSES
    assert payload["image_size"] == SIZE
    assert payload["arch"] == "mobilenet_v2-pix2pix"
    model = SegNet(len(CLASSES), payload["dropout"])
    model.load_state_dict(payload["state_dict"])  # strict: every key matches
    assert model.head.out_channels == 3
    assert all(torch.isfinite(v).all() for v in payload["state_dict"].values()
               if v.is_floating_point())


def test_dvclive_log(chain):
    live = chain["model"].parent / "live"
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 0  # one epoch
    assert math.isfinite(summary["train"]["loss"]) and summary["train"]["loss"] > 0
    # running mIoU of the (augmented, shuffled) training batches: no independent recount
    # here short of replaying the epoch; test_train checks train_epoch's matrix against the
    # per-batch host computation exactly, and the val figures are checked below
    assert 0 < summary["train"]["miou"] <= 1
    assert set(summary["val"]) >= {"loss", "miou", "iou"}
    assert set(summary["val"]["iou"]) == set(CLASSES)
    loss_tsv = pd.read_csv(live / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    assert list(loss_tsv.columns) == ["step", "loss"] and len(loss_tsv) == 1


def test_dvclive_val_figures_equal_a_fresh_validation(chain):
    """The logged val loss, per-class IoU and mIoU (one epoch, so model.pt is the model that
    was validated) equal torch's cross_entropy and IoUs counted by hand in numpy over the
    val batches at training size, not only a value in [0, 1]."""
    import torch.nn.functional as F

    from stages.lib.model import load_trained

    summary = json.loads((chain["model"].parent / "live" / "metrics.json").read_text())
    model, _ = load_trained(chain["model"] / "model.pt", torch.device("cpu"))
    model.eval()
    cfg = dict(chain["params_dict"]["train"], num_workers=0)
    loader = train.data_loader(chain["raw"], chain["masks"], "val", cfg, False,
                               torch.device("cpu"))
    loss_sum, pixels, inter, union = 0.0, 0, np.zeros(3), np.zeros(3)
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX,
                                              reduction="sum"))
            gt, pred = labels.numpy(), logits.argmax(1).numpy()
            valid = gt != IGNORE_INDEX
            pixels += int(valid.sum())
            for k in range(3):
                inter[k] += ((gt == k) & (pred == k) & valid).sum()
                union[k] += (((gt == k) | (pred == k)) & valid).sum()
    assert pixels > 0
    assert summary["val"]["loss"] == pytest.approx(loss_sum / pixels, rel=1e-5)
    iou = {name: inter[k] / union[k] for k, name in enumerate(CLASSES) if union[k]}
    assert set(summary["val"]["iou"]) == set(iou)
    for name, value in iou.items():
        assert summary["val"]["iou"][name] == pytest.approx(value, rel=1e-9), name
    assert summary["val"]["miou"] == pytest.approx(np.mean(list(iou.values())), rel=1e-9)


def test_predictions_are_palette_pngs_at_image_size(chain, val_images):
    folder = chain["pred"] / "val"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{Path(im['file_name']).stem}.png" for im in val_images)
    sizes = set()
    for im in val_images:
        with Image.open(folder / f"{Path(im['file_name']).stem}.png") as pred:
            assert pred.mode == "P"
            assert pred.size == (im["width"], im["height"])
            values = set(np.unique(np.asarray(pred)).tolist())
        with Image.open(chain["raw"] / "images" / "val" / im["file_name"]) as image:
            assert image.size == pred.size
        sizes.add(pred.size)
        assert values <= {0, 1, 2}
    assert len(sizes) > 1  # the sample's images differ in size, so this checks per-image sizes


def test_infer_samples_csv(chain, val_images):
    table = pd.read_csv(chain["pred"] / "samples.csv")
    assert list(table.columns) == ["image_id", "stem", "loss", "pixel_accuracy", "confidence",
                                   "miou", "iou_background", "iou_person", "iou_car",
                                   "latency_ms"]
    assert table["image_id"].tolist() == [im["id"] for im in val_images]
    assert table["stem"].tolist() == [int(Path(im["file_name"]).stem) for im in val_images]
    assert (table["loss"] > 0).all() and np.isfinite(table["loss"]).all()
    assert table["confidence"].between(1 / 3, 1).all()
    assert (table["latency_ms"] > 0).all()
    # per-sample pixel accuracy and IoU agree with the PNGs written
    for row in table.itertuples(index=False):
        stem = f"{row.stem:012d}"
        pred = np.asarray(Image.open(chain["pred"] / "val" / f"{stem}.png"))
        gt = np.asarray(Image.open(chain["masks"] / "val" / f"{stem}.png"))
        valid = gt != IGNORE_INDEX
        assert row.pixel_accuracy == pytest.approx((pred[valid] == gt[valid]).mean())
        for index, name in enumerate(CLASSES):
            inter = ((pred == index) & (gt == index) & valid).sum()
            union = (((pred == index) | (gt == index)) & valid).sum()
            value = getattr(row, f"iou_{name}")
            if union == 0:
                assert math.isnan(value)
            else:
                assert value == pytest.approx(inter / union)


def test_latents_npz(chain):
    table = pd.read_csv(chain["pred"] / "samples.csv")
    with np.load(chain["pred"] / "latents.npz") as npz:
        assert sorted(npz.files) == ["image_ids", "latents", "layer_names", "layer_slices"]
        assert npz["layer_names"].tolist() == ["bottleneck", "decoder1", "decoder2",
                                               "decoder3", "decoder4"]
        assert npz["layer_slices"][-1, 1] == npz["latents"].shape[1]
        assert npz["image_ids"].tolist() == table["image_id"].tolist()
        latents = npz["latents"]
    assert latents.shape == (N_VAL, 320 + 512 + 256 + 128 + 64)
    assert latents.dtype == np.float32 and np.isfinite(latents).all()
    assert not np.allclose(latents[0], latents[1])


def test_timing_json(chain):
    timing = json.loads((chain["pred"] / "timing.json").read_text())
    assert set(timing) == {"images", "device", "batch_size", "latency_ms", "wall_s",
                           "throughput_img_s", "image_size", "torch_threads", "warmup_batches",
                           "warmup_definition", "latency_definition", "throughput_definition",
                           "train_embedding"}
    assert (timing["image_size"], timing["warmup_batches"]) == (SIZE, 1)
    assert set(timing["latency_ms"]) == {"total", "mean", "variance", "median"}
    assert (timing["images"], timing["device"], timing["batch_size"]) == (
        N_VAL, "cpu", chain["params_dict"]["infer"]["batch_size"])
    per_image = pd.read_csv(chain["pred"] / "samples.csv")["latency_ms"].tolist()
    lat = timing["latency_ms"]
    assert lat["total"] == pytest.approx(sum(per_image), rel=1e-9)
    assert lat["mean"] == pytest.approx(lat["total"] / N_VAL, rel=1e-9)
    assert lat["median"] == pytest.approx(statistics.median(per_image), rel=1e-9)
    assert lat["variance"] == pytest.approx(statistics.pvariance(per_image), rel=1e-6)
    assert timing["wall_s"] > 0
    assert timing["throughput_img_s"] == pytest.approx(N_VAL / timing["wall_s"], rel=1e-9)
    assert lat["total"] <= timing["wall_s"] * 1000


def test_metrics_json(chain, val_images):
    text = chain["metrics"].read_text()
    doc = json.loads(text, parse_constant=_no_nan)
    assert "NaN" not in text and "Infinity" not in text
    assert list(doc) == ["miou", "pixel_accuracy", "pixel_accuracy_with_ignore",
                         "mean_class_accuracy", "fw_iou", "iou", "dice", "class_accuracy",
                         "precision", "recall", "images", "pixels_evaluated", "pixels_ignored",
                         "interval", "seeds"]
    # one seed: its block repeats the top level, spread nil
    assert doc["seeds"]["seeds"] == [0]
    assert doc["seeds"]["miou"]["per_seed"] == [pytest.approx(doc["miou"])]
    spread = doc["seeds"]["miou"]
    assert spread["min"] == spread["max"] == spread["mean"]
    for key in ("iou", "dice", "class_accuracy", "precision", "recall"):
        assert list(doc[key]) == CLASSES
        assert all(v is None or 0 <= v <= 1 for v in doc[key].values())
    assert doc["images"] == N_VAL
    assert doc["pixels_evaluated"] + doc["pixels_ignored"] == sum(
        im["width"] * im["height"] for im in val_images)
    assert doc["pixel_accuracy_with_ignore"] <= doc["pixel_accuracy"]
    # the whole-set confusion matrix, recomputed here from the PNGs
    cm = np.zeros((3, 3), np.int64)
    for im in val_images:
        stem = Path(im["file_name"]).stem
        gt = np.asarray(Image.open(chain["masks"] / "val" / f"{stem}.png")).ravel()
        pred = np.asarray(Image.open(chain["pred"] / "val" / f"{stem}.png")).ravel()
        keep = gt != IGNORE_INDEX
        np.add.at(cm, (gt[keep], pred[keep]), 1)
    table = pd.read_csv(chain["confusion"])
    assert table["ground_truth"].tolist() == CLASSES
    assert table[CLASSES].to_numpy().tolist() == cm.tolist()
    assert doc["pixels_evaluated"] == cm.sum()
    assert doc["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())


def test_metrics_match_torchmetrics_on_the_real_predictions(chain, val_images):
    from test_metrics import torchmetrics_scores

    pairs = [(read_labels(chain["masks"] / "val" / f"{Path(im['file_name']).stem}.png"),
              read_labels(chain["pred"] / "val" / f"{Path(im['file_name']).stem}.png"))
             for im in val_images]
    reference = torchmetrics_scores(pairs, len(CLASSES))
    doc = json.loads(chain["metrics"].read_text())
    table = pd.read_csv(chain["confusion"])
    assert table[CLASSES].to_numpy().tolist() == reference["cm"].astype(int).tolist()
    for key in ("miou", "pixel_accuracy", "pixel_accuracy_with_ignore", "mean_class_accuracy",
                "fw_iou"):
        assert doc[key] == pytest.approx(reference[key], rel=1e-5), key
    for key in ("iou", "dice", "class_accuracy", "precision", "recall"):
        for index, name in enumerate(CLASSES):
            if doc[key][name] is not None:
                assert doc[key][name] == pytest.approx(reference[key][index], rel=1e-5), key
    # per-sample table: one row per image, summing to the whole-set counts
    per_sample = pd.read_csv(chain["metric_samples"], dtype={"stem": str})
    assert per_sample["stem"].tolist() == [Path(im["file_name"]).stem for im in val_images]
    assert per_sample["pixels_evaluated"].sum() == doc["pixels_evaluated"]
    assert per_sample["pixels_ignored"].sum() == doc["pixels_ignored"]
    infer_table = pd.read_csv(chain["pred"] / "samples.csv")
    np.testing.assert_allclose(per_sample["pixel_accuracy"], infer_table["pixel_accuracy"])
    with Image.open(chain["confusion_plot"]) as image:
        assert image.format == "PNG"


# no leak_free_metrics.json: no val image of the sample has a train twin
ANALYSIS_FILES = ["bin_members.csv", "cluster_categories.csv", "clusters.csv",
                  "duplicates.csv", "heatmaps", "insights.json", "label_issues",
                  "label_issues.csv", "metadata", "metadata_flagged.csv", "metadata_loss.csv",
                  "neighbours.csv", "samples.csv", "similars.csv", "summary.json"]


def test_analysis_files(chain):
    folder = chain["analysis"]
    assert sorted(p.name for p in folder.iterdir()) == ANALYSIS_FILES
    samples = pd.read_csv(folder / "samples.csv")
    infer_table = pd.read_csv(chain["pred"] / "samples.csv")
    assert samples["image_id"].tolist() == infer_table["image_id"].tolist()
    for col in ("loss", "x", "y", "cluster", "is_grayscale", "person_fraction", "split", "width",
                "label_quality", "label_quality_rank", "ood_score"):
        assert col in samples.columns
    assert (samples["split"] == "val").all()
    assert np.isfinite(samples[["x", "y"]]).all().all()
    assert set(samples["cluster"]) == {0, 1}   # k_min = k_max = 2 in small_params
    assert sorted(samples["label_quality_rank"]) == list(range(1, N_VAL + 1))
    clusters = pd.read_csv(folder / "clusters.csv")
    assert list(clusters.columns) == ["cluster", "size", "mean_loss", "mean_pixel_accuracy",
                                      "grayscale_share", "mean_iou_background", "mean_iou_person",
                                      "mean_iou_car", "dominant_categories", "medoid_image_id",
                                      "representative_image_ids", "train_images", "train_share",
                                      "val_share"]
    assert clusters["size"].sum() == N_VAL
    # the per-cluster means recomputed from samples.csv with pandas
    by_cluster = samples.groupby("cluster")
    per = clusters.set_index("cluster")
    assert per["size"].to_dict() == by_cluster.size().to_dict()
    for col in ("loss", "pixel_accuracy", "iou_background", "iou_person", "iou_car"):
        expected = by_cluster[col].mean()
        np.testing.assert_allclose(per[f"mean_{col}"].loc[expected.index], expected,
                                   rtol=1e-9, err_msg=col)
    assert clusters["grayscale_share"].between(0, 1).all()
    assert len(clusters) == 2                           # summary's k: the loop runs
    for row in clusters.itertuples():
        reps = [int(i) for i in str(row.representative_image_ids).split()]
        assert reps[0] == row.medoid_image_id
        assert set(samples.loc[samples["image_id"].isin(reps), "cluster"]) == {row.cluster}
    cats = pd.read_csv(folder / "cluster_categories.csv")
    assert list(cats.columns) == ["cluster", "category", "images", "share", "share_overall",
                                  "lift"]
    assert "person" in set(cats["category"]) and cats["share"].between(0, 1).all()
    # the shares are right: recount one category from the metadata
    person = samples["person_instances"] > 0
    person_rows = cats[cats["category"] == "person"]
    assert len(person_rows) == len(clusters)          # one row per cluster: the loop runs
    for row in person_rows.itertuples():
        assert row.images == int(person[samples["cluster"] == row.cluster].sum())
    similars = pd.read_csv(folder / "similars.csv")
    k = chain["params_dict"]["analyze"]["similars"]["k"]
    assert k >= 1 and similars["query_image_id"].nunique() >= len(clusters)   # loop runs
    for query, group in similars.groupby("query_image_id"):
        assert group["rank"].tolist() == list(range(1, min(k, N_VAL - 1) + 1))
        assert query not in set(group["image_id"])
        assert group["cosine_distance"].is_monotonic_increasing
    assert set(clusters["medoid_image_id"]) <= set(similars["query_image_id"])
    bins = pd.read_csv(folder / "metadata_loss.csv")
    assert list(bins.columns)[:12] == ["binning", "field", "bin", "low", "high", "count",
                                       "mean_loss", "std_loss", "se_loss", "overall_mean_loss",
                                       "excess_se", "flagged"]
    cfg = chain["params_dict"]["analyze"]["buckets"]
    assert set(bins["binning"]) == set(cfg["binning"])
    assert "brightness" in set(bins["field"])
    for (_binning, field), group in bins.groupby(["binning", "field"]):
        assert group["count"].sum() == N_VAL, field
        assert len(group) <= (2 if field == "is_grayscale" else cfg["n_bins"]), field
        assert (group["low"].to_numpy()[1:] == group["high"].to_numpy()[:-1]).all()
    for field in ("image_id", "loss", "x", "cluster", "latency_ms", "iou_person",
                  "label_quality"):
        assert field not in set(bins["field"])
    assert "count_bus" in samples.columns   # every unclaimed category reaches samples.csv...
    counted = [f for f in set(bins["field"]) if f.startswith("count_")]
    assert len(counted) <= analyze.MAX_COUNT_FIELDS   # ...but only a few are binned
    assert (folder / "metadata" / "brightness.png").is_file()
    issues = pd.read_csv(folder / "label_issues.csv", dtype={"stem": str})
    assert issues["rank"].tolist() == list(range(1, N_VAL + 1))
    assert issues["label_quality"].is_monotonic_increasing
    top = chain["params_dict"]["analyze"]["label_issues"]["top"]
    flagged = issues[issues["flagged"]]
    assert top >= 1 and len(flagged) == min(top, N_VAL)   # the loop below runs
    for row in flagged.itertuples():
        region = read_labels(folder / row.region)
        gt = read_labels(chain["masks"] / "val" / f"{row.stem}.png")
        assert region.shape == gt.shape
        inside = region != IGNORE_INDEX
        assert inside.sum() == row.disagreement_pixels
        assert (region[inside] != gt[inside]).all() and (gt[inside] != IGNORE_INDEX).all()
        assert (folder / row.figure).is_file()
    index = pd.read_csv(folder / "heatmaps" / "index.csv")
    assert set(index["kind"]) == {"shared_features", "gradcam"}
    assert all((folder / f).is_file() for f in index["file"])
    gradcam = index[index["kind"] == "gradcam"]
    assert set(gradcam["class"]) == set(CLASSES)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["clustering"]["k"] == 2 and summary["samples"] == N_VAL


def test_analyze_bins_only_the_frequent_category_counts():
    """masks writes 70+ count_<category> columns; the bins keep the frequent few."""
    n = 40
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"image_id": range(n), "loss": rng.random(n),
                          "brightness": rng.random(n) * 255, "count_never": 0})
    for i in range(15):   # count_c<i> is non-zero in i + 1 samples
        frame[f"count_c{i:02d}"] = [2] * (i + 1) + [0] * (n - i - 1)
    # 2 samples (5%) at least, then the 10 most frequent: c05 (6 samples) .. c14 (15)
    assert analyze.metadata_fields(frame) == ["brightness"] + [
        f"count_c{i:02d}" for i in range(5, 15)]
    assert analyze.MAX_COUNT_FIELDS == 10


def test_analyze_refuses_too_few_or_mismatched_samples(chain, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(chain["pred"], pred)
    table = pd.read_csv(pred / "samples.csv")
    with np.load(pred / "latents.npz") as npz:
        ids, latents = npz["image_ids"], npz["latents"]
    np.savez(pred / "latents.npz", image_ids=ids[::-1], latents=latents)
    with pytest.raises(StageError, match="image ids do not match samples.csv"):
        analyze.run(chain["params_dict"], pred, chain["masks"], chain["model"], chain["raw"],
                    tmp_path / "a")
    table.head(2).to_csv(pred / "samples.csv", index=False)
    np.savez(pred / "latents.npz", image_ids=ids[:2], latents=latents[:2])
    with pytest.raises(StageError, match="2 samples; analysis needs 3"):
        analyze.run(chain["params_dict"], pred, chain["masks"], chain["model"], chain["raw"],
                    tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- data pipeline of train

def test_training_masks_are_resized_nearest_and_flipped_with_the_image(chain):
    samples = list_samples(chain["raw"], chain["masks"], "train")
    assert len(samples) == N_TRAIN
    transform = joint_transform(SIZE, IMAGENET_MEAN, IMAGENET_STD, train=True, hflip=True)
    dataset = SegmentationDataset(samples, transform)
    for index in range(len(samples)):
        original = set(np.unique(read_labels(samples[index].mask_path)).tolist())
        image, mask = dataset[index]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert mask.shape == (SIZE, SIZE) and mask.dtype == torch.int64
        # nearest neighbour only: no value appears that the stored mask did not have
        assert set(mask.unique().tolist()) <= original
    # a left-right asymmetric pair: flips must move image and mask together
    image = tv_tensors.Image(torch.zeros(3, 40, 60, dtype=torch.uint8))
    image[:, :, :20] = 255
    mask = tv_tensors.Mask(torch.zeros(40, 60, dtype=torch.uint8))
    mask[:, :20] = 1
    outcomes = set()
    torch.manual_seed(0)
    for _ in range(20):
        img_t, mask_t = transform(image, mask)
        bright_left = bool(img_t[0, :, :10].mean() > img_t[0, :, -10:].mean())
        label_left = bool(mask_t[:, :10].float().mean() > mask_t[:, -10:].float().mean())
        assert bright_left == label_left
        outcomes.add(bright_left)
    assert outcomes == {True, False}
    plain = joint_transform(SIZE, IMAGENET_MEAN, IMAGENET_STD, train=False, hflip=True)
    assert all(bool(plain(image, mask)[1][:, :10].float().mean() > 0.5) for _ in range(5))


# ---------------------------------------------------------------- determinism

def _train_state(chain, tmp_path, seed: int) -> dict:
    params = json.loads(json.dumps(chain["params_dict"]))
    params["train"].update(image_size=32, batch_size=4)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        train.run(params, SCHEME, chain["raw"], chain["masks"], tmp_path / f"m{seed}",
                  seed=seed)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return torch.load(tmp_path / f"m{seed}" / "model.pt", weights_only=True)["state_dict"]


def test_train_is_deterministic_on_cpu(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _train_state(chain, tmp_path, seed=5)
    (tmp_path / "m5").rename(tmp_path / "first")
    second = _train_state(chain, tmp_path, seed=5)
    other = _train_state(chain, tmp_path, seed=6)
    assert list(first) == list(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not all(torch.equal(first[k], other[k]) for k in first)
    # Byte-identical files too, so DVC sees an unchanged model as unchanged.
    assert (tmp_path / "first" / "model.pt").read_bytes() == \
        (tmp_path / "m5" / "model.pt").read_bytes()


def test_train_at_32px_with_a_last_batch_of_one(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = json.loads(json.dumps(chain["params_dict"]))
    params["train"].update(image_size=32, batch_size=N_TRAIN - 1)
    # 32 px leaves a 1x1 bottleneck, where BatchNorm in train mode cannot take a batch of one:
    # of 8 images in batches of 7, the last batch (of one) is dropped, and only that one.
    assert params["train"]["epochs"] == 1
    forwards: list[tuple[bool, int]] = []
    real_forward = SegNet.forward

    def spy(self, x):
        forwards.append((self.training, x.shape[0]))
        return real_forward(self, x)

    monkeypatch.setattr(SegNet, "forward", spy)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        train.run(params, SCHEME, chain["raw"], chain["masks"], tmp_path / "m",
                  live=tmp_path / "live")
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert (tmp_path / "m" / "model.pt").is_file()
    # one training batch of 7 (the 8th image dropped), then validation of all 6 val images
    assert forwards == [(True, N_TRAIN - 1), (False, N_VAL)]
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["step"] == 0 and math.isfinite(summary["train"]["loss"])


# ---------------------------------------------------------------- bad input

def _argv(stage: str, p: str, root: Path) -> list[str]:
    x = str(root / "x")
    return {
        "download": ["--params", p, "--out", x],
        "masks": ["--params", p, "--scheme", SCHEME, "--raw", x, "--out", x],
        "train": ["--params", p, "--scheme", SCHEME, "--seed", "0", "--raw", x, "--masks", x,
                  "--out", x,
                  "--live", x],
        "infer": ["--params", p, "--model", x, "--raw", x, "--masks", x, "--out", x],
        "evaluate": ["--params", p, "--scheme", SCHEME, "--pred", x, "--gt", x, "--out", x,
                     "--confusion", x],
        "analyze": ["--params", p, "--predictions", x, "--masks", x, "--model", x, "--raw", x,
                    "--out", x],
    }[stage]


MODULES = {"download": download, "masks": masks, "train": train, "infer": infer,
           "evaluate": evaluate, "analyze": analyze}


@pytest.mark.parametrize("stage", list(MODULES))
def test_unknown_params_key_exit_code_2(stage, params, tmp_path, caplog):
    params["train"]["epoch"] = 3
    p = str(_write_params(tmp_path / "params.yaml", params))
    assert MODULES[stage].main(_argv(stage, p, tmp_path)) == 2
    assert ("train.epoch: unknown key (allowed here: device, nproc, image_size, epochs"
            in caplog.text)
    assert str(tmp_path / "params.yaml") in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_missing_cli_flag_is_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--params", str(tmp_path / "p.yaml"), "--scheme", SCHEME])
    assert info.value.code == 2
    assert "--pred" in capsys.readouterr().err


HELP_DESCRIPTIONS = {
    "download": "download: COCO annotations and a reproducible choice of images, from the COCO "
                "server or any folder/URL laid out like it, into one raw-data folder with a "
                "manifest.",
    "masks": "masks: one palette PNG per image (pixel value = class index, 255 = ignore) for "
             "one label scheme, plus a per-image metadata table.",
    "train": "train: fit the MobileNetV2 + pix2pix model on one scheme's train masks; validate "
             "on val every train.val_every epochs and after the last.",
    "infer": "infer: predict the val split with a trained model.",
    "evaluate": "evaluate: one confusion matrix over the whole val set, and every score from "
                "it.",
    "analyze": "analyze: what the model learned and where it fails, for one scheme, as the "
               "study found it: a map of the val samples in the model's latent space, "
               "unsupervised clusters on it, \"fetch similars\", heat-maps of the features a "
               "cluster shares and Grad-CAM, metadata against loss, and a ranking of label "
               "issues.",
}


@pytest.mark.parametrize("stage", list(MODULES))
def test_help_describes_the_stage_in_its_whole_first_sentence(stage, capsys, monkeypatch):
    """--help shows the docstring's first sentence, whole: the docstrings' first lines stop
    mid-sentence ("... as the study found"), which --help used to print as it was. Expected
    texts written out by hand, not taken from the docstrings."""
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as shown:
        MODULES[stage].main(["--help"])
    assert shown.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m stages.{stage} [-h] --params PARAMS")
    assert out.split("\n\n")[1] == HELP_DESCRIPTIONS[stage]


@pytest.mark.parametrize("docstring, sentence", [
    ("a: b c\nd. Then more.", "a: b c d."),
    ("a: loads with torch.load(weights_only=True) here.\nNext.",
     "a: loads with torch.load(weights_only=True) here."),
    ("a: no full stop\n\nsecond paragraph. Here.", "a: no full stop"),
    ("  a: ends the docstring.", "a: ends the docstring."),
])
def test_first_sentence_joins_lines_and_stops_at_the_first_full_stop(docstring, sentence):
    assert first_sentence(docstring) == sentence


@pytest.mark.parametrize("seed", ["-1", "x", "4294967296", "1.0"])
def test_train_refuses_a_seed_that_is_no_seed(tmp_path, capsys, seed):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--params", str(tmp_path / "p.yaml"), "--scheme", SCHEME, "--seed", seed,
                    "--raw", "r", "--masks", "m", "--out", "o", "--live", "l"])
    assert stopped.value.code == 2
    assert f"argument --seed: {seed!r}: expected an integer seed in 0..4294967295" in \
        capsys.readouterr().err


def test_masks_missing_raw_folder(chain, tmp_path, caplog):
    missing = tmp_path / "no_raw"
    code = masks.main(["--params", str(chain["params"]), "--scheme", SCHEME, "--raw",
                       str(missing), "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"{missing}/annotations/instances_train.json: cannot read COCO annotations" \
        in caplog.text
    assert not (tmp_path / "out").exists()


def test_evaluate_missing_folders(chain, tmp_path, caplog):
    p = str(chain["params"])
    missing = tmp_path / "no_gt"
    code = evaluate.main(["--params", p, "--scheme", SCHEME, "--pred", str(chain["pred"].parent),
                          "--gt", str(missing), "--out", str(tmp_path / "m.json"),
                          "--confusion", str(tmp_path / "c.csv")])
    assert code == 2
    assert f"{missing}: no ground-truth masks" in caplog.text
    code = evaluate.main(["--params", p, "--scheme", SCHEME, "--pred", str(tmp_path / "no_pred"),
                          "--gt", str(chain["masks"] / "val"), "--out", str(tmp_path / "m.json"),
                          "--confusion", str(tmp_path / "c.csv")])
    assert code == 2
    assert f"{tmp_path / 'no_pred' / 'seed0' / 'val'}: no predictions of seed 0 (run infer for " \
           "it)" in caplog.text
    assert not (tmp_path / "m.json").exists()


def test_train_missing_raw_folder(chain, tmp_path, caplog):
    missing = tmp_path / "no_raw"
    code = train.main(["--params", str(chain["params"]), "--scheme", SCHEME, "--seed", "0",
                       "--raw",
                       str(missing), "--masks", str(chain["masks"]), "--out", str(tmp_path / "m"),
                       "--live", str(tmp_path / "live")])
    assert code == 2
    assert str(missing) in caplog.text


def test_infer_missing_model_folder(chain, tmp_path, caplog):
    missing = tmp_path / "no_model"
    code = infer.main(["--params", str(chain["params"]), "--model", str(missing), "--raw",
                       str(chain["raw"]), "--masks", str(chain["masks"]), "--out",
                       str(tmp_path / "p")])
    assert code == 2
    assert str(missing) in caplog.text


def test_analyze_missing_predictions_folder(chain, tmp_path, caplog):
    missing = tmp_path / "no_predictions"
    code = analyze.main(["--params", str(chain["params"]), "--predictions", str(missing),
                         "--masks", str(chain["masks"]), "--model", str(chain["model"]),
                         "--raw", str(chain["raw"]), "--out", str(tmp_path / "a")])
    assert code == 2
    assert str(missing) in caplog.text


def test_train_missing_mask_names_the_file(chain, tmp_path, caplog):
    masks_copy = tmp_path / "masks"
    shutil.copytree(chain["masks"], masks_copy)
    victim = sorted((masks_copy / "train").glob("*.png"))[0]
    victim.unlink()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        code = train.main(["--params", str(chain["params"]), "--scheme", SCHEME, "--seed", "0",
                       "--raw",
                           str(chain["raw"]), "--masks", str(masks_copy), "--out",
                           str(tmp_path / "m"), "--live", str(tmp_path / "live")])
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert code == 2
    assert f"{victim}: mask missing for image {victim.stem}.jpg" in caplog.text
    assert not (tmp_path / "m").exists()


def test_outputs_get_the_usual_file_mode_not_the_private_temp_mode(tmp_path):
    from stages.lib.io import atomic_dir, write_json
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
