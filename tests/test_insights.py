"""The insights record contract: derived size and score, the ranking, the scheme_change diff
and every builder against hand-built cases, a JSON round trip with null for NaN, and every
record valid under docs/insights.schema.json."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from stages.lib import insights
from stages.lib.bootstrap import Settings
from stages.lib.segments import Condition, Segment

SETTINGS = Settings(1000, 0.95, 0)
SCHEMA = json.loads((ROOT / "docs" / "insights.schema.json").read_text())


def valid(records: list[dict]) -> list[dict]:
    jsonschema.validate(json.loads(insights.to_json(records)), SCHEMA)
    return records


def test_a_record_derives_size_and_score_and_turns_nan_into_none():
    r = insights.record("leak", "t", np.array([3, 1]), effect=np.float64(-0.5),
                        interval=[np.nan, 1.0], q_value=float("nan"), evidence={"x": np.nan})
    assert r == {"type": "leak", "title": "t", "image_ids": [3, 1], "size": 2, "effect": -0.5,
                 "interval": None, "q_value": None, "score": 1.0, "evidence": {"x": None}}
    assert list(r) == list(insights.KEYS)
    none = insights.record("duplicate", "d", [1, 2, 3])
    assert (none["effect"], none["score"], none["interval"]) == (None, None, None)
    with pytest.raises(ValueError, match="unknown insight type 'big'"):
        insights.record("big", "t", [])


def test_ranking_is_by_effect_times_size_then_type_then_title():
    records = [insights.record("weak_segment", "b", range(10), effect=0.5),     # 5.0
               insights.record("low_performance", "z", range(3), effect=-2.0),  # 6.0
               insights.record("duplicate", "a", range(50)),                     # no score
               insights.record("low_performance", "y", range(5), effect=1.0),    # 5.0
               insights.record("weak_segment", "a", range(5), effect=1.0),       # 5.0
               insights.record("leak", "c", range(2))]                           # no score
    ranked = insights.rank(records)
    assert [(r["type"], r["title"]) for r in ranked] == [
        ("low_performance", "z"), ("low_performance", "y"), ("weak_segment", "a"),
        ("weak_segment", "b"), ("duplicate", "a"), ("leak", "c")]
    assert [r["score"] for r in ranked] == [6.0, 5.0, 5.0, 5.0, None, None]


def test_json_round_trip_writes_null_for_nan_and_keeps_the_rank():
    records = [insights.record("out_of_distribution", "far", [4], effect=0.25,
                               evidence={"scores": np.array([np.nan, 0.5]), "k": np.int64(5)}),
               insights.record("weak_segment", "big", [1, 2], effect=2.0, interval=[1.0, 3.0],
                               q_value=0.01)]
    text = insights.to_json(records)
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back == [
        {"type": "weak_segment", "title": "big", "image_ids": [1, 2], "size": 2, "effect": 2.0,
         "interval": [1.0, 3.0], "q_value": 0.01, "score": 4.0, "evidence": {}},
        {"type": "out_of_distribution", "title": "far", "image_ids": [4], "size": 1,
         "effect": 0.25, "interval": None, "q_value": None, "score": 0.25,
         "evidence": {"scores": [None, 0.5], "k": 5}}]
    jsonschema.validate(back, SCHEMA)


def finding(kind: str, ids, title: str, effect: float = 1.0) -> dict:
    return insights.record(kind, title, ids, effect=effect, interval=[0.5, 1.5], q_value=0.01)


def test_scheme_changes_match_findings_by_image_overlap_not_by_number():
    car = [finding("low_performance", range(1, 11), "cluster 0 of person_car"),
           finding("weak_segment", range(20, 26), "segment s")]
    vehicle = [finding("low_performance", range(2, 12), "cluster 3 of person_vehicle"),
               finding("under_represented", [30, 31], "cluster 1 of person_vehicle", 2.0),
               finding("weak_segment", [20, 21], "segment t")]
    changes = insights.scheme_changes({"person_car": car, "person_vehicle": vehicle}, 0.5)
    # cluster 0 and cluster 3 share 9 of 11 images: the same finding, no change
    assert [(c["evidence"]["scheme"], c["evidence"]["finding_type"], c["image_ids"],
             round(c["evidence"]["closest_jaccard"], 4)) for c in changes] == [
        ("person_car", "weak_segment", list(range(20, 26)), round(2 / 6, 4)),
        ("person_vehicle", "under_represented", [30, 31], 0.0),
        ("person_vehicle", "weak_segment", [20, 21], round(2 / 6, 4))]
    assert changes[1]["title"] == (
        "Under person_vehicle, not under person_car: cluster 1 of person_vehicle (no "
        "under-represented finding under person_car shares 50% of these images; the closest "
        "shares 0%)")
    assert (changes[1]["effect"], changes[1]["interval"], changes[1]["q_value"],
            changes[1]["score"]) == (2.0, [0.5, 1.5], 0.01, 4.0)
    assert changes[0]["title"].endswith("(no weak-segment finding under person_vehicle shares "
                                        "50% of these images; the closest shares 33%)")
    valid(changes)


def test_identical_findings_under_every_scheme_make_no_change():
    same = [finding("low_performance", range(5), "c"), finding("leak", [9], "l")]
    assert insights.scheme_changes({"a": same, "b": list(same), "c": list(same)}, 0.9) == []
    # three schemes: a finding only b has differs from a and from c
    only_b = insights.scheme_changes({"a": [], "b": same[:1], "c": []}, 0.9)
    assert [(c["evidence"]["scheme"], c["evidence"]["other"]) for c in only_b] == [
        ("b", "a"), ("b", "c")]


def cluster_table() -> pd.DataFrame:
    base = {"val_share": 0.5, "p_value": 0.01, "representation_p_value": 0.001}
    return pd.DataFrame([
        {**base, "cluster": 0, "val_images": 4, "train_images": 1, "train_share": 0.1,
         "share_ratio": 0.2, "mean_loss": 2.0, "mean_loss_rest": 0.5, "effect": 1.5,
         "interval": [1.0, 2.0], "q_value": 0.02, "representation_q_value": 0.002,
         "finding": "under_represented", "image_ids": [1, 2, 3, 4]},
        {**base, "cluster": 1, "val_images": 1, "train_images": 9, "train_share": 0.9,
         "share_ratio": 1.8, "mean_loss": 1.25, "mean_loss_rest": 0.5, "effect": 0.75,
         "interval": None, "q_value": 0.05, "representation_q_value": 1.0,
         "finding": "low_performance", "image_ids": [5]},
        {**base, "cluster": 2, "val_images": 3, "train_images": 3, "train_share": 0.3,
         "share_ratio": 0.6, "mean_loss": 0.1, "mean_loss_rest": 0.9, "effect": -0.8,
         "interval": [-1.0, -0.6], "q_value": 0.9, "representation_q_value": 0.9,
         "finding": "", "image_ids": [6, 7, 8]}])


def test_cluster_records_state_the_numbers():
    under, low = valid(insights.from_clusters(cluster_table(), 0.95))
    assert under["type"] == "under_represented" and under["title"] == (
        "Cluster 0: 4 val images, mean loss 2 vs 0.5 for the rest (difference 1.5, 95% "
        "interval 1 to 2), q = 0.02; it holds 10.0% of the training images and 50.0% of the "
        "clustered val images (ratio 0.2, Fisher q = 0.002)")
    assert (under["effect"], under["score"], under["q_value"]) == (1.5, 6.0, 0.02)
    assert under["evidence"]["representation_q_value"] == 0.002
    assert low["type"] == "low_performance" and low["interval"] is None
    assert low["title"] == (
        "Cluster 1: 1 val image, mean loss 1.25 vs 0.5 for the rest (difference 0.75), "
        "q = 0.05; it holds 90.0% of the training images and 50.0% of the clustered val "
        "images")


def test_segment_records_carry_the_held_out_evidence():
    segment = Segment((Condition("person_fraction", 0.4, None, False),
                       Condition("is_grayscale", 0.5, None, False)),
                      "person_fraction > 0.4 and is_grayscale", [1, 2, 3, 4, 5, 6], [2, 4, 6],
                      1.9, 0.6, 1.3, [0.9, 1.7], 0.001, 0.004)
    (r,) = valid(insights.from_segments([segment], 0.9))
    assert r["title"] == ("person_fraction > 0.4 and is_grayscale: 6 images (3 held out), on "
                          "the held-out half mean loss 1.9 vs 0.6 for the rest (difference "
                          "1.3, 90% interval 0.9 to 1.7), q = 0.004")
    assert (r["image_ids"], r["size"], r["effect"], r["q_value"]) == (
        [1, 2, 3, 4, 5, 6], 6, 1.3, 0.004)
    assert r["score"] == pytest.approx(7.8)
    assert r["evidence"]["conditions"][0] == {"field": "person_fraction", "above": 0.4,
                                              "at_most": None, "missing": False}
    assert r["evidence"]["held_out_ids"] == [2, 4, 6]


PAIRS = pd.DataFrame([(10, "train", 1, "val", "exact_bytes", 0.0),
                      (11, "train", 2, "val", "near_hash", 3.0),
                      (12, "train", 13, "train", "exact_pixels", 0.0),
                      (3, "val", 4, "val", "near_latent", 0.01),
                      (5, "val", 6, "val", "near_latent", 0.004),
                      (14, "train", 7, "val", "near_latent", 0.012)],
                     columns=["image_id_a", "split_a", "image_id_b", "split_b", "kind",
                              "distance"])


def test_duplicate_records_split_leaks_from_copies_within_a_split():
    loss = pd.Series([0.1, 0.3, 1.0, 1.0, 1.2, np.nan], index=[1, 2, 3, 4, 5, 6])
    leak, train_copies, latent_across, val_copies = valid(
        insights.from_duplicates(PAIRS, loss, SETTINGS))
    # the latent-only train-val pair (14, 7) is no leak: a duplicate record of its own
    assert leak["type"] == "leak" and leak["image_ids"] == [1, 2]
    assert leak["effect"] == pytest.approx(0.2 - (1.0 + 1.0 + 1.2) / 3)   # NaN loss left out
    assert leak["title"].startswith(
        "2 val images with a copy among the training images (pairs: 1 same bytes, 1 near by "
        "perceptual hash): mean loss 0.2 vs 1.07 for the other val images (difference -0.867, "
        "95% interval ")
    assert [p["image_id_b"] for p in leak["evidence"]["pairs"]] == [1, 2]
    assert (train_copies["title"], train_copies["image_ids"], train_copies["score"]) == (
        "1 pair of train images, same pixels", [12, 13], None)
    assert (val_copies["title"], val_copies["image_ids"]) == (
        "2 pairs of val images, near in the latent space (cosine distance at most 0.01)",
        [3, 4, 5, 6])
    assert (latent_across["title"], latent_across["image_ids"], latent_across["effect"]) == (
        "1 pair of train and val images, near in the latent space (cosine distance at most "
        "0.012); not counted as leaks", [7, 14], None)
    assert latent_across["evidence"] == {"split": "train-val", "kind": "near_latent",
                                         "pairs": 1}
    # without losses the leak is still reported, with no effect
    (no_loss, *_) = insights.from_duplicates(PAIRS, None, SETTINGS)
    assert (no_loss["effect"], no_loss["score"]) == (None, None)
    assert insights.from_duplicates(PAIRS.iloc[:0], loss, SETTINGS) == []


def test_label_issue_records_group_the_flagged_images_by_their_disagreement():
    table = pd.DataFrame({  # analyze's label_issues.csv, worst first
        "rank": [1, 2, 3, 4, 5], "image_id": [7, 3, 5, 9, 8], "stem": list("abcde"),
        "label_quality": [0.01, 0.02, 0.05, 0.5, 0.6], "loss": [2.0, 1.8, 1.0, 0.4, 0.2],
        "flagged": [True, True, True, False, False],
        "main_disagreement": ["labelled background, model says person"] * 2 + [np.nan] * 3})
    lone, pair = valid(insights.from_label_issues(table, SETTINGS))
    assert pair["image_ids"] == [3, 7] and pair["evidence"]["label_quality"] == [0.02, 0.01]
    assert pair["effect"] == pytest.approx(1.9 - (1.0 + 0.4 + 0.2) / 3)
    assert pair["title"].startswith(
        "2 suspected label issues (labelled background, model says person), cleanlab label "
        "quality 0.01 to 0.02: mean loss 1.9 vs 0.533 for the other images (difference 1.37, "
        "95% interval ")
    assert lone["title"] == (
        "1 suspected label issue (no confident disagreement region), cleanlab label quality "
        "0.05: mean loss 1 vs 1.1 for the other images (difference -0.1)")
    assert lone["interval"] is None and lone["q_value"] is None
    # two images whose qualities print alike (3 significant digits) read as one value too
    table.loc[1, "label_quality"] = 0.010004
    (_, alike) = insights.from_label_issues(table, SETTINGS)
    assert alike["title"].startswith("2 suspected label issues (labelled background, model "
                                     "says person), cleanlab label quality 0.01: mean loss")


def test_the_out_of_distribution_record():
    loss = pd.Series([1.0, 0.2, 2.0, 0.4], index=[5, 3, 9, 7])
    (r,) = valid(insights.from_out_of_distribution(
        [9, 3, 5, 7], [True, False, True, False], [0.5, 0.1, 0.4, 0.05], loss, k=5,
        quantile=0.99, threshold=0.3, settings=SETTINGS))
    assert r["image_ids"] == [5, 9] and r["evidence"]["scores"] == [0.4, 0.5]
    assert r["effect"] == pytest.approx(1.5 - 0.3) and r["q_value"] is None
    assert r["title"].startswith(
        "2 val images farther from the training images than 99% of the training images lie "
        "from the rest of them (mean cosine distance to the 5 nearest above 0.3): mean loss "
        "1.5 vs 0.3 for the rest (difference 1.2, 95% interval ")
    assert insights.from_out_of_distribution([1], [False], [0.1], loss, k=5, quantile=0.99,
                                             threshold=0.3, settings=SETTINGS) == []


def test_the_planted_segment_of_the_real_sample_becomes_the_top_record(sample_metadata):
    from test_segments import CORE, fields, noise, planted

    from stages.lib import segments

    loss = noise(len(sample_metadata), 0) + 1.0 * planted(sample_metadata)
    found = segments.weak_segments(fields(sample_metadata), loss,
                                   sample_metadata["image_id"].to_numpy(), **CORE)
    weak = insights.from_segments(found, CORE["settings"].confidence)
    copies = insights.record("duplicate", "copies", range(100))   # larger, but no score
    (top, last) = json.loads(insights.to_json([copies, *weak]))
    jsonschema.validate([top, last], SCHEMA)
    assert top["type"] == "weak_segment" and last["type"] == "duplicate"
    assert top["title"].startswith("person_fraction > 0.05699 and grayscale_score <= 16.47: ")
    assert top["score"] == pytest.approx(abs(found[0].effect) * len(found[0].member_ids))
