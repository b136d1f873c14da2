"""Both splits in the latent space: how much of the training set each val cluster holds,
how far each val image lies from the training set, and which high-loss clusters the
training set under-represents (collect or label more) rather than represents and still
fails (look at the model or the labels).

The caller passes the vectors in the space it clustered the val images in (e.g. analyze's
standardised, PCA-reduced latents, with the train latents transformed by the same fitted
scaler and PCA), so that "nearest centroid" means what the clustering meant.

The flags, per cluster of at least `min_count` val images (HDBSCAN's noise, -1, is no
cluster):
- high loss: a one-sided Mann-Whitney U test (scipy.stats.mannwhitneyu, "greater") of the
  cluster's val losses against the other val images', Benjamini-Hochberg q-value over the
  clusters (scipy.stats.false_discovery_control) at most `fdr`, AND the bootstrap interval
  of its mean loss minus the rest's above 0 (the finding states that difference, so it
  needs both: a rank test can pass while the means' interval holds 0);
- under-represented: its train share at most `share_ratio` x its val share (the training
  set would need 1 / share_ratio times that kind's images to match val's mix: at the
  default 0.5, twice as many) AND a one-sided Fisher exact test (scipy.stats.fisher_exact,
  "less": the odds of a train image falling in the cluster are lower than a val image's)
  with a Benjamini-Hochberg q-value over the clusters at most `fdr`. The ratio keeps a
  small but real shortfall of a huge training set from counting; the test keeps a cluster
  of a handful of val images, whose val share is itself uncertain, from counting on chance.
A high-loss cluster is `under_represented` when both hold, else `low_performance` (its
train share is then within that bound or not shown to fall short).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import pairwise_distances_argmin
from sklearn.neighbors import NearestNeighbors

from stages.lib import bootstrap
from stages.lib.embeddings import NOISE, unit_vectors

CLUSTER_COLUMNS = ["cluster", "val_images", "val_share", "train_images", "train_share",
                   "share_ratio", "mean_loss", "mean_loss_rest", "effect", "interval",
                   "p_value", "q_value", "representation_p_value", "representation_q_value",
                   "finding", "image_ids"]


def centroids(val: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster labels, their mean val vectors), noise left out, labels ascending."""
    labels = np.array(sorted(set(np.unique(clusters).tolist()) - {NOISE}), int)
    return labels, np.array([val[clusters == c].mean(0) for c in labels]).reshape(
        len(labels), val.shape[1])


def shares(val: np.ndarray, train: np.ndarray, clusters: np.ndarray) -> pd.DataFrame:
    """Per cluster: val images and share (of the val images in a cluster), train images
    assigned to the nearest val centroid (Euclidean, as k-means assigns) and their share,
    and train share / val share. pairwise_distances_argmin works in row chunks: memory per
    train image is its vector, whatever the number of clusters."""
    labels, centres = centroids(val, clusters)
    clustered = int((clusters != NOISE).sum())
    val_images = np.array([(clusters == c).sum() for c in labels], int)
    if len(labels) == 0 or len(train) == 0:
        nearest = np.array([], int)
    else:
        nearest = pairwise_distances_argmin(train, centres)
    train_images = np.bincount(nearest, minlength=len(labels))
    val_share = val_images / clustered if clustered else np.full(len(labels), np.nan)
    train_share = train_images / len(train) if len(train) else np.full(len(labels), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = train_share / val_share
    return pd.DataFrame({"cluster": labels, "val_images": val_images, "val_share": val_share,
                         "train_images": train_images, "train_share": train_share,
                         "share_ratio": ratio})


def ood_scores(val: np.ndarray, train: np.ndarray, k: int) -> np.ndarray:
    """Per val image, the mean cosine distance to its k nearest train images (fewer when
    train has fewer): 0 for an image the training set holds, larger the farther it lies.
    Zero vectors have no direction: left out of train, NaN in val."""
    train_unit, train_ok = unit_vectors(train)
    val_unit, val_ok = unit_vectors(val)
    scores = np.full(len(val_unit), np.nan)
    k = min(k, int(train_ok.sum()))
    if k and val_ok.any():
        index = NearestNeighbors(n_neighbors=k).fit(train_unit[train_ok])
        scores[val_ok] = _cosine(index.kneighbors(val_unit[val_ok])[0]).mean(1)
    return scores


def train_reference_scores(train: np.ndarray, k: int) -> np.ndarray:
    """The same score for each train image against the OTHER train images (kneighbors with
    no query leaves each point out): how far training images usually lie from the rest of
    the training set, the yardstick for calling a val image out of distribution."""
    unit, ok = unit_vectors(train)
    scores = np.full(len(unit), np.nan)
    k = min(k, int(ok.sum()) - 1)
    if k >= 1:
        index = NearestNeighbors(n_neighbors=k).fit(unit[ok])
        scores[ok] = _cosine(index.kneighbors()[0]).mean(1)
    return scores


def _cosine(euclidean: np.ndarray) -> np.ndarray:
    """Cosine distance from the Euclidean distance of unit vectors (embeddings.unit_vectors:
    the memory-bounded search)."""
    return euclidean.astype(np.float64) ** 2 / 2


def ood_threshold(reference: np.ndarray, quantile: float) -> float:
    """The `quantile` of the training images' own scores (NaN ones left out); NaN when none
    has one (fewer than two training images: no yardstick)."""
    reference = np.asarray(reference, float)
    finite = reference[np.isfinite(reference)]
    return float(np.quantile(finite, quantile)) if len(finite) else float("nan")


def out_of_distribution(val_scores: np.ndarray, reference: np.ndarray,
                        quantile: float) -> np.ndarray:
    """Boolean per val image: farther from the training set than `quantile` of the training
    images are from the rest of it (its score above ood_threshold; NaN scores are no
    evidence either way: never flagged, not in the quantile; no yardstick flags nothing)."""
    return np.asarray(val_scores) > ood_threshold(reference, quantile)


def _tests(table: pd.DataFrame, clusters: np.ndarray, loss: np.ndarray, n_train: int,
           min_count: int) -> tuple[list[float], list[float]]:
    """Per cluster, the loss test's and the representation test's p-values (NaN: untested)."""
    loss_p, share_p = [], []
    clustered = int((clusters != NOISE).sum())
    for row in table.itertuples():
        inside = clusters == row.cluster
        losses, rest = loss[inside & np.isfinite(loss)], loss[~inside & np.isfinite(loss)]
        if len(losses) < min_count or len(rest) == 0:
            loss_p.append(np.nan)
            share_p.append(np.nan)
            continue
        loss_p.append(float(stats.mannwhitneyu(losses, rest, alternative="greater").pvalue))
        counts = [[row.train_images, n_train - row.train_images],
                  [row.val_images, clustered - row.val_images]]
        share_p.append(float(stats.fisher_exact(counts, alternative="less").pvalue)
                       if n_train else np.nan)
    return loss_p, share_p


def _q_values(p: list[float]) -> np.ndarray:
    p = np.asarray(p, float)
    q = np.full(len(p), np.nan)
    tested = np.isfinite(p)
    if tested.any():
        q[tested] = stats.false_discovery_control(p[tested], method="bh")
    return q


def cluster_findings(val: np.ndarray, train: np.ndarray, clusters: np.ndarray,
                     loss: np.ndarray, image_ids: np.ndarray, *, min_count: int, fdr: float,
                     share_ratio: float, settings: bootstrap.Settings) -> pd.DataFrame:
    """One row per cluster (CLUSTER_COLUMNS): shares, mean loss inside and outside, effect
    (their difference) with its bootstrap interval ([lo, hi] or None), both tests' p- and
    q-values, `finding` (under_represented, low_performance or "") and the cluster's val
    image ids. Losses that are NaN (no labelled pixel) are left out of the loss figures."""
    clusters, loss, ids = np.asarray(clusters), np.asarray(loss, float), np.asarray(image_ids)
    table = shares(val, train, clusters)
    loss_p, share_p = _tests(table, clusters, loss, len(train), min_count)
    table["p_value"], table["q_value"] = loss_p, _q_values(loss_p)
    table["representation_p_value"] = share_p
    table["representation_q_value"] = _q_values(share_p)
    means, rests, intervals, members = [], [], [], []
    for c in table["cluster"]:
        inside = clusters == c
        a, b = loss[inside & np.isfinite(loss)], loss[~inside & np.isfinite(loss)]
        means.append(a.mean() if len(a) else np.nan)
        rests.append(b.mean() if len(b) else np.nan)
        intervals.append(bootstrap.mean_difference_interval(a, b, settings))
        members.append(sorted(int(i) for i in ids[inside]))
    table["mean_loss"], table["mean_loss_rest"] = means, rests
    table["effect"] = table["mean_loss"] - table["mean_loss_rest"]
    table["interval"], table["image_ids"] = intervals, members
    high = (table["q_value"] <= fdr) & table["interval"].map(bootstrap.above_zero)
    short = (table["share_ratio"] <= share_ratio) & (table["representation_q_value"] <= fdr)
    table["finding"] = np.where(high & short, "under_represented",
                                np.where(high, "low_performance", ""))
    return table[CLUSTER_COLUMNS]
