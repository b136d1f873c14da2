"""A shim until analyze and compare write the issue-17 outputs (branch issue17-analyze): the
report reads `analysis/S/insights.json`, `compare/insights.json`, analyze's `ood_score`
column and train.json's `encoder_pretraining`, which no stage writes yet. This makes them
from a real run's outputs with the cores of stages/lib (representation, segments,
duplicates, insights), and writes each ONLY WHERE ABSENT: the report's tests run on real
files now, and on the stages' own files, untouched, once the stages write them. Delete it
with the wiring.

Called by the report's pipeline fixtures (tests/test_report.py BUILD) after analyze and
compare ran, in the process that ran them (torch already imported).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from stages import analyze, infer
from stages.lib import duplicates, insights, representation, segments
from stages.lib.bootstrap import Settings
from stages.lib.names import seed_dir

def encoder_pretraining(weights: str) -> str:
    """What the encoder's starting weights were trained on, as issue 17 words it."""
    return {"imagenet": "ImageNet-1k", "none": "none (trained from scratch)"}.get(
        weights, f"local file {weights}")


def train_latents(params: dict, root: Path, scheme: str,
                  train_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The train split's pooled latents under the scheme's model: infer run on a view of
    the data whose "val" is the train split (symlinks), so the vectors are infer's own.
    `train_root`: the run whose train split and model these are."""
    view = root / "shim" / scheme
    raw, masks = train_root / "data" / "raw", train_root / "data" / "masks" / scheme
    (view / "raw" / "annotations").mkdir(parents=True, exist_ok=True)
    (view / "raw" / "images").mkdir(exist_ok=True)
    (view / "masks").mkdir(exist_ok=True)
    links = {view / "raw" / "annotations" / "instances_val.json":
             raw / "annotations" / "instances_train.json",
             view / "raw" / "images" / "val": raw / "images" / "train",
             view / "masks" / "val": masks / "train"}
    for link, target in links.items():
        if not link.exists():
            link.symlink_to(target)
    model = train_root / "models" / scheme / seed_dir(params["train"]["seeds"][0])
    infer.run(params, model, view / "raw", view / "masks", view / "out")
    with np.load(view / "out" / "latents.npz") as npz:
        return npz["image_ids"], npz["latents"].astype(np.float64)


def scheme_records(params: dict, root: Path, scheme: str,
                   train_root: Path) -> tuple[list[dict], pd.Series]:
    """The scheme's findings from its real outputs, and each val image's OOD score."""
    cfg = params["analyze"]
    settings = Settings.from_params(cfg["insights"]["bootstrap"])
    folder = root / "analysis" / scheme
    samples = pd.read_csv(folder / "samples.csv", dtype={"file_name": str})
    ids = samples["image_id"].to_numpy()
    loss = samples.set_index("image_id")["loss"]
    with np.load(root / "predictions" / scheme / seed_dir(params["train"]["seeds"][0])
                 / "latents.npz") as npz:
        row = {int(i): r for r, i in enumerate(npz["image_ids"])}
        val = npz["latents"].astype(np.float64)[[row[int(i)] for i in ids]]
    train_ids, train = train_latents(params, root, scheme, train_root)
    rep = cfg["representation"]
    scores = representation.ood_scores(val, train, rep["k"])
    reference = representation.train_reference_scores(train, rep["k"])
    flags = representation.out_of_distribution(scores, reference, rep["quantile"])
    threshold = float(np.quantile(reference[np.isfinite(reference)], rep["quantile"]))
    records = insights.from_out_of_distribution(ids, flags, scores, loss, k=rep["k"],
                                                quantile=rep["quantile"],
                                                threshold=threshold, settings=settings)
    table = representation.cluster_findings(
        val, train, samples["cluster"].to_numpy(), samples["loss"].to_numpy(), ids,
        min_count=rep["min_count"], fdr=rep["fdr"], share_ratio=rep["share_ratio"],
        settings=settings)
    records += insights.from_clusters(table, settings.confidence)
    found = segments.weak_segments(samples[analyze.metadata_fields(samples)],
                                   samples["loss"].to_numpy(), ids, **cfg["segments"],
                                   seed=cfg["seed"], settings=settings)
    records += insights.from_segments(found, settings.confidence)
    records += insights.from_duplicates(duplicate_pairs(params, root, ids, val, train_ids,
                                                        train), loss, settings)
    records += insights.from_label_issues(pd.read_csv(folder / "label_issues.csv",
                                                      dtype={"stem": str}), settings)
    return records, pd.Series(scores, index=ids)


def duplicate_pairs(params: dict, root: Path, val_ids, val, train_ids, train) -> pd.DataFrame:
    cfg = params["analyze"]["duplicates"]
    raw = root / "data" / "raw"
    rows = []
    for split in ("train", "val"):
        listed = json.loads((raw / "annotations" / f"instances_{split}.json").read_text())
        for image in listed["images"]:
            rows.append({"image_id": image["id"], "split": split, **duplicates.fingerprint(
                raw / "images" / split / image["file_name"], cfg["hash_size"])})
    images = pd.DataFrame(rows)
    vectors = {("val", int(i)): v for i, v in zip(val_ids, val)}
    vectors.update({("train", int(i)): v for i, v in zip(train_ids, train)})
    stacked = np.stack([vectors[(s, int(i))] for s, i in zip(images["split"], images["image_id"])])
    return duplicates.find_pairs(images, cfg["hash_size"], cfg["hash_radius"], stacked,
                                 cfg["latent_radius"])


def write_if_absent(params: dict, root: Path, train_root: Path | None = None) -> None:
    """Each missing file, column or key made and written; whatever exists is left as is.
    `train_root`: where the train split's masks are, when not under root (the benchmark's
    replicated val sets keep them in the run they came from)."""
    per_scheme = {}
    for scheme in params["schemes"]:
        folder = root / "analysis" / scheme
        samples_path = folder / "samples.csv"
        samples = pd.read_csv(samples_path, dtype={"file_name": str})
        path = folder / "insights.json"
        if path.exists() and "ood_score" in samples.columns:
            per_scheme[scheme] = json.loads(path.read_text())
        else:
            records, scores = scheme_records(params, root, scheme, train_root or root)
            if not path.exists():
                path.write_text(insights.to_json(records))
            per_scheme[scheme] = json.loads(path.read_text())
            if "ood_score" not in samples.columns:
                samples["ood_score"] = samples["image_id"].map(scores)
                samples.to_csv(samples_path, index=False)
        for seed in params["train"]["seeds"]:
            train_json = root / "models" / scheme / seed_dir(seed) / "train.json"
            facts = json.loads(train_json.read_text())
            if "encoder_pretraining" not in facts:
                facts["encoder_pretraining"] = encoder_pretraining(
                    params["model"]["encoder_weights"])
                train_json.write_text(json.dumps(facts, indent=2) + "\n")
    changes = root / "compare" / "insights.json"
    if not changes.exists():
        min_jaccard = params["analyze"]["insights"]["min_jaccard"]
        changes.write_text(insights.to_json(insights.scheme_changes(per_scheme, min_jaccard)))
