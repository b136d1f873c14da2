"""analyze: the cores on hand-made data (clusters, medoids, neighbours, buckets, categories,
shared features, label quality against cleanlab, disagreement, Grad-CAM on a model whose
answer is known), and label issues found on real sample images whose labels were
corrupted (a person erased, a region relabelled)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import SAMPLE, small_params, study_recipe
from stages import analyze
from stages.lib import buckets, embeddings, explain
from stages.lib.labels import IGNORE_INDEX, read_labels, save_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- embeddings

def blobs(seed: int = 0, per: int = 20, dims: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(dims)[:3] * 10
    points = np.concatenate([c + rng.normal(0, 0.3, (per, dims)) for c in centres])
    return points, np.repeat(np.arange(3), per)


def test_kmeans_picks_the_k_with_the_best_silhouette():
    points, truth = blobs()
    labels, scores = embeddings.kmeans_by_silhouette(points, 2, 6, seed=0)
    assert set(scores) == {2, 3, 4, 5, 6}
    assert max(scores, key=scores.get) == 3
    assert len(set(labels)) == 3
    # the same partition as the truth, whatever the label numbers
    assert len(set(zip(labels, truth))) == 3


def test_k_range_is_capped_by_the_number_of_samples():
    points, _ = blobs(per=2)
    labels, scores = embeddings.kmeans_by_silhouette(points, 2, 20, seed=0)
    assert max(scores) == len(points) - 1 and len(labels) == len(points)


def test_hdbscan_finds_the_blobs_and_marks_outliers():
    points, truth = blobs()
    points = np.vstack([points, [[100.0] * 6]])
    labels = embeddings.hdbscan_labels(points, min_cluster_size=5)
    assert len(set(labels) - {embeddings.NOISE}) == 3
    assert labels[-1] == embeddings.NOISE


def test_medoid_and_representatives_by_hand():
    points = np.array([[0.0], [1.0], [2.0], [10.0]])
    # sums of distances: 13, 11, 11, 27 -> the first minimum, index 1
    assert embeddings.medoid(points) == 1
    assert embeddings.representatives(points, 3) == [1, 0, 2]
    assert embeddings.representatives(points, 1) == [1]


def test_nearest_neighbours_by_cosine():
    vectors = np.array([[1.0, 0.0], [10.0, 0.5], [0.0, 1.0], [-1.0, 0.0]])
    [found] = embeddings.nearest_neighbours(vectors, [0], k=2)
    assert [i for i, _ in found] == [1, 2]     # scale does not matter, direction does
    assert found[0][1] == pytest.approx(1 - 10 / np.hypot(10, 0.5))
    assert found[1][1] == pytest.approx(1.0)


def test_projection_methods_give_finite_2d_maps():
    points, _ = blobs(per=8)
    scaled = embeddings.standardise(points)
    reduced = embeddings.reduce(scaled, 4, seed=0)
    assert reduced.shape == (24, 4)
    for method in ("pca", "tsne", "umap"):
        xy = embeddings.project(scaled, reduced, method, seed=0)
        assert xy.shape == (24, 2) and np.isfinite(xy).all(), method


def test_fit_space_puts_other_vectors_in_the_val_images_space():
    """The val vectors come out as standardise() and reduce() make them; the train vectors
    through the same scaler (the val mean and population std, by numpy) and PCA, so a val
    vector sent through the transform lands where the val vectors are."""
    points, _ = blobs(per=8)
    other = np.random.default_rng(1).normal(0, 5, (5, points.shape[1]))
    scaled, reduced, to_space = embeddings.fit_space(points, 4, seed=0)
    np.testing.assert_array_equal(scaled, embeddings.standardise(points))
    np.testing.assert_allclose(reduced, embeddings.reduce(scaled, 4, seed=0), atol=1e-6)
    other_scaled, other_reduced = to_space(other)
    np.testing.assert_allclose(other_scaled, (other - points.mean(0)) / points.std(0),
                               rtol=1e-5)
    assert other_reduced.shape == (5, 4)
    np.testing.assert_allclose(to_space(points)[1], reduced, atol=1e-4)
    empty = to_space(np.empty((0, points.shape[1])))
    assert empty[0].shape == (0, points.shape[1]) and empty[1].shape == (0, 4)


@pytest.mark.parametrize("method", ["pca", "tsne", "umap"])
def test_projection_keeps_separated_groups_separated(method):
    """Three blobs 10 apart (spread 0.3) stay three groups on the map: every point's nearest
    neighbour on the map is of its own blob, and sklearn's silhouette of the true groups on
    the map is high. A projection that scrambles rows or returns noise fails this."""
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    # 3 dimensions, one blob along each: standardise would blow pure-noise dimensions up to
    # the signal's variance (blobs()'s default 6), which PCA cannot be asked to see through
    points, truth = blobs(per=8, dims=3)
    scaled = embeddings.standardise(points)
    xy = embeddings.project(scaled, embeddings.reduce(scaled, 4, seed=0), method, seed=0)
    _, nearest = NearestNeighbors(n_neighbors=2).fit(xy).kneighbors(xy)
    assert (truth[nearest[:, 1]] == truth).all()
    assert silhouette_score(xy, truth) > 0.5


# ---------------------------------------------------------------- per-cluster means

def test_cluster_table_means_by_hand():
    """Two clusters and HDBSCAN's noise (-1); the means written out by hand. An IoU that is
    NaN (class absent from an image) is left out of its cluster's mean, not counted as 0."""
    samples = pd.DataFrame({
        "image_id": [10, 11, 12, 13, 14, 15], "cluster": [0, 0, 1, 1, 1, -1],
        "loss": [1.0, 3.0, 0.5, 1.0, 3.0, 9.0],
        "pixel_accuracy": [0.9, 0.7, 0.6, 0.6, 0.9, 0.1],
        "iou_person": [0.5, 0.25, 0.1, np.nan, 0.3, 0.0],
        "is_grayscale": [True, False, False, False, True, False]})
    members = {0: [1, 0], 1: [3], -1: []}
    table = analyze.cluster_table(samples, analyze.category_table(
        samples["cluster"].to_numpy(), pd.DataFrame({"person": [1, 1, 1, 0, 1, 1]})), members)
    assert table["cluster"].tolist() == [-1, 0, 1]
    assert table["size"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(table["mean_loss"], [9.0, 2.0, 1.5])
    np.testing.assert_allclose(table["mean_pixel_accuracy"], [0.1, 0.8, 0.7])
    np.testing.assert_allclose(table["mean_iou_person"], [0.0, 0.375, 0.2])
    np.testing.assert_allclose(table["grayscale_share"], [0.0, 0.5, 1 / 3])
    assert table["medoid_image_id"].tolist() == [-1, 11, 13]
    assert table["representative_image_ids"].tolist() == ["", "11 10", "13"]


# ---------------------------------------------------------------- shared-feature heat-maps

def test_normalise_by_hand():
    heat = np.array([[1.0, 3.0], [5.0, 9.0]])
    assert explain.normalise(heat).tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert explain.normalise(np.full((2, 3), 7.0)).tolist() == [[0.0] * 3] * 2   # flat


def test_upsample_by_hand():
    """2x2 -> 4x4 bilinear, half-pixel centres: output pixel x samples input (x + 0.5)/2 - 0.5
    = -0.25, 0.25, 0.75, 1.25, clamped at the edges, so one row [a, b] becomes
    [a, .75a + .25b, .25a + .75b, b]. Input 2i + j is linear: output 2r + c."""
    weights = [0.0, 0.25, 0.75, 1.0]
    out = explain.upsample(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), (4, 4))
    assert out.shape == (4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, [[2 * r + c for c in weights] for r in weights], atol=1e-6)
    wide = explain.upsample(torch.tensor([[0.0, 4.0]]), (1, 4))   # height kept, width doubled
    np.testing.assert_allclose(wide, [[0.0, 1.0, 3.0, 4.0]], atol=1e-6)


class _OneByOne(nn.Module):
    """A stand-in with SegNet's layout for layer_module: the bottleneck (encoder's last
    module) is a 1x1 convolution scaling the one input channel by 1, 10 and 100."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(1, 3, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1))
        self.encoder = nn.Sequential(nn.Identity(), conv)
        self.ups = nn.ModuleList()

    def forward(self, x):
        return self.encoder(x)


def test_channel_maps_by_hand():
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    heat = explain.channel_maps(_OneByOne(), "bottleneck", image, [0, 2])
    # mean of channels 0 (x) and 2 (100 x): 50.5 x
    assert heat.shape == (2, 2)
    assert heat.tolist() == [[50.5, 101.0], [151.5, 202.0]]
    assert explain.channel_maps(_OneByOne(), "bottleneck", image, [1]).tolist() == \
        [[10.0, 20.0], [30.0, 40.0]]


# ---------------------------------------------------------------- buckets

def test_bin_edges_and_assignment():
    values = pd.Series([0.0, 0.0, 0.0, 0.0, 0.1, 0.5, 0.9, 1.0])
    assert buckets.bin_edges(values, 4, "equal_width").tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    zeros = pd.Series([0.0, 0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8])
    edges = buckets.bin_edges(zeros, 4, "equal_count")
    # the tied zeros get a bin of their own, the other values share three bins
    assert edges.tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert np.bincount(buckets.assign(zeros, edges)).tolist() == [4, 1, 1, 2]
    one = buckets.bin_edges(pd.Series([0.0] * 9 + [0.35]), 5, "equal_count")
    assert one.tolist() == [0, 0.35, 0.35]
    assert buckets.assign([0.0, 0.35], one).tolist() == [0, 1]
    spread = buckets.bin_edges(pd.Series(np.arange(10.0)), 5, "equal_count")
    assert np.bincount(buckets.assign(np.arange(10.0), spread)).tolist() == [2, 2, 2, 2, 2]
    assert buckets.bin_edges(pd.Series([True, False, True]), 5, "equal_count").tolist() == \
        [0, 0.5, 1]
    index = buckets.assign([0.0, 0.25, 0.99, 1.0, np.nan], np.array([0, 0.25, 0.5, 0.75, 1.0]))
    assert index.tolist() == [0, 1, 3, 3, -1]


def test_a_bucket_whose_loss_stands_out_is_flagged():
    # 20 samples: field in [0, 1); the 4 with field >= 0.8 have loss ~3, the rest ~1 (no
    # two losses equal: the rank test is then exact)
    field = np.arange(20) / 20
    loss = np.where(field >= 0.8, 3.0, 1.0) + np.tile([-0.1, 0.1], 10) + np.arange(20) / 1000
    samples = pd.DataFrame({"image_id": range(20), "car_fraction": field, "loss": loss,
                            "iou_car": 1 - field})
    table, index = buckets.bucket_table(samples, "car_fraction", 5, "equal_width", min_count=3)
    q, flagged = buckets.flag_by_fdr(table["p_value"], 0.1)
    assert flagged.tolist() == [False, False, False, False, True]
    last = table.iloc[-1]
    assert last["count"] == 4 and last["mean_loss"] == pytest.approx(3.0, abs=0.02)
    # by hand: its 4 losses are the 4 highest of 20, the one most extreme of C(20, 4)
    # equally likely rankings under no effect (exact Mann-Whitney U)
    assert last["p_value"] == pytest.approx(1 / 4845, rel=1e-9)
    expected_se = np.std(loss[16:], ddof=1) / 2
    assert last["se_loss"] == pytest.approx(expected_se)
    assert last["excess_se"] == pytest.approx((loss[16:].mean() - loss.mean()) / expected_se)
    assert last["mean_iou_car"] == pytest.approx(1 - field[16:].mean())
    # with min_count above its size, the same bucket is not tested, so not flagged
    table, _ = buckets.bucket_table(samples, "car_fraction", 5, "equal_width", 5)
    assert table["p_value"].isna().all()
    assert not buckets.flag_by_fdr(table["p_value"], 0.1)[1].any()
    assert (index == 4).sum() == 4


def test_bucket_table_every_column_by_hand():
    """Two equal-width bins of [0, 1]: losses 1, 2, 3 (mean 2, sd 1) and 4, 6, 8 plus a
    sample without a loss (counted, not averaged: mean 6, sd 2); overall mean 24 / 6 = 4.
    Standard errors 1/sqrt(3) and 2/sqrt(3), so the bins lie -2 sqrt(3) and sqrt(3) standard
    errors from the overall mean. The one-sided Mann-Whitney test of a bin against the rest,
    exact (3 + 3 losses, no ties): U counts the pairs where the bin's loss is higher, 0 and 9
    of 9, so p = P(U >= 0) = 1 and P(U >= 9) = 1 / C(6, 3) = 1/20. Benjamini-Hochberg over
    the two: q = (1, 0.05 * 2 / 1 = 0.1): the second is flagged at fdr 0.1, not at 0.09."""
    samples = pd.DataFrame({"f": [0.0, 0.1, 0.2, 0.6, 0.7, 1.0, 0.8],
                            "loss": [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, np.nan],
                            "iou_car": [0.0, 0.5, np.nan, 1.0, 0.5, 0.0, 0.25],
                            "other": 1.0})
    table, index = buckets.bucket_table(samples, "f", 2, "equal_width", min_count=3)
    assert index.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert list(table.columns) == [
        "binning", "field", "bin", "low", "high", "count", "mean_loss", "std_loss", "se_loss",
        "overall_mean_loss", "excess_se", "p_value", "mean_iou_car"]
    assert table[["binning", "field", "bin", "low", "high", "count"]].to_dict("records") == [
        {"binning": "equal_width", "field": "f", "bin": 0, "low": 0.0, "high": 0.5, "count": 3},
        {"binning": "equal_width", "field": "f", "bin": 1, "low": 0.5, "high": 1.0, "count": 4}]
    r3 = math.sqrt(3)
    for column, expected in {"mean_loss": [2.0, 6.0], "std_loss": [1.0, 2.0],
                             "se_loss": [1 / r3, 2 / r3], "overall_mean_loss": [4.0, 4.0],
                             "excess_se": [-2 * r3, r3], "p_value": [1.0, 1 / 20],
                             "mean_iou_car": [0.25, (1.0 + 0.5 + 0.0 + 0.25) / 4]}.items():
        np.testing.assert_allclose(table[column], expected, rtol=1e-12, err_msg=column)
    q, flagged = buckets.flag_by_fdr(table["p_value"], 0.1)
    np.testing.assert_allclose(q, [1.0, 0.1], rtol=1e-12)
    assert flagged.tolist() == [False, True]
    assert buckets.flag_by_fdr(table["p_value"], 0.09)[1].tolist() == [False, False]


def test_bucket_table_empty_and_single_sample_bins_are_nan_and_unflagged():
    """Edges 0, .3, .6, .9: three samples, an empty bin, and one sample alone in the last
    (closed) bin: no standard deviation from one loss, nothing at all from none, and no test
    of the empty bin (never flagged, whatever the fdr)."""
    samples = pd.DataFrame({"f": [0.0, 0.05, 0.1, 0.9], "loss": [1.0, 1.0, 1.0, 9.0],
                            "iou_car": [0.5, 0.5, 0.5, 0.0]})
    table, index = buckets.bucket_table(samples, "f", 3, "equal_width", min_count=1)
    assert index.tolist() == [0, 0, 0, 2]
    assert table["count"].tolist() == [3, 0, 1]
    assert table["mean_loss"].tolist()[::2] == [1.0, 9.0] and np.isnan(table["mean_loss"][1])
    # the first bin: sd 0, so no excess in standard errors (no division by zero)
    assert table["std_loss"][0] == 0.0 and table["se_loss"][0] == 0.0
    for column in ("std_loss", "se_loss", "excess_se"):
        assert table[column][1:].isna().all(), column
    assert np.isnan(table["excess_se"][0])
    assert np.isnan(table["p_value"][1]) and table["p_value"].notna().tolist() == [
        True, False, True]
    assert not buckets.flag_by_fdr(table["p_value"], 1.0)[1][1]
    assert table["mean_iou_car"][0] == 0.5 and np.isnan(table["mean_iou_car"][1])


def test_bin_edges_special_cases():
    # one repeated value: a single bin of width 1 from it
    assert buckets.bin_edges(pd.Series([0.3, 0.3, 0.3]), 4, "equal_count").tolist() == [0.3, 1.3]
    # 0/1 integers (with a missing value) are two-valued like booleans; 0/1/2 are not
    assert buckets.bin_edges(pd.Series([0, 1, None, 1]), 4, "equal_width").tolist() == [
        0, 0.5, 1]
    assert buckets.is_two_valued(pd.Series([0, 1, np.nan]))
    assert not buckets.is_two_valued(pd.Series([0, 1, 2]))
    assert buckets.bin_edges(pd.Series([0.0, 1.0, 2.0]), 2, "equal_width").tolist() == [
        0, 1, 2]
    # equal counts over distinct values: quantiles, no special bin for the minimum
    assert buckets.bin_edges(pd.Series([0.0, 1.0, 2.0, 3.0, 4.0]), 2,
                             "equal_count").tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match=r"^unknown binning 'quantile' \(known: equal_width, "
                                         r"equal_count\)$"):
        buckets.bin_edges(pd.Series([0.0, 2.0]), 2, "quantile")


def test_bucket_table_two_loss_bins_at_min_count():
    """Bins of exactly two losses (1, 3 and 5, 7): sd sqrt(2), standard error 1, overall
    mean 4, so 2 standard errors either side. A bin holding exactly min_count losses is
    tested: exact Mann-Whitney, U = 0 and 4 of 4 pairs, p = 1 and 1 / C(4, 2) = 1/6; one
    loss short of min_count, it is not."""
    samples = pd.DataFrame({"f": [0.0, 0.1, 0.9, 1.0], "loss": [1.0, 3.0, 5.0, 7.0]})
    table, _ = buckets.bucket_table(samples, "f", 2, "equal_width", min_count=2)
    np.testing.assert_allclose(table["std_loss"], [math.sqrt(2)] * 2, rtol=1e-12)
    np.testing.assert_allclose(table["se_loss"], [1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(table["excess_se"], [-2.0, 2.0], rtol=1e-12)
    np.testing.assert_allclose(table["p_value"], [1.0, 1 / 6], rtol=1e-12)
    table, _ = buckets.bucket_table(samples, "f", 2, "equal_width", min_count=3)
    assert table["p_value"].isna().all()
    # a q-value exactly at the fdr is flagged (q <= fdr): p 0.25 and 0.5 of two tests give
    # q = min(0.25 * 2 / 1, 0.5 * 2 / 2) = 0.5 for both
    q, flagged = buckets.flag_by_fdr(pd.Series([0.5, 0.25]), 0.5)
    assert q.tolist() == [0.5, 0.5] and flagged.tolist() == [True, True]
    assert not buckets.flag_by_fdr(pd.Series([0.5, 0.25]), 0.49)[1].any()


def test_one_equal_count_bin_and_boolean_assignment():
    assert buckets.bin_edges(pd.Series([0.0, 2.0, 4.0]), 1, "equal_count").tolist() == [0, 4]
    assert buckets.assign(pd.Series([True, False, True]), np.array([0, 0.5, 1])).tolist() == [
        1, 0, 1]


def test_flags_are_benjamini_hochberg_over_the_whole_table():
    p = pd.Series([0.01, 0.02, 0.03, 0.5, np.nan])
    q, flagged = buckets.flag_by_fdr(p, 0.05)
    # by hand: q_(i) = min over j >= i of p_(j) * m / j, m = 4 tested
    np.testing.assert_allclose(q[:4], [0.04, 0.04, 0.04, 0.5])
    assert np.isnan(q[4]) and flagged.tolist() == [True, True, True, False, False]
    # the same three p-values alone among 40 tests no longer pass
    many = pd.concat([p[:4], pd.Series(np.full(36, 0.6))], ignore_index=True)
    assert not buckets.flag_by_fdr(many, 0.05)[1].any()
    # an object column of numbers and None (what pandas makes of such a list) is read as
    # floats: the same q-values, and None untested
    q_object, flagged_object = buckets.flag_by_fdr(pd.Series([0.01, 0.02, 0.03, 0.5, None],
                                                             dtype=object), 0.05)
    np.testing.assert_allclose(q_object[:4].astype(float), [0.04, 0.04, 0.04, 0.5])
    assert np.isnan(q_object[4]) and flagged_object.tolist() == flagged.tolist()


@pytest.fixture(scope="module")
def analysis_inputs(val_truth) -> pd.DataFrame:
    """The sample's 80 val images with their real metadata (masks, person_car) and losses
    drawn from a skewed distribution (the tests shuffle them anyway)."""
    metadata = pd.read_csv(val_truth["root"] / "masks" / "person_car" / "metadata.csv")
    val = metadata[metadata["split"] == "val"].reset_index(drop=True).copy()
    return val.assign(loss=np.random.default_rng(1).gamma(2.0, 0.5, len(val)))


def test_shuffled_losses_flag_almost_nothing_and_a_planted_bucket_is_found(analysis_inputs):
    """No effect: the sample's real metadata with its losses shuffled across images, 20
    times; at most 0.5 flagged buckets on average (issue 16). Planted: the same, with the
    losses of the 20% brightest images raised by one standard deviation."""
    samples = analysis_inputs
    cfg = {"binning": ["equal_width", "equal_count"], "n_bins": 5, "fdr": 0.1, "min_count": 3}
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(20):
        shuffled = samples.assign(loss=rng.permutation(samples["loss"].to_numpy()))
        counts.append(int(analyze.metadata_buckets(shuffled, cfg)[0]["flagged"].sum()))
    assert np.mean(counts) <= 0.5, counts
    shuffled = samples.assign(loss=rng.permutation(samples["loss"].to_numpy()))
    top = shuffled["brightness"] >= shuffled["brightness"].quantile(0.8)
    raised = shuffled["loss"] + top * shuffled["loss"].std()
    bins = analyze.metadata_buckets(shuffled.assign(loss=raised), cfg)[0]
    hits = bins[bins["flagged"]]
    assert ("brightness", "equal_count", 4) in set(zip(hits["field"], hits["binning"],
                                                       hits["bin"])), hits


def test_flagged_bucket_samples_are_listed_worst_first():
    field = np.arange(20) / 20
    loss = np.where(field >= 0.8, 3.0, 1.0) + np.arange(20) / 100
    samples = pd.DataFrame({"image_id": range(20), "car_fraction": field, "loss": loss,
                            "file_name": [f"{i}.jpg" for i in range(20)]})
    cfg = {"binning": ["equal_width"], "n_bins": 5, "fdr": 0.1, "min_count": 3}
    bins, listed = analyze.metadata_buckets(samples, cfg)
    assert bins["flagged"].sum() == 1
    assert listed["image_id"].tolist() == [19, 18, 17, 16]
    assert listed["rank"].tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------- clusters and categories

def test_categories_read_by_prefix_and_dominance():
    samples = pd.DataFrame({"person_instances": [1, 1, 0, 2], "count_bus": [0, 0, 2, 1],
                            "count_traffic_light": [0, 0, 0, 0], "car_fraction": [.1, .2, .3, .4]})
    presence = analyze.category_presence(samples)
    assert list(presence.columns) == ["person", "bus", "traffic light"]
    table = analyze.category_table(np.array([0, 0, 1, 1]), presence)
    assert "traffic light" not in set(table["category"])     # shown nowhere
    bus = table[(table["category"] == "bus") & (table["cluster"] == 1)].iloc[0]
    assert (bus["images"], bus["share"], bus["share_overall"], bus["lift"]) == (2, 1.0, 0.5, 2.0)
    assert analyze.dominant_categories(table, 1) == "bus 100% (2.0x); person 50% (0.7x)"
    assert analyze.dominant_categories(table, 0) == "person 100% (1.3x)"


def test_shared_features_rank_the_channels_a_cluster_lights_up():
    rng = np.random.default_rng(0)
    latents = rng.normal(0, 1, (30, 10))
    clusters = np.repeat([0, 1, 2], 10)
    latents[clusters == 1, 7] += 5        # layer = columns 4:10, so channel 3
    latents[clusters == 1, 5] += 3        # channel 1
    latents[:, 9] = 1.0                   # constant: never chosen
    table = analyze.shared_features(latents, 4, 10, clusters, n_channels=2)
    ones = table[table["cluster"] == 1]
    assert ones["channel"].tolist() == [3, 1]
    assert (ones["z"] > 1).all()
    assert 5 not in set(table["channel"])


def test_similar_queries_medoids_worst_losses_and_listed_ids():
    samples = pd.DataFrame({"image_id": [10, 11, 12, 13], "loss": [0.1, 0.9, np.nan, 0.5]})
    queries = analyze.similar_queries(samples, {0: 0, 1: 3}, top_loss=2, listed=[12])
    assert queries == [(0, "medoid of cluster 0"), (3, "medoid of cluster 1"),
                       (1, "loss rank 1"), (2, "listed in params")]
    with pytest.raises(analyze.StageError, match="image 99 is not in the val samples"):
        analyze.similar_queries(samples, {}, 0, [99])


# ---------------------------------------------------------------- label quality

def test_label_quality_is_cleanlabs_score_over_labelled_pixels():
    from cleanlab.segmentation.rank import get_label_quality_scores

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=(12, 9)).transpose(2, 0, 1).astype(np.float32)
    labels = rng.integers(0, 3, (12, 9)).astype(np.uint8)
    expected, _ = get_label_quality_scores(labels[None].astype(int), probs[None], verbose=False)
    assert explain.label_quality(probs, labels) == pytest.approx(expected[0], rel=1e-6)
    # ignore pixels are left out: what the model says there does not change the score
    ignored = labels.copy()
    ignored[:4] = IGNORE_INDEX
    first = explain.label_quality(probs, ignored)
    shuffled = probs.copy()
    shuffled[:, :4] = shuffled[::-1, :4]
    assert explain.label_quality(shuffled, ignored) == pytest.approx(first)
    assert np.isnan(explain.label_quality(probs, np.full((3, 3), IGNORE_INDEX, np.uint8)))


def test_thresholds_and_disagreement_by_hand():
    # two classes, four pixels; labels 0 0 1 1, p(class 1) .1 .9 .8 .4
    p1 = np.array([[0.1, 0.9, 0.8, 0.4]])
    probs = np.stack([1 - p1, p1])
    labels = np.array([[0, 0, 1, 1]], np.uint8)
    t = explain.ClassThresholds(2)
    t.update(probs, labels)
    assert t.values() == pytest.approx([(0.9 + 0.1) / 2, (0.8 + 0.4) / 2])   # .5, .6
    region = explain.disagreement(probs, labels, t.values())
    # pixel 1: labelled 0, says 1 with .9 >= .6; pixel 3: labelled 1, says 0 with .6 >= .5
    assert region.tolist() == [[False, True, False, True]]
    strict = explain.disagreement(probs, labels, np.array([0.7, 0.95]))
    assert strict.tolist() == [[False, False, False, False]]
    labels[0, 1] = IGNORE_INDEX
    assert not explain.disagreement(probs, labels, t.values())[0, 1]


# ---------------------------------------------------------------- Grad-CAM

class TwoLayer(nn.Module):
    """conv -> ReLU (hooked) -> 1x1 conv to 3 classes: Grad-CAM has a closed form here."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(5, 3, 1)

    def forward(self, x):
        return self.head(self.features(x))


def test_grad_cam_closed_form_for_a_linear_head():
    """Target: sum of logit c over the pixels predicted c (mask M). d target / d A_k = W_ck M,
    so the channel weights are W_ck mean(M) and the map is mean(M) relu(logit_c - b_c)."""
    model = TwoLayer().eval()
    image = torch.randn(1, 3, 6, 7)
    cams = explain.grad_cam(model, model.features, image, [0, 1, 2])
    with torch.no_grad():
        logits = model(image)
    pred = logits.argmax(1)[0]
    for c, (cam, target) in cams.items():
        share = (pred == c).float().mean()
        if share == 0:
            assert target == "all pixels"
            share = torch.tensor(1.0)
        else:
            assert target == "predicted pixels"
        expected = share * torch.relu(logits[0, c] - model.head.bias[c])
        torch.testing.assert_close(cam, expected.detach(), rtol=1e-5, atol=1e-6)


def test_layer_modules_output_the_latent_layers():
    from stages.lib.model import LATENT_LAYERS, SegNet, pooled_latent

    model = SegNet(3).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, features = model.forward_with_latents(image)
    pooled = pooled_latent(features)[0]
    start = 0
    assert len(LATENT_LAYERS) == len(features)
    for name, feature in zip(LATENT_LAYERS, features):
        _, act = explain.forward_capturing(model, explain.layer_module(model, name), image)
        torch.testing.assert_close(act, feature)
        width = feature.shape[1]
        torch.testing.assert_close(act.mean((2, 3))[0], pooled[start:start + width])
        start += width


# ---------------------------------------------------------------- label issues, real images

N_IMAGES, SIZE, EPOCHS = 10, 64, 60


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, default_params, one_torch_thread):
    """A model that has learnt the clean labels of 10 real val images (trained on them),
    standing in for a model that segments well: cleanlab's ranking needs one."""
    from stages import download, masks, train

    root = tmp_path_factory.mktemp("issues")
    params = small_params(json.loads(json.dumps(default_params)), train=1, val=N_IMAGES,
                          size=SIZE, epochs=EPOCHS)
    params["data"]["base_url"] = str(SAMPLE)
    params["data"]["filter"].update(scheme_categories_only=True, background_share=0.0)
    params["train"].update(device="cpu", batch_size=5, lr=0.003, hflip=False)
    study_recipe(params)   # memorising 10 images: no augmentation, no resampling
    params["infer"]["device"] = params["analyze"]["device"] = "cpu"
    raw, clean = root / "raw", root / "masks"
    download.run(params, raw)
    masks.run(params, "person_car", raw, clean)
    # train on the val images themselves
    (raw / "annotations" / "instances_train.json").write_text(
        (raw / "annotations" / "instances_val.json").read_text())
    shutil.rmtree(raw / "images" / "train")
    shutil.copytree(raw / "images" / "val", raw / "images" / "train")
    shutil.rmtree(clean / "train")
    shutil.copytree(clean / "val", clean / "train")
    deterministic = torch.are_deterministic_algorithms_enabled()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        train.run(params, "person_car", raw, clean, root / "model", live=root / "live")
    torch.use_deterministic_algorithms(deterministic)
    return {"root": root, "params": params, "raw": raw, "clean": clean,
            "model": root / "model"}


def _corrupt(clean, dest, metadata) -> list[str]:
    """Copy the masks; erase the largest person of one image (its pixels become
    background) and paint a block of background as car in another."""
    shutil.copytree(clean, dest)
    val = metadata[metadata["split"] == "val"].sort_values("person_fraction", ascending=False)
    stems = [f"{int(i):012d}" for i in val["image_id"]]
    erased, painted = stems[0], stems[1]
    path = dest / "val" / f"{erased}.png"
    labels = read_labels(path)
    labels[labels == 1] = 0
    save_labels(path, labels)
    path = dest / "val" / f"{painted}.png"
    labels = read_labels(path)
    h, w = labels.shape
    block = labels[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    block[block == 0] = 2
    save_labels(path, labels)
    return [erased, painted]


def test_corrupted_labels_rank_at_the_top(memorised, tmp_path):
    from stages import infer

    m = memorised
    metadata = pd.read_csv(m["clean"] / "metadata.csv")
    corrupted = _corrupt(m["clean"], tmp_path / "masks", metadata)
    infer.run(m["params"], m["model"], m["raw"], tmp_path / "masks", tmp_path / "pred")
    analyze.run(m["params"], tmp_path / "pred", tmp_path / "masks", m["model"], m["raw"],
                tmp_path / "analysis")
    issues = pd.read_csv(tmp_path / "analysis" / "label_issues.csv", dtype={"stem": str})
    top = issues["stem"].tolist()[: len(corrupted)]
    assert sorted(top) == sorted(corrupted), issues[["stem", "label_quality"]].head(5)
    # and the disagreement region of the erased person is where the person was
    erased = issues[issues["stem"] == corrupted[0]].iloc[0]
    region = read_labels(tmp_path / "analysis" / erased["region"])
    person = read_labels(m["clean"] / "val" / f"{corrupted[0]}.png") == 1
    assert (region[person] == 1).mean() > 0.3          # much of the person is found...
    assert ((region == 1) & ~person).sum() < 0.5 * (region == 1).sum()   # ...and little else
    assert erased["main_disagreement"] == "labelled background, model says person"
    # the same images with clean labels score higher
    analyze.run(m["params"], tmp_path / "pred", m["clean"], m["model"], m["raw"],
                tmp_path / "clean_analysis")
    clean = pd.read_csv(tmp_path / "clean_analysis" / "label_issues.csv",
                        dtype={"stem": str}).set_index("stem")
    for stem in corrupted:
        assert clean.loc[stem, "label_quality"] > issues.set_index("stem").loc[
            stem, "label_quality"]


@pytest.fixture(scope="module")
def analysed(memorised, tmp_path_factory):
    """infer and analyze on the memorised model's 10 real val images, clean labels."""
    from stages import infer

    m = memorised
    root = tmp_path_factory.mktemp("analysed")
    infer.run(m["params"], m["model"], m["raw"], m["clean"], root / "pred")
    analyze.run(m["params"], root / "pred", m["clean"], m["model"], m["raw"], root / "analysis")
    return {"pred": root / "pred", "analysis": root / "analysis",
            "k": m["params"]["analyze"]["similars"]["k"]}


def test_neighbours_are_every_samples_k_nearest_by_cosine(analysed):
    """neighbours.csv against a hand computation: standardise each latent dimension (numpy,
    population std, a constant dimension 0), cosine distance in float64, nearest first."""
    with np.load(analysed["pred"] / "latents.npz") as npz:
        ids, latents = npz["image_ids"].astype(int), npz["latents"].astype(np.float64)
    std = latents.std(0)
    z = (latents - latents.mean(0)) / np.where(std > 0, std, 1)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    distance = 1 - unit @ unit.T
    np.fill_diagonal(distance, np.inf)  # the sample itself is never its own neighbour
    k = analysed["k"]
    assert 1 <= k < len(ids)
    table = pd.read_csv(analysed["analysis"] / "neighbours.csv")
    assert list(table.columns) == ["image_id", "rank", "neighbour_image_id", "cosine_distance"]
    assert len(table) == len(ids) * k
    for i, image_id in enumerate(ids):
        rows = table[table["image_id"] == image_id]
        order = np.argsort(distance[i], kind="stable")[:k]
        assert rows["rank"].tolist() == list(range(1, k + 1))
        assert rows["neighbour_image_id"].tolist() == ids[order].tolist()
        np.testing.assert_allclose(rows["cosine_distance"], distance[i, order], atol=1e-5)


def test_similars_are_their_queries_rows_of_neighbours(analysed):
    similars = pd.read_csv(analysed["analysis"] / "similars.csv")
    neighbours = pd.read_csv(analysed["analysis"] / "neighbours.csv")
    assert len(similars) > 0
    joined = similars.merge(neighbours, left_on=["query_image_id", "rank"],
                            right_on=["image_id", "rank"], how="left", suffixes=("", "_n"),
                            validate="one_to_one")
    assert joined["neighbour_image_id"].notna().all()
    assert (joined["image_id"] == joined["neighbour_image_id"]).all()
    assert (joined["cosine_distance"] == joined["cosine_distance_n"]).all()
    # every query has all of its neighbours, not a prefix
    per_query = similars.groupby("query_image_id").size()
    assert (per_query == analysed["k"]).all()


def test_bin_members_count_and_average_as_metadata_loss(analysed):
    folder = analysed["analysis"]
    samples = pd.read_csv(folder / "samples.csv")
    bins = pd.read_csv(folder / "metadata_loss.csv")
    members = pd.read_csv(folder / "bin_members.csv")
    assert list(members.columns) == ["image_id", "binning", "field", "bin"]
    pairs = bins[["binning", "field"]].drop_duplicates()
    assert len(pairs) > 0 and len(members) == len(pairs) * len(samples)
    loss = samples.set_index("image_id")["loss"]
    for (_, field), group in members.groupby(["binning", "field"], sort=False):
        assert sorted(group["image_id"]) == sorted(samples["image_id"])  # each sample once
        missing = samples.loc[samples[field].isna(), "image_id"]
        assert set(group.loc[group["bin"] == -1, "image_id"]) == set(missing)
    for row in bins.to_dict("records"):
        inside = members[(members["binning"] == row["binning"])
                         & (members["field"] == row["field"]) & (members["bin"] == row["bin"])]
        assert len(inside) == row["count"], row
        if row["count"]:
            assert loss[inside["image_id"]].mean() == pytest.approx(row["mean_loss"], rel=1e-12)


def test_neighbours_table_with_fewer_samples_than_k():
    vectors = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    samples = pd.DataFrame({"image_id": [7, 8, 9]})
    table = analyze.neighbours_table(samples, embeddings.nearest_neighbours(
        vectors, [0, 1, 2], k=5))
    half = 1 - np.sqrt(0.5)  # 45 degrees apart; 7 and 9 are 90 degrees apart (distance 1)
    assert table["image_id"].tolist() == [7, 7, 8, 8, 9, 9]
    assert table["rank"].tolist() == [1, 2, 1, 2, 1, 2]
    # 8 is 45 degrees from both others: either order of that tie is right
    assert table["neighbour_image_id"].tolist()[:2] + table["neighbour_image_id"].tolist()[4:] \
        == [8, 9, 8, 7]
    assert set(table["neighbour_image_id"][2:4]) == {7, 9}
    np.testing.assert_allclose(table["cosine_distance"], [half, 1, half, half, half, 1],
                               atol=1e-12)


# ---------------------------------------------------------------- params

@pytest.mark.parametrize("path, value, message", [
    (("heatmaps", "layer"), "decoder9", "analyze.heatmaps.layer: 'decoder9' is not one of"),
    (("buckets", "binning"), ["quantile"], "analyze.buckets.binning.0: 'quantile' is not one of"),
    (("clustering", "method"), "dbscan", "analyze.clustering.method: 'dbscan' is not one of"),
    (("similars", "image_ids"), [1, 1], "analyze.similars.image_ids: [1, 1] has non-unique"),
])
def test_analyze_params_are_checked(params, path, value, message):
    from stages.lib.params import ParamsError, validate_params

    params["analyze"][path[0]][path[1]] = value
    with pytest.raises(ParamsError) as info:
        validate_params(params)
    assert message in str(info.value)


# ---------------------------------------------------------------- benchmark smoke run

def test_benchmark_runs_at_a_tiny_scale():
    """benchmarks/bench_analyze.py at 8 images (and 80 for its 10x), so it cannot rot; no
    timing is asserted."""
    from benchmarks import bench_analyze, harness

    result = bench_analyze.run(0.1)
    harness.check_result("analyze", result)
    assert [row["val images"] for row in result["table"]] == [8, 80]
    assert [row["size"] for row in result["table"]] == ["1x", "10x"]
    for row in result["table"]:
        assert row["wall s"] > 0 and row["peak RSS MiB"] >= row["of which imports MiB"] > 0


def test_heat_overlay_lightness_rises_with_heat():
    """Heat-maps must read without hue (grey print, colour-vision deficiencies): with the
    overlay alone (alpha 1), luminance increases strictly from low to high heat, and alpha
    blends over the image."""
    from stages.lib.plots import heat_overlay

    heat = np.linspace(0, 1, 64)[None, :]
    rgb = np.zeros((1, 64, 3), np.uint8)
    coloured = heat_overlay(rgb, heat, alpha=1.0).astype(float)[0]
    luminance = coloured @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) > 0)
    half = heat_overlay(np.full((1, 64, 3), 200, np.uint8), heat, alpha=0.5).astype(float)[0]
    assert np.allclose(half, (200 + coloured) / 2, atol=1)


def test_inputs_missing_a_column_name_the_file_and_the_stage(tmp_path):
    pred, masks_dir = tmp_path / "pred", tmp_path / "masks"
    pred.mkdir()
    masks_dir.mkdir()
    pd.DataFrame({"image_id": [1, 2, 3], "stem": ["a", "b", "c"], "loss": [1.0, 2.0, 3.0]}
                 ).to_csv(pred / "samples.csv", index=False)
    np.savez(pred / "latents.npz", image_ids=np.array([1, 2, 3]), latents=np.zeros((3, 4)))
    pd.DataFrame({"id": [1, 2, 3]}).to_csv(masks_dir / "metadata.csv", index=False)
    with pytest.raises(analyze.StageError, match=r"metadata\.csv: missing columns image_id; "
                                                 r"re-run masks$"):
        analyze.read_inputs(pred, masks_dir)
    pd.DataFrame({"image_id": [1, 2, 3]}).to_csv(pred / "samples.csv", index=False)
    with pytest.raises(analyze.StageError, match=r"samples\.csv: missing columns loss; "
                                                 r"re-run infer$"):
        analyze.read_inputs(pred, masks_dir)
    (masks_dir / "metadata.csv").unlink()
    pd.DataFrame({"image_id": [1, 2, 3], "loss": [1.0, 2.0, 3.0]}).to_csv(pred / "samples.csv",
                                                                         index=False)
    with pytest.raises(analyze.StageError, match=r"metadata\.csv: missing \(run the masks "
                                                 r"stage first\)$"):
        analyze.read_inputs(pred, masks_dir)
