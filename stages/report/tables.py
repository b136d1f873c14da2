"""The page's tables and sentences, computed from the schemes as read (pure): the IoU
comparison, verdicts, caveats, timing, cluster tables and cards, flagged buckets, the
scheme differences from compare's summary, and the examples' choice."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from stages.report.inputs import SUMMARY_METRICS, Scheme

N_METADATA_FIELDS = 6
SAME = 5e-4  # below this, two IoUs print the same at 3 decimals







def finite(value) -> float | None:
    """A float, or None for null/NaN/inf (all shown as a dash)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def class_union(schemes: list[Scheme]) -> list[str]:
    """Every class name once, in order of first appearance (background leads every scheme)."""
    return list(dict.fromkeys(itertools.chain.from_iterable(s.class_names for s in schemes)))


def comparison_row(label: str, cells: list[tuple[bool, float | None]]) -> dict:
    """One table row; cells are (scheme has this class, value). The delta is only defined
    when exactly two schemes have the class: with more, 'the difference' is ambiguous."""
    members = [i for i, (member, _) in enumerate(cells) if member]
    values = [finite(v) if member else None for member, v in cells]
    row = {"label": label, "cells": [{"member": m, "value": v} for (m, _), v in zip(cells, values)],
           "pair": None, "delta": None, "direction": "", "best": None}
    if len(members) == 2:
        a, b = members
        row["pair"] = (a, b)
        if values[a] is not None and values[b] is not None:
            row["delta"] = values[b] - values[a]
            row["direction"] = "" if abs(row["delta"]) < SAME else (
                "pos" if row["delta"] > 0 else "neg")
    scored = sorted((i for i in members if values[i] is not None), key=lambda i: -values[i])
    if len(scored) >= 2 and values[scored[0]] - values[scored[1]] >= SAME:
        row["best"] = scored[0]
    return row


def comparison_table(schemes: list[Scheme]) -> dict:
    classes = [comparison_row(name, [(name in s.class_names, s.metrics["iou"].get(name))
                                     for s in schemes]) for name in class_union(schemes)]
    summary = [comparison_row(label, [(True, s.metrics[key]) for s in schemes])
               for key, label in SUMMARY_METRICS]
    return {"classes": classes, "summary": summary}


def class_definition(claims: dict, name: str) -> frozenset:
    """What a class claims; background is 'everything no class claims', so it is defined by
    the union of the scheme's claims."""
    pairs = lambda claim: {(k, v) for k, vs in claim.items() for v in vs}  # noqa: E731
    if name == "background":
        return frozenset(("not", p) for claim in claims.values() for p in pairs(claim))
    return frozenset(pairs(claims[name]))


def verdict(name: str, scored: list[tuple[str, float | None]], same_definition: bool) -> str:
    """One sentence saying which scheme scores a shared class higher, and by how much."""
    known = sorted(((s, v) for s, v in scored if v is not None), key=lambda p: -p[1])
    missing = [s for s, v in scored if v is None]
    if len(known) < 2:
        text = (f"{name}: no comparison, the IoU is undefined in {', '.join(missing)} "
                f"(no {name} pixels in its ground truth or predictions)")
    else:
        (high, vh), (low, vl) = known[0], known[-1]
        if vh - vl < SAME:
            text = f"{name}: {' and '.join(s for s, _ in known)} score the same IoU ({vh:.3f})"
        elif len(known) == 2:
            text = (f"{name}: {high} is higher than {low} by {vh - vl:.3f} IoU "
                    f"({vh:.3f} vs {vl:.3f})")
        else:
            text = (f"{name}: highest in {high} ({vh:.3f}), lowest in {low} ({vl:.3f}), "
                    f"a gap of {vh - vl:.3f} IoU")
    if not same_definition:
        text += "; the schemes define this class differently, so this is not like for like"
    return text + "."


def verdicts(schemes: list[Scheme]) -> list[str]:
    sentences = []
    for name in class_union(schemes):
        having = [s for s in schemes if name in s.class_names]
        if len(having) < 2:
            continue
        definitions = {class_definition(s.claims, name) for s in having}
        scored = [(s.name, finite(s.metrics["iou"].get(name))) for s in having]
        sentences.append(verdict(name, scored, len(definitions) == 1))
    return sentences


def unshared(schemes: list[Scheme]) -> list[str]:
    """The classes only one scheme has (car in one, vehicle in the other): no verdict, but
    side by side they are the comparison the study made."""
    sentences = []
    for name in class_union(schemes):
        having = [s for s in schemes if name in s.class_names]
        if len(having) == 1 and len(schemes) > 1:
            value = finite(having[0].metrics["iou"].get(name))
            claims = having[0].claims.get(name, {})
            what = ", ".join(f"{k} {', '.join(v)}" for k, v in claims.items()) or "its claims"
            sentences.append(f"{name}: only in {having[0].name} ({what}), IoU "
                             f"{'undefined' if value is None else f'{value:.3f}'}.")
    return sentences


STUDY = "ImageNet-initialised encoder on COCO 2014 (82,783 train images): person 0.309 / car 0.262"


FEW_IMAGES = 5000


def training_caveats(params: dict, train_images: int | None) -> list[str]:
    """What a reader must know before comparing these numbers with the study's."""
    notes = []
    weights = params["model"]["encoder_weights"]
    if weights == "none":
        notes.append("The encoder was trained from scratch (model.encoder_weights: none), not "
                     "from ImageNet weights as in the study.")
    if train_images is not None and train_images < FEW_IMAGES:
        notes.append(f"Each model saw {train_images} training images for "
                     f"{params['train']['epochs']} epochs at {params['train']['image_size']} px.")
    if notes:
        notes.append(f"Absolute IoUs are therefore not comparable with the study ({STUDY}); "
                     "compare the schemes with each other, on the same data and budget.")
    return notes


def timing_rows(schemes: list[Scheme]) -> list[dict]:
    rows = []
    for s in schemes:
        t, ms = s.timing, s.timing["latency_ms"]
        rows.append({"scheme": s.name, "images": t["images"], "device": t["device"],
                     "batch_size": t["batch_size"], "total": finite(ms["total"]),
                     "mean": finite(ms["mean"]), "variance": finite(ms["variance"]),
                     "median": finite(ms["median"]), "wall_s": finite(t["wall_s"]),
                     "throughput": finite(t["throughput_img_s"])})
    return rows


def cluster_rows(scheme: Scheme) -> dict:
    iou_cols = [f"mean_iou_{c}" for c in scheme.class_names
                if f"mean_iou_{c}" in scheme.clusters.columns]
    rows = [{"cluster": int(r["cluster"]), "size": int(r["size"]),
             "mean_loss": finite(r["mean_loss"]),
             "mean_pixel_accuracy": finite(r["mean_pixel_accuracy"]),
             "grayscale_share": finite(r["grayscale_share"]),
             "ious": [finite(r[c]) for c in iou_cols]}
            for _, r in scheme.clusters.iterrows()]
    return {"iou_classes": [c.removeprefix("mean_iou_") for c in iou_cols], "rows": rows}


def cluster_agreement(summary: dict | None) -> list[dict]:
    """compare's adjusted Rand index of each pair's clusterings on their shared samples: the
    clusters live in each model's own latent space, so this says whether the two models group
    the images alike (1 = same partition, about 0 = unrelated)."""
    return [{"a": p["a"], "b": p["b"], "n": p["images"], "ari": finite(p["cluster_agreement_ari"])}
            for p in (summary or {}).get("pairs", [])]


def field_spread(frame: pd.DataFrame) -> dict[str, float]:
    """Per metadata field: how far apart the mean losses of its populated bins are."""
    populated = frame[(frame["count"] > 0) & frame["mean_loss"].notna()]
    spread = populated.groupby("field")["mean_loss"].agg(lambda v: v.max() - v.min())
    return spread.to_dict()


def informative_fields(schemes: list[Scheme], k: int = N_METADATA_FIELDS) -> list[str]:
    """Fields worth a chart: the class fractions, grayscale and brightness first (the study's
    findings were there), then whatever else separates the losses most."""
    spreads: dict[str, list[float]] = {}
    for s in schemes:
        for name, value in field_spread(s.metadata_loss).items():
            spreads.setdefault(name, []).append(value)
    score = {name: float(np.mean(values)) for name, values in spreads.items()}
    priority = {f"{c}_fraction" for c in class_union(schemes) if c != "background"}
    priority |= {"is_grayscale", "brightness"}
    ranked = sorted(score, key=lambda f: (f not in priority, -score[f], f))
    return [f for f in ranked if score[f] > 0][:k]


def flagged_bins(scheme: Scheme, fields: list[str]) -> list[dict]:
    """The bins of `fields` analyze flagged (its `flagged` column: params analyze.buckets)."""
    loss = scheme.samples["loss"].dropna()
    frame = scheme.metadata_loss
    hits = frame[frame["field"].isin(fields) & frame["flagged"].astype(bool)]
    return [{"scheme": scheme.name, "field": r["field"], "bin": int(r["bin"]),
             "low": float(r["low"]), "high": float(r["high"]), "count": int(r["count"]),
             "mean_loss": float(r["mean_loss"]), "overall": float(loss.mean())}
            for _, r in hits.iterrows()]


def flag_rule(params: dict) -> str:
    """How analyze chose the flagged buckets, in words."""
    buckets = params["analyze"]["buckets"]
    return (f"at least {buckets['min_count']} samples, and losses higher than the other "
            f"samples' (one-sided Mann-Whitney U) with a Benjamini-Hochberg q-value of at most "
            f"{buckets['fdr']:g} over every bin tested")


def charted_fields(schemes: list[Scheme], k: int = N_METADATA_FIELDS) -> list[str]:
    """The informative fields, then every other field in which analyze flagged a bin."""
    fields = informative_fields(schemes, k)
    for s in schemes:
        frame = s.metadata_loss
        for name in frame.loc[frame["flagged"].astype(bool), "field"]:
            if name not in fields:
                fields.append(name)
    return fields


def cluster_cards(scheme: Scheme, changes: pd.DataFrame | None,
                  heatmap_srcs: dict[str, str]) -> list[dict]:
    """One card per cluster: its numbers, dominant categories, representatives (the medoid
    first) with their shared-feature heat-maps, and how its images fare under the other
    scheme (compare's clusters.csv)."""
    stems = dict(zip(scheme.samples["image_id"], scheme.samples["stem"]))
    overall = finite(scheme.samples["loss"].mean())
    cards = []
    for _, r in scheme.clusters.iterrows():
        c = int(r["cluster"])
        reps = []
        for token in str(r["representative_image_ids"]).split():
            try:
                image_id = int(float(token))
            except ValueError:
                continue
            stem = stems.get(image_id)
            if stem is None:
                continue
            key = f"{c}/{stem}"
            loss = scheme.samples.loc[scheme.samples["stem"] == stem, "loss"]
            reps.append({"stem": stem, "heatmap": heatmap_srcs.get(key),
                         "loss": finite(loss.iloc[0]) if len(loss) else None})
        change = []
        if changes is not None and len(changes):
            rows = changes[(changes["clusters_of"] == scheme.name) & (changes["cluster"] == c)]
            for _, ch in rows.iterrows():
                other = ch["b"] if ch["a"] == scheme.name else ch["a"]
                here, there = ((ch["mean_loss_a"], ch["mean_loss_b"]) if ch["a"] == scheme.name
                               else (ch["mean_loss_b"], ch["mean_loss_a"]))
                change.append({"other": other, "here": finite(here), "there": finite(there),
                               "z": finite(ch["z"]) if ch["a"] == scheme.name or
                               finite(ch["z"]) is None else -finite(ch["z"]),
                               "significant": bool(ch["significant"]),
                               "images": int(ch["images"])})
        cards.append({"cluster": c, "size": int(r["size"]), "mean_loss": finite(r["mean_loss"]),
                      "overall": overall, "harder": (finite(r["mean_loss"]) or 0) > (overall or 0),
                      "pixel_accuracy": finite(r["mean_pixel_accuracy"]),
                      "grayscale_share": finite(r["grayscale_share"]),
                      # an empty text reads back from the CSV as NaN
                      "dominant": str(r["dominant_categories"])
                      if isinstance(r["dominant_categories"], str) else "",
                      "representatives": reps, "change": change})
    return cards


def _change_text(row: dict, kind: str) -> str:
    where = (f"cluster {row['cluster']} of {row['clusters_of']}" if kind == "cluster" else
             f"{row['field']} {row['low']:.3g}–{row['high']:.3g} ({row['binning']}, bins of "
             f"{row['bins_of']})")
    z = finite(row["z"])
    return (f"{where}: {row['images']} images, mean loss {row['mean_loss_a']:.3f} → "
            f"{row['mean_loss_b']:.3f} (z {'—' if z is None else f'{z:.1f}'}"
            f"{', significant' if row['significant'] else ''})")


def scheme_differences(summary: dict | None) -> list[dict]:
    """One entry per pair of schemes from compare/summary.json (none without it)."""
    pairs = []
    for p in (summary or {}).get("pairs", []):
        pairs.append({"a": p["a"], "b": p["b"], "images": p["images"],
                      "delta_loss": finite(p["loss"]["mean_delta_loss"]),
                      "z": finite(p["loss"]["z"]), "delta_miou": finite(p["mean_delta_miou"]),
                      "ari": finite(p["cluster_agreement_ari"]),
                      "clusters": [_change_text(r, "cluster")
                                   for r in p["clusters_changing_most"][:3]],
                      "buckets": [_change_text(r, "bucket")
                                  for r in p["buckets_changing_most"][:3]],
                      "only_in": p["label_issues_only_in"]})
    return pairs


def example_candidates(schemes: list[Scheme]) -> pd.DataFrame:
    """Samples every scheme has, with foreground share and the loss gap between schemes."""
    merged = None
    for i, s in enumerate(schemes):
        part = s.samples[["stem", "file_name", "loss"]].rename(columns={"loss": f"loss_{i}"})
        part[f"fg_{i}"] = 1 - s.samples["background_fraction"]
        merged = part if merged is None else merged.merge(part.drop(columns="file_name"), on="stem")
    losses = merged.filter(like="loss_")
    merged["foreground"] = merged.filter(like="fg_").mean(axis=1).fillna(0)
    merged["spread"] = (losses.max(axis=1) - losses.min(axis=1)).fillna(0)
    return merged


def choose_examples(candidates: pd.DataFrame, n: int, compare: bool) -> list[tuple[str, str]]:
    """n (stem, reason) pairs, the same for every scheme and every run: alternately the
    sample where the schemes' losses differ most and the one with the most foreground."""
    by_fg = candidates.sort_values(["foreground", "spread", "stem"],
                                   ascending=[False, False, True])["stem"].tolist()
    by_gap = candidates[candidates["spread"] >= SAME].sort_values(
        ["spread", "foreground", "stem"], ascending=[False, False, True])["stem"].tolist()
    rankings = [(by_gap, "largest loss gap between schemes")] if compare else []
    rankings.append((by_fg, "most labelled foreground"))
    chosen: dict[str, str] = {}
    for picks in itertools.zip_longest(*(r for r, _ in rankings)):
        for stem, (_, reason) in zip(picks, rankings):
            if stem is not None and stem not in chosen and len(chosen) < n:
                chosen[stem] = reason
    return list(chosen.items())


def sample_scores(scheme: Scheme, stem: str) -> dict:
    row = scheme.samples.set_index("stem").loc[stem]
    ious = [(c, finite(row[f"iou_{c}"])) for c in scheme.class_names]
    return {"loss": finite(row["loss"]), "pixel_accuracy": finite(row["pixel_accuracy"]),
            "ious": ious}


def loss_comparison(names: list[str], scores: list[dict]) -> str:
    """Which scheme's model found this sample easier."""
    known = sorted(((n, s["loss"]) for n, s in zip(names, scores) if s["loss"] is not None),
                   key=lambda p: p[1])
    if len(known) < 2:
        return ""
    (best, lo), (worst, hi) = known[0], known[-1]
    if hi - lo < SAME:
        return "the schemes' losses agree"
    return f"lower loss in {best} ({lo:.3f} vs {hi:.3f} in {worst})"
