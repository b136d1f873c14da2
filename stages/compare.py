"""compare: the label schemes against each other, on the val images they share.
Reads analysis/<scheme>/ of every scheme in params.yaml and writes under --out:
  samples.csv       per image: loss, mIoU, cluster, label quality and flag in each scheme;
                    per pair of schemes (a, b), b - a of the loss, mIoU and each shared
                    class's IoU
  clusters.csv      per pair, per cluster of either scheme (its own latent space): mean loss
                    of its images in a and in b, mean change, its standard error, z
  buckets.csv       the same per metadata bucket of either scheme (analyze's bins)
  label_issues.csv  images flagged as label issues in some scheme: in which, and whether
                    in one scheme only
  summary.json      per pair: images, mean changes, cluster agreement (adjusted Rand
                    index), the clusters and buckets that change most, one-scheme issues
  insights.json     the findings of one scheme (analysis/<scheme>/insights.json) with no
                    counterpart of the same type under another: scheme_change records, for
                    every ordered pair of schemes ([] with one scheme)
A change counts as significant when the group holds at least compare.min_count images and
the Benjamini-Hochberg q-value of its paired test (over every group of its table) is at most
compare.fdr.
"""
from __future__ import annotations

import itertools
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import adjusted_rand_score

from stages.lib import bootstrap, buckets, insights
from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.io import atomic_dir, atomic_path, write_csv, write_json
from stages.lib.metrics import per_class_iou
from stages.lib.names import inside
from stages.lib.params import load_params, scheme_class_names, select
from stages.lib.tables import read_table

log = logging.getLogger("compare")

# miou is infer's per-image mIoU, carried through analyze's samples.csv: compared, not
# recomputed.
SAMPLE_COLUMNS = ["image_id", "loss", "miou", "cluster", "label_quality", "label_quality_rank"]
SIGNIFICANCE_TEST = ("two-sided Wilcoxon signed-rank test of the paired loss changes, "
                     "Benjamini-Hochberg q-value over every group of the table")
N_TOP = 5
# The tables' columns, written as the header even when a table has no row (one scheme: no
# pair to compare), so that a reader tells "nothing changed" from a damaged file.
CHANGE_COLUMNS = ["images", "mean_loss_a", "mean_loss_b", "mean_delta_loss", "se_delta_loss",
                  "z", "p_value", "q_value", "significant"]
CLUSTER_COLUMNS = ["a", "b", "clusters_of", "cluster", *CHANGE_COLUMNS]
BUCKET_COLUMNS = ["a", "b", "bins_of", "binning", "field", "bin", "low", "high", *CHANGE_COLUMNS]


# ---------------------------------------------------------------- pure core

def pair_name(a: str, b: str) -> str:
    return f"{b}_vs_{a}"


def joined_samples(tables: dict[str, pd.DataFrame], flagged: dict[str, set[int]],
                   classes: dict[str, list[str]]) -> pd.DataFrame:
    """One row per image present in every scheme, with per-scheme columns and per-pair
    deltas (b - a for each pair in params order)."""
    merged = None
    for name, table in tables.items():
        part = pd.DataFrame({"image_id": table["image_id"].astype(int)})
        if merged is None and "file_name" in table:
            part["file_name"] = table["file_name"]
        part[f"loss_{name}"] = table["loss"]
        part[f"miou_{name}"] = table["miou"]
        for cls in classes[name]:
            if f"iou_{cls}" in table:
                part[f"iou_{cls}_{name}"] = table[f"iou_{cls}"]
        part[f"cluster_{name}"] = table["cluster"]
        part[f"label_quality_{name}"] = table["label_quality"]
        part[f"label_quality_rank_{name}"] = table["label_quality_rank"]
        part[f"flagged_{name}"] = part["image_id"].isin(flagged[name])
        merged = part if merged is None else merged.merge(part, on="image_id", how="inner",
                                                          validate="one_to_one")
    deltas = {}
    for a, b in itertools.combinations(tables, 2):
        pair = pair_name(a, b)
        deltas[f"delta_loss_{pair}"] = merged[f"loss_{b}"] - merged[f"loss_{a}"]
        deltas[f"delta_miou_{pair}"] = merged[f"miou_{b}"] - merged[f"miou_{a}"]
        for cls in classes[a]:
            if cls in classes[b] and f"iou_{cls}_{a}" in merged and f"iou_{cls}_{b}" in merged:
                deltas[f"delta_iou_{cls}_{pair}"] = (merged[f"iou_{cls}_{b}"]
                                                     - merged[f"iou_{cls}_{a}"])
    return pd.concat([merged, pd.DataFrame(deltas, index=merged.index)], axis=1)


def group_change(delta: pd.Series, loss_a: pd.Series, loss_b: pd.Series,
                 min_count: int) -> dict:
    """Mean change of a group, its standard error, z, and the p-value of a two-sided
    Wilcoxon signed-rank test of the paired changes (NaN under min_count images or when no
    image changed). Whether it is significant needs the whole table's p-values: _flagged."""
    d = delta.dropna()
    n = len(d)
    mean = float(d.mean()) if n else np.nan
    se = float(d.std(ddof=1) / np.sqrt(n)) if n >= 2 else np.nan
    score = mean / se if n >= 2 and se > 0 else np.nan
    return {"images": n, "mean_loss_a": float(loss_a.mean()) if n else np.nan,
            "mean_loss_b": float(loss_b.mean()) if n else np.nan, "mean_delta_loss": mean,
            "se_delta_loss": se, "z": score, "p_value": changed_p_value(d, min_count)}


def changed_p_value(delta: pd.Series, min_count: int) -> float:
    if len(delta) < min_count or not (delta != 0).any():
        return np.nan
    return float(stats.wilcoxon(delta).pvalue)


def _flagged(frame: pd.DataFrame, fdr: float) -> pd.DataFrame:
    """q-values over every group of the table (Benjamini-Hochberg), and `significant`."""
    if frame.empty:
        return frame
    q, significant = buckets.flag_by_fdr(frame["p_value"], fdr)
    return frame.assign(q_value=q, significant=significant)


def cluster_changes(joined: pd.DataFrame, schemes: list[str], fdr: float,
                    min_count: int) -> pd.DataFrame:
    rows = []
    for a, b in itertools.combinations(schemes, 2):
        delta = joined[f"delta_loss_{pair_name(a, b)}"]
        for grouping in (a, b):
            for cluster, members in joined.groupby(f"cluster_{grouping}"):
                idx = members.index
                rows.append({"a": a, "b": b, "clusters_of": grouping, "cluster": int(cluster),
                             **group_change(delta[idx], joined.loc[idx, f"loss_{a}"],
                                            joined.loc[idx, f"loss_{b}"], min_count)})
    return _ranked(_flagged(pd.DataFrame(rows, columns=CLUSTER_COLUMNS), fdr))


def bucket_changes(joined: pd.DataFrame, samples: dict[str, pd.DataFrame],
                   bins: dict[str, pd.DataFrame], schemes: list[str], fdr: float,
                   min_count: int) -> pd.DataFrame:
    """Changes per bucket of each scheme's own bins (its fields: a scheme's class fractions
    exist in it only), over the images both schemes have."""
    rows = []
    for a, b in itertools.combinations(schemes, 2):
        delta = joined[f"delta_loss_{pair_name(a, b)}"]
        for grouping in (a, b):
            values = joined[["image_id"]].merge(samples[grouping], on="image_id", how="left")
            for (binning, field), part in bins[grouping].groupby(["binning", "field"], sort=False):
                if field not in values:
                    continue
                part = part.sort_values("bin")
                edges = np.append(part["low"].to_numpy(), part["high"].to_numpy()[-1])
                index = buckets.assign(pd.to_numeric(values[field], errors="coerce"), edges)
                for b_index, low, high in zip(part["bin"], part["low"], part["high"]):
                    members = joined.index[index == b_index]
                    if len(members) == 0:
                        continue
                    rows.append({"a": a, "b": b, "bins_of": grouping, "binning": binning,
                                 "field": field, "bin": int(b_index), "low": low, "high": high,
                                 **group_change(delta[members], joined.loc[members, f"loss_{a}"],
                                                joined.loc[members, f"loss_{b}"], min_count)})
    frame = pd.DataFrame(rows, columns=BUCKET_COLUMNS)
    if frame.empty:
        return frame
    # A field both schemes share (brightness, person_fraction...) has the same bins in
    # both: keep one row, the first scheme's.
    same = ["a", "b", "binning", "field", "low", "high", "images", "mean_delta_loss"]
    return _ranked(_flagged(frame.drop_duplicates(subset=same, keep="first"), fdr))


def _ranked(frame: pd.DataFrame) -> pd.DataFrame:
    """Biggest absolute mean change first within each pair, significant ones before."""
    if frame.empty:
        return frame
    frame = frame.assign(_abs=frame["mean_delta_loss"].abs())
    frame = frame.sort_values(["a", "b", "significant", "_abs"],
                              ascending=[True, True, False, False], kind="stable")
    return frame.drop(columns="_abs").reset_index(drop=True)


def issue_changes(joined: pd.DataFrame, schemes: list[str]) -> pd.DataFrame:
    flags = joined[[f"flagged_{s}" for s in schemes]].to_numpy()
    keep = flags.any(axis=1)
    part = joined.loc[keep]
    out = pd.DataFrame({"image_id": part["image_id"]})
    if "file_name" in part:
        out["file_name"] = part["file_name"]
    out["flagged_in"] = [" ".join(s for s, f in zip(schemes, row) if f) for row in flags[keep]]
    out["only_in"] = [next(s for s, f in zip(schemes, row) if f) if row.sum() == 1 else ""
                      for row in flags[keep]]
    for s in schemes:
        out[f"label_quality_{s}"] = part[f"label_quality_{s}"]
        out[f"label_quality_rank_{s}"] = part[f"label_quality_rank_{s}"]
    return out.sort_values(["only_in", "image_id"], ascending=[False, True],
                           kind="stable").reset_index(drop=True)


def summary(joined: pd.DataFrame, clusters: pd.DataFrame, bucket_rows: pd.DataFrame,
            issues: pd.DataFrame, schemes: list[str], fdr: float, min_count: int) -> dict:
    pairs = []
    for a, b in itertools.combinations(schemes, 2):
        pair = pair_name(a, b)
        change = group_change(joined[f"delta_loss_{pair}"], joined[f"loss_{a}"],
                              joined[f"loss_{b}"], min_count)
        top = lambda frame, a=a, b=b: (frame[(frame["a"] == a) & (frame["b"] == b)]  # noqa: E731
                                       .head(N_TOP).to_dict("records") if len(frame) else [])
        pairs.append({
            "a": a, "b": b, "images": int(len(joined)), "loss": change,
            "mean_delta_miou": float(joined[f"delta_miou_{pair}"].mean()),
            "cluster_agreement_ari": float(adjusted_rand_score(joined[f"cluster_{a}"],
                                                               joined[f"cluster_{b}"])),
            "clusters_changing_most": top(clusters), "buckets_changing_most": top(bucket_rows),
            "label_issues_only_in": {s: int((issues["only_in"] == s).sum()) for s in (a, b)},
        })
    return {"schemes": schemes,
            "significance": {"fdr": fdr, "min_count": min_count, "test": SIGNIFICANCE_TEST},
            "pairs": pairs}


# ---------------------------------------------------------------- pure core: bootstrap

@dataclass
class PerImage:
    """A scheme's per-image counts (evaluate's per_image.npz), aligned by stem, one entry
    per training seed (train.seeds order) on the second axis."""

    stems: list[str]
    class_names: list[str]
    confusion: np.ndarray           # (N, S, K, K)
    category_names: list[str]
    category_claims: np.ndarray     # (C,) claiming class index, 0 for none
    category_pixels: np.ndarray     # (N, S, C, K)
    seeds: list[int]

    def take(self, stems: list[str]) -> "PerImage":
        row = {stem: i for i, stem in enumerate(self.stems)}
        index = [row[stem] for stem in stems]
        return PerImage(stems, self.class_names, self.confusion[index], self.category_names,
                        self.category_claims, self.category_pixels[index], self.seeds)


def found_share(pixels: np.ndarray, claims: np.ndarray) -> np.ndarray:
    """Per category (last-but-one axis of (..., C, K) counts): the share of its pixels
    predicted as the class that claims it, or, for a category the scheme does not claim,
    as any class but background. NaN where a category has no pixel."""
    total = pixels.sum(-1)
    claimed = pixels[..., np.arange(len(claims)), claims]
    found = np.where(claims > 0, claimed, pixels[..., 1:].sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, found / np.maximum(total, 1), np.nan)


NOT_TESTED = "no detectable difference"
# Why a difference is not called, when its interval alone would call it.
FEW_IMAGES = "fewer than compare.min_images val images show it"
SEEDS_DISAGREE = "the seeds disagree on its sign"


def difference(a_points: np.ndarray, b_points: np.ndarray, a_draws: np.ndarray,
               b_draws: np.ndarray, confidence: float, names: tuple[str, str],
               images: int, min_images: int) -> dict:
    """b - a of a score's mean over the training seeds (per seed points (S,), resampled
    (B, S)), with the paired bootstrap interval of that mean and a verdict ('higher' = b
    higher). A verdict other than 'no detectable difference' needs the interval to exclude
    zero, every seed's own difference to have that sign, and at least min_images images
    showing the class or category: a percentile bootstrap over few images is too narrow
    (over one it has no spread at all), and would call differences that are not there."""
    with warnings.catch_warnings():   # a score no seed defines: NaN, written as null
        warnings.simplefilter("ignore", RuntimeWarning)
        a_mean, b_mean = np.nanmean(a_points), np.nanmean(b_points)
        bounds = bootstrap.interval(np.nanmean(b_draws - a_draws, axis=1), confidence)
    per_seed = b_points - a_points
    verdict, reason = bootstrap.verdict(bounds), None
    if verdict != NOT_TESTED and images < min_images:
        verdict, reason = NOT_TESTED, FEW_IMAGES
    elif verdict != NOT_TESTED and not np.all(np.sign(per_seed) == (1 if verdict == "higher"
                                                                      else -1)):
        verdict, reason = NOT_TESTED, SEEDS_DISAGREE
    return {names[0]: _number(a_mean), names[1]: _number(b_mean),
            "delta": _number(b_mean - a_mean), "interval": bounds, "verdict": verdict,
            "reason": reason, "images": int(images),
            "per_seed": [_number(d) for d in per_seed]}


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def scheme_differences(per_image: dict[str, PerImage], claims: dict[str, dict],
                       settings: bootstrap.Settings,
                       min_images: int) -> dict[tuple[str, str], dict]:
    """Per pair (a, b): every shared class's IoU difference and every category's found-share
    difference, each of the mean over the training seeds, with its paired interval (the
    same resampled images for all schemes and seeds)."""
    names = list(per_image)
    arrays = [per_image[n].confusion for n in names] + [per_image[n].category_pixels
                                                          for n in names]
    resampled = bootstrap.resampled_sums(arrays, settings)
    draws = dict(zip(names, resampled[:len(names)]))
    category_draws = dict(zip(names, resampled[len(names):]))
    iou = {n: (per_class_iou(per_image[n].confusion.sum(0)),              # (S, K)
               per_class_iou(draws[n])) for n in names}                   # (B, S, K)
    share = {n: (found_share(per_image[n].category_pixels.sum(0), per_image[n].category_claims),
                 found_share(category_draws[n], per_image[n].category_claims)) for n in names}
    out = {}
    for a, b in itertools.combinations(names, 2):
        classes = {}
        for cls in per_image[a].class_names:
            if cls not in per_image[b].class_names or cls == "background":
                continue
            i, j = per_image[a].class_names.index(cls), per_image[b].class_names.index(cls)
            entry = difference(iou[a][0][:, i], iou[b][0][:, j], iou[a][1][..., i],
                               iou[b][1][..., j], settings.confidence, ("iou_a", "iou_b"),
                               _images_showing_class(per_image[a], per_image[b], i, j),
                               min_images)
            entry["delta_iou"] = entry.pop("delta")
            entry["same_definition"] = claims[a].get(cls) == claims[b].get(cls)
            classes[cls] = entry
        categories = {}
        for c, category in enumerate(per_image[a].category_names):
            shown = per_image[a].category_pixels[:, 0, c].sum(-1) > 0   # ground truth: any seed
            if not shown.any():
                continue
            entry = difference(share[a][0][:, c], share[b][0][:, c], share[a][1][..., c],
                               share[b][1][..., c], settings.confidence,
                               ("share_a", "share_b"), int(shown.sum()), min_images)
            entry["delta_share"] = entry.pop("delta")
            entry["claimed_by_a"] = _claimer(per_image[a], c)
            entry["claimed_by_b"] = _claimer(per_image[b], c)
            categories[category] = entry
        out[(a, b)] = {"classes": classes, "categories": categories}
    return out


def _images_showing_class(a: PerImage, b: PerImage, i: int, j: int) -> int:
    """Val images whose ground truth holds class i of a or class j of b (a confusion row
    is ground truth, the same for every seed)."""
    shown = (a.confusion[:, 0, i, :].sum(-1) > 0) | (b.confusion[:, 0, j, :].sum(-1) > 0)
    return int(shown.sum())


def _claimer(scheme: PerImage, category: int) -> str:
    claim = int(scheme.category_claims[category])
    return scheme.class_names[claim] if claim else ""


# ---------------------------------------------------------------- run

def read_scheme(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, set[int]]:
    def table(name: str, columns: list[str]) -> pd.DataFrame:
        return read_table(folder / name, columns, produced_by="analyze")

    samples = table("samples.csv", SAMPLE_COLUMNS)
    samples["image_id"] = _image_ids(samples["image_id"], folder / "samples.csv")
    repeated = samples.loc[samples["image_id"].duplicated(), "image_id"]
    if len(repeated):
        # pairs are made by image_id: a second row of one image would pair with the other
        # scheme's row twice
        raise StageError(f"{folder / 'samples.csv'}: image_id {repeated.iloc[0]} is listed "
                         "more than once (each image has one row); re-run analyze")
    bins = table("metadata_loss.csv", ["binning", "field", "bin", "low", "high"])
    issues = table("label_issues.csv", ["image_id", "flagged"])
    issues["image_id"] = _image_ids(issues["image_id"], folder / "label_issues.csv")
    return samples, bins, set(issues.loc[issues["flagged"].astype(bool), "image_id"])


def _image_ids(column: pd.Series, path: Path) -> pd.Series:
    """A table's image_id column as integers (COCO's ids), refused in one line naming the file
    and the first value that is none: pairs and flags are matched by these ids."""
    numbers = pd.to_numeric(column, errors="coerce")
    bad = numbers.isna() | (numbers % 1 != 0) | (numbers < 0)
    if bad.any():
        value = column[bad].iloc[0]
        text = "" if pd.isna(value) else str(value)
        raise StageError(f"{path}: image_id {text!r} is not a COCO image id "
                         "(expected a whole number >= 0); re-run analyze")
    return numbers.astype("int64")


def read_insights(folder: Path) -> list[dict]:
    """analyze's insights.json: a list of records with the contract's keys."""
    path = folder / "insights.json"
    if not path.is_file():
        raise StageError(f"{path}: missing (run the analyze stage first)")
    try:
        records = json.loads(path.read_text())
    except ValueError as exc:
        raise StageError(f"{path}: not JSON ({exc}); re-run analyze") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise StageError(f"{path}: not a list of insight records; re-run analyze")
    for i, found in enumerate(records):
        absent = [k for k in insights.KEYS if k not in found]
        if absent:
            raise StageError(f"{path}: record {i} has no {', '.join(absent)}; re-run analyze")
    return records


# The params this stage reads: run() sees only these (stages.lib.params.select), and dvc.yaml's
# and the rule's `params:` list the same keys. Every scheme's classes, and its own section.
PARAMS = ("schemes", "compare")


def read_per_image(path: Path, class_names: list[str]) -> PerImage:
    keys = ["stems", "class_names", "seeds", "confusion", "category_names", "category_claims",
            "category_pixels"]
    try:
        with np.load(path) as npz:
            absent = [k for k in keys if k not in npz]
            if absent:
                raise StageError(f"{path}: missing arrays {', '.join(absent)}; re-run evaluate")
            found = PerImage(npz["stems"].tolist(), npz["class_names"].tolist(),
                             npz["confusion"], npz["category_names"].tolist(),
                             npz["category_claims"], npz["category_pixels"],
                             npz["seeds"].tolist())
    except FileNotFoundError:
        raise StageError(f"{path}: missing (run the evaluate stage first)") from None
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: not an evaluate per-image file ({exc})") from None
    if found.class_names != class_names:
        raise StageError(f"{path}: classes {found.class_names} differ from params.yaml "
                         f"{class_names}; re-run evaluate")
    if found.confusion.ndim != 4 or found.confusion.shape[1] != len(found.seeds):
        raise StageError(f"{path}: confusion of shape {found.confusion.shape}, expected "
                         f"(images, {len(found.seeds)} seeds, K, K); re-run evaluate")
    return found


def differences(params: dict, metrics: Path,
                schemes: list[str]) -> tuple[list[int], dict[tuple[str, str], dict]]:
    """The training seeds, and the bootstrap comparisons of every pair, on the val images all
    schemes have."""
    per_image = {s: read_per_image(inside(metrics, f"{s}.per_image.npz", resolve=False),
                                   scheme_class_names(params, s)) for s in schemes}
    first = per_image[schemes[0]]
    for name, found in per_image.items():
        if found.category_names != first.category_names:
            raise StageError(f"{metrics}/{name}.per_image.npz: its COCO categories differ from "
                             f"{schemes[0]}'s; evaluate both on the same val annotations")
        if found.seeds != first.seeds:
            raise StageError(f"{metrics}/{name}.per_image.npz: seeds {found.seeds} differ from "
                             f"{schemes[0]}'s {first.seeds}; re-run evaluate for both")
    shared = sorted(set.intersection(*(set(p.stems) for p in per_image.values())))
    if not shared:
        raise StageError(f"{metrics}: the schemes' per_image.npz share no val image")
    claims = {s: params["schemes"][s]["classes"] for s in schemes}
    settings = bootstrap.Settings.from_params(params["compare"]["bootstrap"])
    return first.seeds, scheme_differences({s: p.take(shared) for s, p in per_image.items()},
                                           claims, settings, params["compare"]["min_images"])


def run(params: dict, analysis: Path, out: Path, metrics: Path | None = None) -> dict:
    params = select(params, PARAMS)
    cfg = params["compare"]
    schemes = list(params["schemes"])
    samples, bins, flagged, found = {}, {}, {}, {}
    for name in schemes:
        folder = inside(analysis, name, resolve=False)
        samples[name], bins[name], flagged[name] = read_scheme(folder)
        found[name] = read_insights(folder)
    changes = insights.scheme_changes(found, cfg["min_jaccard"])
    seeds, compared = differences(params, metrics, schemes) if metrics is not None else ([], {})
    classes = {name: scheme_class_names(params, name) for name in schemes}
    joined = joined_samples(samples, flagged, classes)
    if len(schemes) > 1 and joined.empty:
        raise StageError(f"{analysis}: the schemes share no val image; nothing to compare")
    clusters = cluster_changes(joined, schemes, cfg["fdr"], cfg["min_count"])
    bucket_rows = bucket_changes(joined, samples, bins, schemes, cfg["fdr"], cfg["min_count"])
    issues = issue_changes(joined, schemes)
    doc = summary(joined, clusters, bucket_rows, issues, schemes, cfg["fdr"], cfg["min_count"])
    doc["scheme_changes"] = len(changes)
    if metrics is not None:
        doc["bootstrap"] = {**cfg["bootstrap"], "method": bootstrap.METHOD}
        # One seed: the intervals hold the val images' sampling noise, not training noise.
        doc["seeds"] = {"seeds": seeds, "training_noise_measured": len(seeds) > 1}
        for pair in doc["pairs"]:
            pair.update(compared[(pair["a"], pair["b"])])
    with atomic_dir(out) as tmp:
        write_csv(tmp / "samples.csv", joined)
        write_csv(tmp / "clusters.csv", clusters)
        write_csv(tmp / "buckets.csv", bucket_rows)
        write_csv(tmp / "label_issues.csv", issues)
        write_json(tmp / "summary.json", doc)
        with atomic_path(tmp / "insights.json") as path:
            path.write_text(insights.to_json(changes))
    log.info("%d scheme_change insights", len(changes))
    for pair in doc["pairs"]:
        log.info("%s vs %s: %d images, mean loss change %+.4f (z %.2f), ARI %.3f, %d "
                 "significant clusters, %d significant buckets", pair["b"], pair["a"],
                 pair["images"], pair["loss"]["mean_delta_loss"], pair["loss"]["z"],
                 pair["cluster_agreement_ari"],
                 int(clusters["significant"].sum()) if len(clusters) else 0,
                 int(bucket_rows["significant"].sum()) if len(bucket_rows) else 0)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("compare", __doc__)
    parser.add_argument("--analysis", required=True, type=Path,
                        help="folder of analysis/<scheme> (written by analyze)")
    parser.add_argument("--metrics", type=Path,
                        help="folder of <scheme>.per_image.npz (written by evaluate): the "
                             "per-class and per-category differences with their intervals")
    parser.add_argument("--out", required=True, type=Path, help="comparison folder to create")
    args = parser.parse_args(argv)
    return run_main("compare", lambda: run(load_params(args.params), args.analysis, args.out,
                                           args.metrics),
                    outputs=(args.out,))


if __name__ == "__main__":
    raise SystemExit(main())
