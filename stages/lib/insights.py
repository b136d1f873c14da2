"""Insights: every finding of the analysis as one record of one shape, ranked, for the
report's Insights section and for tools (`analysis/<scheme>/insights.json`,
`compare/insights.json`; the contract is docs/outputs.md, "Insights", and
stages/schemas/insights.schema.yaml).

A record: `type` (TYPES), `title` (a sentence made from the numbers only), `image_ids`,
`size` (their count), `effect` (the finding's mean loss minus the other images', in loss
units, so that every type ranks on one scale; null where no loss applies), `interval`
([lo, hi] of the effect, or null), `q_value` (null where the finding is no test of a family),
`score` (|effect| x size, null with the effect) and `evidence` (the type's own numbers).
rank() orders a list by score, highest first; records without a score come last.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from stages.lib import bootstrap
from stages.lib.duplicates import LEAK_KINDS, leaked_val_ids
from stages.lib.io import json_safe

TYPES = ("low_performance", "under_represented", "out_of_distribution", "duplicate", "leak",
         "weak_segment", "label_issue", "scheme_change")
KEYS = ("type", "title", "image_ids", "size", "effect", "interval", "q_value", "score",
        "evidence")
WORDS = {"low_performance": "low-performance", "under_represented": "under-represented",
         "out_of_distribution": "out-of-distribution", "duplicate": "duplicate",
         "leak": "leak", "weak_segment": "weak-segment", "label_issue": "label-issue"}
KIND_WORDS = {"exact_bytes": "same bytes", "exact_pixels": "same pixels",
              "near_hash": "near by perceptual hash", "near_latent": "near in the latent space"}
DISTANCE_WORDS = {"near_hash": "at most {} bits apart", "near_latent": "cosine distance at most {}"}
NO_REGION = "no confident disagreement region"
SPLIT_WORDS = {"train-val": "train and val"}


def _finite(value) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def record(kind: str, title: str, image_ids, effect=None, interval=None, q_value=None,
           evidence: dict | None = None) -> dict:
    """One finding in the contract's shape: NaN becomes None, the size and the score are
    derived, so no builder can get them wrong."""
    if kind not in TYPES:
        raise ValueError(f"unknown insight type {kind!r} (known: {', '.join(TYPES)})")
    ids = [int(i) for i in image_ids]
    effect = _finite(effect)
    bounds = None if interval is None else [_finite(v) for v in interval]
    return {"type": kind, "title": title, "image_ids": ids, "size": len(ids), "effect": effect,
            "interval": None if bounds is None or None in bounds else bounds,
            "q_value": _finite(q_value),
            "score": None if effect is None else abs(effect) * len(ids),
            "evidence": json_safe(evidence or {})}


def rank(records: list[dict]) -> list[dict]:
    """Highest score first; records without a score after all others; ties by type (TYPES
    order), then title, so the order never depends on the builders'."""
    return sorted(records, key=lambda r: (r["score"] is None, -(r["score"] or 0.0),
                                          TYPES.index(r["type"]), r["title"]))


def to_json(records: list[dict]) -> str:
    """The insights.json text: the ranked list, NaN and inf as null (json_safe)."""
    return json.dumps(json_safe(rank(records)), indent=2, allow_nan=False) + "\n"


# ---------------------------------------------------------------- words

def _n(value: float) -> str:
    return f"{value:.3g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _loss_words(inside: float, outside: float, interval, confidence: float,
                rest: str = "the rest") -> str:
    """'mean loss 1.9 vs 0.61 for the rest (difference 1.29, 95% interval 0.9 to 1.7)'."""
    words = f"mean loss {_n(inside)} vs {_n(outside)} for {rest} (difference {_n(inside - outside)}"
    if interval is not None:
        words += f", {confidence:.0%} interval {_n(interval[0])} to {_n(interval[1])}"
    return words + ")"


def _q_words(q: float) -> str:
    return f"q = {q:.2g}"


def _diff(inside, outside):
    return None if inside is None else inside - outside


def _group_effect(ids: np.ndarray, loss: pd.Series, settings: bootstrap.Settings):
    """(mean inside, mean outside, interval) of the losses of `ids` against the other
    images of `loss` (a Series by image id); NaN losses left out."""
    known = loss.dropna()
    inside = known.index.isin(ids)
    a, b = known[inside].to_numpy(float), known[~inside].to_numpy(float)
    if not len(a) or not len(b):
        return None, None, None
    return float(a.mean()), float(b.mean()), bootstrap.mean_difference_interval(a, b, settings)


# ---------------------------------------------------------------- builders

def from_clusters(table: pd.DataFrame, confidence: float) -> list[dict]:
    """low_performance and under_represented records from representation.cluster_findings'
    table (its rows with a finding). q_value: the loss test's; the representation test's is
    in the evidence."""
    out = []
    for row in table[table["finding"] != ""].itertuples():
        title = (f"Cluster {row.cluster}: {_count(row.val_images, 'val image')}, "
                 f"{_loss_words(row.mean_loss, row.mean_loss_rest, row.interval, confidence)}"
                 f", {_q_words(row.q_value)}; it holds {row.train_share:.1%} of the training "
                 f"images and {row.val_share:.1%} of the clustered val images")
        if row.finding == "under_represented":
            title += (f" (ratio {_n(row.share_ratio)}, Fisher "
                      f"{_q_words(row.representation_q_value)})")
        out.append(record(row.finding, title, row.image_ids, row.effect, row.interval,
                          row.q_value, {
                              "cluster": row.cluster, "mean_loss": row.mean_loss,
                              "mean_loss_rest": row.mean_loss_rest,
                              "val_share": row.val_share, "train_share": row.train_share,
                              "share_ratio": row.share_ratio,
                              "representation_q_value": row.representation_q_value}))
    return out


def from_out_of_distribution(image_ids, flags, scores, loss: pd.Series, *, k: int,
                             quantile: float, threshold: float,
                             settings: bootstrap.Settings) -> list[dict]:
    """One record for the val images farther from the training set than `quantile` of the
    training images are from the rest of it (representation.out_of_distribution), or none.
    No q-value: the set is defined by a threshold, not tested."""
    flags = np.asarray(flags, bool)
    order = np.argsort(np.asarray(image_ids)[flags], kind="stable")
    ids = np.asarray(image_ids)[flags][order]
    if not len(ids):
        return []
    inside, outside, interval = _group_effect(ids, loss, settings)
    title = (f"{_count(len(ids), 'val image')} farther from the training images than "
             f"{quantile:.0%} of the training images lie from the rest of them (mean cosine "
             f"distance to the {k} nearest above {_n(threshold)})")
    if inside is not None:
        title += f": {_loss_words(inside, outside, interval, settings.confidence)}"
    return [record("out_of_distribution", title, ids, _diff(inside, outside), interval, None,
                   {"k": k, "quantile": quantile, "threshold": threshold,
                    "scores": np.asarray(scores, float)[flags][order]})]


def _kind_counts(pairs: pd.DataFrame) -> str:
    counts = pairs["kind"].value_counts()
    return ", ".join(f"{counts[k]} {KIND_WORDS[k]}" for k in KIND_WORDS if k in counts)


def from_duplicates(pairs: pd.DataFrame, loss: pd.Series | None,
                    settings: bootstrap.Settings) -> list[dict]:
    """A leak record for the val images with a train twin of a LEAK_KINDS kind (effect:
    their mean loss against the other val images', when `loss`, by val image id, is given)
    and one duplicate record per split and kind for the other pairs: those within a split
    (a copy inside one split does not score the model on what it saw) and the train-val
    pairs only the latent space finds (split "train-val": not shown to be copies). No
    effect on a duplicate record."""
    out = []
    leaked = leaked_val_ids(pairs)
    crossing = pairs["split_a"] != pairs["split_b"]
    across = pairs[crossing & pairs["kind"].isin(LEAK_KINDS)]
    if leaked:
        title = (f"{_count(len(leaked), 'val image')} with a copy among the training images "
                 f"(pairs: {_kind_counts(across)})")
        inside = outside = interval = None
        if loss is not None:
            inside, outside, interval = _group_effect(np.array(leaked), loss, settings)
        if inside is not None:
            title += (": " + _loss_words(inside, outside, interval, settings.confidence,
                                         "the other val images"))
        out.append(record("leak", title, leaked, _diff(inside, outside), interval, None,
                          {"pairs": across[["image_id_a", "image_id_b", "kind", "distance"]]
                           .to_dict("records")}))
    rest = pairs[~crossing | ~pairs["kind"].isin(LEAK_KINDS)]
    splits = rest["split_a"].where(rest["split_a"] == rest["split_b"], "train-val")
    for (split, kind), group in rest.groupby([splits, rest["kind"]], sort=True):
        ids = sorted(set(group["image_id_a"]) | set(group["image_id_b"]))
        title = (f"{_count(len(group), 'pair')} of {SPLIT_WORDS.get(split, split)} images, "
                 f"{KIND_WORDS[kind]}")
        if kind in DISTANCE_WORDS:
            title += f" ({DISTANCE_WORDS[kind].format(_n(group['distance'].max()))})"
        if split == "train-val":
            title += "; not counted as leaks"
        out.append(record("duplicate", title, ids, evidence={
            "split": split, "kind": kind, "pairs": len(group)}))
    return out


def from_segments(segments, confidence: float) -> list[dict]:
    """A weak_segment record per segments.Segment: all its members as image_ids; the effect,
    interval and q-value of its held-out half."""
    return [record("weak_segment", _segment_title(s, confidence), s.member_ids, s.effect,
                   s.interval, s.q_value,
                   {"conditions": [vars(c) for c in s.conditions],
                    "held_out_ids": s.held_out_ids, "mean_loss": s.mean_inside,
                    "mean_loss_rest": s.mean_outside, "p_value": s.p_value})
            for s in segments]


def _segment_title(s, confidence: float) -> str:
    loss = _loss_words(s.mean_inside, s.mean_outside, s.interval, confidence)
    size = _count(len(s.member_ids), "image")
    return (f"{s.text}: {size} ({len(s.held_out_ids)} held out), on the held-out half {loss}, "
            f"{_q_words(s.q_value)}")


def from_label_issues(table: pd.DataFrame, settings: bootstrap.Settings) -> list[dict]:
    """label_issue records from analyze's label_issues.csv: its flagged images grouped by
    their main disagreement ('labelled background, model says person'), the effect their
    mean loss against every other image of the table. No q-value: cleanlab ranks, it does
    not test."""
    flagged = table[table["flagged"].astype(bool)]
    loss = table.set_index("image_id")["loss"]
    out = []
    reasons = flagged["main_disagreement"].fillna("")
    for reason, group in flagged.groupby(reasons, sort=True):
        group = group.sort_values("image_id")
        ids = group["image_id"].astype(int).tolist()
        inside, outside, interval = _group_effect(np.array(ids), loss, settings)
        quality = group["label_quality"]
        low, high = _n(quality.min()), _n(quality.max())
        # one image, or several that print alike: one value, not "0.0413 to 0.0413"
        title = (f"{_count(len(ids), 'suspected label issue')} ({reason or NO_REGION}), "
                 f"cleanlab label quality {low if low == high else f'{low} to {high}'}")
        if inside is not None:
            title += ": " + _loss_words(inside, outside, interval, settings.confidence,
                                        "the other images")
        out.append(record("label_issue", title, ids, _diff(inside, outside), interval, None,
                          {"main_disagreement": reason, "label_quality": quality.to_numpy()}))
    return out


# ---------------------------------------------------------------- between schemes

def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def scheme_changes(per_scheme: dict[str, list[dict]], min_jaccard: float) -> list[dict]:
    """For every ordered pair of schemes (s, o), a scheme_change record per finding of s with
    no finding of the same type under o whose images overlap it by a Jaccard index of at
    least min_jaccard (clusters are matched by their images: their numbers differ between
    schemes). The record carries the finding's images, effect, interval and q-value."""
    out = []
    for scheme, findings in per_scheme.items():
        for other, theirs in per_scheme.items():
            if other == scheme:
                continue
            for finding in findings:
                if finding["type"] == "scheme_change":
                    continue
                closest = max((jaccard(finding["image_ids"], t["image_ids"]) for t in theirs
                               if t["type"] == finding["type"]), default=0.0)
                if closest < min_jaccard:
                    out.append(_change(finding, scheme, other, closest, min_jaccard))
    return out


def _change(finding: dict, scheme: str, other: str, closest: float, min_jaccard: float) -> dict:
    words = WORDS[finding["type"]]
    title = (f"Under {scheme}, not under {other}: {finding['title']} (no {words} finding under "
             f"{other} shares {min_jaccard:.0%} of these images; the closest shares "
             f"{closest:.0%})")
    return record("scheme_change", title, finding["image_ids"], finding["effect"],
                  finding["interval"], finding["q_value"],
                  {"scheme": scheme, "other": other, "finding_type": finding["type"],
                   "closest_jaccard": closest})
