"""The per-sample data the page's JavaScript draws from (one JSON document, columnar):
images and thumbnails, metadata, and per scheme the map, scores, clusters, neighbours and
metadata buckets. Pure: everything comes from the schemes as read."""
from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_hex

from stages.lib import buckets
from stages.lib.labels import OKABE_ITO
from stages.report.inputs import Scheme
from stages.report.tables import finite

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


def image_table(schemes: list[Scheme]) -> pd.DataFrame:
    """Every val image of any scheme once, by stem: image id and file name."""
    parts = [s.samples[["stem", "file_name", "image_id"]] for s in schemes]
    return pd.concat(parts, ignore_index=True).drop_duplicates("stem").sort_values(
        "stem", kind="stable").reset_index(drop=True)


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
        classes = s.class_names
        issue_stems = set(s.label_issues.loc[s.label_issues["flagged"].astype(bool), "stem"])
        k = int(s.neighbours.shape[1])
        per_scheme.append({
            "name": s.name, "classes": classes,
            "img": [position[stem] for stem in samples["stem"]],
            "x": rounded(samples["x"]), "y": rounded(samples["y"]),
            "cluster": [int(c) for c in samples["cluster"]],
            "loss": rounded(samples["loss"]),
            "pa": rounded(samples["pixel_accuracy"]), "miou": rounded(samples["miou"]),
            "iou": {c: rounded(samples[f"iou_{c}"]) for c in classes},
            "lq": rounded(samples["label_quality"]),
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
                          if isinstance(r["dominant_categories"], str) else ""}
                         for _, r in s.clusters.iterrows()],
            # analyze's out-of-distribution score, and the threshold above which it called
            # an image out of distribution (its finding's evidence; none without one)
            "ood": rounded(samples["ood_score"]),
            "ood_threshold": next((finite(r["evidence"].get("threshold")) for r in s.insights
                                   if r["type"] == "out_of_distribution"), None),
            "mean_loss": finite(samples["loss"].mean()),
            "buckets": scheme_buckets(s, charted, flagged),
            "bucket_of": {name: s.bin_members[name] for name in charted
                          if name in s.bin_members},
        })
    return {
        "schemes": [s.name for s in schemes],
        "images": {"stem": images["stem"].tolist(),
                   "id": [int(v) for v in images["image_id"]],
                   "file": images["file_name"].astype(str).tolist(),
                   "thumb": [thumb_index.get(stem, -1) for stem in images["stem"]]},
        "thumbs": thumb_list,
        "fields": [{"key": name, "kind": kinds[name], "shared": name in shared}
                   for name in fields],
        "meta": {name: rounded(values) for name, values in shared.items()},
        "charted": charted,
        "per_scheme": per_scheme,
        "viridis": colour_ramp("viridis"), "diverging": colour_ramp("PuOr_r"),
        "categorical": CATEGORY_COLOURS, "flag": OKABE_ITO["orange"],
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
                         "loss": finite(r["mean_loss"]), "se": finite(r["se_loss"]),
                         "flagged": (name, int(r["bin"])) in hot})
    return rows
