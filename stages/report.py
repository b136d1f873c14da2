"""report: one self-contained HTML page comparing the label schemes side by side.
Reads, for every scheme in params.yaml, the metrics and confusion matrix (evaluate), the
training log (train), timing, latent vectors and predicted masks (infer), the sample,
cluster, heat-map, label-issue and metadata-vs-loss tables (analyze), the scheme
differences (compare), the ground truth (masks), the val images and their manifest
(download), and, for provenance, dvc.lock and the engines' logs and benchmark files when
given. Writes --out: every figure and thumbnail is inlined and the interactive parts
(population maps, similars, histograms, the samples table) run from one JSON blob with
inlined vanilla JavaScript, so the page needs no network.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import importlib.metadata
import io
import itertools
import json
import logging
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pathspec
import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from stages.lib import buckets, embeddings
from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.io import atomic_path
from stages.lib.labels import IGNORE_INDEX, OKABE_ITO, colourise, palette_colours, read_labels
from stages.lib.names import check_plain_name, inside
from stages.lib.params import load_params, scheme_class_names, select
from stages.lib.plots import confusion_figure, fit_width, png_bytes
from stages.lib.tables import read_json, read_table

log = logging.getLogger("report")

TEMPLATES = Path(__file__).resolve().parent / "templates"

SUMMARY_METRICS = [
    ("miou", "mIoU"),
    ("pixel_accuracy", "pixel accuracy (ignore excluded)"),
    ("pixel_accuracy_with_ignore", "pixel accuracy (ignore counted as error)"),
    ("mean_class_accuracy", "mean class accuracy"),
    ("fw_iou", "frequency-weighted IoU"),
]
METRICS_KEYS = [key for key, _ in SUMMARY_METRICS] + ["iou", "images"]
CURVES = {"train_loss": ("train", "loss"), "val_loss": ("val", "loss"),
          "val_miou": ("val", "miou")}
SAMPLE_COLUMNS = ["file_name", "loss", "x", "y", "cluster"]
LIBRARIES = ["torch", "torchvision", "numpy", "pandas", "matplotlib", "scikit-learn", "pillow",
             "jinja2", "pycocotools", "snakemake", "dvc", "dvclive"]
# Line colours per scheme: Okabe-Ito without yellow (too faint as a line on white).
SCHEME_COLOURS = [OKABE_ITO[name] for name in ("blue", "orange", "bluish_green", "reddish_purple",
                                               "sky_blue", "vermillion", "black")]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
N_METADATA_FIELDS = 6
SAME = 5e-4  # below this, two IoUs print the same at 3 decimals


@dataclass
class Scheme:
    """Everything the report shows about one scheme, already read from disk."""
    name: str
    class_names: list[str]
    claims: dict
    metrics: dict
    confusion: np.ndarray
    curves: dict[str, pd.DataFrame]
    timing: dict
    samples: pd.DataFrame
    clusters: pd.DataFrame
    metadata_loss: pd.DataFrame
    # For the interactive map: each sample's k nearest neighbours (row indices into
    # samples, -1 where fewer exist) and their cosine distances, as analyze's similars.
    neighbours: np.ndarray | None = None
    distances: np.ndarray | None = None
    label_issues: pd.DataFrame | None = None      # analyze's label_issues.csv
    heatmaps: pd.DataFrame | None = None          # analyze's heatmaps/index.csv
    extra: dict = field(default_factory=dict)     # e.g. the training device from its log


# ---------------------------------------------------------------- pure core: tables

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
                     "median": finite(ms["median"]), "wall_s": finite(t.get("wall_s")),
                     "throughput": finite(t.get("throughput_img_s"))})
    return rows


def cluster_rows(scheme: Scheme) -> dict:
    iou_cols = [f"mean_iou_{c}" for c in scheme.class_names
                if f"mean_iou_{c}" in scheme.clusters.columns]
    rows = [{"cluster": int(r["cluster"]), "size": int(r["size"]),
             "mean_loss": finite(r["mean_loss"]),
             "mean_pixel_accuracy": finite(r.get("mean_pixel_accuracy")),
             "grayscale_share": finite(r.get("grayscale_share")),
             "ious": [finite(r[c]) for c in iou_cols]}
            for _, r in scheme.clusters.iterrows()]
    return {"iou_classes": [c.removeprefix("mean_iou_") for c in iou_cols], "rows": rows}


def cluster_agreement(schemes: list[Scheme]) -> list[dict]:
    """Adjusted Rand index of two schemes' clusterings on their common samples: the clusters
    live in each model's own latent space, so this says whether the two models group the
    images alike (1 = same partition, about 0 = unrelated)."""
    pairs = []
    for a, b in itertools.combinations(schemes, 2):
        joined = a.samples[["stem", "cluster"]].merge(b.samples[["stem", "cluster"]], on="stem")
        if len(joined) >= 2:
            pairs.append({"a": a.name, "b": b.name, "n": len(joined),
                          "ari": adjusted_rand_score(joined["cluster_x"], joined["cluster_y"])})
    return pairs


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
    """The bins analyze flagged (its `flagged` column); for tables without it, bins (2+
    samples) whose mean loss is at least one standard deviation above the scheme's mean
    sample loss: the kind of bucket the study found at ~80% car pixels."""
    loss = scheme.samples["loss"].dropna()
    if len(loss) < 2:
        return []
    frame = scheme.metadata_loss
    if "flagged" in frame.columns:  # analyze's own test (standard errors, params buckets.*)
        hits = frame[frame["field"].isin(fields) & frame["flagged"].astype(bool)]
    else:
        threshold = loss.mean() + loss.std(ddof=0)
        hits = frame[frame["field"].isin(fields) & (frame["count"] >= 2)
                     & (frame["mean_loss"] >= threshold)]
    return [{"scheme": scheme.name, "field": r["field"], "bin": int(r["bin"]),
             "low": float(r["low"]), "high": float(r["high"]), "count": int(r["count"]),
             "mean_loss": float(r["mean_loss"]), "overall": float(loss.mean())}
            for _, r in hits.iterrows()]


def flag_rule(params: dict, schemes: list[Scheme]) -> str:
    """How the flagged buckets were chosen, in words."""
    buckets = params.get("analyze", {}).get("buckets")
    if buckets and all("flagged" in s.metadata_loss.columns for s in schemes):
        return (f"at least {buckets['min_count']} samples, and losses higher than the other "
                f"samples' (one-sided Mann-Whitney U) with a Benjamini-Hochberg q-value of at "
                f"most {buckets['fdr']:g} over every bin tested")
    return "2+ samples, mean loss at least one standard deviation above the scheme's mean"


# ---------------------------------------------------------------- pure core: interactive data

# Metadata a tooltip shows first (when the scheme has it), after the scheme's class fractions.
KEY_FIELDS = ["is_grayscale", "brightness", "n_annotations"]
SIGNIFICANT = 4  # significant digits of the numbers in the JSON blob (the page shows 3)
# Colour scales the page draws with: viridis (sequential) and PuOr (diverging) stay readable
# under the common colour-vision deficiencies; Okabe-Ito for categories (clusters).
CATEGORY_COLOURS = [OKABE_ITO[name] for name in ("blue", "orange", "bluish_green",
                                                 "reddish_purple", "sky_blue", "vermillion",
                                                 "yellow", "black")]


def colour_ramp(name: str, n: int = 64) -> list[str]:
    return [to_hex(rgba, keep_alpha=False) for rgba in colormaps[name](np.linspace(0, 1, n))]


def rounded(values, digits: int = SIGNIFICANT) -> list:
    """JSON-ready numbers: ints stay ints, floats keep `digits` significant digits, NaN and
    missing values become null (JSON has no NaN)."""
    series = pd.Series(values)
    if pd.api.types.is_bool_dtype(series):
        return series.astype(int).tolist()
    numeric = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    if pd.api.types.is_integer_dtype(series):
        return [int(v) for v in numeric]
    out = []
    for v in numeric:
        if not math.isfinite(v):
            out.append(None)
        elif v == int(v) and abs(v) < 1e15:
            out.append(int(v))
        else:
            out.append(float(f"{v:.{digits}g}"))
    return out


def json_script(document: object) -> Markup:
    """JSON for a <script type="application/json"> element. Inside <script> the HTML parser
    ends the element at the first "</script" and starts a comment state at "<!--", whatever
    the JSON means; escaping every <, > and & as \\u003c... (still the same JSON) leaves no
    such sequence, so a category called </script><script>... stays data."""
    text = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def image_table(schemes: list[Scheme]) -> pd.DataFrame:
    """Every val image of any scheme once, by stem: image id and file name."""
    parts = [s.samples[["stem", "file_name"] + (["image_id"] if "image_id" in s.samples else [])]
             for s in schemes]
    images = pd.concat(parts, ignore_index=True).drop_duplicates("stem").sort_values(
        "stem", kind="stable").reset_index(drop=True)
    if "image_id" not in images:
        images["image_id"] = pd.NA
    return images


def explorer_fields(schemes: list[Scheme]) -> list[str]:
    """The metadata fields the page offers (colour by, tooltips, range filter): those analyze
    binned (it drops constant columns and keeps only frequent category counts)."""
    fields: dict[str, None] = {}
    for s in schemes:
        for name in s.metadata_loss["field"].drop_duplicates():
            if name in s.samples.columns:
                fields[name] = None
    return list(fields)


def field_kind(values: pd.Series) -> str:
    if buckets.is_two_valued(values.dropna()) and values.dropna().nunique() <= 2:
        return "bool"
    numeric = pd.to_numeric(values, errors="coerce").dropna()
    return "int" if len(numeric) and (numeric == numeric.round()).all() else "float"


def split_fields(schemes: list[Scheme], images: pd.DataFrame,
                 fields: list[str]) -> tuple[dict[str, pd.Series], dict[str, dict[str, pd.Series]]]:
    """Fields with the same value for an image under every scheme (size, brightness,
    category counts...) are stored once per image; the others (class fractions, background)
    once per scheme and sample."""
    shared, own = {}, {s.name: {} for s in schemes}
    for name in fields:
        columns = [s.samples.set_index("stem")[name] if name in s.samples else None
                   for s in schemes]
        if all(c is not None for c in columns):
            aligned = [c.reindex(images["stem"]).reset_index(drop=True) for c in columns]
            first = aligned[0]
            if all(first.equals(other) for other in aligned[1:]):
                shared[name] = first
                continue
        for s, column in zip(schemes, columns):
            if column is not None:
                own[s.name][name] = s.samples[name].reset_index(drop=True)
    return shared, own


def bin_members(samples: pd.DataFrame, bins: pd.DataFrame) -> dict[str, list[int]]:
    """Per field of a (one-binning) metadata_loss table: each sample's bin, -1 for none.
    The edges are read back from the table and assigned as analyze assigns them, so a
    bucket's members are exactly the samples analyze counted in it."""
    members = {}
    for name, part in bins.groupby("field", sort=False):
        if name not in samples:
            continue
        part = part.sort_values("bin")
        edges = np.append(part["low"].to_numpy(float), part["high"].to_numpy(float)[-1])
        index = buckets.assign(pd.to_numeric(samples[name], errors="coerce"), edges)
        labels = part["bin"].to_numpy(dtype=np.int64)
        members[name] = np.where(index >= 0, labels[np.clip(index, 0, None)], -1).tolist()
    return members


def thumbnail_stems(schemes: list[Scheme], first: list[str], limit: int) -> list[str]:
    """Which images get an inlined thumbnail, at most `limit`, most useful first: those
    the page shows anyway (`first`: label issues, cluster representatives), each scheme's
    similars queries and their neighbours, the highest- and lowest-loss samples, then the
    rest in a fixed pseudo-random order (by a hash of the stem), so a 40k-image val set
    gives as many thumbnails as a small one and the choice never changes between runs."""
    chosen: dict[str, None] = {}

    def take(stems) -> bool:
        for stem in stems:
            if len(chosen) >= limit:
                return False
            chosen.setdefault(stem, None)
        return len(chosen) < limit

    if limit <= 0 or not take(first):
        return list(chosen)
    for s in schemes:
        by_loss = s.samples.sort_values(["loss", "stem"], ascending=[False, True],
                                        na_position="last")["stem"].tolist()
        extremes = [stem for pair in itertools.zip_longest(by_loss[:10], by_loss[::-1][:5])
                    for stem in pair if stem is not None]
        if not take(extremes):
            return list(chosen)
    every = sorted(set(itertools.chain.from_iterable(s.samples["stem"] for s in schemes)),
                   key=lambda stem: hashlib.md5(stem.encode()).hexdigest())
    take(every)
    return list(chosen)


def explorer_data(schemes: list[Scheme], thumbs: dict[str, str], fields: list[str],
                  charted: list[str], flagged: list[dict],
                  only_in: dict[str, str] | None = None) -> dict:
    """The per-sample data the page's JavaScript draws from, columnar (one list per column,
    so 40k samples cost no repeated keys): images, thumbnails, metadata, and per scheme the
    map, scores, clusters, neighbours and metadata buckets."""
    images = image_table(schemes)
    position = {stem: i for i, stem in enumerate(images["stem"])}
    thumb_list = [thumbs[stem] for stem in images["stem"] if stem in thumbs]
    thumb_index, n = {}, 0
    for stem in images["stem"]:
        if stem in thumbs:
            thumb_index[stem] = n
            n += 1
    shared, own = split_fields(schemes, images, fields)
    kinds = {}
    for name in fields:
        column = shared.get(name)
        if column is None:
            column = next(own[s.name][name] for s in schemes if name in own[s.name])
        kinds[name] = field_kind(column)
    per_scheme = []
    for s in schemes:
        samples = s.samples.reset_index(drop=True)
        classes = [c for c in s.class_names if f"iou_{c}" in samples]
        issue_stems = set()
        if s.label_issues is not None and "flagged" in s.label_issues:
            issue_stems = set(s.label_issues.loc[s.label_issues["flagged"].astype(bool), "stem"])
        k = 0 if s.neighbours is None else int(s.neighbours.shape[1])
        per_scheme.append({
            "name": s.name, "classes": classes,
            "img": [position[stem] for stem in samples["stem"]],
            "x": rounded(samples["x"]), "y": rounded(samples["y"]),
            "cluster": [int(c) for c in samples["cluster"]],
            "loss": rounded(samples["loss"]),
            "pa": rounded(samples["pixel_accuracy"]) if "pixel_accuracy" in samples else None,
            "miou": rounded(samples[[f"iou_{c}" for c in classes]].mean(axis=1, skipna=True))
            if classes else None,
            "iou": {c: rounded(samples[f"iou_{c}"]) for c in classes},
            "lq": rounded(samples["label_quality"]) if "label_quality" in samples else None,
            "issue": [int(stem in issue_stems) for stem in samples["stem"]],
            "only": only_in_scheme(samples, s.name, only_in),
            "meta": {name: rounded(values) for name, values in own[s.name].items()},
            "key": [f for f in [f"{c}_fraction" for c in s.class_names if c != "background"]
                    + KEY_FIELDS if f in fields and f in samples],
            "k": k,
            "nn": [] if not k else [int(v) for v in s.neighbours.ravel()],
            "nnd": [] if not k else rounded(s.distances.ravel(), 3),
            "clusters": [{"id": int(r["cluster"]), "size": int(r["size"]),
                          "loss": finite(r["mean_loss"]),
                          "dominant": str(r["dominant_categories"])
                          if isinstance(r.get("dominant_categories"), str) else ""}
                         for _, r in s.clusters.iterrows()],
            "mean_loss": finite(samples["loss"].mean()),
            "buckets": scheme_buckets(s, charted, flagged),
            "bucket_of": bin_members(samples, s.metadata_loss[
                s.metadata_loss["field"].isin(charted)]),
        })
    return {
        "schemes": [s.name for s in schemes],
        "images": {"stem": images["stem"].tolist(),
                   "id": [None if pd.isna(v) else int(v) for v in images["image_id"]],
                   "file": images["file_name"].astype(str).tolist(),
                   "thumb": [thumb_index.get(stem, -1) for stem in images["stem"]]},
        "thumbs": thumb_list,
        "fields": [{"key": name, "kind": kinds[name], "shared": name in shared}
                   for name in fields],
        "meta": {name: rounded(values) for name, values in shared.items()},
        "charted": charted,
        "per_scheme": per_scheme,
        "viridis": colour_ramp("viridis"), "diverging": colour_ramp("PuOr_r"),
        "categorical": CATEGORY_COLOURS,
    }


def only_in_scheme(samples: pd.DataFrame, name: str, only_in: dict[str, str] | None) -> list[int]:
    """1 where compare found this sample a label issue under this scheme only."""
    if not only_in:
        return [0] * len(samples)
    return [int(only_in.get(stem) == name) for stem in samples["stem"]]


def scheme_buckets(scheme: Scheme, charted: list[str], flagged: list[dict]) -> list[dict]:
    hot = {(f["field"], f["bin"]) for f in flagged if f["scheme"] == scheme.name}
    frame = scheme.metadata_loss
    rows = []
    for name in charted:
        for _, r in frame[frame["field"] == name].sort_values("bin").iterrows():
            rows.append({"field": name, "bin": int(r["bin"]), "low": float(r["low"]),
                         "high": float(r["high"]), "count": int(r["count"]),
                         "loss": finite(r["mean_loss"]), "se": finite(r.get("se_loss")),
                         "flagged": (name, int(r["bin"])) in hot})
    return rows


def charted_fields(schemes: list[Scheme], k: int = N_METADATA_FIELDS) -> list[str]:
    """The informative fields, then every other field in which analyze flagged a bin."""
    fields = informative_fields(schemes, k)
    for s in schemes:
        frame = s.metadata_loss
        if "flagged" in frame:
            for name in frame.loc[frame["flagged"].astype(bool), "field"]:
                if name not in fields:
                    fields.append(name)
    return fields


def cluster_cards(scheme: Scheme, changes: pd.DataFrame | None,
                  heatmap_srcs: dict[str, str]) -> list[dict]:
    """One card per cluster: its numbers, dominant categories, representatives (the medoid
    first) with their shared-feature heat-maps, and how its images fare under the other
    scheme (compare's clusters.csv)."""
    stems = dict(zip(scheme.samples["image_id"], scheme.samples["stem"])) \
        if "image_id" in scheme.samples else {}
    overall = finite(scheme.samples["loss"].mean())
    cards = []
    for _, r in scheme.clusters.iterrows():
        c = int(r["cluster"])
        reps = []
        for token in str(r.get("representative_image_ids", "") or "").split():
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
                      "pixel_accuracy": finite(r.get("mean_pixel_accuracy")),
                      "grayscale_share": finite(r.get("grayscale_share")),
                      "dominant": str(r["dominant_categories"])
                      if isinstance(r.get("dominant_categories"), str) else "",
                      "representatives": reps, "change": change})
    return cards


# ---------------------------------------------------------------- pure core: provenance

def flatten(document: object, prefix: str = "") -> dict[str, object]:
    """{"a.b": value} for nested mappings; lists and scalars are leaves."""
    if isinstance(document, dict) and document:
        out = {}
        for key, value in document.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: document}


def params_diff(base: dict | None, used: dict) -> list[dict]:
    """Every key whose value differs between the reference params and those used:
    changed, added (not in the reference) or removed (only in the reference)."""
    if base is None:
        return []
    a, b = flatten(base), flatten(used)
    rows = []
    for key in list(dict.fromkeys([*b, *a])):
        if key not in a:
            rows.append({"key": key, "base": None, "used": b[key], "what": "added"})
        elif key not in b:
            rows.append({"key": key, "base": a[key], "used": None, "what": "removed"})
        elif a[key] != b[key]:
            rows.append({"key": key, "base": a[key], "used": b[key], "what": "changed"})
    return [{**r, "base": _yaml_value(r["base"]), "used": _yaml_value(r["used"])} for r in rows]


def _yaml_value(value) -> str:
    return "—" if value is None else json.dumps(value, ensure_ascii=False)


STAGE_ORDER = ["download", "masks", "train", "infer", "evaluate", "analyze", "compare"]


def stage_times(benchmarks: dict[tuple[str, str], pd.DataFrame],
                logs: dict[tuple[str, str], float]) -> list[dict]:
    """One row per (stage, scheme) job: Snakemake's benchmark (wall s, CPU s, peak RSS)
    where it exists, else the span of the job's log timestamps (a lower bound: start-up
    before the first line is not in it)."""
    rows = []
    keys = set(benchmarks) | set(logs)
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    for stage, scheme in sorted(keys, key=lambda k: (order.get(k[0], len(order)), k)):
        frame = benchmarks.get((stage, scheme))
        if frame is not None and len(frame):
            last = frame.iloc[-1]
            rows.append({"stage": stage, "scheme": scheme, "wall_s": finite(last.get("s")),
                         "cpu_s": finite(last.get("cpu_time")),
                         "max_rss_mb": finite(last.get("max_rss")),
                         "source": "Snakemake benchmark"})
        elif (stage, scheme) in logs:
            rows.append({"stage": stage, "scheme": scheme, "wall_s": logs[(stage, scheme)],
                         "cpu_s": None, "max_rss_mb": None,
                         "source": "log timestamps (lower bound)"})
    return rows


def example_candidates(schemes: list[Scheme]) -> pd.DataFrame:
    """Samples every scheme has, with foreground share and the loss gap between schemes."""
    merged = None
    for i, s in enumerate(schemes):
        part = s.samples[["stem", "file_name", "loss"]].rename(columns={"loss": f"loss_{i}"})
        part[f"fg_{i}"] = 1 - s.samples.get("background_fraction", pd.Series(1.0, s.samples.index))
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
    ious = [(c, finite(row.get(f"iou_{c}"))) for c in scheme.class_names]
    return {"loss": finite(row["loss"]), "pixel_accuracy": finite(row.get("pixel_accuracy")),
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


# ---------------------------------------------------------------- pure core: figures

def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def curves_figure(schemes: list[Scheme]) -> bytes:
    fig = Figure(figsize=(10, 3.4))
    loss_ax, miou_ax = fig.subplots(1, 2)
    for i, s in enumerate(schemes):
        colour, marker = SCHEME_COLOURS[i % len(SCHEME_COLOURS)], MARKERS[i % len(MARKERS)]
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            curve = s.curves[key]
            loss_ax.plot(curve["epoch"], curve["value"], style, color=colour, marker=marker,
                         label=f"{s.name} {key.split('_')[0]}")
        curve = s.curves["val_miou"]
        miou_ax.plot(curve["epoch"], curve["value"], "-", color=colour, marker=marker,
                     label=s.name)
    for ax, ylabel in ((loss_ax, "loss (cross-entropy)"), (miou_ax, "val mIoU")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    loss_ax.set_title("loss: train solid, val dashed")
    miou_ax.set_title("validation mIoU")
    return png_bytes(fig)


def legend_swatches(class_names: list[str]) -> list[dict]:
    palette = palette_colours()
    swatches = [{"name": c, "colour": to_hex(palette[i] / 255)} for i, c in enumerate(class_names)]
    swatches.append({"name": "ignore", "colour": to_hex(palette[IGNORE_INDEX] / 255)})
    return swatches


def thumbnail(image: Image.Image, width: int, nearest: bool) -> Image.Image:
    """Scale to `width` keeping the aspect; label maps use nearest so classes never blend."""
    height = max(1, round(image.height * width / image.width))
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    return image.resize((width, height), method)


def encode(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return data_uri(buffer.getvalue(), f"image/{fmt.lower()}")


# ---------------------------------------------------------------- pure core: page

def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = format_number
    env.filters["signed"] = format_signed
    env.filters["thousands"] = lambda v: "—" if v is None else f"{int(v):,}"
    return env


def format_number(value, digits: int = 3) -> str:
    value = finite(value)
    return "—" if value is None else f"{value:.{digits}f}"


def format_signed(value, digits: int = 3) -> str:
    """+0.012 / -0.012; a difference that rounds to zero prints unsigned, never as -0.000."""
    value = finite(value)
    if value is None:
        return "—"
    return f"{0.0:.{digits}f}" if round(value, digits) == 0 else f"{value:+.{digits}f}"


def render(context: dict) -> str:
    return environment().get_template("report.html.j2").render(**context)


APP_JS = TEMPLATES / "report.js"
PROVENANCE_DEFAULTS = {"params_base": None, "params_diff": [], "stage_times": [], "host": {}}


def app_script() -> tuple[Markup, str]:
    """The page's JavaScript and its CSP hash: the page's Content-Security-Policy lets only
    this exact script run, so even an injected <script> or onerror= would stay inert."""
    code = APP_JS.read_text(encoding="utf-8")
    if "</script" in code.lower() or "<!--" in code:
        raise StageError(f"{APP_JS}: must not contain </script or <!--")
    digest = base64.b64encode(hashlib.sha256(code.encode("utf-8")).digest()).decode("ascii")
    return Markup(code), f"sha256-{digest}"


def build_context(params: dict, schemes: list[Scheme], provenance: dict,
                  examples: list[dict], issues: list[dict] | None = None,
                  differences: list[dict] | None = None, thumbs: dict[str, str] | None = None,
                  cards: dict[str, list[dict]] | None = None,
                  only_in: dict[str, str] | None = None) -> dict:
    """Everything the template shows, figures already encoded; `thumbs` (stem -> data URI)
    are the inlined sample thumbnails, `cards` the cluster cards per scheme (drawn without
    heat-maps or compare's changes when not given)."""
    names = [s.name for s in schemes]
    charted = charted_fields(schemes)
    flagged = [f for s in schemes for f in flagged_bins(s, charted)]
    projection = params["analyze"]["projection"]
    code, script_hash = app_script()
    cards = cards or {s.name: cluster_cards(s, None, {}) for s in schemes}
    explorer = explorer_data(schemes, thumbs or {}, explorer_fields(schemes), charted, flagged,
                             only_in)
    return {
        "title": params["report"]["title"], "schemes": names,
        "provenance": {**PROVENANCE_DEFAULTS, **provenance,
                       "models": [{"train_device": None, **m} for m in provenance["models"]]},
        "comparison": comparison_table(schemes), "verdicts": verdicts(schemes),
        "unshared": unshared(schemes),
        # One scheme has nothing to subtract; with three or more, each delta names its pair.
        "delta_label": (f"Δ {names[1]} − {names[0]}" if len(names) == 2
                        else "Δ (the two schemes with the class)" if len(names) > 2 else ""),
        "confusion": [{"scheme": s.name, "src": data_uri(confusion_figure(
            s.confusion, s.class_names, s.name))} for s in schemes],
        "curves_src": data_uri(curves_figure(schemes)),
        "timing": timing_rows(schemes),
        "population": [{"scheme": s.name, "index": i, "n": len(s.samples),
                        "clusters": cluster_rows(s), "cards": cards[s.name]}
                       for i, s in enumerate(schemes)],
        "agreement": cluster_agreement(schemes), "projection": projection,
        "charted": charted, "flagged": flagged, "flag_rule": flag_rule(params, schemes),
        "binning": params.get("analyze", {}).get("buckets", {}).get(
            "binning", ["equal_width"])[0].replace("_", "-"),
        "legends": [{"scheme": s.name, "swatches": legend_swatches(s.class_names)}
                    for s in schemes],
        "examples": examples, "thumbnail_px": params["report"]["thumbnail_px"],
        "caveats": training_caveats(params, provenance["data"]["images"].get("train")),
        "issues": [{"scheme": s.name, "rows": [i for i in issues or [] if i["scheme"] == s.name]}
                   for s in schemes],
        "differences": differences or [],
        "n_thumbs": len(explorer["thumbs"]), "n_images": len(explorer["images"]["stem"]),
        "max_thumbnails": params["report"].get("max_thumbnails"),
        "data_json": json_script(explorer), "app_js": code, "script_hash": script_hash,
    }


# ---------------------------------------------------------------- run: reading inputs

def read_metrics(path: Path, class_names: list[str]) -> dict:
    metrics = read_json(path)
    missing = [k for k in METRICS_KEYS if k not in metrics]
    if missing:
        raise StageError(f"{path}: missing keys {', '.join(missing)}")
    if list(metrics["iou"]) != class_names:
        raise StageError(f"{path}: classes {list(metrics['iou'])} differ from params.yaml "
                         f"{class_names}; re-run evaluate")
    return metrics


def read_confusion(path: Path, class_names: list[str]) -> np.ndarray:
    frame = read_table(path, ["ground_truth", *class_names])
    if list(frame.columns) != ["ground_truth", *class_names] or \
            frame["ground_truth"].tolist() != class_names:
        raise StageError(f"{path}: rows/columns are not the classes {class_names}; "
                         "re-run evaluate")
    return frame[class_names].to_numpy(dtype=np.int64)


def read_curve(path: Path, column: str) -> pd.DataFrame:
    frame = read_table(path, ["step", column], sep="\t")
    return pd.DataFrame({"epoch": frame["step"] + 1, "value": frame[column]})


def read_samples(path: Path) -> pd.DataFrame:
    samples = read_table(path, SAMPLE_COLUMNS, dtype={"file_name": str})
    for image_id, file_name in zip(samples["image_id"], samples["file_name"]):
        check_plain_name(file_name, f"{path}: image {image_id}")   # read as files below
    # The stem comes from file_name: a numeric-looking stem column loses its zeros in CSV.
    samples["stem"] = samples["file_name"].map(lambda name: Path(name).stem)
    duplicated = samples["stem"][samples["stem"].duplicated()]
    if len(duplicated):
        raise StageError(f"{path}: file_name {duplicated.iloc[0]!r} listed twice")
    return samples


def load_scheme(params: dict, name: str, predictions: Path, metrics: Path,
                analysis: Path) -> Scheme:
    class_names = scheme_class_names(params, name)
    plots = metrics / "train" / name / "plots" / "metrics"
    folder = inside(analysis, name, resolve=False)
    return Scheme(
        name=name, class_names=class_names, claims=params["schemes"][name]["classes"],
        metrics=read_metrics(metrics / f"{name}.json", class_names),
        confusion=read_confusion(metrics / f"{name}.confusion.csv", class_names),
        curves={key: read_curve(plots / split / f"{column}.tsv", column)
                for key, (split, column) in CURVES.items()},
        timing=read_timing(predictions / name / "timing.json"),
        samples=read_samples(folder / "samples.csv"),
        clusters=read_table(folder / "clusters.csv", ["cluster", "size", "mean_loss"]),
        metadata_loss=one_binning(read_table(folder / "metadata_loss.csv",
                                             ["field", "bin", "low", "high", "count",
                                              "mean_loss"]),
                                  params["analyze"]["buckets"]["binning"][0]),
        label_issues=read_table(folder / "label_issues.csv", ["rank", "label_quality", "flagged"],
                                dtype={"stem": str}) if (folder / "label_issues.csv").is_file()
        else None,
        heatmaps=read_table(folder / "heatmaps" / "index.csv", ["file", "kind", "cluster", "stem"],
                            dtype={"stem": str})
        if (folder / "heatmaps" / "index.csv").is_file() else None,
    )


def one_binning(frame: pd.DataFrame, binning: str) -> pd.DataFrame:
    """analyze bins every field under each binning of params; the charts show the first."""
    if "binning" not in frame.columns:
        return frame
    return frame[frame["binning"] == binning].reset_index(drop=True)


def read_timing(path: Path) -> dict:
    timing = read_json(path)
    missing = [k for k in ("images", "device", "batch_size", "latency_ms") if k not in timing]
    missing += [f"latency_ms.{k}" for k in ("total", "mean", "variance", "median")
                if k not in timing.get("latency_ms", {})]
    if missing:
        raise StageError(f"{path}: missing keys {', '.join(missing)}")
    return timing


def similars(path: Path, samples: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sample's k nearest neighbours (row indices into samples) and cosine distances,
    computed as analyze computes its similars (standardised latent vectors), so the page can
    fetch similars for any sample, not only analyze's queries."""
    try:
        with np.load(path) as npz:
            ids, latents = npz["image_ids"], npz["latents"]
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"{path}: not a latents file ({exc})") from None
    if "image_id" not in samples:
        raise StageError(f"{path}: the analysis samples have no image_id column to match")
    row_of = {int(v): i for i, v in enumerate(ids)}
    wanted = [int(v) for v in samples["image_id"]]
    absent = [v for v in wanted if v not in row_of]
    if absent:
        raise StageError(f"{path}: no latent vector for image {absent[0]}; re-run analyze")
    scaled = embeddings.standardise(latents[[row_of[v] for v in wanted]])
    n = len(wanted)
    found = embeddings.nearest_neighbours(scaled, list(range(n)), k)
    width = max((len(f) for f in found), default=0)
    neighbours = np.full((n, width), -1, dtype=np.int64)
    distances = np.full((n, width), np.nan)
    for i, pairs in enumerate(found):
        for j, (row, distance) in enumerate(pairs):
            neighbours[i, j], distances[i, j] = row, distance
    return neighbours, distances


# ---------------------------------------------------------------- run: provenance

def git_state(repo: Path, pipeline_paths: list[Path] = ()) -> dict:
    """The commit, and whether the user changed anything since: a changed, added, deleted
    or untracked file counts unless it lies in one of the pipeline's own paths (its
    outputs, logs, dvc.lock), which every run writes, tracked (DVC's `cache: false`
    metrics) or not."""
    try:
        commit = _git(repo, "rev-parse", "--short", "HEAD")
        # Unstripped: a porcelain line may start with a space (" M file").
        listed = subprocess.run(["git", "status", "--porcelain=v1", "-z"], cwd=repo,
                                capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    own = [p.resolve() for p in pipeline_paths if p is not None]
    return {"commit": commit,
            "dirty": any(_users(repo / rel, own) for rel in porcelain_paths(listed))}


def _users(path: Path, own: list[Path]) -> bool:
    """Whether a changed path holds something outside the pipeline's own paths. git
    lists an untracked folder once (data/ when only data/raw exists): its files are
    looked at, skipping the pipeline's folders inside it."""
    path = path.resolve()
    if any(_within(path, o) for o in own):
        return False
    if not path.is_dir():
        return True
    for dirpath, dirs, files in os.walk(path):
        if any(not any(_within(Path(dirpath, f), o) for o in own) for f in files):
            return True
        dirs[:] = [d for d in dirs if not any(_within(Path(dirpath, d), o) for o in own)]
    return False


def porcelain_paths(listed: str) -> list[str]:
    """The paths of `git status --porcelain=v1 -z` (a rename's both); an untracked folder
    is one entry ending in '/'."""
    paths, entries = [], iter(listed.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC":  # the next entry is where it came from
            paths.append(next(entries, ""))
    return [p for p in paths if p]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def committed_params(repo: Path) -> dict | None:
    """params.yaml as committed at HEAD: the reference the used params are compared with."""
    try:
        return yaml.safe_load(_git(repo, "show", "HEAD:params.yaml"))
    except (OSError, subprocess.SubprocessError, yaml.YAMLError):
        return None


def report_date() -> str:
    # SOURCE_DATE_EPOCH lets a rebuild produce the same bytes (reproducible-builds.org).
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch
              else dt.datetime.now(dt.timezone.utc))
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def library_versions() -> list[tuple[str, str]]:
    versions = [("python", platform.python_version())]
    for name in LIBRARIES:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((name, "not installed"))
    return versions


def md5_file(path: Path) -> str | None:
    """The md5 DVC records for a file (DVC 3: of its bytes)."""
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def dvc_lock_outs(lock: Path | None) -> dict[Path, dict]:
    """dvc.lock's outputs by absolute path: {md5, size, nfiles} as DVC recorded them, and
    the project folder (dvc.lock's) as "root"."""
    if lock is None or not lock.is_file():
        return {}
    try:
        document = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StageError(f"{lock}: not valid YAML ({exc})") from None
    outs = {}
    for stage in (document.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if isinstance(out, dict) and "path" in out and "md5" in out:
                outs[(lock.parent / out["path"]).resolve()] = {**out,
                                                               "root": lock.parent.resolve()}
    return outs


def dvc_hash(path: Path, lock_outs: dict[Path, dict]) -> dict:
    """The md5 dvc.lock records for an output (a folder's ends in .dir), while dvc.lock is
    current for it: a file's md5 is that of its bytes (DVC 3); a folder must hold the size
    and file count dvc.lock records, counted as DVC counts them (.dvcignore applies).
    Otherwise "not recorded": computing DVC's folder hash would take DVC's internals, and
    `dvc commit` records it. A record that no longer fits is reported as stale."""
    if not path.exists():
        return {"md5": None, "source": "missing", "stale": None}
    entry = lock_outs.get(path.resolve())
    if entry is None:
        return {"md5": None, "source": "not recorded", "stale": None}
    md5 = str(entry["md5"])
    if path.is_dir():
        sizes = [f.stat().st_size for f in dvc_files(path, entry["root"])]
        current = entry.get("size") == sum(sizes) and entry.get("nfiles") == len(sizes)
    else:
        current = md5 == md5_file(path)
    if current:
        return {"md5": md5, "source": "dvc.lock", "stale": None}
    return {"md5": None, "source": "not recorded", "stale": md5}


def dvc_files(folder: Path, root: Path) -> list[Path]:
    """The files of a folder DVC tracks: those its project's .dvcignore (gitignore
    patterns, relative to the project folder) does not leave out."""
    ignore = root / ".dvcignore"
    spec = pathspec.GitIgnoreSpec.from_lines(
        ignore.read_text().splitlines() if ignore.is_file() else [])
    # Paths relative to the project as written, not resolved: with DVC's symlink cache a
    # file resolves into .dvc/cache.
    base = Path(os.path.relpath(folder.resolve(), root))
    files = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            if not spec.match_file((base / path.relative_to(folder)).as_posix()):
                files.append(path)
    return files


def data_source(raw: Path, lock_outs: dict[Path, dict]) -> dict:
    manifest_path = raw / "manifest.json"
    manifest = read_json(manifest_path)
    splits = manifest.get("splits", {})
    return {"base_url": manifest.get("base_url"), "year": manifest.get("year"),
            "seed": manifest.get("seed"), "manifest_md5": md5_file(manifest_path),
            "raw": dvc_hash(raw, lock_outs),
            "images": {split: len(body.get("images", [])) for split, body in splits.items()}}


def train_device(logs: Path | None, scheme: str) -> str | None:
    """train logs its device ("... device cpu"); only Snakemake keeps stage logs."""
    path = None if logs is None else logs / "train" / f"{scheme}.log"
    if path is None or not path.is_file():
        return None
    found = re.findall(r"\bdevice (\S+)", path.read_text(errors="replace"))
    return found[-1] if found else None


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", re.M)


def log_span(path: Path) -> float | None:
    stamps = [dt.datetime.strptime(t, "%Y-%m-%d %H:%M:%S") + dt.timedelta(milliseconds=int(ms))
              for t, ms in LOG_TIME.findall(path.read_text(errors="replace"))]
    return (stamps[-1] - stamps[0]).total_seconds() if len(stamps) >= 2 else None


def read_stage_times(logs: Path | None) -> list[dict]:
    """Wall time per stage and scheme from Snakemake's benchmark files
    (benchmark/<stage>[/<scheme>].tsv under --logs) or the stage logs
    (<stage>[/<scheme>].log); DVC keeps neither."""
    if logs is None or not logs.is_dir():
        return []
    benchmarks, spans = {}, {}
    bench = logs / "benchmark"
    for path in sorted(bench.rglob("*.tsv")) if bench.is_dir() else []:
        rel = path.relative_to(bench).with_suffix("")
        key = (rel.parts[0], rel.parts[1] if len(rel.parts) > 1 else "")
        try:
            benchmarks[key] = pd.read_csv(path, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            log.warning("%s: not a benchmark table, left out", path)
    for path in sorted(logs.rglob("*.log")):
        rel = path.relative_to(logs).with_suffix("")
        if rel.parts[0] == "benchmark":
            continue
        key = (rel.parts[0], rel.parts[1] if len(rel.parts) > 1 else "")
        span = log_span(path)
        if span is not None:
            spans[key] = span
    own = {k for k in [*benchmarks, *spans] if k[0] == "report"}  # this very run is not over
    return stage_times({k: v for k, v in benchmarks.items() if k not in own},
                       {k: v for k, v in spans.items() if k not in own})


def provenance(params: dict, raw: Path, models: Path, schemes: list[Scheme],
               logs: Path | None = None, lock: Path | None = None,
               pipeline_paths: list[Path] = ()) -> dict:
    lock_outs = dvc_lock_outs(lock)
    # The project is the working folder (both engines run stages from it), not the folder
    # this module sits in: an installed wheel puts it in site-packages, outside any checkout.
    project = Path.cwd()
    git = git_state(project, [*pipeline_paths, logs, lock])
    record = {
        "git": git, "date": report_date(), "versions": library_versions(),
        "params_yaml": yaml.safe_dump(params, sort_keys=False, allow_unicode=True),
        "params_base": f"params.yaml at HEAD (commit {git['commit']})" if git["commit"] else None,
        "params_diff": params_diff(committed_params(project), params) if git["commit"] else [],
        "data": data_source(raw, lock_outs),
        "models": [{"scheme": s.name, "device": s.timing["device"],
                    "train_device": s.extra.get("train_device"),
                    "dir": dvc_hash(models / s.name, lock_outs),
                    "md5": md5_file(models / s.name / "model.pt")} for s in schemes],
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "stage_times": read_stage_times(logs),
    }
    # Where each hash came from goes to the log as well (under Snakemake there is usually
    # no current dvc.lock: "not recorded").
    for what, h in [("data/raw", record["data"]["raw"]),
                    *((f"models/{m['scheme']}", m["dir"]) for m in record["models"])]:
        log.info("%s md5 %s (%s%s)", what, h["md5"], h["source"],
                 f"; dvc.lock records {h['stale']}" if h["stale"] else "")
    return record


# ---------------------------------------------------------------- run: examples

def examples(schemes: list[Scheme], raw: Path, masks: Path, predictions: Path,
             n: int, width: int) -> list[dict]:
    candidates = example_candidates(schemes)
    file_names = dict(zip(candidates["stem"], candidates["file_name"]))
    rows = []
    for stem, reason in choose_examples(candidates, n, compare=len(schemes) > 1):
        scores = [sample_scores(s, stem) for s in schemes]
        renders = [{"scheme": s.name, **score,
                    "gt": label_thumbnail(inside(masks, s.name, "val", f"{stem}.png",
                                                 resolve=False), width),
                    "pred": label_thumbnail(inside(predictions, s.name, "val", f"{stem}.png",
                                                   resolve=False), width)}
                   for s, score in zip(schemes, scores)]
        rows.append({"stem": stem, "reason": reason, "schemes": renders,
                     "image": photo_thumbnail(inside(raw, "images", "val", file_names[stem],
                                                     resolve=False), width),
                     "comparison": loss_comparison([s.name for s in schemes], scores)})
    return rows


def photo_thumbnail(path: Path, width: int) -> str:
    try:
        with Image.open(path) as image:
            return encode(thumbnail(image.convert("RGB"), width, nearest=False), "JPEG")
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None
    except OSError as exc:
        raise StageError(f"{path}: not a readable image ({exc})") from None


def figure_src(path: Path, width: int) -> str:
    """A pre-drawn figure (label issue, heat-map), scaled down to `width` and stored as JPEG:
    a quarter of the PNG's bytes at no visible cost for photos with overlays."""
    try:
        with Image.open(path) as image:
            return encode(fit_width(image.convert("RGB"), width), "JPEG")
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None
    except OSError as exc:
        raise StageError(f"{path}: not a readable image ({exc})") from None


def label_thumbnail(path: Path, width: int) -> str:
    try:
        labels = read_labels(path)
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: not a label map ({exc})") from None
    return encode(thumbnail(Image.fromarray(colourise(labels)), width, nearest=True), "PNG")


# ---------------------------------------------------------------- run: analyze and compare

def issue_gallery(folder: Path, scheme: Scheme, flagged_in: dict[str, list[str]],
                  width: int) -> list[dict]:
    """Every image analyze flagged as a label issue, worst first, with its pre-drawn figure
    (image | ground truth | prediction | disagreement) and in which schemes it is flagged."""
    table = scheme.label_issues
    if table is None:
        return []
    path = folder / "label_issues.csv"
    rows = []
    for r in table[table["flagged"].astype(bool)].itertuples():
        figure = listed_file(folder, r.figure, path)
        if not figure.is_file():
            raise StageError(f"{figure}: missing (listed in {path})")
        stem = str(r.stem)
        schemes_flagging = flagged_in.get(stem, [scheme.name])
        rows.append({"scheme": scheme.name, "rank": int(r.rank), "stem": stem,
                     "score": finite(r.label_quality), "loss": finite(getattr(r, "loss", None)),
                     "what": str(r.main_disagreement)
                     if isinstance(getattr(r, "main_disagreement", None), str) else "",
                     "only": schemes_flagging == [scheme.name] and bool(flagged_in),
                     "others": [s for s in schemes_flagging if s != scheme.name],
                     "src": figure_src(figure, width)})
    return rows


def heatmap_sources(folder: Path, scheme: Scheme, width: int) -> dict[str, str]:
    """'cluster/stem' -> the shared-feature heat-map analyze drew over that representative."""
    index = scheme.heatmaps
    if index is None:
        return {}
    shared = index[index["kind"] == "shared_features"]
    listing = folder / "heatmaps" / "index.csv"
    return {f"{int(r.cluster)}/{r.stem}": figure_src(listed_file(folder, r.file, listing), width)
            for r in shared.itertuples()}


def listed_file(folder: Path, name: object, table: Path) -> Path:
    """A file an analysis table lists by its path relative to the folder: read from there,
    never from outside it (the table is input like any other)."""
    try:
        return inside(folder, str(name), resolve=False)
    except StageError as exc:
        raise StageError(f"{table}: lists {name!r}: {exc}") from None


def read_flagged_in(compare: Path | None, schemes: list[Scheme]) -> dict[str, list[str]]:
    """stem -> the schemes in which compare found the image flagged as a label issue."""
    if compare is None:
        return {}
    path = compare / "label_issues.csv"
    table = read_table(path, ["image_id", "flagged_in"])
    stems = {}
    for s in schemes:
        if "image_id" in s.samples:
            stems.update(zip(s.samples["image_id"].astype(int), s.samples["stem"]))
    return {stems[int(r.image_id)]: str(r.flagged_in).split()
            for r in table.itertuples() if int(r.image_id) in stems}


def read_cluster_changes(compare: Path | None) -> pd.DataFrame | None:
    if compare is None:
        return None
    path = compare / "clusters.csv"
    try:
        return read_table(path, ["a", "b", "clusters_of", "cluster", "images", "mean_loss_a",
                                 "mean_loss_b", "z", "significant"])
    except StageError as exc:
        if "not a readable table" in str(exc):  # one scheme: compare writes an empty table
            return None
        raise


def _change_text(row: dict, kind: str) -> str:
    where = (f"cluster {row['cluster']} of {row['clusters_of']}" if kind == "cluster" else
             f"{row['field']} {row['low']:.3g}–{row['high']:.3g} ({row['binning']}, bins of "
             f"{row['bins_of']})")
    z = finite(row.get("z"))
    return (f"{where}: {row['images']} images, mean loss {row['mean_loss_a']:.3f} → "
            f"{row['mean_loss_b']:.3f} (z {'—' if z is None else f'{z:.1f}'}"
            f"{', significant' if row['significant'] else ''})")


def scheme_differences(compare: Path | None) -> list[dict]:
    """One entry per pair of schemes from compare/summary.json (none without it)."""
    if compare is None:
        return []
    doc = read_json(compare / "summary.json")
    pairs = []
    for p in doc.get("pairs", []):
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


# ---------------------------------------------------------------- run

# The params this stage reads: run() sees only these (stages.lib.params.select), and dvc.yaml's
# and the rule's `params:` list the same keys. Every section: the provenance section prints the
# whole params file and its diff against HEAD, so every value is read.
PARAMS = ("data", "schemes", "masks", "model", "train", "infer", "evaluate", "analyze", "compare",
          "report")


def run(params: dict, raw: Path, masks: Path, models: Path, predictions: Path, metrics: Path,
        analysis: Path, out: Path, compare: Path | None = None, logs: Path | None = None,
        dvc_lock: Path | None = None) -> Path:
    params = select(params, PARAMS)
    cfg = params["report"]
    schemes = [load_scheme(params, name, predictions, metrics, analysis)
               for name in params["schemes"]]
    for s in schemes:
        s.neighbours, s.distances = similars(predictions / s.name / "latents.npz", s.samples,
                                             params["analyze"]["similars"]["k"])
        s.extra["train_device"] = train_device(logs, s.name)
    rows = examples(schemes, raw, masks, predictions, cfg["n_examples"], cfg["thumbnail_px"])
    flagged_in = read_flagged_in(compare, schemes)
    issues = [row for s in schemes
              for row in issue_gallery(analysis / s.name, s, flagged_in, 4 * cfg["thumbnail_px"])]
    changes = read_cluster_changes(compare)
    cards = {s.name: cluster_cards(s, changes, heatmap_sources(analysis / s.name, s,
                                                               cfg["thumbnail_px"]))
             for s in schemes}
    shown = [i["stem"] for i in issues] + [r["stem"] for cs in cards.values() for c in cs
                                           for r in c["representatives"]]
    files = dict(zip(*(image_table(schemes)[c] for c in ("stem", "file_name"))))
    thumbs = {stem: photo_thumbnail(inside(raw, "images", "val", files[stem], resolve=False),
                                    cfg["sample_thumbnail_px"])
              for stem in thumbnail_stems(schemes, shown, cfg["max_thumbnails"])}
    only_in = {stem: found[0] for stem, found in flagged_in.items() if len(found) == 1}
    # What the pipeline writes is not a user's edit (git_state).
    own = [raw, masks, models, predictions, metrics, analysis, compare, out]
    context = build_context(params, schemes, provenance(params, raw, models, schemes, logs,
                                                        dvc_lock, own),
                            rows, issues, scheme_differences(compare), thumbs, cards, only_in)
    html = render(context)
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    log.info("%s: %d schemes, %d val images, %d thumbnails inlined (report.max_thumbnails %d), "
             "%d examples, %.1f MB", out, len(schemes), context["n_images"], len(thumbs),
             cfg["max_thumbnails"], len(rows), len(html.encode()) / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("report", __doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, type=Path, help="folder written by download")
    parser.add_argument("--masks", required=True, type=Path, help="folder of masks/{scheme}")
    parser.add_argument("--models", required=True, type=Path, help="folder of models/{scheme}")
    parser.add_argument("--predictions", required=True, type=Path,
                        help="folder of predictions/{scheme}")
    parser.add_argument("--metrics", required=True, type=Path,
                        help="folder of {scheme}.json and {scheme}.confusion.csv")
    parser.add_argument("--analysis", required=True, type=Path, help="folder of analysis/{scheme}")
    parser.add_argument("--compare", type=Path, help="folder written by compare")
    parser.add_argument("--logs", type=Path,
                        help="the engines' log folder (stage logs, benchmark/ files): stage "
                             "wall times and the training device, when present")
    parser.add_argument("--dvc-lock", type=Path,
                        help="dvc.lock: output hashes as DVC recorded them, when present")
    parser.add_argument("--out", required=True, type=Path, help="HTML file to write")
    args = parser.parse_args(argv)
    return run_main("report", lambda: run(load_params(args.params), args.raw, args.masks,
                                          args.models, args.predictions, args.metrics,
                                          args.analysis, args.out, args.compare, args.logs,
                                          args.dvc_lock),
                    outputs=(args.out,))


if __name__ == "__main__":
    raise SystemExit(main())
