"""analyze: a map of the val samples in the model's latent space, unsupervised clusters
on it, and loss per bin of every metadata field. Writes under --out:
  samples.csv        per sample: metrics from infer, metadata from masks, x, y, cluster
  clusters.csv       per cluster: size, mean loss, mean IoU per class, grayscale share
  metadata_loss.csv  per metadata field and bin: range, count, mean loss, mean IoU per class
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.preprocessing import StandardScaler

from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.io import atomic_dir, write_csv
from stages.lib.params import load_params

log = logging.getLogger("analyze")

# Identifiers and bookkeeping columns that are not properties of the image.
NOT_METADATA = {"image_id", "file_name", "split", "stem"}
# masks writes one count_<category> column per COCO category its scheme leaves unclaimed
# (70+). Binning them all would bury the other fields; only categories seen in enough
# samples to fill bins are kept, the most frequent first.
COUNT_PREFIX = "count_"
MIN_COUNT_SHARE = 0.05
MAX_COUNT_FIELDS = 10


# ---------------------------------------------------------------- pure core

def project(latents: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates of standardised latent vectors."""
    scaled = StandardScaler().fit_transform(latents)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(scaled)
    perplexity = float(min(30, max(2, (len(scaled) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(scaled)


def cluster(latents: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    scaled = StandardScaler().fit_transform(latents)
    k = min(n_clusters, len(scaled))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(scaled)


def cluster_table(samples: pd.DataFrame) -> pd.DataFrame:
    iou_cols = [c for c in samples.columns if c.startswith("iou_")]
    grouped = samples.groupby("cluster")
    table = pd.DataFrame({"size": grouped.size(), "mean_loss": grouped["loss"].mean(),
                          "mean_pixel_accuracy": grouped["pixel_accuracy"].mean(),
                          "grayscale_share": grouped["is_grayscale"].mean()})
    for col in iou_cols:
        table[f"mean_{col}"] = grouped[col].mean()
    return table.reset_index()


def metadata_fields(samples: pd.DataFrame) -> list[str]:
    """Numeric (or boolean) metadata columns that vary across samples, with at most
    MAX_COUNT_FIELDS of the per-category counts, in column order."""
    metrics = {"loss", "pixel_accuracy", "confidence", "latency_ms", "x", "y", "cluster"}
    fields = []
    for col in samples.columns:
        if col in NOT_METADATA or col in metrics or col.startswith("iou_"):
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


def loss_by_bins(samples: pd.DataFrame, field: str, n_bins: int) -> pd.DataFrame:
    """Equal-width bins of one field with count, mean loss and mean IoU per class."""
    values = samples[field].astype(float)
    edges = np.histogram_bin_edges(values, bins=2 if samples[field].dtype == bool else n_bins)
    index = np.clip(np.digitize(values, edges[1:-1], right=False), 0, len(edges) - 2)
    iou_cols = [c for c in samples.columns if c.startswith("iou_")]
    rows = []
    for b in range(len(edges) - 1):
        members = samples[index == b]
        row = {"field": field, "bin": b, "low": edges[b], "high": edges[b + 1],
               "count": len(members), "mean_loss": members["loss"].mean() if len(members) else np.nan}
        row.update({f"mean_{c}": members[c].mean() if len(members) else np.nan for c in iou_cols})
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- run

def run(params: dict, predictions: Path, masks: Path, out: Path) -> pd.DataFrame:
    cfg = params["analyze"]
    for name in ("samples.csv", "latents.npz"):
        if not (predictions / name).is_file():
            raise StageError(f"{predictions / name}: missing (run the infer stage first)")
    samples = pd.read_csv(predictions / "samples.csv", dtype={"stem": str})
    with np.load(predictions / "latents.npz") as npz:
        ids, latents = npz["image_ids"], npz["latents"]
    if not np.array_equal(ids, samples["image_id"].to_numpy()):
        raise StageError(f"{predictions / 'latents.npz'}: image ids do not match samples.csv")
    if len(samples) < 3:
        raise StageError(f"{predictions / 'samples.csv'}: {len(samples)} samples; analysis needs 3+")
    if not (masks / "metadata.csv").is_file():
        raise StageError(f"{masks / 'metadata.csv'}: missing (run the masks stage first)")
    metadata = pd.read_csv(masks / "metadata.csv")
    samples = samples.merge(metadata[metadata["split"] == "val"], on="image_id", how="left",
                            validate="one_to_one")
    xy = project(latents, cfg["projection"], cfg["seed"])
    # One concat, not three inserts: with the metadata's 100-odd columns, pandas warns
    # about (and slows down on) a fragmented frame.
    placed = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1],
                           "cluster": cluster(latents, cfg["n_clusters"], cfg["seed"])},
                          index=samples.index)
    samples = pd.concat([samples, placed], axis=1)
    bins = pd.concat([loss_by_bins(samples, f, cfg["n_bins"]) for f in metadata_fields(samples)],
                     ignore_index=True)
    with atomic_dir(out) as tmp:
        write_csv(tmp / "samples.csv", samples)
        write_csv(tmp / "clusters.csv", cluster_table(samples))
        write_csv(tmp / "metadata_loss.csv", bins)
    log.info("%d samples, %d clusters, %d metadata fields", len(samples),
             samples["cluster"].nunique(), bins["field"].nunique())
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("analyze", __doc__.splitlines()[0])
    parser.add_argument("--predictions", required=True, type=Path, help="folder written by infer")
    parser.add_argument("--masks", required=True, type=Path, help="folder written by masks")
    parser.add_argument("--out", required=True, type=Path, help="analysis folder to create")
    args = parser.parse_args(argv)
    return run_main("analyze", lambda: run(load_params(args.params), args.predictions,
                                           args.masks, args.out))


if __name__ == "__main__":
    raise SystemExit(main())
