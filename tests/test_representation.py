"""Both splits in one space, on the real sample: no model latents here, so a cheap
deterministic feature of the real images stands in (each image's histogram of HSV
saturation), which puts the muted, near-grey photographs in a cluster of their own. Dropping
most training images of that kind, with a planted loss raise on its val images, flags it
under-represented; with every training image kept the same cluster is low-performance and
nothing is under-represented; without the raise nothing is flagged at all."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.cluster import KMeans

from conftest import ROOT, SAMPLE
from stages.lib import representation
from stages.lib.bootstrap import Settings
from stages.lib.images import decode

ANALYZE = yaml.safe_load((ROOT / "params.yaml").read_text())["analyze"]
# params.yaml's defaults
CORE = {key: ANALYZE["representation"][key] for key in ("min_count", "fdr", "share_ratio")}
CORE["settings"] = Settings.from_params(ANALYZE["insights"]["bootstrap"])


def saturation_histogram(path) -> np.ndarray:
    rgb, _ = decode(path, scale=8)
    saturation = np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1]
    counts = np.histogram(saturation, bins=8, range=(0, 256))[0]
    return counts / counts.sum()


@pytest.fixture(scope="module")
def space() -> dict:
    paths = {s: sorted((SAMPLE / f"{s}2017").glob("*.jpg")) for s in ("train", "val")}
    val = np.array([saturation_histogram(p) for p in paths["val"]])
    train = np.array([saturation_histogram(p) for p in paths["train"]])
    clusters = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(val)
    centres = np.array([val[clusters == c].mean(0) for c in range(3)])
    muted = int(np.argmax(centres[:, 0]))            # most pixels of saturation < 32
    nearest = np.argmin(((train[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    return {"val": val, "train": train, "clusters": clusters, "muted": muted,
            "nearest": nearest, "ids": np.array([int(p.stem) for p in paths["val"]])}


def losses(space: dict, raise_muted: float) -> np.ndarray:
    noise = np.random.default_rng(0).gamma(2.0, 0.3, len(space["val"]))
    return noise + raise_muted * (space["clusters"] == space["muted"])


def without_most_of_the_muted_kind(space: dict) -> np.ndarray:
    kind = np.flatnonzero(space["nearest"] == space["muted"])
    dropped = kind[: int(0.9 * len(kind))]
    return np.delete(space["train"], dropped, axis=0)


def findings(space: dict, train: np.ndarray, loss: np.ndarray) -> pd.DataFrame:
    return representation.cluster_findings(space["val"], train, space["clusters"], loss,
                                           space["ids"], **CORE).set_index("cluster")


def test_the_muted_kind_is_a_cluster_of_its_own(space):
    assert np.bincount(space["clusters"]).tolist() == [35, 20, 25]
    assert np.bincount(space["nearest"], minlength=3).tolist() == [41, 18, 21]
    assert space["muted"] == 1


def test_dropping_most_training_images_of_a_high_loss_kind_flags_it_under_represented(space):
    table = findings(space, without_most_of_the_muted_kind(space), losses(space, 1.0))
    muted = table.loc[space["muted"]]
    assert muted["finding"] == "under_represented"
    assert (muted["val_images"], muted["train_images"]) == (20, 2)
    assert muted["train_share"] == pytest.approx(2 / 64)
    assert muted["share_ratio"] == pytest.approx((2 / 64) / (20 / 80))
    assert muted["q_value"] <= 0.1 and muted["representation_q_value"] <= 0.1
    assert table.drop(index=space["muted"])["finding"].tolist() == ["", ""]
    assert muted["image_ids"] == sorted(space["ids"][space["clusters"] == space["muted"]])


def test_with_every_training_image_the_same_cluster_is_low_performance(space):
    table = findings(space, space["train"], losses(space, 1.0))
    assert table["finding"].tolist() == ["", "low_performance", ""]
    assert table.loc[space["muted"], "share_ratio"] == pytest.approx((18 / 80) / (20 / 80))


def test_without_a_loss_raise_no_cluster_is_flagged_dropped_or_not(space):
    for train in (space["train"], without_most_of_the_muted_kind(space)):
        assert findings(space, train, losses(space, 0.0))["finding"].tolist() == ["", "", ""]


def test_the_effect_is_mean_loss_inside_minus_outside_with_its_interval(space):
    loss = losses(space, 1.0)
    table = findings(space, space["train"], loss)
    inside = space["clusters"] == space["muted"]
    row = table.loc[space["muted"]]
    assert row["mean_loss"] == pytest.approx(loss[inside].mean())
    assert row["mean_loss_rest"] == pytest.approx(loss[~inside].mean())
    lo, hi = row["interval"]
    assert lo < row["effect"] < hi and lo > 0


def test_noise_is_no_cluster_and_small_clusters_are_not_tested():
    val = np.array([[0.0, 1], [0, 1.1], [5, 5], [5, 5.1], [5, 5.2], [9, 0]])
    clusters = np.array([0, 0, 1, 1, 1, -1])
    train = np.array([[0.0, 1.05], [5, 5], [5, 5], [9, 0]])
    table = representation.cluster_findings(val, train, clusters, np.arange(6.0), np.arange(6),
                                            **CORE)
    assert table["cluster"].tolist() == [0, 1]
    assert table["val_share"].tolist() == [0.4, 0.6]           # of the 5 clustered images
    assert table["train_images"].tolist() == [1, 3]            # [9, 0] lies nearest cluster 1
    assert np.isnan(table.loc[0, "p_value"]) and table.loc[1, "p_value"] > 0   # 2 < min_count


def brute_mean_cosine(queries: np.ndarray, points: np.ndarray, k: int,
                      leave_out_self: bool = False) -> np.ndarray:
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)   # noqa: E731
    distance = 1 - unit(queries) @ unit(points).T
    if leave_out_self:
        np.fill_diagonal(distance, np.inf)
    return np.sort(distance, axis=1)[:, :k].mean(1)


def test_ood_scores_are_the_mean_cosine_distance_to_the_k_nearest_train_images(space):
    scores = representation.ood_scores(space["val"], space["train"], 5)
    # float32 unit vectors: about 1e-7 off the float64 brute force
    assert scores == pytest.approx(brute_mean_cosine(space["val"], space["train"], 5), abs=1e-6)
    reference = representation.train_reference_scores(space["train"], 5)
    assert reference == pytest.approx(
        brute_mean_cosine(space["train"], space["train"], 5, leave_out_self=True), abs=1e-6)
    # a val image the training set holds scores 0 with k = 1
    assert representation.ood_scores(space["train"][:3], space["train"], 1) == \
        pytest.approx(np.zeros(3), abs=1e-6)


def test_dropping_a_kind_moves_its_val_images_away_from_the_training_set(space):
    muted = space["clusters"] == space["muted"]
    kept = space["train"][space["nearest"] != space["muted"]]
    before = representation.ood_scores(space["val"], space["train"], 5)
    after = representation.ood_scores(space["val"], kept, 5)
    rise = after / np.maximum(before, 1e-12)
    assert np.median(rise[muted]) > 2 * np.median(rise[~muted])


def test_out_of_distribution_is_beyond_the_quantile_of_the_training_images():
    reference = np.arange(101) / 100.0                     # 0.00 ... 1.00: quantile 0.9 = 0.9
    flags = representation.out_of_distribution(np.array([0.5, 0.9, 0.91, 2.0]), reference, 0.9)
    assert flags.tolist() == [False, False, True, True]
    assert representation.ood_threshold(reference, 0.9) == pytest.approx(0.9)


def test_one_training_image_is_no_yardstick_and_flags_nothing():
    """A training set of one image has no leave-one-out score: no threshold, no flag (the
    quantile of nothing would raise)."""
    reference = representation.train_reference_scores(np.array([[1.0, 0.0]]), 5)
    assert np.isnan(reference).all()
    assert np.isnan(representation.ood_threshold(reference, 0.99))
    scores = np.array([0.1, 5.0, np.nan])
    assert representation.out_of_distribution(scores, reference, 0.99).tolist() == [False] * 3


def test_zero_vectors_have_no_direction_and_no_score():
    train = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    val = np.array([[0.0, 0.0], [1.0, 1.0]])
    scores = representation.ood_scores(val, train, 2)
    assert np.isnan(scores[0])
    assert scores[1] == pytest.approx(1 - np.sqrt(0.5), abs=1e-6)   # 45 degrees from both
    reference = representation.train_reference_scores(train, 5)
    assert np.isnan(reference[1]) and reference[[0, 2]] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert representation.out_of_distribution(scores, reference, 0.5).tolist() == [False,
                                                                                  False]


def test_a_rank_test_without_a_mean_difference_above_zero_is_no_finding():
    """Cluster 0's 10 losses (0.3) rank above nearly all of the rest's (0.1), so the rank
    test passes, but two of the rest's 42 losses are 3.0: the means differ by
    0.3 - 10 / 42 = 0.062 and the bootstrap interval of that holds 0. The finding would
    state that difference, so there is none. With the two large losses at 0.1 too, the
    same cluster is a low_performance finding."""
    val = np.array([[0.0, 1.0]] * 10 + [[5.0, 5.0]] * 42)
    clusters = np.array([0] * 10 + [1] * 42)
    loss = np.array([0.3] * 10 + [0.1] * 40 + [3.0] * 2)
    table = representation.cluster_findings(val, val, clusters, loss, np.arange(52), **CORE)
    row = table.set_index("cluster").loc[0]
    assert row["q_value"] < 1e-6
    assert row["effect"] == pytest.approx(0.3 - 10 / 42)
    assert row["interval"][0] < 0 < row["interval"][1]
    assert table["finding"].tolist() == ["", ""]
    loss[-2:] = 0.1
    table = representation.cluster_findings(val, val, clusters, loss, np.arange(52), **CORE)
    assert table["finding"].tolist() == ["low_performance", ""]
    assert table.loc[0, "interval"][0] > 0
