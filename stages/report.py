"""report: one self-contained HTML page comparing the label schemes side by side.
Reads, for every scheme in params.yaml, the metrics and confusion matrix (evaluate), the
training log (train), timing and predicted masks (infer), the sample, cluster and
metadata-vs-loss tables (analyze), the ground truth (masks) and the val images (download),
and writes --out: every figure and thumbnail is inlined, so the page needs no network.
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
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.io import atomic_path
from stages.lib.labels import IGNORE_INDEX, colourise, palette_colours, read_labels
from stages.lib.params import load_params, scheme_class_names
from stages.lib.plots import compact, confusion_figure, png_bytes  # noqa: F401 (re-exported)

log = logging.getLogger("report")

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPO = Path(__file__).resolve().parents[1]

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
# Okabe-Ito: line colours that stay apart under the common colour-vision deficiencies.
SCHEME_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000"]
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
        return (f"at least {buckets['min_count']} samples, mean loss above the scheme's mean "
                f"by more than {buckets['z']:g} standard errors of the bin")
    return "2+ samples, mean loss at least one standard deviation above the scheme's mean"


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


def population_figure(samples: pd.DataFrame, title: str, projection: str) -> bytes:
    """The latent map twice: coloured by cluster (marker shapes too, so colour is not the
    only cue) and by sample loss."""
    fig = Figure(figsize=(8.4, 3.6))
    by_cluster, by_loss = fig.subplots(1, 2)
    clusters = sorted(samples["cluster"].unique())
    colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(clusters), 1)))
    for i, c in enumerate(clusters):
        members = samples[samples["cluster"] == c]
        by_cluster.scatter(members["x"], members["y"], s=22, color=colours[i],
                           marker=MARKERS[i % len(MARKERS)], edgecolor="white", linewidth=0.4,
                           label=f"cluster {c} (n={len(members)})")
    by_cluster.legend(fontsize=7, loc="best")
    points = by_loss.scatter(samples["x"], samples["y"], c=samples["loss"], s=22,
                             cmap="viridis", edgecolor="white", linewidth=0.4)
    fig.colorbar(points, ax=by_loss, label="sample loss")
    for ax, what in ((by_cluster, "clusters"), (by_loss, "loss")):
        ax.set_title(f"{title}: {what}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"latent {projection} 1")
        ax.set_ylabel(f"latent {projection} 2")
    return png_bytes(fig)


def bin_labels(bins: pd.DataFrame, boolean: bool) -> list[str]:
    if boolean:
        return ["no" if high <= 0.5 else "yes" for high in bins["high"]]
    return [f"{low:.3g}–{high:.3g}" for low, high in zip(bins["low"], bins["high"])]


def metadata_figure(field: str, schemes: list[Scheme], flagged: list[dict]) -> bytes:
    """Mean loss per bin of one field, one panel per scheme with a shared loss axis."""
    fig = Figure(figsize=(3.0 * len(schemes) + 0.4, 2.5))
    axes = np.atleast_1d(fig.subplots(1, len(schemes), sharey=True))
    for ax, s in zip(axes, schemes):
        bins = s.metadata_loss[s.metadata_loss["field"] == field].sort_values("bin")
        ax.set_title(s.name, fontsize=10)
        if bins.empty:
            ax.text(0.5, 0.5, "not a field\nof this scheme", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="#555555")
            ax.set_xticks([])
            continue
        hot = {f["bin"] for f in flagged if f["scheme"] == s.name and f["field"] == field}
        _metadata_bars(ax, bins, hot, _is_boolean(s.samples, field))
        ax.axhline(s.samples["loss"].mean(), color="#444444", linestyle="--", linewidth=1)
    axes[0].set_ylabel("mean loss")
    return png_bytes(fig)


def _metadata_bars(ax, bins: pd.DataFrame, hot: set[int], boolean: bool) -> None:
    positions = np.arange(len(bins))
    heights = bins["mean_loss"].fillna(0).to_numpy()
    colours = ["#fde725" if b in hot else "#21918c" for b in bins["bin"]]
    bars = ax.bar(positions, heights, color=colours, edgecolor="#333333", linewidth=0.6)
    for bar, b in zip(bars, bins["bin"]):
        if b in hot:
            bar.set_hatch("//")
    for x, h, n in zip(positions, heights, bins["count"]):
        ax.text(x, h, f"n={int(n)}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(positions, bin_labels(bins, boolean), rotation=30, ha="right", fontsize=8)
    ax.margins(y=0.15)


def _is_boolean(samples: pd.DataFrame, field: str) -> bool:
    return field in samples.columns and pd.api.types.is_bool_dtype(samples[field])


def legend_swatches(class_names: list[str]) -> list[dict]:
    palette = palette_colours()
    swatches = [{"name": c, "colour": "#%02x%02x%02x" % tuple(palette[i])}
                for i, c in enumerate(class_names)]
    swatches.append({"name": "ignore", "colour": "#%02x%02x%02x" % tuple(palette[IGNORE_INDEX])})
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


def build_context(params: dict, schemes: list[Scheme], provenance: dict,
                  examples: list[dict], issues: list[dict] | None = None,
                  differences: list[dict] | None = None) -> dict:
    """Everything the template shows, figures already encoded."""
    names = [s.name for s in schemes]
    fields = informative_fields(schemes)
    flagged = [f for s in schemes for f in flagged_bins(s, fields)]
    projection = params["analyze"]["projection"]
    return {
        "title": params["report"]["title"], "schemes": names, "provenance": provenance,
        "comparison": comparison_table(schemes), "verdicts": verdicts(schemes),
        # One scheme has nothing to subtract; with three or more, each delta names its pair.
        "delta_label": (f"Δ {names[1]} − {names[0]}" if len(names) == 2
                        else "Δ (the two schemes with the class)" if len(names) > 2 else ""),
        "confusion": [{"scheme": s.name, "src": data_uri(confusion_figure(
            s.confusion, s.class_names, s.name))} for s in schemes],
        "curves_src": data_uri(curves_figure(schemes)),
        "timing": timing_rows(schemes),
        "population": [{"scheme": s.name, "clusters": cluster_rows(s),
                        "src": data_uri(population_figure(s.samples, s.name, projection))}
                       for s in schemes],
        "agreement": cluster_agreement(schemes), "projection": projection,
        "metadata": [{"field": f, "src": data_uri(metadata_figure(f, schemes, flagged))}
                     for f in fields],
        "flagged": flagged, "flag_rule": flag_rule(params, schemes),
        "binning": params.get("analyze", {}).get("buckets", {}).get(
            "binning", ["equal_width"])[0].replace("_", "-"),
        "legends": [{"scheme": s.name, "swatches": legend_swatches(s.class_names)}
                    for s in schemes],
        "examples": examples, "thumbnail_px": params["report"]["thumbnail_px"],
        "caveats": training_caveats(params, provenance["data"]["images"].get("train")),
        "issues": issues or [], "differences": differences or [],
    }


# ---------------------------------------------------------------- run: reading inputs

def read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise StageError(f"{path}: expected a JSON object")
    return document


def read_table(path: Path, columns: list[str], **kwargs) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not a readable table ({exc})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise StageError(f"{path}: missing columns {', '.join(missing)}")
    return frame


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
    # The stem comes from file_name: a numeric-looking stem column loses its zeros in CSV.
    samples["stem"] = samples["file_name"].map(lambda name: Path(name).stem)
    return samples


def load_scheme(params: dict, name: str, predictions: Path, metrics: Path,
                analysis: Path) -> Scheme:
    class_names = scheme_class_names(params, name)
    plots = metrics / "train" / name / "plots" / "metrics"
    return Scheme(
        name=name, class_names=class_names, claims=params["schemes"][name]["classes"],
        metrics=read_metrics(metrics / f"{name}.json", class_names),
        confusion=read_confusion(metrics / f"{name}.confusion.csv", class_names),
        curves={key: read_curve(plots / split / f"{column}.tsv", column)
                for key, (split, column) in CURVES.items()},
        timing=read_timing(predictions / name / "timing.json"),
        samples=read_samples(analysis / name / "samples.csv"),
        clusters=read_table(analysis / name / "clusters.csv", ["cluster", "size", "mean_loss"]),
        metadata_loss=one_binning(read_table(analysis / name / "metadata_loss.csv",
                                             ["field", "bin", "low", "high", "count",
                                              "mean_loss"]),
                                  params["analyze"]["buckets"]["binning"][0]),
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


# ---------------------------------------------------------------- run: provenance

def git_state(repo: Path) -> dict:
    try:
        commit = _git(repo, "rev-parse", "--short", "HEAD")
        dirty = bool(_git(repo, "status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


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


def sha256_prefix(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def data_source(manifest_path: Path) -> dict:
    manifest = read_json(manifest_path)
    splits = manifest.get("splits", {})
    return {"base_url": manifest.get("base_url"), "year": manifest.get("year"),
            "seed": manifest.get("seed"), "sha256": sha256_prefix(manifest_path),
            "images": {split: len(body.get("images", [])) for split, body in splits.items()}}


def provenance(params: dict, raw: Path, models: Path, schemes: list[Scheme]) -> dict:
    return {
        "git": git_state(REPO), "date": report_date(), "versions": library_versions(),
        "params_yaml": yaml.safe_dump(params, sort_keys=False, allow_unicode=True),
        "data": data_source(raw / "manifest.json"),
        "models": [{"scheme": s.name, "device": s.timing["device"],
                    "sha256": sha256_prefix(models / s.name / "model.pt")} for s in schemes],
    }


# ---------------------------------------------------------------- run: examples

def examples(schemes: list[Scheme], raw: Path, masks: Path, predictions: Path,
             n: int, width: int) -> list[dict]:
    candidates = example_candidates(schemes)
    file_names = dict(zip(candidates["stem"], candidates["file_name"]))
    rows = []
    for stem, reason in choose_examples(candidates, n, compare=len(schemes) > 1):
        scores = [sample_scores(s, stem) for s in schemes]
        renders = [{"scheme": s.name, **score,
                    "gt": label_thumbnail(masks / s.name / "val" / f"{stem}.png", width),
                    "pred": label_thumbnail(predictions / s.name / "val" / f"{stem}.png", width)}
                   for s, score in zip(schemes, scores)]
        rows.append({"stem": stem, "reason": reason, "schemes": renders,
                     "image": photo_thumbnail(raw / "images" / "val" / file_names[stem], width),
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


def label_thumbnail(path: Path, width: int) -> str:
    try:
        labels = read_labels(path)
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: not a label map ({exc})") from None
    return encode(thumbnail(Image.fromarray(colourise(labels)), width, nearest=True), "PNG")


# ---------------------------------------------------------------- run: analyze and compare

N_ISSUES = 3  # label-issue figures shown per scheme (analyze lists them all)


def issue_gallery(folder: Path, scheme: str, n: int = N_ISSUES) -> list[dict]:
    """The n worst-scored images analyze flagged, with its pre-drawn figure."""
    path = folder / "label_issues.csv"
    if not path.is_file():
        return []
    table = read_table(path, ["rank", "label_quality", "flagged"], dtype={"stem": str})
    rows = []
    for r in table[table["flagged"].astype(bool)].head(n).itertuples():
        figure = folder / str(r.figure)
        if not figure.is_file():
            raise StageError(f"{figure}: missing (listed in {path})")
        rows.append({"scheme": scheme, "rank": int(r.rank), "stem": str(r.stem),
                     "score": finite(r.label_quality), "what": str(r.main_disagreement)
                     if isinstance(r.main_disagreement, str) else "",
                     "src": data_uri(figure.read_bytes())})
    return rows


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
                      "clusters": [_change_text(r, "cluster") for r in p["clusters_changing_most"][:3]],
                      "buckets": [_change_text(r, "bucket") for r in p["buckets_changing_most"][:3]],
                      "only_in": p["label_issues_only_in"]})
    return pairs


# ---------------------------------------------------------------- run

def run(params: dict, raw: Path, masks: Path, models: Path, predictions: Path, metrics: Path,
        analysis: Path, out: Path, compare: Path | None = None) -> Path:
    schemes = [load_scheme(params, name, predictions, metrics, analysis)
               for name in params["schemes"]]
    cfg = params["report"]
    rows = examples(schemes, raw, masks, predictions, cfg["n_examples"], cfg["thumbnail_px"])
    issues = [row for s in schemes for row in issue_gallery(analysis / s.name, s.name)]
    html = render(build_context(params, schemes, provenance(params, raw, models, schemes), rows,
                                issues, scheme_differences(compare)))
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    log.info("%s: %d schemes, %d examples, %.1f MB", out, len(schemes), len(rows),
             len(html.encode()) / 1e6)
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
    parser.add_argument("--out", required=True, type=Path, help="HTML file to write")
    args = parser.parse_args(argv)
    return run_main("report", lambda: run(load_params(args.params), args.raw, args.masks,
                                          args.models, args.predictions, args.metrics,
                                          args.analysis, args.out, args.compare))


if __name__ == "__main__":
    raise SystemExit(main())
