"""Weak segments on real metadata (masks' metadata.csv of the 160 sample images): a loss
raise planted on a two-field condition is found and stated by both fields; shuffled losses
report almost nothing; a segment that holds only on the fitting half is not reported; the
plain-terms conditions by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from conftest import ROOT
from stages.lib import bootstrap, segments
from stages.lib.bootstrap import Settings
from stages.lib.segments import Condition

ANALYZE = yaml.safe_load((ROOT / "params.yaml").read_text())["analyze"]
SETTINGS = Settings.from_params(ANALYZE["insights"]["bootstrap"])
# params.yaml's defaults, the tree's seed analyze's own
CORE = dict(**ANALYZE["segments"], seed=ANALYZE["seed"], settings=SETTINGS)
# Fields that measure what a planted field measures (colourfulness and is_grayscale the
# grayscale score; the person's instances and area, the background and ignore shares, the
# annotation count its fraction) would let the tree state the segment by a proxy: right,
# but not what these tests check.
PROXIES = {"colourfulness", "is_grayscale", "person_mean_area", "person_instances",
           "background_fraction", "n_annotations", "ignore_fraction"}


@pytest.fixture(scope="module")
def metadata(sample_metadata) -> pd.DataFrame:
    return sample_metadata


def fields(metadata: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in metadata.columns if c not in {"image_id", "file_name", "split"} | PROXIES
            and metadata[c].nunique() > 1]
    return metadata[keep]


def planted(metadata: pd.DataFrame) -> np.ndarray:
    return ((metadata["grayscale_score"] <= 15) & (metadata["person_fraction"] > 0.05)).to_numpy()


def noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, 0.3, n)   # mean 0.6, skewed like losses


def test_a_planted_two_field_segment_is_found_and_named_by_both_fields(metadata):
    members = planted(metadata)
    assert members.sum() == 26
    loss = noise(len(metadata), 0) + 1.0 * members
    found = segments.weak_segments(fields(metadata), loss, metadata["image_id"].to_numpy(),
                                   **CORE)
    assert len(found) == 1
    segment = found[0]
    assert [c.field for c in segment.conditions] == ["person_fraction", "grayscale_score"]
    assert segment.text == "person_fraction > 0.05699 and grayscale_score <= 16.47"
    truth = set(metadata.loc[members, "image_id"])
    overlap = len(truth & set(segment.member_ids)) / len(truth | set(segment.member_ids))
    assert overlap >= 0.85
    assert set(segment.held_out_ids) < set(segment.member_ids)
    lo, hi = segment.interval
    assert 0 < lo < segment.effect < hi and segment.q_value <= 0.1
    # the effect and its means are the held-out half's
    held = metadata["image_id"].isin(segment.held_out_ids).to_numpy()
    _, test = segments.halves(len(metadata), 0)
    rest = np.setdiff1d(test, np.flatnonzero(held))
    assert segment.mean_inside == pytest.approx(loss[held].mean())
    assert segment.mean_outside == pytest.approx(loss[rest].mean())


def test_shuffled_losses_report_at_most_half_a_segment_on_average(metadata):
    loss = noise(len(metadata), 1) + 1.0 * planted(metadata)
    rng = np.random.default_rng(2)
    counts = [len(segments.weak_segments(fields(metadata), rng.permutation(loss),
                                         metadata["image_id"].to_numpy(), **CORE))
              for _ in range(20)]
    assert np.mean(counts) <= 0.5


def test_a_segment_that_holds_only_where_the_tree_was_fitted_is_not_reported(metadata):
    fit, _ = segments.halves(len(metadata), 0)
    in_fit = np.zeros(len(metadata), bool)
    in_fit[fit] = True
    loss = noise(len(metadata), 3) + 2.0 * (planted(metadata) & in_fit)
    assert segments.weak_segments(fields(metadata), loss, metadata["image_id"].to_numpy(),
                                  **CORE) == []
    # the same raise on both halves is found
    both = noise(len(metadata), 3) + 2.0 * planted(metadata)
    assert segments.weak_segments(fields(metadata), both, metadata["image_id"].to_numpy(),
                                  **CORE) != []


def test_conditions_merge_the_path_per_field_with_the_trees_thresholds():
    # 40 images: loss 1 where a >= 3 and b <= 0.2, else 0; depth 2 splits exactly there.
    a = np.tile(np.arange(5), 8)
    b = np.repeat(np.linspace(0, 0.7, 8), 5)
    frame = pd.DataFrame({"a": a, "b": b})
    loss = ((a >= 3) & (b <= 0.2)).astype(float)
    from sklearn.tree import DecisionTreeRegressor

    tree = DecisionTreeRegressor(max_depth=2, random_state=0).fit(frame.to_numpy(float), loss)
    leaf = int(tree.apply(np.array([[4.0, 0.0]]))[0])
    conditions = segments.path_conditions(tree, leaf, ["a", "b"])
    assert {c.field: (c.above, c.at_most) for c in conditions} == {
        "a": (2.5, None), "b": (None, pytest.approx(0.25))}
    assert " and ".join(c.text(frame[c.field]) for c in sorted(conditions,
                                                               key=lambda c: c.field)) == \
        "a >= 3 and b <= 0.25"


@pytest.mark.parametrize("condition, values, text", [
    (Condition("is_grayscale", 0.5, None, False), pd.Series([True, False]), "is_grayscale"),
    (Condition("is_grayscale", None, 0.5, False), pd.Series([True, False]),
     "not is_grayscale"),
    (Condition("n", 2.5, None, False), pd.Series([1, 2, 3, 9]), "n >= 3"),
    (Condition("n", None, 2.5, False), pd.Series([1, 2, 3, 9]), "n <= 2"),
    (Condition("n", 1.5, 4.5, False), pd.Series([1, 2, 3, 9]), "2 <= n <= 4"),
    (Condition("n", 1.5, 2.5, False), pd.Series([1, 2, 3, 9]), "n = 2"),
    (Condition("f", 0.123456, None, False), pd.Series([0.1, 0.2]), "f > 0.1235"),
    (Condition("f", 0.1, 0.4, False), pd.Series([0.1, 0.25]), "0.1 < f <= 0.4"),
    (Condition("f", None, 0.4, True), pd.Series([0.1, np.nan]), "(f <= 0.4 or unknown)"),
    (Condition("f", None, 0.4, True), pd.Series([0.1, 0.5]), "f <= 0.4"),
])
def test_a_condition_in_plain_terms(condition, values, text):
    assert condition.text(values) == text


def test_missing_values_follow_the_trees_routing_into_the_text():
    # f unknown for the high-loss images: the tree sends missing values to their side.
    f = np.r_[np.linspace(0, 1, 30), [np.nan] * 10]
    loss = np.r_[np.zeros(30), np.ones(10)]
    from sklearn.tree import DecisionTreeRegressor

    tree = DecisionTreeRegressor(max_depth=1, random_state=0).fit(f[:, None], loss)
    leaf = int(tree.apply(np.array([[np.nan]]))[0])
    (condition,) = segments.path_conditions(tree, leaf, ["f"])
    assert condition.missing
    assert condition.text(pd.Series(f)).endswith("or unknown)")


def test_nothing_to_split_reports_nothing():
    ids = np.arange(6)
    assert segments.weak_segments(pd.DataFrame(index=range(6)), np.ones(6), ids, **CORE) == []
    assert segments.weak_segments(pd.DataFrame({"x": np.arange(6.0)}), np.arange(6.0), ids,
                                  **CORE) == []


def test_a_held_out_rank_difference_whose_mean_interval_holds_zero_is_no_segment(metadata):
    """The planted segment's losses sit 0.2 above the rest's everywhere, so the tree finds it
    and the held-out rank test passes; but three held-out images outside it have a loss of
    5.0, so the held-out mean difference is about 0 and its interval holds 0. The segment
    would state that difference: it is not reported. Without the three, it is."""
    members = planted(metadata)
    base = 0.1 + np.random.default_rng(4).uniform(0, 0.02, len(metadata)) + 0.2 * members
    ids = metadata["image_id"].to_numpy()
    found = segments.weak_segments(fields(metadata), base, ids, **CORE)
    assert len(found) == 1 and found[0].interval[0] > 0
    _, test = segments.halves(len(metadata), 0)
    outliers = [i for i in test if not members[i]][:3]
    loss = base.copy()
    loss[outliers] = 5.0
    assert segments.weak_segments(fields(metadata), loss, ids, **CORE) == []
    # the fitting half is unchanged, so the tree and its leaf are: on the held-out half the
    # rank test passes and the interval of the mean difference holds 0
    held = np.isin(ids, found[0].held_out_ids)
    rest = np.setdiff1d(test, np.flatnonzero(held))
    assert stats.mannwhitneyu(loss[held], loss[rest], alternative="greater").pvalue < 1e-3
    lo, hi = bootstrap.mean_difference_interval(loss[held], loss[rest], SETTINGS)
    assert lo < 0 < hi
