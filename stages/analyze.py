"""analyze: what the model learned and where it fails, for one scheme, as the study found
it: a map of the val samples in the model's latent space, unsupervised clusters on it,
"fetch similars", heat-maps of the features a cluster shares and Grad-CAM, metadata
against loss, and a ranking of label issues. Writes under --out:
  samples.csv            per sample: infer's scores, masks' metadata, x, y, cluster,
                         label_quality and its rank
  clusters.csv           per cluster: size, mean loss / pixel accuracy / IoU per class,
                         grayscale share, dominant categories, medoid, representatives
  cluster_categories.csv per cluster and category: share of its images showing it, share
                         over all samples, lift
  similars.csv           per query (cluster medoids, highest-loss samples, listed ids): its
                         k nearest neighbours by cosine distance in the latent space
  neighbours.csv         per sample: its k nearest neighbours (the same measure; similars
                         are the queries' rows of it)
  metadata_loss.csv      per binning, metadata field and bin: range, count, loss mean / std /
                         standard error, mean IoU per class, excess in standard errors, flag,
                         the field's figure (path, or empty)
  bin_members.csv        per sample, binning and field: the sample's bin (-1: no value)
  metadata_flagged.csv   the samples of every flagged bin, worst loss first
  metadata/{field}.png   mean loss per bin (each binning), flagged bins marked: fields with
                         a flagged bin, the class fractions, grayscale and brightness (the
                         field's name made safe: a category's count field comes from data)
  label_issues.csv       every sample ranked by cleanlab's label-quality score (worst first);
                         for the flagged top: the size and kind of the disagreement region
  label_issues/{stem}.png         image | ground truth | prediction | disagreement
  label_issues/{stem}.region.png  palette PNG: the confidently predicted class where it
                                  disagrees with the label, 255 elsewhere
  heatmaps/index.csv     one row per heat-map PNG (kind, cluster, sample, class, layer)
  heatmaps/shared_features.csv    per cluster: the layer's channels whose mean activation
                                  most exceeds the data set's (in standard deviations)
  heatmaps/*.png         shared-feature overlays on each cluster's representatives, and
                         Grad-CAM per class on the chosen samples
  summary.json           choices made (k and its silhouette scores, thresholds, counts)
  insights.json          every finding, ranked (issue 17): low-performance and
                         under-represented clusters, out-of-distribution images, duplicates
                         and leaks, weak segments, label issues
  duplicates.csv         pairs of images (both splits) with the same bytes or pixels, or
                         near by perceptual hash or latent cosine distance
  leak_free_metrics.json the val scores without the val images that have a train twin
                         (only when there are any)
The train split enters through infer's latents_train.npz (each cluster's train share, each
val image's out-of-distribution score, in samples.csv and clusters.csv) and through the
images and annotations of data/raw (fingerprints for the duplicates).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import DataLoader, Subset

from stages.lib import (bootstrap, buckets, duplicates, embeddings, explain, findings,
                        insights, representation, segments)
from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.data import InferenceDataset, collate_inference, list_samples, read_image
from stages.lib.io import atomic_dir, atomic_path, write_csv, write_json
from stages.lib.labels import IGNORE_INDEX, colourise, save_labels
from stages.lib.model import load_trained, resolve_device
from stages.lib.names import FileNames, check_plain_name, inside, safe_filename
from stages.lib.params import load_params, select
from stages.lib.plots import (fit_width, heat_overlay, mask_overlay, png_bytes, save_image,
                              side_by_side, write_png)
from stages.lib.tables import read_table

log = logging.getLogger("analyze")

# Identifiers and bookkeeping columns that are not properties of the image.
NOT_METADATA = {"image_id", "file_name", "split", "stem"}
# Columns analyze itself adds, and infer's scores: never metadata either.
NOT_FIELDS = {"loss", "pixel_accuracy", "confidence", "miou", "latency_ms", "x", "y",
              "cluster", "label_quality", "label_quality_rank", "ood_score"}
# masks writes one count_<category> column per COCO category its scheme leaves unclaimed
# (70+). Binning them all would bury the other fields; only categories seen in enough
# samples to fill bins are kept, the most frequent first.
COUNT_PREFIX = "count_"
INSTANCES_SUFFIX = "_instances"
MIN_COUNT_SHARE = 0.05
MAX_COUNT_FIELDS = 10
DOMINANT_SHARE = 0.25      # a category is "dominant" in a cluster from this share of its images
N_DOMINANT = 3


# ---------------------------------------------------------------- pure core: inputs

def merge_inputs(samples: pd.DataFrame, ids: np.ndarray, metadata: pd.DataFrame,
                 source: str) -> pd.DataFrame:
    if not np.array_equal(ids, samples["image_id"].to_numpy()):
        raise StageError(f"{source}: image ids do not match samples.csv")
    val = metadata[metadata["split"] == "val"] if "split" in metadata else metadata
    merged = samples.merge(val, on="image_id", how="left", validate="one_to_one")
    return merged


def metadata_fields(samples: pd.DataFrame) -> list[str]:
    """Numeric (or boolean) metadata columns that vary across samples, with at most
    MAX_COUNT_FIELDS of the per-category counts, in column order."""
    fields = []
    for col in samples.columns:
        if col in NOT_METADATA or col in NOT_FIELDS or col.startswith("iou_"):
            continue
        values = samples[col]
        if (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)) \
                and values.nunique(dropna=True) > 1:
            fields.append(col)
    counts = frequent_counts(samples, [f for f in fields if f.startswith(COUNT_PREFIX)])
    return [f for f in fields if not f.startswith(COUNT_PREFIX) or f in counts]


def frequent_counts(samples: pd.DataFrame, columns: list[str]) -> set[str]:
    """The count columns whose category shows in at least MIN_COUNT_SHARE of the samples
    (and two of them), at most MAX_COUNT_FIELDS, most frequent first (ties by name)."""
    share = {c: float((samples[c] > 0).mean()) for c in columns}
    frequent = [c for c in columns
                if share[c] >= MIN_COUNT_SHARE and (samples[c] > 0).sum() >= 2]
    return set(sorted(frequent, key=lambda c: (-share[c], c))[:MAX_COUNT_FIELDS])


def category_presence(samples: pd.DataFrame) -> pd.DataFrame:
    """One boolean column per category an image may show, read by prefix/suffix so that
    masks may add or drop columns: `<class>_instances` (the scheme's own classes) and
    `count_<category>` (COCO categories the scheme leaves unclaimed)."""
    columns = {}
    for col in samples.columns:
        if col.startswith(COUNT_PREFIX):
            name = col.removeprefix(COUNT_PREFIX).replace("_", " ")
        elif col.endswith(INSTANCES_SUFFIX):
            name = col.removesuffix(INSTANCES_SUFFIX)
        else:
            continue
        values = pd.to_numeric(samples[col], errors="coerce").fillna(0)
        columns[name] = values.to_numpy() > 0
    return pd.DataFrame(columns, index=samples.index)


# ---------------------------------------------------------------- pure core: clusters

def cluster_samples(reduced: np.ndarray, cfg: dict, seed: int) -> tuple[np.ndarray, dict]:
    method = cfg["method"]
    if method == "kmeans":
        labels, scores = embeddings.kmeans_by_silhouette(reduced, cfg["k_min"], cfg["k_max"],
                                                         seed)
        return labels, {"method": method, "k": int(len(np.unique(labels))),
                        "silhouette_by_k": {str(k): v for k, v in scores.items()}}
    labels = embeddings.hdbscan_labels(reduced, cfg["min_cluster_size"])
    return labels, {"method": method, "k": int(len(set(labels) - {embeddings.NOISE})),
                    "noise": int((labels == embeddings.NOISE).sum()),
                    "min_cluster_size": cfg["min_cluster_size"]}


def category_table(clusters: np.ndarray, presence: pd.DataFrame) -> pd.DataFrame:
    """Per cluster and category shown anywhere: share in the cluster, overall, lift."""
    overall = presence.mean()
    rows = []
    for c in sorted(np.unique(clusters)):
        members = presence[clusters == c]
        for name in presence.columns:
            if overall[name] == 0:
                continue
            share = float(members[name].mean())
            rows.append({"cluster": int(c), "category": name,
                         "images": int(members[name].sum()), "share": share,
                         "share_overall": float(overall[name]),
                         "lift": share / float(overall[name])})
    return pd.DataFrame(rows, columns=["cluster", "category", "images", "share",
                                       "share_overall", "lift"])


def dominant_categories(table: pd.DataFrame, cluster: int) -> str:
    """'bus 60% (3.1x); ...': the categories in at least DOMINANT_SHARE of the cluster's
    images, most over-represented first; else the most frequent one."""
    rows = table[table["cluster"] == cluster]
    strong = rows[rows["share"] >= DOMINANT_SHARE].sort_values(["lift", "share", "category"],
                                                               ascending=[False, False, True])
    picked = strong.head(N_DOMINANT) if len(strong) else rows.sort_values(
        ["share", "category"], ascending=[False, True]).head(1)
    picked = picked[picked["share"] > 0]
    return "; ".join(f"{r.category} {r.share:.0%} ({r.lift:.1f}x)" for r in picked.itertuples())


def cluster_table(samples: pd.DataFrame, categories: pd.DataFrame,
                  members: dict[int, list[int]]) -> pd.DataFrame:
    """One row per cluster; `members` maps a cluster to its representatives (row indices,
    the medoid first; empty for HDBSCAN's noise)."""
    iou_cols = [c for c in samples.columns if c.startswith("iou_")]
    grouped = samples.groupby("cluster")
    gray = (samples["is_grayscale"].astype(float) if "is_grayscale" in samples
            else pd.Series(np.nan, index=samples.index))
    table = pd.DataFrame({"size": grouped.size(), "mean_loss": grouped["loss"].mean(),
                          "mean_pixel_accuracy": grouped["pixel_accuracy"].mean(),
                          "grayscale_share": gray.groupby(samples["cluster"]).mean()})
    for col in iou_cols:
        table[f"mean_{col}"] = grouped[col].mean()
    table = table.reset_index()
    table["dominant_categories"] = [dominant_categories(categories, c) for c in table["cluster"]]
    reps = [members.get(int(c), []) for c in table["cluster"]]
    table["medoid_image_id"] = [int(samples.loc[r[0], "image_id"]) if r else -1 for r in reps]
    table["representative_image_ids"] = [
        " ".join(str(int(samples.loc[i, "image_id"])) for i in r) for r in reps]
    return table


# ---------------------------------------------------------------- pure core: similars

def similar_queries(samples: pd.DataFrame, medoids: dict[int, int], top_loss: int,
                    listed: list[int]) -> list[tuple[int, str]]:
    """(row index, reason) of every sample to fetch similars for, each once."""
    queries: dict[int, str] = {}
    for c, row in sorted(medoids.items()):
        queries.setdefault(row, f"medoid of cluster {c}")
    worst = samples["loss"].fillna(-np.inf).sort_values(ascending=False, kind="stable")
    for rank, row in enumerate(worst.index[:top_loss], start=1):
        queries.setdefault(int(row), f"loss rank {rank}")
    position = {int(v): i for i, v in enumerate(samples["image_id"])}
    for image_id in listed:
        if image_id not in position:
            raise StageError(f"analyze.similars.image_ids: image {image_id} is not in the val "
                             "samples")
        queries.setdefault(position[image_id], "listed in params")
    return list(queries.items())


NEIGHBOUR_COLUMNS = ["image_id", "rank", "neighbour_image_id", "cosine_distance"]


def neighbours_table(samples: pd.DataFrame,
                     neighbours: list[list[tuple[int, float]]]) -> pd.DataFrame:
    """Every sample's nearest neighbours (neighbours[i]: (row, cosine distance) of sample
    row i's, nearest first, itself left out), one row each, rank 1 the nearest."""
    ids = samples["image_id"].astype(int).to_numpy()
    rows = [(ids[query], rank, ids[row], distance)
            for query, found in enumerate(neighbours)
            for rank, (row, distance) in enumerate(found, start=1)]
    return pd.DataFrame(rows, columns=NEIGHBOUR_COLUMNS)


def similars_table(samples: pd.DataFrame, queries: list[tuple[int, str]],
                   neighbours: list[list[tuple[int, float]]]) -> pd.DataFrame:
    rows = []
    for (query, reason), found in zip(queries, neighbours):
        for rank, (row, distance) in enumerate(found, start=1):
            rows.append({"query_image_id": int(samples.loc[query, "image_id"]),
                         "query_reason": reason,
                         "query_cluster": int(samples.loc[query, "cluster"]),
                         "query_loss": samples.loc[query, "loss"], "rank": rank,
                         "image_id": int(samples.loc[row, "image_id"]),
                         "cosine_distance": distance,
                         "cluster": int(samples.loc[row, "cluster"]),
                         "loss": samples.loc[row, "loss"]})
    return pd.DataFrame(rows, columns=["query_image_id", "query_reason", "query_cluster",
                                       "query_loss", "rank", "image_id", "cosine_distance",
                                       "cluster", "loss"])


# ---------------------------------------------------------------- pure core: shared features

def shared_features(latents: np.ndarray, start: int, stop: int, clusters: np.ndarray,
                    n_channels: int) -> pd.DataFrame:
    """Per cluster (noise left out), the channels of one layer (columns start:stop of the
    pooled latents) whose mean pooled activation in the cluster exceeds the data set's
    mean by the most data-set standard deviations."""
    layer = latents[:, start:stop].astype(np.float64)
    mean, std = layer.mean(0), layer.std(0)
    rows = []
    for c in sorted(set(np.unique(clusters)) - {embeddings.NOISE}):
        in_cluster = layer[clusters == c].mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(std > 0, (in_cluster - mean) / np.where(std > 0, std, 1), -np.inf)
        for rank, channel in enumerate(np.argsort(-z, kind="stable")[:n_channels], start=1):
            if not np.isfinite(z[channel]):
                break
            rows.append({"cluster": int(c), "rank": rank, "channel": int(channel),
                         "cluster_mean": float(in_cluster[channel]),
                         "dataset_mean": float(mean[channel]),
                         "dataset_std": float(std[channel]), "z": float(z[channel])})
    return pd.DataFrame(rows, columns=["cluster", "rank", "channel", "cluster_mean",
                                       "dataset_mean", "dataset_std", "z"])


# ---------------------------------------------------------------- pure core: both splits

SHARE_COLUMNS = ["train_images", "train_share", "val_share"]


def with_shares(clusters: pd.DataFrame, represented: pd.DataFrame) -> pd.DataFrame:
    """clusters.csv's rows with each cluster's train images and share and its val share
    (representation.cluster_findings' columns; empty for HDBSCAN's noise, no cluster)."""
    shares = represented[["cluster", *SHARE_COLUMNS]].astype({"train_images": "Int64"})
    return clusters.merge(shares, on="cluster", how="left", validate="one_to_one")


def out_of_distribution(val: np.ndarray, train: np.ndarray, image_ids: np.ndarray,
                        cfg: dict) -> dict:
    """Each val image's score (mean cosine distance to its k nearest train images), the
    threshold (cfg quantile of the train images' own leave-one-out scores) and the flags."""
    scores = representation.ood_scores(val, train, cfg["k"])
    threshold = representation.ood_threshold(
        representation.train_reference_scores(train, cfg["k"]), cfg["quantile"])
    return {"image_ids": np.asarray(image_ids), "scores": scores, "flags": scores > threshold,
            "k": cfg["k"], "quantile": cfg["quantile"], "threshold": threshold}


def weak_segments(samples: pd.DataFrame, cfg: dict, seed: int,
                  settings: bootstrap.Settings) -> list:
    """segments.weak_segments over the metadata fields the buckets bin."""
    return segments.weak_segments(
        samples[metadata_fields(samples)], samples["loss"].to_numpy(float),
        samples["image_id"].to_numpy(), max_depth=cfg["max_depth"],
        min_samples_leaf=cfg["min_samples_leaf"], min_count=cfg["min_count"], fdr=cfg["fdr"],
        seed=seed, settings=settings)


def duplicate_pairs(raw: Path, val_ids: np.ndarray, train_ids: np.ndarray,
                    vectors: np.ndarray, cfg: dict, threads: int) -> pd.DataFrame:
    """duplicates.find_pairs among the val images (rows of `vectors` first) and the train
    images (then), both as download listed them."""
    images = pd.concat([findings.split_images(raw, "val", val_ids),
                        findings.split_images(raw, "train", train_ids)], ignore_index=True)
    printed = findings.fingerprints(images, cfg["hash_size"], threads)
    return duplicates.find_pairs(printed, cfg["hash_size"], cfg["hash_radius"], vectors,
                                 cfg["latent_radius"])


# ---------------------------------------------------------------- pure core: metadata

BIN_MEMBER_COLUMNS = ["image_id", "binning", "field", "bin"]


def bucket_assignments(samples: pd.DataFrame,
                       cfg: dict) -> list[tuple[str, str, pd.DataFrame, np.ndarray]]:
    """(binning, field, its bins' table, each sample's bin) for every field under every
    binning: the one place the bins are made, so that the counts of metadata_loss.csv and
    the members of bin_members.csv cannot disagree."""
    return [(binning, field, *buckets.bucket_table(samples, field, cfg["n_bins"], binning,
                                                   cfg["min_count"]))
            for binning in cfg["binning"] for field in metadata_fields(samples)]


def bin_members(samples: pd.DataFrame,
                assigned: list[tuple[str, str, pd.DataFrame, np.ndarray]]) -> pd.DataFrame:
    """One row per sample, binning and field: the sample's bin (-1: its value is missing)."""
    ids = samples["image_id"].astype(int).to_numpy()
    parts = [pd.DataFrame({"image_id": ids, "binning": binning, "field": field,
                           "bin": np.asarray(index, dtype=int)})
             for binning, field, _, index in assigned]
    return (pd.concat(parts, ignore_index=True) if parts
            else pd.DataFrame(columns=BIN_MEMBER_COLUMNS))


def metadata_buckets(samples: pd.DataFrame, cfg: dict,
                     assigned: list | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All bins of every field under every binning, flagged by their q-value over all of
    them (buckets.flag_by_fdr), and the samples of flagged bins (`assigned`:
    bucket_assignments(samples, cfg) when already made)."""
    if assigned is None:
        assigned = bucket_assignments(samples, cfg)
    columns = ["binning", "field", "bin", "low", "high", "rank", "image_id", "file_name", "loss"]
    if not assigned:
        return pd.DataFrame(), pd.DataFrame(columns=columns)
    bins = pd.concat([table for *_, table, _ in assigned], ignore_index=True)
    q_value, flagged = buckets.flag_by_fdr(bins["p_value"], cfg["fdr"])
    # `flagged` where it always stood (after excess_se), the test's p- and q-values beside it
    at = bins.columns.get_loc("p_value")
    bins.insert(at, "flagged", flagged)
    bins.insert(at + 2, "q_value", q_value)
    members_of = {(binning, field): index for binning, field, _, index in assigned}
    flagged = []
    for row in bins[bins["flagged"]].itertuples():
        index = members_of[(row.binning, row.field)]
        members = samples[index == row.bin].sort_values("loss", ascending=False, kind="stable")
        flagged.append(pd.DataFrame({
            "binning": row.binning, "field": row.field, "bin": row.bin, "low": row.low,
            "high": row.high, "rank": np.arange(1, len(members) + 1),
            "image_id": members["image_id"].to_numpy(),
            "file_name": members.get("file_name", pd.Series("", members.index)).to_numpy(),
            "loss": members["loss"].to_numpy()}))
    listed = pd.concat(flagged, ignore_index=True) if flagged else pd.DataFrame(columns=columns)
    return bins, listed


def plotted_fields(bins: pd.DataFrame, class_names: list[str]) -> list[str]:
    """Fields drawn as PNG: every field with a flagged bin, and always the scheme's class
    fractions, grayscale and brightness (where the study's findings were); the numbers of
    every field are in metadata_loss.csv."""
    if bins.empty:
        return []
    always = {f"{c}_fraction" for c in class_names} | {"is_grayscale", "brightness"}
    flagged = set(bins.loc[bins["flagged"], "field"])
    return [f for f in dict.fromkeys(bins["field"]) if f in always or f in flagged]


def metadata_figure(field: str, bins: pd.DataFrame) -> bytes:
    """Mean loss (± standard error) per bin, one panel per binning; flagged bins hatched."""
    binnings = list(dict.fromkeys(bins["binning"]))
    fig = Figure(figsize=(3.4 * len(binnings) + 0.4, 2.7))
    axes = np.atleast_1d(fig.subplots(1, len(binnings), sharey=True))
    for ax, binning in zip(axes, binnings):
        part = bins[bins["binning"] == binning].sort_values("bin")
        x = np.arange(len(part))
        colours = ["#fde725" if f else "#21918c" for f in part["flagged"]]
        bars = ax.bar(x, part["mean_loss"].fillna(0), yerr=part["se_loss"].fillna(0),
                      color=colours, edgecolor="#333333", linewidth=0.6, capsize=2)
        for bar, flag in zip(bars, part["flagged"]):
            if flag:
                bar.set_hatch("//")
        for xi, h, n in zip(x, part["mean_loss"].fillna(0), part["count"]):
            ax.text(xi, h, f"n={int(n)}", ha="center", va="bottom", fontsize=7)
        ax.axhline(part["overall_mean_loss"].iloc[0], color="#444444", linestyle="--",
                   linewidth=1)
        ax.set_xticks(x, [f"{lo:.3g}–{hi:.3g}" for lo, hi in zip(part["low"], part["high"])],
                      rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{field} ({binning.replace('_', ' ')})", fontsize=9)
        ax.margins(y=0.15)
    axes[0].set_ylabel("mean loss ± s.e.")
    return png_bytes(fig)


# ---------------------------------------------------------------- pure core: label issues

def main_disagreement(labels: np.ndarray, probs: np.ndarray, region: np.ndarray,
                      class_names: list[str]) -> str:
    """The most common (label -> prediction) pair inside the region, in words."""
    if not region.any():
        return ""
    pred = probs.argmax(0)[region]
    pairs = labels[region].astype(np.int64) * len(class_names) + pred
    top = int(np.bincount(pairs).argmax())
    label, predicted = divmod(top, len(class_names))
    return f"labelled {class_names[label]}, model says {class_names[predicted]}"


def issue_figure(rgb: np.ndarray, labels: np.ndarray, probs: np.ndarray, region: np.ndarray,
                 width: int) -> Image.Image:
    """Image | ground truth | prediction | disagreement region over the image."""
    pred = probs.argmax(0).astype(np.uint8)
    panels = [Image.fromarray(rgb), Image.fromarray(colourise(labels)),
              Image.fromarray(colourise(pred)), Image.fromarray(mask_overlay(rgb, region))]
    return side_by_side([np.asarray(fit_width(p, width, nearest=i in (1, 2)))
                         for i, p in enumerate(panels)])


# ---------------------------------------------------------------- run

class ModelView:
    """The trained model and the val images in the order of samples.csv."""

    def __init__(self, model_dir: Path, raw: Path, masks: Path, image_ids: list[int],
                 device: str, batch_size: int):
        self.device = resolve_device(device)
        self.model, meta = load_trained(model_dir / "model.pt", self.device)
        self.class_names = list(meta["class_names"])
        listed = list_samples(raw, masks, "val")
        by_id = {s.image_id: s for s in listed}
        missing = [i for i in image_ids if i not in by_id]
        if missing:
            raise StageError(f"{raw}: val images {missing[:5]} of samples.csv are missing")
        self.samples = [by_id[i] for i in image_ids]
        self.dataset = InferenceDataset(self.samples, meta["image_size"], meta["mean"],
                                        meta["std"])
        self.batch_size = batch_size

    def batches(self, rows: list[int] | None = None):
        """Batches of the whole split, or of some rows; every item keeps its row in the
        whole split as its index (InferenceDataset returns the index it was asked for)."""
        data = self.dataset if rows is None else Subset(self.dataset, rows)
        return DataLoader(data, batch_size=self.batch_size, collate_fn=collate_inference)

    def image(self, row: int) -> torch.Tensor:
        return self.dataset[row]["image"][None].to(self.device)

    def rgb(self, row: int, width: int) -> np.ndarray:
        photo = read_image(self.samples[row].image_path).permute(1, 2, 0).numpy()
        return np.asarray(fit_width(Image.fromarray(photo), width))


def label_issues(view: ModelView, samples: pd.DataFrame, top: int, width: int,
                 folder: Path) -> tuple[pd.DataFrame, dict]:
    """Pass 1 (all images, streamed): cleanlab's score per image and the per-class
    confident-learning thresholds. Pass 2 (the `top` worst only): their disagreement
    regions, figures and region PNGs."""
    k = len(view.class_names)
    thresholds = explain.ClassThresholds(k)
    scores = np.full(len(samples), np.nan)
    for item in explain.stream_probs(view.model, view.batches(), view.device):
        scores[item.index] = explain.label_quality(item.probs, item.labels)
        thresholds.update(item.probs, item.labels)
    t = thresholds.values()
    order = np.argsort(np.where(np.isnan(scores), np.inf, scores), kind="stable")
    table = pd.DataFrame({"rank": np.arange(1, len(samples) + 1),
                          "image_id": samples["image_id"].to_numpy()[order],
                          "stem": [view.samples[i].stem for i in order],
                          "label_quality": scores[order],
                          "loss": samples["loss"].to_numpy()[order]})
    table["flagged"] = (table["rank"] <= top) & table["label_quality"].notna()
    extra = {c: [np.nan] * len(table) for c in ("disagreement_pixels", "disagreement_fraction")}
    extra["main_disagreement"] = [""] * len(table)
    extra["figure"] = [""] * len(table)
    extra["region"] = [""] * len(table)
    flagged_rows = [int(order[i]) for i in range(len(order)) if table["flagged"].iloc[i]]
    position = {int(r): i for i, r in enumerate(order)}
    folder.mkdir(parents=True, exist_ok=True)
    names = FileNames(f"{folder.name}/")
    for item in explain.stream_probs(view.model, view.batches(flagged_rows), view.device):
        row = item.index
        region = explain.disagreement(item.probs, item.labels, t)
        stem = view.samples[row].stem
        image = f"image {view.samples[row].image_id}"
        figure_name = names.claim(check_plain_name(f"{stem}.png", image), image)
        region_name = names.claim(f"{stem}.region.png", image)
        i = position[row]
        labelled = int((item.labels != IGNORE_INDEX).sum())
        extra["disagreement_pixels"][i] = int(region.sum())
        extra["disagreement_fraction"][i] = region.sum() / labelled if labelled else np.nan
        extra["main_disagreement"][i] = main_disagreement(item.labels, item.probs, region,
                                                          view.class_names)
        rgb = read_image(view.samples[row].image_path).permute(1, 2, 0).numpy()
        save_image(inside(folder, figure_name),
                   issue_figure(rgb, item.labels, item.probs, region, width))
        save_labels(inside(folder, region_name),
                    np.where(region, item.probs.argmax(0), IGNORE_INDEX).astype(np.uint8))
        extra["figure"][i] = f"{folder.name}/{figure_name}"
        extra["region"][i] = f"{folder.name}/{region_name}"
    for key, values in extra.items():
        table[key] = values
    return table, {"thresholds": dict(zip(view.class_names, t.tolist())),
                   "method": "cleanlab.segmentation.rank.get_label_quality_scores (softmin), "
                             "labelled pixels only",
                   "flagged": int(table["flagged"].sum())}


def heatmaps(view: ModelView, samples: pd.DataFrame, features: pd.DataFrame,
             members: dict[int, list[int]], queries: list[tuple[int, str]], cfg: dict,
             width: int, folder: Path) -> pd.DataFrame:
    """Shared-feature overlays on each cluster's representatives, Grad-CAM per class on
    every similars query; returns the index rows."""
    folder.mkdir(parents=True, exist_ok=True)
    names = FileNames(f"{folder.name}/")
    rows = []
    for cluster, reps in sorted(members.items()):
        channels = features.loc[features["cluster"] == cluster, "channel"].astype(int).tolist()
        if not channels:
            continue
        for row in reps:
            rgb = view.rgb(row, width)
            raw_heat = explain.channel_maps(view.model, cfg["layer"], view.image(row), channels)
            heat = explain.normalise(explain.upsample(raw_heat, rgb.shape[:2]))
            stem = view.samples[row].stem
            name = safe_filename(f"cluster{cluster}_{stem}", ".png", names,
                                 f"cluster {cluster}'s image {view.samples[row].image_id}")
            save_image(inside(folder, name), Image.fromarray(heat_overlay(rgb, heat)))
            rows.append({"file": f"heatmaps/{name}", "kind": "shared_features",
                         "cluster": cluster, "image_id": int(samples.loc[row, "image_id"]),
                         "stem": stem, "class": "", "layer": cfg["layer"],
                         "channels": " ".join(map(str, channels)), "target": "",
                         "peak": float(raw_heat.max()),
                         "reason": "representative of its cluster"})
    module = explain.layer_module(view.model, cfg["gradcam_layer"])
    classes = list(range(len(view.class_names)))
    for row, reason in queries:
        rgb = view.rgb(row, width)
        cams = explain.grad_cam(view.model, module, view.image(row), classes)
        stem = view.samples[row].stem
        for c, (cam, target) in cams.items():
            heat = explain.normalise(explain.upsample(cam, rgb.shape[:2]))
            name = safe_filename(f"gradcam_{stem}_{view.class_names[c]}", ".png", names,
                                 f"Grad-CAM of class {view.class_names[c]!r} on image "
                                 f"{view.samples[row].image_id}")
            save_image(inside(folder, name), Image.fromarray(heat_overlay(rgb, heat)))
            rows.append({"file": f"heatmaps/{name}", "kind": "gradcam",
                         "cluster": int(samples.loc[row, "cluster"]),
                         "image_id": int(samples.loc[row, "image_id"]), "stem": stem,
                         "class": view.class_names[c], "layer": cfg["gradcam_layer"],
                         "channels": "", "target": target, "peak": float(cam.max()),
                         "reason": reason})
    # peak: the map's maximum before scaling to [0, 1]; 0 means an empty map (drawn flat).
    return pd.DataFrame(rows, columns=["file", "kind", "cluster", "image_id", "stem", "class",
                                       "layer", "channels", "target", "peak", "reason"])


def metadata_figures(bins: pd.DataFrame, class_names: list[str], folder: Path) -> pd.DataFrame:
    """Draws plotted_fields' figures into `folder`, each named after its field made safe (a
    field may be a category's count column, whose name comes from the annotations), and
    returns the bins with `figure`, the path of their field's figure ("" when not drawn):
    readers find a figure through it, never by rebuilding its name."""
    folder.mkdir()
    names = FileNames(f"{folder.name}/")
    figures = {}
    for field in plotted_fields(bins, class_names):
        name = safe_filename(field, ".png", names, f"field {field!r}")
        write_png(inside(folder, name), metadata_figure(field, bins[bins["field"] == field]))
        figures[field] = f"{folder.name}/{name}"
    return bins.assign(figure=bins["field"].map(figures).fillna("")) if len(bins) else bins


def read_inputs(predictions: Path, masks: Path) -> tuple[pd.DataFrame, np.ndarray, dict]:
    if not (predictions / "latents.npz").is_file():
        raise StageError(f"{predictions / 'latents.npz'}: missing (run the infer stage first)")
    samples = read_table(predictions / "samples.csv", ["image_id", "loss"], "infer",
                         dtype={"stem": str})
    with np.load(predictions / "latents.npz") as npz:
        ids, latents = npz["image_ids"], npz["latents"]
        layout = {str(n): (int(a), int(b)) for n, (a, b) in
                  zip(npz["layer_names"], npz["layer_slices"])} if "layer_names" in npz else {}
    if not np.array_equal(ids, samples["image_id"].to_numpy()):
        raise StageError(f"{predictions / 'latents.npz'}: image ids do not match samples.csv")
    if len(samples) < 3:
        raise StageError(
            f"{predictions / 'samples.csv'}: {len(samples)} samples; analysis needs 3+")
    metadata = read_table(masks / "metadata.csv", ["image_id"], "masks")
    merged = merge_inputs(samples, ids, metadata, str(predictions / "latents.npz"))
    return merged, latents, layout


# The params this stage reads: run() sees only these (stages.lib.params.select), and dvc.yaml's
# and the rule's `params:` list the same keys. Reads its own section; the model's settings come
# from models/<scheme>.
PARAMS = ("analyze",)


def run(params: dict, predictions: Path, masks: Path, model_dir: Path, raw: Path,
        out: Path) -> pd.DataFrame:
    params = select(params, PARAMS)
    cfg = params["analyze"]
    seed = cfg["seed"]
    samples, latents, layout = read_inputs(predictions, masks)
    train_ids, train_latents = findings.read_train_latents(predictions / "latents_train.npz",
                                                           latents.shape[1])
    for layer in (cfg["heatmaps"]["layer"], cfg["heatmaps"]["gradcam_layer"]):
        if layer not in layout:
            raise StageError(f"analyze.heatmaps: layer {layer!r} is not in "
                             f"{predictions / 'latents.npz'} (has {', '.join(layout)})")
    view = ModelView(model_dir, raw, masks, samples["image_id"].astype(int).tolist(),
                     cfg["device"], cfg["batch_size"])

    scaled, reduced, to_space = embeddings.fit_space(latents, cfg["pca_dims"], seed)
    _, train_reduced = to_space(train_latents)
    xy = embeddings.project(scaled, reduced, cfg["projection"], seed)
    clusters, cluster_info = cluster_samples(reduced, cfg["clustering"], seed)
    samples = pd.concat([samples, pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1],
                                                "cluster": clusters}, index=samples.index)],
                        axis=1).copy()  # one block per dtype: later columns do not fragment it
    members: dict[int, list[int]] = {}
    for c in sorted(set(clusters) - {embeddings.NOISE}):
        rows = np.flatnonzero(clusters == c)
        members[int(c)] = [int(rows[i]) for i in
                           embeddings.representatives(reduced[rows], cfg["representatives"])]
    categories = category_table(clusters, category_presence(samples))
    queries = similar_queries(samples, {c: r[0] for c, r in members.items()},
                              cfg["similars"]["top_loss"], cfg["similars"]["image_ids"])
    # Every sample's neighbours once; the queries' similars are their rows of it.
    neighbours = embeddings.nearest_neighbours(scaled, list(range(len(samples))),
                                               cfg["similars"]["k"])
    similars = similars_table(samples, queries, [neighbours[q] for q, _ in queries])
    start, stop = layout[cfg["heatmaps"]["layer"]]
    features = shared_features(latents, start, stop, clusters, cfg["heatmaps"]["channels"])
    assigned = bucket_assignments(samples, cfg["buckets"])
    bins, flagged = metadata_buckets(samples, cfg["buckets"], assigned)
    found = both_splits(samples, reduced, train_ids, train_reduced, raw, cfg)

    with atomic_dir(out) as tmp:
        issues, issue_info = label_issues(view, samples, cfg["label_issues"]["top"],
                                          cfg["figure_px"], tmp / "label_issues")
        quality = issues.set_index("image_id")
        samples = pd.concat([samples, pd.DataFrame({
            "label_quality": samples["image_id"].map(quality["label_quality"]),
            "label_quality_rank": samples["image_id"].map(quality["rank"]),
            "ood_score": found["ood"]["scores"]}, index=samples.index)], axis=1)
        index = heatmaps(view, samples, features, members, queries, cfg["heatmaps"],
                         cfg["figure_px"], tmp / "heatmaps")
        write_csv(tmp / "heatmaps" / "index.csv", index)
        write_csv(tmp / "heatmaps" / "shared_features.csv", features)
        bins = metadata_figures(bins, view.class_names, tmp / "metadata")
        write_csv(tmp / "samples.csv", samples)
        write_csv(tmp / "clusters.csv", with_shares(cluster_table(samples, categories, members),
                                                    found["clusters"]))
        write_csv(tmp / "cluster_categories.csv", categories)
        write_csv(tmp / "similars.csv", similars)
        write_csv(tmp / "neighbours.csv", neighbours_table(samples, neighbours))
        write_csv(tmp / "metadata_loss.csv", bins)
        write_csv(tmp / "bin_members.csv", bin_members(samples, assigned))
        write_csv(tmp / "metadata_flagged.csv", flagged)
        write_csv(tmp / "label_issues.csv", issues)
        records = write_findings(tmp, found, issues, samples, predictions, masks,
                                 view.class_names)
        write_json(tmp / "summary.json", {
            "samples": len(samples), "projection": cfg["projection"],
            "latent_dims": int(latents.shape[1]), "reduced_dims": int(reduced.shape[1]),
            "clustering": cluster_info, "similars_queries": len(queries),
            "flagged_buckets": int(bins["flagged"].sum()) if len(bins) else 0,
            "label_issues": issue_info, "heatmaps": len(index),
            "classes": view.class_names, **findings_summary(found, records, len(train_ids))})
    log.info("%d samples, %d clusters (%s), %d flagged buckets, %d label issues flagged, "
             "%d heat-maps; %d insights (%s)", len(samples), cluster_info["k"],
             cluster_info["method"], int(bins["flagged"].sum()) if len(bins) else 0,
             issue_info["flagged"], len(index), len(records),
             ", ".join(f"{n} {t}" for t, n in count_types(records).items()) or "none")
    return samples


def both_splits(samples: pd.DataFrame, reduced: np.ndarray, train_ids: np.ndarray,
                train_reduced: np.ndarray, raw: Path, cfg: dict) -> dict:
    """What the train split tells about the val images, in the space they were clustered
    in: cluster shares and flags, out-of-distribution scores, duplicate pairs; and the weak
    segments over the metadata."""
    settings = bootstrap.Settings.from_params(cfg["insights"]["bootstrap"])
    rep = cfg["representation"]
    ids = samples["image_id"].to_numpy()
    clusters = representation.cluster_findings(
        reduced, train_reduced, samples["cluster"].to_numpy(), samples["loss"].to_numpy(float),
        ids, min_count=rep["min_count"], fdr=rep["fdr"], share_ratio=rep["share_ratio"],
        settings=settings)
    return {"settings": settings, "clusters": clusters,
            "ood": out_of_distribution(reduced, train_reduced, ids, rep),
            "pairs": duplicate_pairs(raw, ids, train_ids,
                                     np.concatenate([reduced, train_reduced]),
                                     cfg["duplicates"], torch.get_num_threads()),
            "segments": weak_segments(samples, cfg["segments"], cfg["seed"], settings)}


def write_findings(folder: Path, found: dict, issues: pd.DataFrame, samples: pd.DataFrame,
                   predictions: Path, masks: Path, class_names: list[str]) -> list[dict]:
    """duplicates.csv, leak_free_metrics.json (when a val image leaks) and insights.json;
    returns the insight records."""
    pairs, settings = found["pairs"], found["settings"]
    write_csv(folder / "duplicates.csv", pairs)
    leaked = duplicates.leaked_val_ids(pairs)
    if leaked:
        write_json(folder / "leak_free_metrics.json", findings.leak_free_metrics(
            samples, predictions, masks, class_names, leaked, settings))
    records = findings.records(clusters=found["clusters"], ood=found["ood"], pairs=pairs,
                               segments=found["segments"], issues=issues,
                               loss=samples.set_index("image_id")["loss"], settings=settings)
    with atomic_path(folder / "insights.json") as tmp:
        tmp.write_text(insights.to_json(records))
    return records


def count_types(records: list[dict]) -> dict[str, int]:
    counts = pd.Series([r["type"] for r in records], dtype=object).value_counts()
    return {t: int(counts[t]) for t in insights.TYPES if t in counts}


def findings_summary(found: dict, records: list[dict], train_images: int) -> dict:
    """summary.json's keys of the insights: counts, and the out-of-distribution threshold."""
    pairs, ood = found["pairs"], found["ood"]
    return {"train_images": train_images,
            "insights": {"records": len(records), "by_type": count_types(records)},
            "duplicates": {"pairs": len(pairs),
                           "by_kind": {k: int((pairs["kind"] == k).sum())
                                       for k in duplicates.KINDS},
                           "by_kind_and_split": duplicates.counts_by_kind_and_split(pairs),
                           "leaked_val_images": len(duplicates.leaked_val_ids(pairs))},
            "out_of_distribution": {"k": ood["k"], "quantile": ood["quantile"],
                                    "threshold": ood["threshold"],
                                    "flagged": int(ood["flags"].sum())},
            "weak_segments": len(found["segments"])}


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("analyze", __doc__)
    parser.add_argument("--predictions", required=True, type=Path, help="folder written by infer")
    parser.add_argument("--masks", required=True, type=Path, help="folder written by masks")
    parser.add_argument("--model", required=True, type=Path, help="folder written by train")
    parser.add_argument("--raw", required=True, type=Path, help="folder written by download")
    parser.add_argument("--out", required=True, type=Path, help="analysis folder to create")
    args = parser.parse_args(argv)
    return run_main("analyze", lambda: run(load_params(args.params), args.predictions,
                                           args.masks, args.model, args.raw, args.out),
                    outputs=(args.out,))


if __name__ == "__main__":
    raise SystemExit(main())
