"""The page's tables and sentences, computed from the schemes as read (pure): the IoU
comparison, verdicts, caveats, timing, cluster tables and cards, flagged buckets, the
scheme differences from compare's summary, and the examples' choice."""
from __future__ import annotations

import itertools
import math
import re

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


def verdict(name: str, entry: dict, a: str, b: str, confidence: float) -> str:
    """One sentence on a shared class from compare's paired bootstrap (summary.json's
    pair["classes"][name]): "higher"/"lower" only when the interval excludes zero."""
    va, vb, delta = finite(entry["iou_a"]), finite(entry["iou_b"]), finite(entry["delta_iou"])
    lo, hi = (finite(v) for v in entry["interval"])
    level = f"{confidence:.0%}"
    if None in (va, vb, delta):
        text = f"{name}: no comparison, the IoU is undefined in {a if va is None else b}"
    elif lo is None or hi is None:
        text = (f"{name}: {b} {vb:.3f}, {a} {va:.3f}; no interval (the IoU is undefined in "
                f"most resamples of the val images), so no verdict")
    elif entry["verdict"] == "no detectable difference":
        text = (f"{name}: no detectable difference between {b} and {a} ({vb:.3f} vs {va:.3f}"
                f"{_seed_mean(entry)}; {_not_called(entry, level, lo, hi)})")
    else:
        word = "higher" if entry["verdict"] == "higher" else "lower"
        text = (f"{name}: {b} is {word} than {a} by {abs(delta):.3f} IoU ({vb:.3f} vs "
                f"{va:.3f}{_seed_mean(entry)}; {level} interval of the difference {lo:+.3f} "
                f"to {hi:+.3f})")
    if not entry["same_definition"]:
        text += "; the schemes define this class differently, so this is not like for like"
    return text + "."


def _seed_mean(entry: dict) -> str:
    """', mean of 2 seeds, per seed +0.010 and +0.020' with more than one training seed."""
    per_seed = entry.get("per_seed") or []
    if len(per_seed) < 2:
        return ""
    deltas = " and ".join("—" if d is None else f"{d:+.3f}" for d in per_seed)
    return f", means over {len(per_seed)} seeds; the difference per seed {deltas}"


def _not_called(entry: dict, level: str, lo: float, hi: float) -> str:
    """Why no verdict: the interval holds 0, or compare's reason (too few images, seeds that
    disagree) although it does not."""
    bounds = f"the {level} interval of the difference, {lo:+.3f} to {hi:+.3f}"
    if entry.get("reason") == "the seeds disagree on its sign":
        return f"{bounds}, excludes 0, but the seeds disagree on its sign"
    if entry.get("reason") == "fewer than compare.min_images val images show it":
        return (f"{bounds}, comes from {entry['images']} val images showing it, too few to "
                f"call a difference")
    return f"{bounds}, includes 0"


def verdicts(summary: dict | None) -> list[str]:
    """A sentence per shared class and pair of schemes, from compare's intervals; none
    without compare (no interval, so no claim that one scheme is better)."""
    confidence = (summary or {}).get("bootstrap", {}).get("confidence")
    return [verdict(name, entry, p["a"], p["b"], confidence)
            for p in (summary or {}).get("pairs", []) if confidence is not None
            for name, entry in p.get("classes", {}).items()]


def seed_note(summary: dict | None, schemes: list[Scheme]) -> str:
    """What the intervals cover, and whether training noise was measured."""
    seeds = ((summary or {}).get("seeds") or {}).get("seeds") or (
        schemes[0].metrics["seeds"]["seeds"] if schemes else [])
    if len(seeds) < 2:
        return ("One training run per scheme: training noise was not measured, so the "
                "intervals cover the choice of val images only (a paired bootstrap over them), "
                "not what another training run would give.")
    listed = ", ".join(str(s) for s in seeds)
    return (f"{len(seeds)} training runs per scheme (seeds {listed}): the verdicts compare "
            f"the mean over seeds, with the interval of that mean over resampled val images, "
            f"and call a difference only when every seed agrees on its sign. The spread over "
            f"seeds is in the table below. The other sections show the model of seed "
            f"{seeds[0]}.")


def seed_spread(schemes: list[Scheme]) -> list[dict]:
    """Per score (each class's IoU, then mIoU and pixel accuracy), per scheme: the mean over
    training seeds and its min–max (evaluate's "seeds" block); empty with one seed."""
    if not schemes or len(schemes[0].metrics["seeds"]["seeds"]) < 2:
        return []
    rows = [{"label": f"IoU {name}",
             "cells": [_spread(s.metrics["seeds"]["iou"].get(name)) for s in schemes]}
            for name in class_union(schemes)]
    rows += [{"label": label,
              "cells": [_spread(s.metrics["seeds"].get(key)) for s in schemes]}
             for key, label in SUMMARY_METRICS if key in schemes[0].metrics["seeds"]]
    return rows


def _spread(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    return {"mean": finite(entry["mean"]), "min": finite(entry["min"]),
            "max": finite(entry["max"]), "per_seed": [finite(v) for v in entry["per_seed"]]}


def weak_classes(scheme: Scheme, threshold: float) -> list[str]:
    """The classes (background aside) the model has not learned: val IoU, or the upper end
    of its interval when evaluate wrote one, below report.min_class_iou."""
    interval = scheme.metrics.get("interval", {}).get("iou", {})
    weak = []
    for name in scheme.class_names[1:]:
        upper = finite((interval.get(name) or [None, None])[1])
        value = upper if upper is not None else finite(scheme.metrics["iou"].get(name))
        if value is None or value < threshold:
            weak.append(name)
    return weak


def weak_warning(name: str) -> str:
    return (f"the model has not learned {name}; findings about {name} describe the model's "
            f"failure, not the data")


def named(classes: list[str], text: str) -> list[str]:
    """The classes a label issue's disagreement names ("labelled background, model says
    car"): where the model has not learned one, the issue is its failure, not the label's."""
    return [c for c in classes if re.search(rf"\b{re.escape(c)}\b", text)]


CATEGORIES_FIRST = ("person",)
CATEGORY_GROUP_FIRST = "vehicle"


def category_order(schemes: list[Scheme]) -> list[str]:
    """person, then the vehicle supercategory (the study's hypothesis), then the rest; by
    counted pixels within each group."""
    frame = pd.concat([s.categories[["category", "supercategory", "pixels"]] for s in schemes])
    pixels = frame.groupby("category")["pixels"].max()
    group = frame.drop_duplicates("category").set_index("category")["supercategory"]
    rank = lambda c: (c not in CATEGORIES_FIRST, group[c] != CATEGORY_GROUP_FIRST,  # noqa: E731
                      -pixels[c], c)
    return sorted(pixels.index, key=rank)


def category_rows(schemes: list[Scheme], summary: dict | None) -> list[dict]:
    """The table "what each category becomes": per scheme the class claiming the category
    and the shares of its pixels predicted as each class (evaluate's categories.csv); per
    pair of two schemes, compare's found-share difference with its interval."""
    pairs = (summary or {}).get("pairs", [])
    differences = pairs[0].get("categories", {}) if len(pairs) == 1 else {}
    rows = []
    for name in category_order(schemes):
        cells = []
        for s in schemes:
            found = s.categories[s.categories["category"] == name]
            if found.empty:
                cells.append(None)
                continue
            r = found.iloc[0]
            shares = sorted(((c, finite(r[f"pred_{c}"])) for c in s.class_names),
                            key=lambda p: -(p[1] or 0))
            rate = r["instance_recall"] if r["claimed_by"] else r["instance_pull"]
            cells.append({"claimed_by": r["claimed_by"], "instances": int(r["instances"]),
                          "shares": [(c, v) for c, v in shares if v], "rate": finite(rate)})
        diff = differences.get(name)
        rows.append({"category": name, "supercategory": schemes[0].categories.set_index(
            "category")["supercategory"].get(name, ""), "cells": cells,
            "difference": None if diff is None else {
                "delta": finite(diff["delta_share"]), "verdict": diff["verdict"],
                "interval": [finite(v) for v in diff["interval"]]}})
    return rows


def study_sentence(schemes: list[Scheme]) -> str:
    """The study's hypothesis in numbers, read from the category tables: under each scheme,
    the share of car, truck and bus pixels predicted as the class that claims car."""
    parts = []
    for s in schemes:
        table = s.categories.set_index("category")
        if "car" not in table.index or not table.loc["car", "claimed_by"]:
            continue
        cls = table.loc["car", "claimed_by"]
        shares = [f"{table.loc[c, f'pred_{cls}']:.0%} of {c} pixels"
                  for c in ("car", "truck", "bus") if c in table.index]
        listed = (", ".join(shares[:-1]) + " and " + shares[-1]) if len(shares) > 1 else shares[0]
        parts.append(f"under {s.name}, {listed} are predicted {cls}")
    if not parts:
        return ""
    sentence = "; ".join(parts) + "."
    return sentence[0].upper() + sentence[1:]


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


def recipe_changes(train: dict) -> list[str]:
    """How params.yaml's training differs from the study's recipe, in words."""
    changes = []
    if train["loss"] != "ce":
        weighted = train["loss"].startswith("weighted")
        changes.append(f"loss {train['loss']}"
                       + (f" with {train['class_weights']} class weights" if weighted else ""))
    if train["sampler"] != "uniform":
        changes.append(f"{train['sampler'].replace('_', '-')} sampling of the training images")
    low, high = train["augment"]["crop_scale"]
    if (low, high) != (1, 1):
        changes.append(f"random resized crops of {low:g}–{high:g} of the image area")
        if train["augment"]["rare_crop"]:
            share = train["augment"]["rare_crop"]
            changes.append(f"{share:.0%} of them centred on the image's rarest class")
    if any(v > 0 for v in train["augment"]["colour_jitter"].values()):
        changes.append("colour jitter")
    if train["schedule"] != "constant":
        changes.append(f"{train['schedule'].replace('_', ' ')} learning-rate schedule")
    return changes


def training_caveats(params: dict, train_images: int | None) -> list[str]:
    """What a reader must know before comparing these numbers with the study's."""
    notes = []
    weights = params["model"]["encoder_weights"]
    if weights == "none":
        notes.append("The encoder was trained from scratch (model.encoder_weights: none), not "
                     "from ImageNet weights as in the study.")
    recipe = recipe_changes(params["train"])
    if recipe:
        notes.append(f"Trained with the small-data recipe ({', '.join(recipe)}); the study "
                     "trained with plain cross-entropy, no augmentation and a constant learning "
                     "rate (README, \"Reproducing the study on one GPU\").")
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
             "ious": [finite(r[c]) for c in iou_cols], **cluster_shares(r)}
            for _, r in scheme.clusters.iterrows()]
    return {"iou_classes": [c.removeprefix("mean_iou_") for c in iou_cols], "rows": rows}


def cluster_shares(row: pd.Series) -> dict:
    """A clusters.csv row's train images, train share and val share (empty, so None, for
    HDBSCAN's noise)."""
    images = finite(row["train_images"])
    return {"train_images": None if images is None else int(images),
            "train_share": finite(row["train_share"]), "val_share": finite(row["val_share"])}


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def cluster_readings(scheme: Scheme) -> dict[int, str]:
    """cluster -> what analyze's own finding about it means (insights.json's
    under_represented or low_performance record, its evidence's numbers): a high-loss
    cluster with few training images wants more data; one that is not short of them points
    at the model or the labels. Clusters without such a finding have no reading."""
    readings = {}
    for r in scheme.insights:
        e = r["evidence"]
        if r["type"] not in ("under_represented", "low_performance") or \
                not isinstance(e.get("cluster"), int):
            continue
        shares = (f"{_share(finite(e.get('train_share')))} of the training images against "
                  f"{_share(finite(e.get('val_share')))} of the clustered val images")
        q = finite(e.get("representation_q_value"))
        test = "" if q is None else f", Fisher q = {q:.2g}"
        if r["type"] == "under_represented":
            text = (f"Under-represented: high loss, and it holds {shares} (analyze's "
                    f"under_represented finding{test}): collect or label more images like "
                    "these.")
        else:
            text = (f"High loss, but not under-represented in training: it holds {shares} "
                    f"(analyze's low_performance finding{test}); the loss points at the model "
                    "or the labels rather than at missing data.")
        readings[int(e["cluster"])] = text   # one finding per cluster (its finding column)
    return readings


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
    readings = cluster_readings(scheme)
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
                      "representatives": reps, "change": change, **cluster_shares(r),
                      "reading": readings.get(c)})
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
