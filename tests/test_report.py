"""report: the pure core on small synthetic schemes, and the whole stage on real pipeline
outputs (the embedded COCO sample run through every stage at tiny size, once per session)."""
from __future__ import annotations

import base64
import copy
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import jinja2
import pytest
import yaml

from conftest import ROOT, SAMPLE, small_params
from stages import report
from stages.lib import buckets, insights
from stages.report import inputs as report_inputs
from stages.lib.categories import category_table
from stages.report import tables as report_tables
from stages.lib.cli import StageError
from stages.lib.plots import curves_figure, png_bytes
from unwritable import blocked_folder, can_mount_read_only, read_only_command

EVIL = "<script>alert(1)</script>"
TITLE = f'segflow {EVIL} & "co"'

# Runs every stage before report in one fresh interpreter: one torch import instead of
# eleven, and train's process-wide torch settings stay out of the test process.
BUILD = """
import sys
from pathlib import Path
from stages import analyze, compare, download, evaluate, infer, masks, train
from stages.lib.params import load_params
params, root = load_params(sys.argv[1]), Path(sys.argv[2])
raw = root / "data" / "raw"
download.run(params, raw)
for s in params["schemes"]:
    m = root / "data" / "masks" / s
    model, pred = root / "models" / s / "seed0", root / "predictions" / s / "seed0"
    masks.run(params, s, raw, m)
    train.run(params, s, raw, m, model, live=root / "metrics" / "train" / s / "seed0")
    infer.run(params, model, raw, m, pred)
    evaluate.run(params, s, pred / "val", m / "val", root / "metrics" / f"{s}.json",
                 root / "metrics" / f"{s}.confusion.csv", root / "metrics" / f"{s}.confusion.png",
                 annotations=raw / "annotations" / "instances_val.json",
                 categories_out=root / "metrics" / f"{s}.categories.csv",
                 per_image_out=root / "metrics" / f"{s}.per_image.npz")
    analyze.run(params, pred, m, model, raw, root / "analysis" / s)
compare.run(params, root / "analysis", root / "compare", root / "metrics")
"""

_BUILT: dict[str, dict] = {}


def build_pipeline(tmp_path_factory) -> dict:
    """Real inputs for the report, built once per session (shared with the browser test)."""
    if "inputs" not in _BUILT:
        root = tmp_path_factory.mktemp("pipeline")
        params = small_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
        params["data"]["base_url"] = str(SAMPLE)
        params["report"]["title"] = TITLE
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        done = subprocess.run([sys.executable, "-c", BUILD, str(root / "params.yaml"), str(root)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        _BUILT["inputs"] = {"root": root, "params": params, "args": stage_args(root)}
    return _BUILT["inputs"]


def stage_args(root: Path, **override) -> dict:
    paths = {"raw": root / "data" / "raw", "masks": root / "data" / "masks",
             "models": root / "models", "predictions": root / "predictions",
             "metrics": root / "metrics", "analysis": root / "analysis",
             "compare": root / "compare",
             "out": root / "reports" / "index.html"}
    paths.update(override)
    return paths


def cli_argv(params_path: Path, paths: dict) -> list[str]:
    argv = ["--params", str(params_path)]
    for key in ("raw", "masks", "models", "predictions", "metrics", "analysis", "compare",
                "out"):
        argv += [f"--{key}", str(paths[key])]
    return argv


def render_report(tmp_path_factory) -> dict:
    """The report rendered through the CLI, as a user (or DVC) runs it."""
    if "rendered" not in _BUILT:
        inputs = build_pipeline(tmp_path_factory)
        args = inputs["args"]
        argv = cli_argv(inputs["root"] / "params.yaml", args)
        assert report.main(argv) == 0
        html = args["out"].read_text(encoding="utf-8")
        _BUILT["rendered"] = {**inputs, "html": html, "page": Page.parse(html)}
    return _BUILT["rendered"]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> dict:
    return build_pipeline(tmp_path_factory)


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict:
    return render_report(tmp_path_factory)


class Page(HTMLParser):
    """Tags with attributes, visible text, and the cell texts of every table with an id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.scripts: list[tuple[dict, str]] = []  # (attributes, text) of every <script>
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._raw: str | None = None  # inside <script> or <style>: not visible text

    @classmethod
    def parse(cls, html: str) -> "Page":
        page = cls()
        page.feed(html)
        page.close()
        return page

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag in ("script", "style"):
            self._raw = tag
            if tag == "script":
                self.scripts.append((attrs, ""))
            return
        if tag == "table" and attrs.get("id"):
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == self._raw:
            self._raw = None
            return
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._raw == "script":
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        if self._raw:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def all_text(self) -> str:
        return " ".join("".join(self.text).split())

    def data(self) -> dict:
        """The page's JSON blob, parsed."""
        [text] = [t for a, t in self.scripts if a.get("type") == "application/json"]
        return json.loads(text)


def rows_by_label(table: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in table if len(row) > 1}


# ---------------------------------------------------------------- pure core, synthetic

# A figure as train draws its curves (stages.lib.plots.curves_figure), for the synthetic
# schemes' confusion and curves images.
FIGURE = png_bytes(curves_figure(
    [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_miou": 0.2},
     {"epoch": 2, "train_loss": 0.8, "val_loss": 1.0, "val_miou": None}], "synthetic"))
TRAIN_JSON = {"device": "cpu", "precision": "float32", "epochs": 2, "wall_s": 3.5,
              "torch_version": "2.0.0", "model_sha256": "ab" * 32, "train_images": 8,
              "val_images": 8, "encoder_pretraining": "ImageNet-1k"}


def metadata_loss_frame(samples: pd.DataFrame, spec: dict[str, list[tuple]],
                        class_names: list[str], binning: str = "equal_width") -> pd.DataFrame:
    """analyze's metadata_loss.csv, every documented column; spec: field -> (low, high,
    count, mean_loss[, flagged]) per bin."""
    overall = float(samples["loss"].mean())
    rows = []
    for name, bins in spec.items():
        for b, (low, high, count, mean, *flag) in enumerate(bins):
            rows.append({"binning": binning, "field": name, "bin": b, "low": low, "high": high,
                         "count": count, "mean_loss": mean, "std_loss": 0.1,
                         "se_loss": 0.05, "overall_mean_loss": overall,
                         "excess_se": (mean - overall) / 0.05, "flagged": bool(flag and flag[0]),
                         **{f"mean_iou_{c}": 0.5 for c in class_names}, "figure": ""})
    return pd.DataFrame(rows)


def members_of(samples: pd.DataFrame, bins: pd.DataFrame) -> dict[str, list[int]]:
    """analyze's bin_members.csv (one row per sample and field, its bin by the table's edges,
    -1 outside them), read as report reads it."""
    rows = []
    for name, part in bins.groupby("field", sort=False):
        if name not in samples:
            continue
        edges = np.append(part["low"].to_numpy(float), part["high"].to_numpy(float)[-1])
        index = buckets.assign(pd.to_numeric(samples[name], errors="coerce"), edges)
        rows.append(pd.DataFrame({"image_id": samples["image_id"], "binning": "equal_width",
                                  "field": name, "bin": index}))
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["image_id", "binning", "field", "bin"])
    return report_inputs.member_lists(table, samples, Path("bin_members.csv"))


def neighbours_of(samples: pd.DataFrame, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """analyze's neighbours.csv (nearest by distance on the map here), read as report does."""
    xy = samples[["x", "y"]].to_numpy()
    ids = samples["image_id"].to_numpy()
    rows = []
    for i in range(len(samples)):
        d = np.hypot(*(xy - xy[i]).T)
        order = [j for j in np.argsort(d, kind="stable") if j != i][:k]
        rows += [(ids[i], rank, ids[j], d[j]) for rank, j in enumerate(order, start=1)]
    table = pd.DataFrame(rows, columns=["image_id", "rank", "neighbour_image_id",
                                        "cosine_distance"])
    return report_inputs.neighbour_matrix(table, samples, Path("neighbours.csv"))


def analyze_samples(stems: list[str], names: list[str], rng, **columns) -> pd.DataFrame:
    """analyze's samples.csv: infer's columns, masks metadata, map, cluster, label quality."""
    n = len(stems)
    ious = {f"iou_{c}": rng.uniform(0, 1, n) for c in names}
    frame = pd.DataFrame({
        "image_id": np.arange(n) + 1, "stem": stems, "loss": rng.uniform(0.2, 1.5, n),
        "pixel_accuracy": rng.uniform(0.5, 1, n), "confidence": rng.uniform(0.4, 1, n),
        "miou": np.mean(list(ious.values()), axis=0), **ious,
        "latency_ms": rng.uniform(5, 10, n), "file_name": [f"{s}.jpg" for s in stems],
        "split": "val", "width": 640, "height": 480, "is_grayscale": np.arange(n) % 3 == 0,
        "brightness": rng.uniform(0, 255, n), "n_annotations": rng.integers(0, 9, n),
        "background_fraction": rng.uniform(0, 1, n),
        "x": rng.normal(size=n), "y": rng.normal(size=n), "cluster": np.arange(n) % 2,
        "label_quality": rng.uniform(0, 1, n), "ood_score": rng.uniform(0, 0.5, n)})
    frame["label_quality_rank"] = frame["label_quality"].rank(method="first").astype(int)
    for name, values in columns.items():
        frame[name] = values
    return frame


CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"},
              {"id": 8, "name": "truck", "supercategory": "vehicle"},
              {"id": 17, "name": "cat", "supercategory": "animal"}]


def evaluate_categories(names: list[str], claims: dict, rng) -> pd.DataFrame:
    """evaluate's categories.csv, made by its own writer (stages.lib.categories) from counts."""
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    class_of = {ids[cat]: names.index(cls) for cls, claim in claims.items() if cls in names
                for cat in claim.get("categories", []) if cat in ids}
    pixels = rng.integers(1, 500, (len(CATEGORIES), len(names)))
    instances = rng.integers(1, 6, len(CATEGORIES))
    table = category_table(CATEGORIES, names, class_of, pixels, instances,
                           rng.integers(0, 2, len(CATEGORIES)) * instances)
    return table.fillna({"claimed_by": ""})


def synthetic_scheme(name: str, classes: list[str], ious: list[float | None], seed: int = 0,
                     claims: dict | None = None) -> report.Scheme:
    """A scheme as report.load_scheme returns it, from tables with the documented columns of
    docs/outputs.md (evaluate, train, infer, analyze)."""
    rng = np.random.default_rng(seed)
    names = ["background", *classes]
    n = 8
    stems = [f"{i:012d}" for i in range(n)]
    samples = analyze_samples(stems, names, rng)
    bins = metadata_loss_frame(samples, {
        f: [(b / 2, (b + 1) / 2, 4, 0.5 + b * (0.3 if f == "brightness" else 0.1))
            for b in range(2)] for f in ("brightness", "is_grayscale", "width")}, names)
    neighbours, distances = neighbours_of(samples)
    return report.Scheme(
        name=name, class_names=names,
        claims=claims or {c: {"categories": [c]} for c in classes},
        metrics={"miou": 0.4, "pixel_accuracy": 0.8, "pixel_accuracy_with_ignore": 0.7,
                 "mean_class_accuracy": 0.5, "fw_iou": 0.6, "images": n,
                 "iou": dict(zip(names, ious)),
                 "seeds": seeds_block([{"miou": 0.4, "pixel_accuracy": 0.8,
                                        "pixel_accuracy_with_ignore": 0.7,
                                        "iou": dict(zip(names, ious))}])},
        confusion=rng.integers(0, 1000, (len(names), len(names))),
        confusion_png=FIGURE, curves_png=FIGURE,
        categories=evaluate_categories(names, claims or {c: {"categories": [c]} for c in classes},
                                       rng),
        timing={"images": n, "device": "cpu", "batch_size": 4, "wall_s": 1.0,
                "throughput_img_s": 8.0,
                "latency_ms": {"total": 800.0, "mean": 100.0, "variance": 4.0, "median": 99.0}},
        train=dict(TRAIN_JSON),
        samples=samples,
        clusters=pd.DataFrame({"cluster": [0, 1], "size": [4, 4], "mean_loss": [0.5, 0.7],
                               "mean_pixel_accuracy": [0.8, 0.7], "grayscale_share": [0.5, 0.0],
                               **{f"mean_iou_{c}": [0.1, 0.2] for c in names},
                               "dominant_categories": ["bus 60% (3.1x)", np.nan],
                               "medoid_image_id": [1, 2],
                               "representative_image_ids": ["1 3", "2"],
                               "train_images": [30, 10], "train_share": [0.75, 0.25],
                               "val_share": [0.5, 0.5]}),
        metadata_loss=bins, neighbours=neighbours, distances=distances,
        bin_members=members_of(samples, bins),
        label_issues=pd.DataFrame({
            "rank": np.arange(1, n + 1), "image_id": samples["image_id"], "stem": stems,
            "label_quality": np.sort(samples["label_quality"]), "loss": samples["loss"],
            "flagged": False, "disagreement_pixels": np.nan, "disagreement_fraction": np.nan,
            "main_disagreement": np.nan, "figure": np.nan, "region": np.nan}),
        heatmaps=pd.DataFrame(columns=["file", "kind", "cluster", "image_id", "stem", "class",
                                       "layer", "channels", "target", "peak", "reason"]))


def seeds_block(per_seed: list[dict], seeds: list[int] | None = None) -> dict:
    """evaluate's "seeds" block (docs/outputs.md) from each seed's scores, spread by hand."""
    def summary(values):
        defined = [v for v in values if v is not None]
        return {"per_seed": values, "mean": sum(defined) / len(defined) if defined else None,
                "min": min(defined, default=None), "max": max(defined, default=None),
                "interval": [None, None]}
    block = {"seeds": seeds or list(range(len(per_seed)))}
    for key in ("miou", "pixel_accuracy", "pixel_accuracy_with_ignore"):
        block[key] = summary([p[key] for p in per_seed])
    block["iou"] = {c: summary([p["iou"][c] for p in per_seed]) for c in per_seed[0]["iou"]}
    return block


def test_comparison_rows_union_classes_and_delta_only_for_two_schemes():
    a = synthetic_scheme("person_car", ["person", "car"], [0.9, 0.309, 0.262])
    b = synthetic_scheme("person_vehicle", ["person", "vehicle"], [0.91, 0.319, None])
    table = report.comparison_table([a, b])
    assert [r["label"] for r in table["classes"]] == ["background", "person", "car", "vehicle"]
    person = table["classes"][1]
    assert person["delta"] == pytest.approx(0.010)
    assert person["best"] == 1 and person["direction"] == "pos"
    car, vehicle = table["classes"][2], table["classes"][3]
    assert car["pair"] is None and car["cells"][1]["member"] is False
    assert vehicle["cells"][1] == {"member": True, "value": None} and vehicle["delta"] is None
    assert [r["label"] for r in table["summary"]][:3] == [
        "mIoU", "pixel accuracy (ignore excluded)", "pixel accuracy (ignore counted as error)"]
    c = synthetic_scheme("third", ["person"], [0.8, 0.5])
    three = report.comparison_table([a, b, c])
    assert three["classes"][1]["delta"] is None  # person is in all three: no single delta
    assert three["classes"][2]["delta"] is None  # car only in one


def pair_summary(classes: dict, categories: dict | None = None) -> dict:
    """compare's summary.json (docs/outputs.md) for one pair, with what the report reads."""
    return {"bootstrap": {"samples": 1000, "confidence": 0.95, "seed": 0, "method": "m"},
            "pairs": [{"a": "person_car", "b": "person_vehicle", "classes": classes,
                       "categories": categories or {}}]}


def test_verdicts_say_higher_only_when_the_interval_excludes_zero():
    entry = {"iou_a": 0.309, "iou_b": 0.319, "delta_iou": 0.010, "same_definition": True}
    higher = report.verdicts(pair_summary({"person": {**entry, "interval": [0.004, 0.016],
                                                      "verdict": "higher"}}))
    assert higher == ["person: person_vehicle is higher than person_car by 0.010 IoU (0.319 vs "
                      "0.309; 95% interval of the difference +0.004 to +0.016)."]
    lower = report.verdicts(pair_summary({"person": {
        **entry, "iou_b": 0.299, "delta_iou": -0.010, "interval": [-0.016, -0.004],
        "verdict": "lower"}}))
    assert lower == ["person: person_vehicle is lower than person_car by 0.010 IoU (0.299 vs "
                     "0.309; 95% interval of the difference -0.016 to -0.004)."]
    none = report.verdicts(pair_summary({"person": {**entry, "interval": [-0.002, 0.022],
                                                    "verdict": "no detectable difference",
                                                    "same_definition": False}}))
    assert none == ["person: no detectable difference between person_vehicle and person_car "
                    "(0.319 vs 0.309; the 95% interval of the difference, -0.002 to +0.022, "
                    "includes 0); the schemes define this class differently, so this is not "
                    "like for like."]
    undefined = report.verdicts(pair_summary({"car": {**entry, "iou_b": None, "delta_iou": None,
                                                      "interval": [None, None],
                                                      "verdict": "no detectable difference"}}))
    assert undefined == ["car: no comparison, the IoU is undefined in person_vehicle."]
    # both IoUs defined but no interval (either bound missing): the values, and no verdict
    for interval in ([None, None], [None, 0.016], [0.004, None]):
        assert report.verdicts(pair_summary({"person": {
            **entry, "interval": interval, "verdict": "no detectable difference"}})) == [
            "person: person_vehicle 0.319, person_car 0.309; no interval (the IoU is undefined "
            "in most resamples of the val images), so no verdict."], interval
    # without compare's intervals nothing is claimed
    assert report.verdicts(None) == [] and report.verdicts({"pairs": []}) == []


def test_verdicts_over_seeds_quote_each_seed_and_say_why_none_is_called():
    entry = {"iou_a": 0.30, "iou_b": 0.33, "delta_iou": 0.03, "same_definition": True,
             "interval": [0.01, 0.05], "per_seed": [0.02, 0.04], "images": 40, "reason": None,
             "verdict": "higher"}
    assert report.verdicts(pair_summary({"person": entry})) == [
        "person: person_vehicle is higher than person_car by 0.030 IoU (0.330 vs 0.300, means "
        "over 2 seeds; the difference per seed +0.020 and +0.040; 95% interval of the "
        "difference +0.010 to +0.050)."]
    disagree = {**entry, "per_seed": [0.08, -0.02], "verdict": "no detectable difference",
                "reason": "the seeds disagree on its sign"}
    assert report.verdicts(pair_summary({"person": disagree})) == [
        "person: no detectable difference between person_vehicle and person_car (0.330 vs "
        "0.300, means over 2 seeds; the difference per seed +0.080 and -0.020; the 95% "
        "interval of the difference, +0.010 to +0.050, excludes 0, but the seeds disagree on "
        "its sign)."]
    few = {**entry, "per_seed": [0.03], "images": 2, "verdict": "no detectable difference",
           "reason": "fewer than compare.min_images val images show it"}
    assert report.verdicts(pair_summary({"person": few})) == [
        "person: no detectable difference between person_vehicle and person_car (0.330 vs "
        "0.300; the 95% interval of the difference, +0.010 to +0.050, comes from 2 val images "
        "showing it, too few to call a difference)."]


def test_seed_spread_and_note_with_two_seeds_and_with_one():
    a = synthetic_scheme("person_car", ["person", "car"], [0.9, 0.3, 0.1])
    b = synthetic_scheme("person_vehicle", ["person", "vehicle"], [0.9, 0.2, 0.15])
    assert report_tables.seed_spread([a, b]) == []
    assert report_tables.seed_note(None, [a, b]).startswith(
        "One training run per scheme: training noise was not measured")
    for s, second in ((a, 0.5), (b, 0.1)):
        first = {"miou": 0.4, "pixel_accuracy": 0.8, "pixel_accuracy_with_ignore": 0.7,
                 "iou": s.metrics["iou"]}
        other = {**first, "miou": 0.6, "iou": {**s.metrics["iou"], "person": second}}
        s.metrics["seeds"] = seeds_block([first, other], seeds=[3, 7])
    rows = {r["label"]: r["cells"] for r in report_tables.seed_spread([a, b])}
    assert list(rows) == ["IoU background", "IoU person", "IoU car", "IoU vehicle", "mIoU",
                          "pixel accuracy (ignore excluded)",
                          "pixel accuracy (ignore counted as error)"]
    assert rows["IoU person"] == [
        {"mean": pytest.approx(0.4), "min": 0.3, "max": 0.5, "per_seed": [0.3, 0.5]},
        {"mean": pytest.approx(0.15), "min": 0.1, "max": 0.2, "per_seed": [0.2, 0.1]}]
    assert rows["IoU car"][1] is None and rows["IoU vehicle"][0] is None
    assert rows["mIoU"][0]["min"] == 0.4 and rows["mIoU"][0]["max"] == 0.6
    note = report_tables.seed_note({"seeds": {"seeds": [3, 7]}}, [a, b])
    assert note.startswith("2 training runs per scheme (seeds 3, 7): the verdicts compare the "
                           "mean over seeds")
    assert note.endswith("The other sections show the model of seed 3.")


def test_weak_classes_use_the_top_of_the_interval():
    s = synthetic_scheme("person_car", ["person", "car"], [0.9, 0.3, 0.02])
    assert report.weak_classes(s, 0.10) == ["car"]
    s.metrics["interval"] = {"iou": {"background": [0.8, 0.95], "person": [0.05, 0.09],
                                     "car": [0.0, 0.12]}}
    assert report.weak_classes(s, 0.10) == ["person"]      # car's interval reaches 0.12
    s.metrics["iou"]["car"] = None
    s.metrics["interval"]["iou"]["car"] = [None, None]
    assert report.weak_classes(s, 0.10) == ["person", "car"]   # undefined: not learned
    assert report.weak_warning("car") == ("the model has not learned car; findings about car "
                                          "describe the model's failure, not the data")


def test_study_sentence_and_category_rows_read_the_category_tables():
    a = synthetic_scheme("person_car", ["person", "car"], [0.9, 0.3, 0.2])
    b = synthetic_scheme("person_vehicle", ["person", "vehicle"], [0.9, 0.3, 0.2],
                         claims={"person": {"categories": ["person"]},
                                 "vehicle": {"categories": ["car", "truck"]}})
    for s, shares in ((a, {"car": 0.40, "truck": 0.09}), (b, {"car": 0.61, "truck": 0.44})):
        cls = s.class_names[2]
        for category, share in shares.items():
            s.categories.loc[s.categories["category"] == category, f"pred_{cls}"] = share
    assert report.study_sentence([a, b]) == (
        "Under person_car, 40% of car pixels and 9% of truck pixels are predicted car; under "
        "person_vehicle, 61% of car pixels and 44% of truck pixels are predicted vehicle.")
    summary = pair_summary({}, {"truck": {"share_a": 0.1, "share_b": 0.44, "delta_share": 0.34,
                                          "interval": [0.2, 0.5], "verdict": "higher",
                                          "claimed_by_a": "", "claimed_by_b": "vehicle"}})
    rows = report.category_rows([a, b], summary)
    # person first, then the vehicle supercategory, then the rest
    assert [r["category"] for r in rows][:1] == ["person"]
    assert [r["category"] for r in rows][-1] == "cat"
    truck = next(r for r in rows if r["category"] == "truck")
    assert [c["claimed_by"] for c in truck["cells"]] == ["", "vehicle"]
    assert truck["difference"] == {"delta": 0.34, "verdict": "higher", "interval": [0.2, 0.5]}
    assert next(r for r in rows if r["category"] == "cat")["difference"] is None


def test_comparison_row_by_hand_at_the_same_threshold():
    """SAME = 5e-4 (two IoUs that print alike at 3 decimals): a difference of exactly SAME
    counts (direction and best set), one of 2**-11 (< SAME) does not; a non-member's value
    is dropped; NaN/inf are no value; with three members there is no delta but a best."""
    row = report_tables.comparison_row("x", [(True, 0.0), (False, 0.9), (True, 5e-4)])
    assert row == {"label": "x", "cells": [{"member": True, "value": 0.0},
                                           {"member": False, "value": None},
                                           {"member": True, "value": 5e-4}],
                   "pair": (0, 2), "delta": 5e-4, "direction": "pos", "best": 2}
    down = report_tables.comparison_row("y", [(True, 0.75), (True, 0.5)])
    assert (down["pair"], down["delta"], down["direction"], down["best"]) == ((0, 1), -0.25,
                                                                              "neg", 0)
    alike = report_tables.comparison_row("z", [(True, 0.25), (True, 0.25 + 2 ** -11)])
    assert (alike["delta"], alike["direction"], alike["best"]) == (2 ** -11, "", None)
    nan = report_tables.comparison_row("n", [(True, float("nan")), (True, 0.5)])
    assert [c["value"] for c in nan["cells"]] == [None, 0.5]
    assert (nan["pair"], nan["delta"], nan["direction"], nan["best"]) == ((0, 1), None, "", None)
    inf = report_tables.comparison_row("i", [(True, 0.5), (True, float("inf"))])
    assert [c["value"] for c in inf["cells"]] == [0.5, None] and inf["delta"] is None
    three = report_tables.comparison_row("t", [(True, 0.25), (True, 0.75), (True, 0.5)])
    assert (three["pair"], three["delta"], three["direction"], three["best"]) == (
        None, None, "", 1)
    tie = report_tables.comparison_row("u", [(True, 0.75), (True, 0.75), (True, 0.25)])
    assert tie["best"] is None


def test_comparison_table_summary_rows_read_each_metric():
    a = synthetic_scheme("person_car", ["person", "car"], [0.9, 0.25, 0.5])
    b = synthetic_scheme("person_vehicle", ["person", "vehicle"], [0.875, 0.25, 0.125])
    b.metrics.update(miou=0.5, pixel_accuracy=0.75, pixel_accuracy_with_ignore=0.625,
                     mean_class_accuracy=0.375, fw_iou=0.25)
    table = report.comparison_table([a, b])
    assert [r["label"] for r in table["summary"]] == [
        "mIoU", "pixel accuracy (ignore excluded)", "pixel accuracy (ignore counted as error)",
        "mean class accuracy", "frequency-weighted IoU"]
    assert [[c["value"] for c in r["cells"]] for r in table["summary"]] == [
        [0.4, 0.5], [0.8, 0.75], [0.7, 0.625], [0.5, 0.375], [0.6, 0.25]]
    assert all(c["member"] for r in table["summary"] for c in r["cells"])
    assert [[(c["member"], c["value"]) for c in r["cells"]] for r in table["classes"]] == [
        [(True, 0.9), (True, 0.875)], [(True, 0.25), (True, 0.25)],
        [(True, 0.5), (False, None)], [(False, None), (True, 0.125)]]


def test_verdicts_of_every_pair_in_order_at_the_summarys_confidence():
    entry = {"iou_a": 0.5, "iou_b": 0.75, "delta_iou": 0.25, "interval": [0.125, 0.375],
             "verdict": "higher", "same_definition": True}
    summary = {"bootstrap": {"confidence": 0.9},
               "pairs": [{"a": "a", "b": "b", "classes": {"person": entry, "car": entry}},
                         {"a": "a", "b": "c", "classes": {"person": {
                             **entry, "iou_b": 0.5, "delta_iou": 0.0, "interval": [0.0, 0.0],
                             "verdict": "no detectable difference"}}}]}
    assert report.verdicts(summary) == [
        "person: b is higher than a by 0.250 IoU (0.750 vs 0.500; 90% interval of the "
        "difference +0.125 to +0.375).",
        "car: b is higher than a by 0.250 IoU (0.750 vs 0.500; 90% interval of the "
        "difference +0.125 to +0.375).",
        "person: no detectable difference between c and a (0.500 vs 0.500; the 90% interval "
        "of the difference, +0.000 to +0.000, includes 0)."]
    # no bootstrap settings: no interval to quote, so no verdict
    assert report.verdicts({"pairs": summary["pairs"]}) == []


def test_examples_are_deterministic_shared_and_explained():
    a = synthetic_scheme("a", ["person"], [0.9, 0.3], seed=1)
    b = synthetic_scheme("b", ["person"], [0.9, 0.3], seed=2)
    candidates = report.example_candidates([a, b])
    chosen = report.choose_examples(candidates, 4, compare=True)
    assert chosen == report.choose_examples(candidates.sample(frac=1, random_state=3), 4, True)
    assert len(chosen) == len({stem for stem, _ in chosen}) == 4
    assert chosen[0] == (candidates.loc[candidates["spread"].idxmax(), "stem"],
                         "largest loss gap between schemes")
    assert candidates.loc[candidates["foreground"].idxmax(), "stem"] in dict(chosen)
    assert "most labelled foreground" in dict(chosen).values()
    assert report.choose_examples(candidates, 0, True) == []
    assert len(report.choose_examples(candidates, 50, True)) == len(candidates)
    only = report.choose_examples(candidates, 3, compare=False)
    assert {reason for _, reason in only} == {"most labelled foreground"}


def test_informative_fields_prefer_class_fractions_grayscale_brightness():
    a = synthetic_scheme("a", ["person"], [0.9, 0.3])
    assert report.informative_fields([a]) == ["brightness", "is_grayscale", "width"]
    assert report.informative_fields([a], k=1) == ["brightness"]


def test_numbers_format_with_fixed_precision_and_never_minus_zero():
    assert report.format_number(0.30912) == "0.309"
    assert report.format_number(None) == report.format_number(float("nan")) == "—"
    assert report.format_signed(-0.0001) == "0.000"
    assert report.format_signed(0.0104) == "+0.010"
    assert report.format_signed(-0.02) == "-0.020"


# analyze's params as committed (the flag rule and binning the page describes), PCA maps
ANALYZE = {**yaml.safe_load((ROOT / "params.yaml").read_text())["analyze"], "projection": "pca"}
COMPARE = yaml.safe_load((ROOT / "params.yaml").read_text())["compare"]
STUDY_RECIPE = {"loss": "ce", "class_weights": "inverse_sqrt", "sampler": "uniform",
                "schedule": "constant",
                "augment": {"crop_scale": [1, 1], "rare_crop": 0,
                            "colour_jitter": {"brightness": 0, "contrast": 0}}}
TRAINING = {"model": {"encoder_weights": "imagenet"},
            "train": {"epochs": 20, "image_size": 128, **STUDY_RECIPE}}


def test_caveats_say_when_numbers_cannot_be_compared_with_the_study():
    scratch = {"model": {"encoder_weights": "none"},
               "train": {"epochs": 3, "image_size": 64, **STUDY_RECIPE}}
    notes = " ".join(report.training_caveats(scratch, 80))
    assert "from scratch" in notes and "80 training images for 3 epochs at 64 px" in notes
    assert "not comparable with the study" in notes
    assert report.training_caveats(TRAINING, 82783) == []
    assert "20 epochs" in " ".join(report.training_caveats(TRAINING, 800))


def test_caveats_name_the_small_data_recipe_and_how_it_differs_from_the_studys():
    train = {**TRAINING["train"], "loss": "weighted_ce", "sampler": "class_balanced",
             "schedule": "warmup_cosine",
             "augment": {"crop_scale": [0.3, 1.0], "rare_crop": 0,
                         "colour_jitter": {"brightness": 0.3}}}
    [recipe, *_] = report.training_caveats({**TRAINING, "train": train}, 82783)
    assert recipe == ("Trained with the small-data recipe (loss weighted_ce with inverse_sqrt "
                      "class weights, class-balanced sampling of the training images, random "
                      "resized crops of 0.3–1 of the image area, colour jitter, warmup cosine "
                      "learning-rate schedule); the study trained with plain cross-entropy, no "
                      "augmentation and a constant learning rate (README, \"Reproducing the "
                      "study on one GPU\").")


def test_caveats_name_the_share_of_crops_centred_on_the_rarest_class():
    train = {**TRAINING["train"], "augment": {"crop_scale": [0.3, 1.0], "rare_crop": 0.5,
                                              "colour_jitter": {"brightness": 0}}}
    assert report_tables.recipe_changes(train) == [
        "random resized crops of 0.3–1 of the image area",
        "50% of them centred on the image's rarest class"]


def test_render_escapes_scheme_and_class_names():
    evil = synthetic_scheme(EVIL, [EVIL], [0.5, 0.25])
    plain = synthetic_scheme("plain", ["person"], [0.5, 0.2])
    params = {"report": {"title": EVIL, "thumbnail_px": 64, "min_class_iou": 0.1,
                         "insight_thumbnails": 2, "insights_shown": 8,
                         "duplicate_pairs": 4},
              "analyze": ANALYZE, "compare": COMPARE,
              **TRAINING}
    provenance = {"git": {"commit": None, "dirty": None}, "date": "d", "versions": [("x", "1")],
                  "params_yaml": EVIL, "data": {"base_url": EVIL, "year": 2017, "seed": 0,
                                                "manifest_sha256": "0" * 64,
                                                "images": {"val": 8}},
                  "models": [{"scheme": EVIL, "device": "cpu", "device_train": EVIL,
                              **{k: TRAIN_JSON[k] for k in ("precision", "epochs", "wall_s",
                                                            "torch_version", "model_sha256",
                                                            "encoder_pretraining")}}]}
    html = report.render(report.build_context(params, [evil, plain], provenance, []))
    assert EVIL not in html and "<script>alert" not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 8
    page = Page.parse(html)
    # Exactly the page's own two scripts: the JSON blob and the inlined code.
    assert [a for a, _ in page.scripts] == [{"type": "application/json", "id": "segflow-data"}, {}]
    table = page.tables["comparison-table"]
    assert table[0][:3] == ["class / score", EVIL, "plain"]
    assert EVIL in rows_by_label(table)
    data = page.data()
    assert data["schemes"][0] == EVIL and data["per_scheme"][0]["classes"][1] == EVIL


SYNTHETIC_PROVENANCE = {"git": {"commit": "abc1234", "dirty": False}, "date": "d",
                        "versions": [], "params_yaml": "",
                        "data": {"base_url": "x", "year": 2017, "seed": 0,
                                 "manifest_sha256": "0" * 64, "images": {}},
                        "models": []}


def synthetic_page(schemes: list[report.Scheme]) -> Page:
    params = {"report": {"title": "t", "thumbnail_px": 64, "min_class_iou": 0.1,
                         "insight_thumbnails": 2, "insights_shown": 8,
                         "duplicate_pairs": 4},
              "analyze": ANALYZE, "compare": COMPARE, **TRAINING}
    return Page.parse(report.render(report.build_context(params, schemes,
                                                         SYNTHETIC_PROVENANCE, [])))


def test_one_scheme_has_no_delta_column_and_three_schemes_label_it():
    one = synthetic_page([synthetic_scheme("solo", ["person"], [0.5, 0.2])])
    assert one.tables["comparison-table"][0] == ["class / score", "solo"]
    assert "Δ" not in one.all_text()
    three = synthetic_page([synthetic_scheme(n, [c], [0.5, 0.2], seed=i) for i, (n, c) in
                            enumerate([("a", "person"), ("b", "person"), ("c", "car")])])
    rows = rows_by_label(three.tables["comparison-table"])
    assert three.tables["comparison-table"][0][-1] == "Δ (the two schemes with the class)"
    assert rows["person"] == ["0.200", "0.200", "not a class", "0.000"]
    assert rows["mIoU"][-1] == ""  # all three have it: no single difference


def test_render_refuses_a_missing_value():
    with pytest.raises(jinja2.exceptions.UndefinedError, match=r"^'script_hash' is undefined$"):
        report.render({"title": "t"})


# ---------------------------------------------------------------- the stage, real data

def test_comparison_table_has_a_row_per_class_with_the_metrics_values(rendered):
    params, root = rendered["params"], rendered["root"]
    schemes = list(params["schemes"])
    metrics = {s: json.loads((root / "metrics" / f"{s}.json").read_text()) for s in schemes}
    table = rendered["page"].tables["comparison-table"]
    assert table[0] == ["class / score", *schemes, f"Δ {schemes[1]} − {schemes[0]}"]
    rows = rows_by_label(table)
    classes = ["background", "person", "car", "vehicle"]
    assert [label for label in rows if label in classes] == classes
    # the page's formats, written out here: three decimals, a dash for undefined, a sign on
    # differences
    three = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for name in classes:
        for i, s in enumerate(schemes):
            expected = (three(metrics[s]["iou"][name])
                        if name in metrics[s]["iou"] else "not a class")
            assert rows[name][i] == expected, (name, s)
    person = [metrics[s]["iou"]["person"] for s in schemes]
    assert None not in person
    delta = round(person[1] - person[0], 3)
    assert rows["person"][2] == ("0.000" if delta == 0 else f"{delta:+.3f}")
    assert rows["car"][2] == rows["vehicle"][2] == ""
    labels = {"miou": "mIoU", "pixel_accuracy": "pixel accuracy (ignore excluded)",
              "pixel_accuracy_with_ignore": "pixel accuracy (ignore counted as error)",
              "mean_class_accuracy": "mean class accuracy", "fw_iou": "frequency-weighted IoU"}
    for key, label in labels.items():
        assert rows[label][:2] == [three(metrics[s][key]) for s in schemes]


def test_escapes_the_title_everywhere(rendered):
    html = rendered["html"]
    assert EVIL not in html and html.lower().count("<script") == 2  # the page's own two
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert rendered["page"].all_text().startswith(TITLE)
    assert f"<title>{TITLE}" not in html


DATA_URI = r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+"


def test_page_is_self_contained(rendered):
    page = rendered["page"]
    tags = page.tags
    images = [attrs for tag, attrs in tags if tag == "img" and "src" in attrs]
    examples = rendered["params"]["report"]["n_examples"]
    n_schemes = len(rendered["params"]["schemes"])
    # confusion x2, curves, example image + GT + prediction, label issues, heat-maps
    assert len(images) >= 2 * n_schemes + 1 + examples * (1 + 2 * n_schemes)
    assert all(re.fullmatch(DATA_URI, a["src"]) for a in images)
    # cluster representatives take their thumbnail from the JSON blob (no second copy)
    assert [a for tag, a in tags if tag == "img" and "src" not in a
            and "js-thumb" not in a.get("class", "")] == []
    assert all(re.fullmatch(DATA_URI, t) for t in page.data()["thumbs"])
    links = [v for _, attrs in tags for k, v in attrs.items() if k in ("src", "href", "srcset")]
    assert all(v.startswith(("data:", "#")) for v in links), links
    assert not [tag for tag, _ in tags if tag in ("link", "iframe", "object", "embed")]
    assert [a for a, _ in page.scripts] == [{"type": "application/json", "id": "segflow-data"}, {}]
    # no CSS or SVG reference outside the page (url(#id) points inside it)
    assert not re.search(r"url\((?!#)", rendered["html"]) and "@import" not in rendered["html"]
    code = page.scripts[1][1].replace("http://www.w3.org/2000/svg", "")  # SVG's namespace
    assert not re.search(r"https?://|fetch\(|XMLHttpRequest|import\(", code)  # fetches nothing


def test_sections_toc_timing_and_examples(rendered):
    page, params, root = rendered["page"], rendered["params"], rendered["root"]
    headings = [t for t in re.findall(r"<h2>(.*?)</h2>", rendered["html"])]
    assert headings == ["1. Insights", "2. Scheme comparison", "3. Timing", "4. Population map",
                        "5. Clusters", "6. Metadata vs loss", "7. Label issues", "8. Samples",
                        "9. Examples", "10. Provenance"]
    ids = {attrs["id"] for _, attrs in page.tags if "id" in attrs}
    anchors = [attrs["href"][1:] for tag, attrs in page.tags
               if tag == "a" and attrs.get("href", "").startswith("#")]
    assert len(anchors) >= 10 and set(anchors) <= ids
    # the contents list every section in the page's order, Insights first with its parts
    toc = re.findall(r'href="#([^"]+)"', re.search(r'<nav class="toc".*?</nav>',
                                                   rendered["html"], re.S).group(0))
    sections = re.findall(r'<section id="([^"]+)">', rendered["html"])
    assert [a for a in toc if a in sections] == sections
    assert toc[:4] == ["insights", "insights-0", "insights-1", "insight-changes"]
    timing = rows_by_label(page.tables["timing-table"])
    for s in params["schemes"]:
        t = json.loads((root / "predictions" / s / "seed0" / "timing.json").read_text())
        assert timing[s][:3] == [str(t["images"]), t["device"], str(t["batch_size"])]
        assert timing[s][4] == f"{t['latency_ms']['mean']:.1f}"
        assert timing[s][6] == f"{t['latency_ms']['median']:.1f}"
    examples = page.tables["examples-table"][1:]
    assert len(examples) == params["report"]["n_examples"]
    assert all("loss" in cell for row in examples for cell in row[1:])


def test_label_issues_and_scheme_differences(rendered):
    page, params, root = rendered["page"], rendered["params"], rendered["root"]
    text = page.all_text()
    for s in params["schemes"]:
        issues = pd.read_csv(root / "analysis" / s / "label_issues.csv", dtype={"stem": str})
        worst = issues.iloc[0]
        assert f"{s} #1 {worst['stem']}: score {worst['label_quality']:.3f}" in text
    summary = json.loads((root / "compare" / "summary.json").read_text())
    [pair] = summary["pairs"]
    assert f"{pair['b']} vs {pair['a']} on {pair['images']} shared images" in text
    assert f"adjusted Rand index {pair['cluster_agreement_ari']:.3f}" in text


def _visible(html: str) -> str:
    return " ".join(unescape(re.sub(r"<[^>]+>", "", html)).split())


def _z(value: float) -> str:
    return "—" if pd.isna(value) else f"{value:.1f}"


def _change_line(r, kind: str) -> str:
    """compare's row as the page words it, written out here."""
    where = (f"cluster {r.cluster} of {r.clusters_of}" if kind == "cluster" else
             f"{r.field} {r.low:.3g}–{r.high:.3g} ({r.binning}, bins of {r.bins_of})")
    return (f"{where}: {r.images} images, mean loss {r.mean_loss_a:.3f} → {r.mean_loss_b:.3f} "
            f"(z {_z(r.z)}{', significant' if r.significant else ''})")


def _card_lines(changes: pd.DataFrame) -> list[tuple[str, int, str]]:
    """(scheme, cluster, line) of every row of compare's clusters.csv, as the card of that
    scheme's cluster words it: its own mean loss first, and z from its side (compare's z is
    of b - a, so it changes sign for the second scheme's cards)."""
    lines = []
    for r in changes.itertuples():
        mine = r.clusters_of
        other, here, there, z = ((r.b, r.mean_loss_a, r.mean_loss_b, r.z) if mine == r.a
                                 else (r.a, r.mean_loss_b, r.mean_loss_a, -r.z))
        lines.append((mine, r.cluster, f"Under {other}: mean loss {here:.3f} → {there:.3f} on "
                      f"{r.images} images (z {_z(z)}{', significant' if r.significant else ''})."))
    return lines


def _assert_differences_list(html: str, changes: pd.DataFrame, bucket_rows: pd.DataFrame):
    """The scheme differences show compare's first three cluster and bucket rows (its
    ranking: biggest change first), worded as written out here."""
    differences = _visible(html.split('id="differences"')[1].split('id="confusion"')[0])
    lines = [_change_line(r, "cluster") for r in changes.head(3).itertuples()]
    lines += [_change_line(r, "bucket") for r in bucket_rows.head(3).itertuples()]
    assert len(lines) == 6
    for line in lines:
        assert line in differences, (line, differences)


def _cards(html: str) -> dict[tuple[str, int], str]:
    return {(m.group(1), int(m.group(2))): _visible(m.group(3)) for m in re.finditer(
        r'<article class="ccard[^"]*" data-scheme="([^"]+)" data-cluster="(-?\d+)">(.*?)'
        r"</article>", html, re.S)}


def test_cluster_cards_and_differences_agree_with_compares_own_functions():
    """Planted defect 5 (issue 18): compare's real cluster_changes, bucket_changes and
    summary on two schemes whose losses differ (b = a + 0.3, so mean losses and z tell the
    sides apart); each card's line and the differences' lines are written out here from
    compare's rows. Without the cards' a/b swap, with z's sign flipped, or without the
    cluster lines in the differences, this fails."""
    from stages import compare
    a = synthetic_scheme("a", ["person"], [0.5, 0.2], seed=1)
    b = synthetic_scheme("b", ["person"], [0.5, 0.3], seed=2)
    rng = np.random.default_rng(5)
    b.samples["loss"] = a.samples["loss"] + 0.3 + rng.normal(0, 0.05, len(a.samples))
    b.samples["cluster"] = [0, 0, 0, 1, 1, 1, 1, 0]
    samples = {"a": a.samples, "b": b.samples}
    joined = compare.joined_samples(samples, {"a": set(), "b": set()},
                                    {"a": a.class_names, "b": b.class_names})
    changes = compare.cluster_changes(joined, ["a", "b"], 2.0, 2)
    bins = {"a": a.metadata_loss, "b": b.metadata_loss}
    bucket_rows = compare.bucket_changes(joined, samples, bins, ["a", "b"], 2.0, 2)
    summary = compare.summary(joined, changes, bucket_rows, compare.issue_changes(joined,
                                                                                  ["a", "b"]),
                              ["a", "b"], 2.0, 2)
    cards = {s.name: report.cluster_cards(s, changes, {}) for s in (a, b)}
    params = {"report": {"title": "t", "thumbnail_px": 64, "min_class_iou": 0.1,
                         "insight_thumbnails": 2, "insights_shown": 8,
                         "duplicate_pairs": 4},
              "analyze": ANALYZE, "compare": COMPARE, **TRAINING}
    html = report.render(report.build_context(params, [a, b], SYNTHETIC_PROVENANCE, [],
                                              summary=summary, cards=cards))
    shown = _cards(html)
    lines = _card_lines(changes)
    assert len(lines) == 4 and {m for m, _, _ in lines} == {"a", "b"}
    for mine, cluster, line in lines:
        assert line in shown[(mine, cluster)], (line, shown[(mine, cluster)])
    _assert_differences_list(html, changes, bucket_rows)


def test_cluster_cards_and_scheme_differences_follow_compares_tables(rendered):
    """On the real pipeline's outputs: every row of compare's clusters.csv is on its card,
    from the card's scheme's side, and the differences list the first three cluster and
    bucket rows (compare ranks them biggest change first). Expected lines are built from
    compare's CSVs."""
    root, html = rendered["root"], rendered["html"]
    changes = pd.read_csv(root / "compare" / "clusters.csv")
    assert len(changes)
    cards = _cards(html)
    for mine, cluster, line in _card_lines(changes):
        assert line in cards[(mine, cluster)], (line, cards[(mine, cluster)])
    _assert_differences_list(html, changes, pd.read_csv(root / "compare" / "buckets.csv"))


def test_provenance_lists_commit_params_versions_and_data(rendered):
    text = rendered["page"].all_text()
    assert "git commit" in text and "generated" in text
    versions = rows_by_label(rendered["page"].tables["versions-table"])
    assert versions["torch"] == [importlib.metadata.version("torch")]
    assert re.fullmatch(r"\d+\.\d+\.\d+", versions["python"][0])
    assert f"{SAMPLE}, COCO 2017" in text
    assert "images: train 8, val 6" in text
    assert "Each model saw 8 training images" in text and "from scratch" in text
    yaml_block = re.search(r"<pre>(.*?)</pre>", rendered["html"], re.S).group(1)
    assert "n_examples: 2" in yaml_block and "&lt;script&gt;" in yaml_block
    # the params against params.yaml at HEAD: what small_params and the fixture changed
    committed = yaml.safe_load(subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT,
                                              capture_output=True, text=True).stdout)
    diff = rows_by_label(rendered["page"].tables["params-diff-table"])
    # Written out by hand: what small_params and this fixture change (values as JSON, a
    # dash for null).
    c = committed
    assert diff.pop("key")[1] == "used"
    assert diff == {
        "data.max_images.train": ["—", "8"], "data.max_images.val": ["—", "6"],
        "data.base_url": [f'"{c["data"]["base_url"]}"', f'"{SAMPLE}"'],
        "train.image_size": [str(c["train"]["image_size"]), "64"],
        "train.epochs": [str(c["train"]["epochs"]), "1"],
        "train.batch_size": [str(c["train"]["batch_size"]), "4"],
        "analyze.clustering.k_max": [str(c["analyze"]["clustering"]["k_max"]), "2"],
        "report.n_examples": [str(c["report"]["n_examples"]), "2"],
        "report.title": [f'"{c["report"]["title"]}"',
                         '"segflow <script>alert(1)</script> & \\"co\\""']}
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered["html"].split(
        'id="params-diff-table"')[1].split("</table>")[0]
    # identities: the manifest's sha256 (it lists every image's) and each model.pt's, both
    # recomputed here from the files
    raw = rendered["args"]["raw"]
    manifest = hashlib.sha256((raw / "manifest.json").read_bytes()).hexdigest()
    assert f"manifest.json sha256 {manifest} (it lists every image's sha256" in text
    for s in rendered["params"]["schemes"]:
        model = hashlib.sha256((rendered["args"]["models"] / s / "seed0" / "model.pt").read_bytes())
        assert (f"model {s} model.pt sha256 {model.hexdigest()}; trained on cpu, inference "
                "on cpu") in text


def test_page_data_matches_the_analysis(rendered):
    """The JSON blob: every sample of every scheme, neighbours as analyze's similars,
    bucket members as analyze's bins, thumbnails for every image (6 < max_thumbnails)."""
    data, params, root = rendered["page"].data(), rendered["params"], rendered["root"]
    stems = data["images"]["stem"]
    assert len(data["thumbs"]) == len(stems) == 6
    for k, s in enumerate(params["schemes"]):
        scheme = data["per_scheme"][k]
        samples = pd.read_csv(root / "analysis" / s / "samples.csv", dtype={"file_name": str})
        assert [stems[i] for i in scheme["img"]] == [Path(f).stem for f in samples["file_name"]]
        assert scheme["loss"] == pytest.approx(samples["loss"].tolist(), rel=1e-3)
        ids = samples["image_id"].tolist()
        similars = pd.read_csv(root / "analysis" / s / "similars.csv")
        assert len(similars)
        width = scheme["k"]
        for query, group in similars.groupby("query_image_id"):
            row = ids.index(query)
            found = [ids[r] for r in scheme["nn"][row * width:(row + 1) * width] if r >= 0]
            assert found == group.sort_values("rank")["image_id"].tolist()
        bins = pd.read_csv(root / "analysis" / s / "metadata_loss.csv")
        bins = bins[bins["binning"] == params["analyze"]["buckets"]["binning"][0]]
        assert data["charted"]
        for field in data["charted"]:
            expected = bins[bins["field"] == field].sort_values("bin")["count"].tolist()
            members = scheme["bucket_of"].get(field)
            if members is None:
                assert expected == []
                continue
            assert [members.count(b) for b in range(len(expected))] == expected, (s, field)


def test_missing_metrics_file_is_one_clear_error(pipeline, tmp_path, caplog):
    metrics = tmp_path / "metrics"
    shutil.copytree(pipeline["root"] / "metrics", metrics)
    (metrics / "person_vehicle.json").unlink()
    out = tmp_path / "out" / "index.html"
    args = stage_args(pipeline["root"], metrics=metrics, out=out)
    with pytest.raises(StageError, match=re.escape(str(metrics / "person_vehicle.json"))):
        report.run(pipeline["params"], **args)
    assert report.main(cli_argv(pipeline["root"] / "params.yaml", args)) == 2
    assert str(metrics / "person_vehicle.json") in caplog.text
    assert not out.exists()


def test_confusion_for_other_classes_is_rejected(pipeline, tmp_path):
    metrics = tmp_path / "metrics"
    shutil.copytree(pipeline["root"] / "metrics", metrics)
    swapped = metrics / "person_car.confusion.csv"
    frame = pd.read_csv(swapped).rename(columns={"car": "truck"})
    frame.to_csv(swapped, index=False)
    with pytest.raises(StageError, match="person_car.confusion.csv"):
        report.run(pipeline["params"], **stage_args(pipeline["root"], metrics=metrics,
                                                     out=tmp_path / "index.html"))


def test_missing_prediction_mask_is_named(pipeline, tmp_path):
    predictions = tmp_path / "predictions"
    for s in pipeline["params"]["schemes"]:
        src = pipeline["root"] / "predictions" / s / "seed0"
        (predictions / s / "seed0" / "val").mkdir(parents=True)
        for name in ("timing.json", "latents.npz"):
            (predictions / s / "seed0" / name).write_bytes((src / name).read_bytes())
    params = copy.deepcopy(pipeline["params"])
    with pytest.raises(StageError,
                       match=r"predictions/person_car/seed0/val/\d{12}\.png: missing"):
        report.run(params, **stage_args(pipeline["root"], predictions=predictions,
                                        out=tmp_path / "index.html"))


@pytest.mark.parametrize("table, column", [("label_issues.csv", "figure"),
                                           ("heatmaps/index.csv", "file")])
def test_a_figure_listed_outside_the_analysis_folder_is_refused(pipeline, tmp_path, table,
                                                               column):
    """analyze's tables name its figures by path; report embeds what they name, so a path
    leading out of the folder (here to an image beside it) must not be read."""
    analysis = tmp_path / "analysis"
    shutil.copytree(pipeline["root"] / "analysis", analysis)
    shutil.copyfile(next((analysis / "person_car" / "label_issues").glob("*.png")),
                    tmp_path / "secret.png")
    listing = analysis / "person_car" / table
    frame = pd.read_csv(listing, dtype=str, keep_default_na=False)
    rows = frame.index[frame["flagged"] == "True"] if column == "figure" else \
        frame.index[frame["kind"] == "shared_features"]
    frame.loc[rows[0], column] = "../../secret.png"
    frame.to_csv(listing, index=False)
    with pytest.raises(StageError, match=re.escape(
            f"{listing}: lists '../../secret.png': {analysis / 'person_car' / '../../secret.png'}"
            f": resolves to {tmp_path / 'secret.png'}, outside {analysis / 'person_car'}; "
            "refused")):
        report.run(pipeline["params"], **stage_args(pipeline["root"], analysis=analysis,
                                                     out=tmp_path / "index.html"))
    assert not (tmp_path / "index.html").exists()


def test_an_unwritable_report_folder_is_refused_before_reading_anything(pipeline, tmp_path,
                                                                        monkeypatch, caplog):
    monkeypatch.setattr(report, "load_scheme",
                        lambda *a, **k: pytest.fail("read its inputs before checking its output"))
    out = blocked_folder(tmp_path).parent / "index.html"      # its folder is a regular file
    argv = cli_argv(pipeline["root"] / "params.yaml", stage_args(pipeline["root"], out=out))
    assert report.main(argv) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"{out.parent}: output folder not writable, index.html cannot be written there "
        "(a file, not a folder)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.skipif(not can_mount_read_only(), reason="needs unshare and mount (root)")
def test_report_into_a_read_only_folder_stops_with_one_line(pipeline, tmp_path):
    read_only = tmp_path / "reports"
    read_only.mkdir()
    argv = [sys.executable, "-m", "stages.report",
            *cli_argv(pipeline["root"] / "params.yaml",
                      stage_args(pipeline["root"], out=read_only / "index.html"))]
    done = subprocess.run(read_only_command(read_only, argv), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].endswith(
        f"report ERROR {read_only}: output folder not writable, index.html cannot be written "
        "there (Read-only file system)"), done.stderr[-2000:]


# ---------------------------------------------------------------- interactive data, provenance

PAYLOAD = "</script><script>alert(1)</script><!--"


def test_json_script_keeps_the_data_and_cannot_close_its_element():
    text = str(report.json_script({"category": PAYLOAD, "n": [1, 0.25, None], "amp": "a & b"}))
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"category": PAYLOAD, "n": [1, 0.25, None], "amp": "a & b"}
    # Jinja's tojson, with the environment's policies: ' escaped too, the data in its order,
    # non-ASCII kept, and NaN refused (JSON has none)
    assert str(report.json_script({"z": "it's", "a": "é"})) == '{"z":"it\\u0027s","a":"é"}'
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        report.json_script({"n": float("nan")})


def test_a_category_that_closes_the_script_stays_data_and_shows_as_text():
    a = synthetic_scheme("a", ["person"], [0.5, 0.2])
    a.clusters["dominant_categories"] = [PAYLOAD, "bus 60% (3.1x)"]
    page = synthetic_page([a])
    html = report.render(report.build_context(
        {"report": {"title": "t", "thumbnail_px": 64, "min_class_iou": 0.1,
                         "insight_thumbnails": 2, "insights_shown": 8,
                         "duplicate_pairs": 4}, "analyze": ANALYZE, "compare": COMPARE,
         **TRAINING}, [a], SYNTHETIC_PROVENANCE, []))
    assert PAYLOAD not in html and "</script><script>" not in html
    assert page.data()["per_scheme"][0]["clusters"][0]["dominant"] == PAYLOAD
    assert PAYLOAD in page.all_text()  # the cluster card, escaped by Jinja
    assert [a for a, _ in page.scripts] == [{"type": "application/json", "id": "segflow-data"}, {}]


def test_page_allows_only_its_own_script_by_hash():
    html = report.render(report.build_context(
        {"report": {"title": "t", "thumbnail_px": 64, "min_class_iou": 0.1,
                         "insight_thumbnails": 2, "insights_shown": 8,
                         "duplicate_pairs": 4}, "analyze": ANALYZE, "compare": COMPARE,
         **TRAINING}, [synthetic_scheme("a", ["person"], [0.5, 0.2])], SYNTHETIC_PROVENANCE, []))
    page = Page.parse(html)
    [csp] = [a["content"] for t, a in page.tags
             if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    code = page.scripts[1][1]
    digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    # Scripts run only by this hash (no 'unsafe-inline'), nothing loads from anywhere.
    assert directives["script-src"] == f"'sha256-{digest}'"
    assert directives["default-src"] == "'none'" and directives["img-src"] == "data:"


def test_params_diff_lists_changed_added_and_removed_keys():
    base = {"train": {"epochs": 15, "lr": 0.001}, "report": {"title": "t"},
            "schemes": {"a": {"classes": {"person": {"categories": ["person"]}}}}}
    used = copy.deepcopy(base)
    used["train"]["epochs"] = 1
    used["report"]["max_thumbnails"] = 5
    del used["report"]["title"]
    used["schemes"]["a"]["classes"]["person"]["categories"] = ["person", "car"]
    rows = {r["key"]: (r["base"], r["used"], r["what"]) for r in report.params_diff(base, used)}
    assert rows == {"train.epochs": ("15", "1", "changed"),
                    "report.max_thumbnails": ("—", "5", "added"),
                    "report.title": ('"t"', "—", "removed"),
                    "schemes.a.classes.person.categories": ('["person"]', '["person", "car"]',
                                                            "changed")}
    assert report.params_diff(base, copy.deepcopy(base)) == []
    assert report.params_diff(None, used) == []


def big_scheme(name: str, n: int, seed: int) -> report.Scheme:
    """A scheme with n synthetic samples (analyze's documented tables), for bounds."""
    rng = np.random.default_rng(seed)
    s = synthetic_scheme(name, ["person", "car"], [0.9, 0.3, 0.2], seed=seed)
    stems = [f"{i:012d}" for i in range(n)]
    s.samples = analyze_samples(
        stems, s.class_names, rng, loss=rng.gamma(2.0, 0.3, n),
        cluster=rng.integers(0, 8, n), is_grayscale=rng.uniform(size=n) < 0.05,
        person_fraction=rng.uniform(0, 1, n), car_fraction=rng.uniform(0, 1, n) ** 4,
        n_annotations=rng.integers(0, 30, n))
    s.metadata_loss = metadata_loss_frame(s.samples, {
        f: [(lo, lo + step, n // 5, 0.6, f == "car_fraction" and b == 4)
            for b, lo in enumerate(lo0 + step * np.arange(5 if f != "is_grayscale" else 2))]
        for f, lo0, step in [("brightness", 0, 51), ("person_fraction", 0, 0.2),
                             ("car_fraction", 0, 0.2), ("is_grayscale", 0, 0.5),
                             ("n_annotations", 0, 6)]}, s.class_names)
    s.bin_members = members_of(s.samples, s.metadata_loss)
    s.neighbours = rng.integers(0, n, (n, 5))
    s.distances = rng.uniform(0, 1, (n, 5))
    return s


def test_thumbnails_are_bounded_first_come_the_shown_samples_and_the_choice_is_stable():
    n, limit = 40_000, 300
    a, b = big_scheme("a", n, 1), big_scheme("b", n, 2)
    first = ["000000000007", "000000012345", "000000000007"]
    chosen = report.thumbnail_stems([a, b], first, limit)
    assert len(chosen) == len(set(chosen)) == limit
    assert chosen[:2] == first[:2]
    worst = a.samples.loc[a.samples["loss"].idxmax(), "stem"]
    assert worst in chosen
    shuffled = big_scheme("a", n, 1)
    shuffled.samples = shuffled.samples.sample(frac=1, random_state=0)
    assert report.thumbnail_stems([shuffled, b], first, limit) == chosen
    assert report.thumbnail_stems([a, b], first, 0) == []
    small = big_scheme("s", 20, 3)
    assert sorted(report.thumbnail_stems([small], [], limit)) == sorted(small.samples["stem"])


def test_explorer_data_for_40k_images_holds_at_most_max_thumbnails():
    n, limit = 40_000, 300
    schemes = [big_scheme("a", n, 1), big_scheme("b", n, 2)]
    schemes[1].samples["brightness"] = schemes[0].samples["brightness"]
    thumbs = {stem: f"data:image/jpeg;base64,{i}"
              for i, stem in enumerate(report.thumbnail_stems(schemes, [], limit))}
    fields = report.explorer_fields(schemes)
    data = report.explorer_data(schemes, thumbs, fields, ["car_fraction"], [])
    assert len(data["thumbs"]) == limit and len(data["images"]["stem"]) == n
    assert sum(t >= 0 for t in data["images"]["thumb"]) == limit
    for column in ("img", "x", "y", "cluster", "loss", "lq", "issue"):
        assert len(data["per_scheme"][0][column]) == n
    assert len(data["per_scheme"][1]["nn"]) == 5 * n
    # identical in both schemes: stored once per image; different: once per scheme
    kinds = {f["key"]: f for f in data["fields"]}
    assert kinds["brightness"]["shared"] and not kinds["person_fraction"]["shared"]
    assert kinds["is_grayscale"]["kind"] == "bool" and kinds["n_annotations"]["kind"] == "int"
    text = str(report.json_script(data))
    assert len(text) < 25_000_000  # about 18 MB: columnar, 4 significant digits


def test_bin_members_and_neighbours_are_looked_up_by_sample_row():
    """analyze's bin_members.csv and neighbours.csv, in any row order, become per-row lists
    the page indexes by sample row; an image the samples do not have is refused."""
    samples = pd.DataFrame({"image_id": [10, 20, 30]})
    members = pd.DataFrame({"image_id": [30, 10, 20, 10], "binning": "equal_width",
                            "field": ["v", "v", "v", "u"], "bin": [1, 0, -1, 2]})
    path = Path("analysis/a/bin_members.csv")
    assert report_inputs.member_lists(members, samples, path) == {"v": [0, -1, 1],
                                                                  "u": [2, -1, -1]}
    with pytest.raises(StageError, match=re.escape(
            f"{path}: image 99 is not in samples.csv beside it; re-run analyze")):
        report_inputs.member_lists(members.assign(image_id=[30, 10, 20, 99]), samples, path)
    table = pd.DataFrame({"image_id": [10, 20, 10], "rank": [2, 1, 1],
                          "neighbour_image_id": [20, 10, 30],
                          "cosine_distance": [0.5, 0.2, 0.1]})
    rows, distances = report_inputs.neighbour_matrix(table, samples, Path("n.csv"))
    assert rows.tolist() == [[2, 1], [0, -1], [-1, -1]]
    np.testing.assert_array_equal(distances, [[0.1, 0.5], [0.2, np.nan], [np.nan, np.nan]])


def write_tsv(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def test_stage_times_come_only_from_snakemake_benchmark_files(tmp_path):
    """Replaces test_stage_times_from_benchmarks_else_log_timestamps: the stage times are
    the benchmark files given (the rule's declared inputs; the last row is the last run),
    none are scraped from logs, and without files (DVC) there are none."""
    bench = tmp_path / "logs" / "benchmark"
    write_tsv(bench / "train" / "a.tsv", BENCH_HEADER
              + "70.0\t0:01:10\t800\t1\t1\t1\t1\t1\t1\t100.0\n"
              + "61.5\t0:01:01\t900.2\t1\t1\t1\t1\t1\t1\t110.0\n")
    write_tsv(bench / "download.tsv", BENCH_HEADER + "2.0\t0:00:02\t80\t1\t1\t1\t1\t1\t1\t1.5\n")
    write_tsv(bench / "masks" / "a.tsv", BENCH_HEADER + "3.25\t0:00:03\t50\t1\t1\t1\t1\t1\t1\t3\n")
    write_tsv(tmp_path / "logs" / "infer" / "a.log",
              "2026-01-01 10:00:00,000 infer INFO start\n2026-01-01 10:00:09,000 infer INFO done\n")
    rows = report.read_stage_times([bench / "train" / "a.tsv", bench / "download.tsv",
                                    bench / "masks" / "a.tsv"])
    assert rows == [
        {"stage": "download", "scheme": "", "wall_s": 2.0, "cpu_s": 1.5, "max_rss_mb": 80.0},
        {"stage": "masks", "scheme": "a", "wall_s": 3.25, "cpu_s": 3.0, "max_rss_mb": 50.0},
        {"stage": "train", "scheme": "a", "wall_s": 61.5, "cpu_s": 110.0, "max_rss_mb": 900.2}]
    assert report.read_stage_times(None) is None
    assert report.read_stage_times([]) == []
    write_tsv(bench / "evaluate" / "a.tsv", BENCH_HEADER)
    with pytest.raises(StageError, match=re.escape(
            f"{bench / 'evaluate' / 'a.tsv'}: no benchmark row; re-run its Snakemake job")):
        report.read_stage_times([bench / "evaluate" / "a.tsv"])
    with pytest.raises(StageError, match=re.escape(f"{bench / 'absent.tsv'}: missing")):
        report.read_stage_times([bench / "absent.tsv"])


def test_the_data_and_models_are_identified_by_sha256(tmp_path):
    """Replaces test_dvc_hashes_are_those_dvc_records: no dvc.lock is read; the data's
    identity is the sha256 of its manifest (which lists every image's sha256), a model's is
    the model_sha256 train wrote in train.json."""
    from stages.report import provenance as report_provenance
    raw = tmp_path / "raw"
    raw.mkdir()
    text = json.dumps({"base_url": "u", "year": 2017, "seed": 3,
                       "splits": {"train": {"images": [1, 2]}, "val": {"images": [3]}}})
    (raw / "manifest.json").write_text(text)
    assert report_provenance.data_source(raw) == {
        "base_url": "u", "year": 2017, "seed": 3,
        "manifest_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "images": {"train": 2, "val": 1}}
    a = synthetic_scheme("a", ["person"], [0.5, 0.2])
    a.train["model_sha256"] = "cd" * 32
    [model] = report_provenance.record({"x": 1}, raw, [a])["models"]
    assert model == {"scheme": "a", "device": "cpu", "device_train": "cpu",
                     "precision": "float32", "epochs": 2, "wall_s": 3.5,
                     "torch_version": "2.0.0", "model_sha256": "cd" * 32,
                     "encoder_pretraining": "ImageNet-1k"}
    (raw / "manifest.json").write_text(json.dumps({"base_url": "u"}))
    with pytest.raises(StageError, match=re.escape(
            f"{raw / 'manifest.json'}: missing keys year, seed, splits")):
        report_provenance.data_source(raw)


def _git_repo(root: Path) -> Path:
    git = ["git", "-c", "user.email=test@segflow", "-c", "user.name=segflow-test"]
    root.mkdir(parents=True)
    (root / "params.yaml").write_text("a: 1\n")
    (root / "metrics").mkdir()
    (root / "metrics" / "s.json").write_text("{}")  # a `cache: false` metric, committed
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], cwd=root, check=True)
    return root


def test_uncommitted_changes_are_the_users_edits_not_the_pipelines_outputs(tmp_path):
    repo = _git_repo(tmp_path / "repo")
    own = [repo / "metrics", repo / "data" / "raw", repo / "reports" / "index.html",
           repo / "logs", repo / "dvc.lock"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                            capture_output=True, check=True).stdout.strip()
    assert report.git_state(repo, own) == {"commit": commit, "dirty": False}
    # What a run writes: untracked output folders and files, a rewritten tracked metric,
    # logs, dvc.lock.
    (repo / "metrics" / "s.json").write_text('{"miou": 0.5}')
    (repo / "metrics" / "train").mkdir()
    (repo / "metrics" / "train" / "x.tsv").write_text("step\n")
    (repo / "data" / "raw").mkdir(parents=True)
    (repo / "data" / "raw" / "manifest.json").write_text("{}")
    (repo / "reports").mkdir()
    (repo / "reports" / "index.html").write_text("<html>")
    (repo / "logs").mkdir()
    (repo / "logs" / "a.log").write_text("x")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    assert report.git_state(repo, own) == {"commit": commit, "dirty": False}
    # ...the same without knowing the pipeline's paths: changes
    assert report.git_state(repo)["dirty"] is True
    # A user's edits: a tracked file changed, a new file beside the outputs.
    (repo / "params.yaml").write_text("a: 2\n")
    assert report.git_state(repo, own)["dirty"] is True
    subprocess.run(["git", "checkout", "-q", "params.yaml"], cwd=repo, check=True)
    assert report.git_state(repo, own)["dirty"] is False
    (repo / "reports" / "notes.txt").write_text("mine")
    assert report.git_state(repo, own)["dirty"] is True
    (repo / "reports" / "notes.txt").unlink()
    # git lists the untracked data/ once: a file of the user's beside data/raw counts
    (repo / "data" / "mine.txt").write_text("mine")
    assert report.git_state(repo, own)["dirty"] is True
    (repo / "data" / "mine.txt").unlink()
    assert report.git_state(repo, own)["dirty"] is False
    (repo / "params.yaml").unlink()  # deleted
    assert report.git_state(repo, own)["dirty"] is True
    assert report.git_state(tmp_path) == {"commit": None, "dirty": None}  # not a checkout


def test_porcelain_paths_reads_renames_and_spaces():
    listed = " M a b.txt\0?? out/\0R  new.py\0old.py\0D  gone\0"
    assert report.porcelain_paths(listed) == ["a b.txt", "out/", "new.py", "old.py", "gone"]
    assert report.porcelain_paths("") == []


# ---------------------------------------------------------------- a large val set

def inflate(pipeline: dict, dest: Path, n_extra: int) -> dict:
    """The pipeline's outputs with n_extra more val images: the real samples repeated under
    new ids and file names (symlinks to the real files), each with its original's
    neighbours and bins.
    What the report reads of a val set of any size, without running the pipeline on it."""
    src, rng = pipeline["root"], np.random.default_rng(0)
    for sub in ("metrics", "compare", "models"):
        shutil.copytree(src / sub, dest / sub, symlinks=True)
    raw = dest / "data" / "raw"
    shutil.copytree(src / "data" / "raw", raw, symlinks=True)
    first = {}
    for s in pipeline["params"]["schemes"]:
        shutil.copytree(src / "analysis" / s, dest / "analysis" / s)
        shutil.copytree(src / "predictions" / s, dest / "predictions" / s)
        shutil.copytree(src / "data" / "masks" / s, dest / "data" / "masks" / s)
        path = dest / "analysis" / s / "samples.csv"
        samples = pd.read_csv(path, dtype={"file_name": str})
        picks = np.arange(n_extra) % len(samples)
        extra = samples.iloc[picks].copy()
        extra["image_id"] = 10**9 + np.arange(n_extra)
        extra["file_name"] = [f"synthetic{i:06d}.jpg" for i in range(n_extra)]
        extra["loss"] = extra["loss"] * rng.uniform(0.5, 1.5, n_extra)
        pd.concat([samples, extra]).to_csv(path, index=False)
        new_id = dict(zip(extra["image_id"], samples["image_id"].iloc[picks]))
        for table in ("neighbours.csv", "bin_members.csv"):
            frame = pd.read_csv(dest / "analysis" / s / table)
            copies = [frame[frame["image_id"] == old].assign(image_id=new)
                      for new, old in new_id.items()]
            pd.concat([frame, *copies]).to_csv(dest / "analysis" / s / table, index=False)
        for i, original in enumerate(samples["file_name"].iloc[picks]):
            stem, new = Path(original).stem, f"synthetic{i:06d}"
            for folder in (dest / "data" / "masks" / s / "val",
                           dest / "predictions" / s / "seed0" / "val"):
                (folder / f"{new}.png").symlink_to(folder / f"{stem}.png")
            first.setdefault(new, original)
    images = raw / "images" / "val"
    for new, original in first.items():
        (images / f"{new}.jpg").symlink_to(images / original)
    return stage_args(dest, out=dest / "reports" / "index.html")


def test_a_large_val_set_inlines_at_most_max_thumbnails(pipeline, rendered, tmp_path):
    params = copy.deepcopy(pipeline["params"])
    params["report"]["max_thumbnails"] = 25
    args = inflate(pipeline, tmp_path, 1200)
    report.run(params, **args)
    html = args["out"].read_text(encoding="utf-8")
    page = Page.parse(html)
    data = page.data()
    assert len(data["images"]["stem"]) == 1206 and len(data["per_scheme"][0]["img"]) == 1206
    assert len(data["thumbs"]) == 25
    # every other inlined image (figures, examples, label issues, heat-maps) is the same as
    # in the small report: the page grows by its 25 thumbnails and the per-sample data only
    small = rendered["html"]
    small_thumbs = len(rendered["page"].data()["thumbs"])
    assert html.count("data:image/") == small.count("data:image/") - small_thumbs + 25
    # the samples the page shows as images come first: the label issues have a thumbnail
    with_thumb = {s for s, t in zip(data["images"]["stem"], data["images"]["thumb"]) if t >= 0}
    for s in params["schemes"]:
        issues = pd.read_csv(tmp_path / "analysis" / s / "label_issues.csv", dtype={"stem": str})
        assert set(issues.loc[issues["flagged"], "stem"]) <= with_thumb
    assert len(html.encode()) < len(small.encode()) + 1_500_000


def test_engine_specific_facts_stay_in_the_timing_section(pipeline, tmp_path, monkeypatch):
    """Snakemake gives the report its benchmark files, DVC none: the stage times live in the
    timing section, which the engines' parity test leaves out; the rest of the page is the
    same bytes under both engines."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    bench = tmp_path / "logs" / "benchmark" / "train" / "person_car.tsv"
    write_tsv(bench, "s\th:m:s\tmax_rss\tcpu_time\n12.5\t0:00:12\t300\t20\n")
    smk = stage_args(pipeline["root"], out=tmp_path / "smk.html")
    report.run(pipeline["params"], **smk, benchmarks=[bench])
    dvc = stage_args(pipeline["root"], out=tmp_path / "dvc.html")
    report.run(pipeline["params"], **dvc)
    a, b = (p.read_text(encoding="utf-8") for p in (smk["out"], dvc["out"]))
    times = Page.parse(a).tables["stage-times-table"]
    assert times[1:] == [["train", "person_car", "12.5", "20.0", "300"]]
    assert "stage-times-table" not in b
    assert "DVC records no stage times; run through Snakemake for them." in b
    assert "DVC records no stage times" not in a
    timing = re.compile(r'<section id="timing">.*?</section>', re.S)
    assert timing.sub("", a) == timing.sub("", b)


def test_comparison_leads_with_intervals_categories_and_weak_classes(rendered):
    """On the real pipeline: every verdict carries compare's interval, the category table
    lists evaluate's categories, and each class the tiny model has not learned is named."""
    root, page, params = rendered["root"], rendered["page"], rendered["params"]
    summary = json.loads((root / "compare" / "summary.json").read_text())
    text = page.all_text()
    [pair] = summary["pairs"]
    assert pair["classes"], "no shared class to check"
    for name, entry in pair["classes"].items():
        lo, hi = entry["interval"]
        assert lo is not None and f"{lo:+.3f} to {hi:+.3f}" in text, name
        said = "no detectable difference" if entry["verdict"] == "no detectable difference" \
            else f"is {entry['verdict']} than"
        assert f"{name}: " in text and said in text
    assert "training noise was not measured" in text
    listed = {row[0].split()[0] for row in page.tables["category-table"][1:]}
    weak, classes = set(), set()
    for scheme in params["schemes"]:
        categories = pd.read_csv(root / "metrics" / f"{scheme}.categories.csv")
        assert set(categories["category"].str.split().str[0]) <= listed
        doc = json.loads((root / "metrics" / f"{scheme}.json").read_text())
        for name in list(doc["iou"])[1:]:
            upper = doc["interval"]["iou"][name][1]
            classes.add(name)
            if (upper if upper is not None else doc["iou"][name] or 0) < 0.10:
                weak.add(name)
    for name in classes:
        assert (f"the model has not learned {name}" in text) == (name in weak), name


# ---------------------------------------------------------------- insights (issue 17)

def car_scheme() -> report.Scheme:
    """person_car with car not learned (IoU 0.02 < report.min_class_iou 0.1); its val images
    are ids 1..8, stems 000000000000..000000000007."""
    return synthetic_scheme("person_car", ["person", "car"], [0.9, 0.3, 0.02])


def stem(image_id: int) -> str:
    return f"{image_id - 1:012d}"


CAR_SEGMENT = {"conditions": [{"field": "car_fraction", "above": 0.2, "at_most": None,
                               "missing": False}]}


def car_findings() -> list[dict]:
    """analyze's records for car_scheme, in an order no key of theirs sorts them in: the
    page must keep the file's order (the stage ranked it), not re-rank."""
    return [
        insights.record("low_performance", "Cluster 1: 5 val images", [1, 5, 6, 7, 8],
                        effect=0.2, interval=[0.1, 0.3], q_value=0.04),
        insights.record("weak_segment", "car_fraction > 0.2: 3 images", [2, 3, 4], effect=0.5,
                        interval=[0.25, 0.75], q_value=0.01, evidence=CAR_SEGMENT),
        insights.record("duplicate", "1 pair of train images, same pixels", [100, 101],
                        evidence={"split": "train", "kind": "exact_pixels", "pairs": 1}),
        insights.record("label_issue", "1 suspected label issue (labelled background, model "
                        "says person)", [3], effect=-0.125,
                        evidence={"main_disagreement": "labelled background, model says person",
                                  "label_quality": [0.25]}),
        insights.record("label_issue", "2 suspected label issues (labelled car, model says "
                        "background)", [4, 5], effect=0.75, interval=[0.5, 1.0],
                        evidence={"main_disagreement": "labelled car, model says background",
                                  "label_quality": [0.1, 0.2]}),
    ]


CAR_WARNING = ("the model has not learned car; findings about car describe the model's "
               "failure, not the data")


def test_evidence_words_state_the_count_the_effect_with_its_interval_and_the_q_value():
    r = insights.record("weak_segment", "t", [1, 2, 3], effect=0.25, interval=[0.125, 0.375],
                        q_value=0.0123)
    assert report.evidence_words(r, 0.95) == (
        "3 images · loss effect +0.250 (95% interval +0.125 to +0.375) · q = 0.012")
    assert report.evidence_words(insights.record("out_of_distribution", "t", [4], effect=-0.5),
                                 0.9) == ("1 image · loss effect -0.500 (no interval: a side has "
                                          "fewer than 2 losses) · no q-value (not a test)")
    assert report.evidence_words(insights.record("duplicate", "t", [1, 2]), 0.95) == (
        "2 images · no loss effect (none applies to this finding) · no q-value (not a test)")
    # a difference that rounds to zero prints unsigned, as the comparison's do
    assert report.evidence_words(insights.record("leak", "t", [1, 2], effect=-0.0004,
                                                 interval=[-0.0004, 0.25]), 0.9) == (
        "2 images · loss effect 0.000 (90% interval 0.000 to +0.250) · no q-value (not a test)")


def test_scheme_findings_keep_the_files_order_and_say_which_are_the_models_failure():
    s = car_scheme()
    s.insights = car_findings()
    shown = report.scheme_findings(s, report.weak_classes(s, 0.1), 0.95, 2)
    assert shown["scheme"] == "person_car" and shown["none"] is None
    rows = shown["findings"]
    assert [r["title"] for r in rows] == [r["title"] for r in car_findings()]
    assert [(r["words"], r["ids"], r["outside"], r["stems"], r["not_learned"], r["warnings"])
            for r in rows] == [
        ("low-performance cluster", [1, 5, 6, 7, 8], 0, [stem(1), stem(5)], [], []),
        ("weak segment", [2, 3, 4], 0, [stem(2), stem(3)], ["car"], [CAR_WARNING]),
        ("duplicates", [], 2, [], [], []),     # train images: not in the samples table
        ("suspected label issue", [3], 0, [stem(3)], [], []),
        ("suspected label issue", [4, 5], 0, [stem(4), stem(5)], ["car"], [CAR_WARNING])]
    assert rows[1]["evidence"] == ("3 images · loss effect +0.500 (95% interval +0.250 to "
                                   "+0.750) · q = 0.01")
    # with car learned, nothing is the model's failure
    assert not any(r["warnings"] for r in report.scheme_findings(s, [], 0.95, 2)["findings"])
    s.insights = []
    assert report.scheme_findings(s, ["car"], 0.95, 2) == {
        "scheme": "person_car", "findings": [],
        "none": "No finding survives under person_car: analyze reported no low-performance or "
                "under-represented cluster, weak segment, out-of-distribution image, duplicate, "
                "leak or suspected label issue."}


def test_change_findings_repeat_compares_records_under_their_scheme_or_say_why_none():
    a, b = car_scheme(), synthetic_scheme("person_vehicle", ["person", "vehicle"], [0.9, 0.3, 0.4])
    a.insights = car_findings()
    changes = insights.scheme_changes({"person_car": a.insights, "person_vehicle": []}, 0.5)
    assert len(changes) == 5
    weak = {"person_car": ["car"], "person_vehicle": []}
    shown = report.change_findings(changes, [a, b], weak, 0.95, 1, 0.5)
    assert shown["none"] is None
    assert [r["title"] for r in shown["findings"]] == [c["title"] for c in changes]
    assert [(r["scheme"], r["other"], r["finding_words"], r["source"], r["not_learned"])
            for r in shown["findings"]] == [
        ("person_car", "person_vehicle", "low-performance cluster", "compare", []),
        ("person_car", "person_vehicle", "weak segment", "compare", ["car"]),
        ("person_car", "person_vehicle", "duplicates", "compare", []),
        ("person_car", "person_vehicle", "suspected label issue", "compare", []),
        ("person_car", "person_vehicle", "suspected label issue", "compare", ["car"])]
    assert shown["findings"][0]["stems"] == [stem(1)]
    assert report.change_findings([], [a, b], weak, 0.95, 1, 0.5)["none"] == (
        "No finding differs between the schemes: each finding of a scheme has one of the same "
        "type under every other scheme sharing at least 50% of its images.")
    a.insights = []
    assert report.change_findings([], [a, b], weak, 0.95, 1, 0.5)["none"] == (
        "No finding differs between the schemes: no scheme has any.")
    assert report.change_findings(None, [a, b], weak, 0.95, 1, 0.5)["none"] == (
        "No comparison between schemes: the compare stage's output was not given.")
    assert report.change_findings([], [a], weak, 0.95, 1, 0.5)["none"] == (
        "One scheme: no finding can differ between schemes.")


def test_insight_stems_are_each_findings_first_thumbnails_in_the_pages_order():
    a, b = car_scheme(), synthetic_scheme("person_vehicle", ["person", "vehicle"], [0.9, 0.3, 0.4])
    a.insights = car_findings()
    b.insights = [insights.record("out_of_distribution", "far", [8, 7, 6], effect=0.5)]
    changes = insights.scheme_changes({"person_car": [], "person_vehicle": b.insights}, 0.5)
    assert report.insight_stems([a, b], changes, 2) == [
        stem(1), stem(5), stem(2), stem(3), stem(4), stem(8), stem(7)]
    assert report.insight_stems([a, b], None, 0) == []
    # the thumbnails the page inlines start with them (label issues before, if any)
    first = report.insight_stems([a, b], changes, 2)
    assert report.thumbnail_stems([a, b], first, 5) == first[:5]


def insight_page(schemes: list[report.Scheme], changes: list[dict] | None) -> str:
    params = {"report": {"title": "t", "thumbnail_px": 64, "min_class_iou": 0.1,
                         "insight_thumbnails": 2, "insights_shown": 8,
                         "duplicate_pairs": 4}, "analyze": ANALYZE, "compare": COMPARE,
              **TRAINING}
    return report.render(report.build_context(params, schemes, SYNTHETIC_PROVENANCE, [],
                                              compare_insights=changes))


def _findings(html: str, scheme: str) -> list[tuple[dict, str]]:
    """(data attributes, visible text) of each finding listed under the scheme."""
    return [({"type": m.group(1), "size": int(m.group(3))}, _visible(m.group(4)))
            for m in re.finditer(r'<li class="finding[^"]*" data-type="([^"]+)" '
                                 rf'data-scheme="({re.escape(scheme)})" data-size="(\d+)">'
                                 r"(.*?)</li>", html, re.S)]


def test_the_insights_section_comes_first_and_words_each_finding_from_its_record():
    a, b = car_scheme(), synthetic_scheme("person_vehicle", ["person", "vehicle"], [0.9, 0.3, 0.4])
    a.insights = car_findings()
    changes = insights.scheme_changes({"person_car": a.insights, "person_vehicle": []}, 0.5)
    html = insight_page([a, b], changes)
    assert re.findall(r"<h2>(.*?)</h2>", html)[0] == "1. Insights"
    section = html.split('<section id="insights">')[1].split("</section>")[0]
    listed = _findings(section.split('id="insight-changes"')[0], "person_car")
    assert [(t["type"], t["size"]) for t, _ in listed] == [
        ("low_performance", 5), ("weak_segment", 3), ("duplicate", 2), ("label_issue", 1),
        ("label_issue", 2)]
    texts = [text for _, text in listed]
    assert texts[0] == ("low-performance cluster Cluster 1: 5 val images 5 images · loss effect "
                        "+0.200 (95% interval +0.100 to +0.300) · q = 0.04 show its 5 images "
                        "in the samples table")
    assert texts[1] == ("model failure: car not learned The model has not learned car; findings "
                        "about car describe the model's failure, not the data. analyze's weak "
                        "segment record: car_fraction > 0.2: 3 images 3 images · loss effect "
                        "+0.500 (95% interval +0.250 to +0.750) · q = 0.01 show its 3 images in "
                        "the samples table")
    assert texts[2] == ("duplicates 1 pair of train images, same pixels 2 images · no loss "
                        "effect (none applies to this finding) · no q-value (not a test) 2 of "
                        "its images are not among person_car's val images (train images): not "
                        "in the samples table")
    assert texts[3].startswith("suspected label issue 1 suspected label issue (labelled "
                               "background, model says person) 1 image · loss effect -0.125")
    assert texts[3].endswith("show its image in the samples table")
    assert texts[4].startswith("model failure: car not learned The model has not learned car")
    # the links: the finding's val images, under its scheme; thumbnails: its first two
    links = re.findall(r'<button type="button" class="link js-members" data-scheme="([^"]+)" '
                       r'data-image-ids="([^"]*)" data-label="([^"]+)">', section)
    assert links[:2] == [
        ("person_car", "1 5 6 7 8", "person_car · low-performance cluster, 5 images"),
        ("person_car", "2 3 4", "person_car · weak segment, 3 images")]
    assert len(links) == 4 + len(changes) - 1   # no link for the train duplicates
    first = section.split('<li class="finding')[1]
    assert re.findall(r'class="js-thumb" data-stem="(\d+)"', first) == [stem(1), stem(5)]
    # the scheme with none says so; the changes are compare's, under their scheme
    assert ("No finding survives under person_vehicle: analyze reported no low-performance "
            "or under-represented cluster") in _visible(section)
    changed = _findings(section.split('id="insight-changes"')[1], "person_car")
    assert [text.split(" Under ")[0] for _, text in changed][:2] == [
        "differs between schemes low-performance cluster",
        "model failure: car not learned The model has not learned car; findings about car "
        "describe the model's failure, not the data. compare's differs between schemes record:"]
    # without compare's file: no change can be listed, and the page says why
    assert ("No comparison between schemes: the compare stage's output was not given."
            in _visible(insight_page([a, b], None)))


def test_the_page_data_carries_the_ood_score_and_its_threshold():
    a = car_scheme()
    a.insights = [insights.record("out_of_distribution", "far", [2], effect=0.5,
                                  evidence={"k": 5, "quantile": 0.99, "threshold": 0.375,
                                            "scores": [0.5]})]
    data = Page.parse(insight_page([a], None)).data()
    [scheme] = data["per_scheme"]
    assert scheme["ood"] == pytest.approx(a.samples["ood_score"].tolist(), rel=1e-3)
    assert scheme["ood_threshold"] == 0.375
    a.insights = []
    assert Page.parse(insight_page([a], None)).data()["per_scheme"][0]["ood_threshold"] is None


SCHEMA_ERRORS = [
    (lambda r: [{**r, "q_value": 1.5}], "[0].q_value: expected a number of at most 1, found 1.5"),
    (lambda r: [{k: v for k, v in r.items() if k != "title"}], "[0]: missing key title"),
    (lambda r: [r, {**r, "type": "big"}],
     '[1].type: expected one of low_performance, under_represented, out_of_distribution, '
     'duplicate, leak, weak_segment, label_issue, scheme_change, found "big"'),
    (lambda r: [{**r, "interval": "x"}],
     '[0].interval: expected null or a list of 2 numbers, found "x"'),
    (lambda r: [{**r, "image_ids": [1, "2"]}], '[0].image_ids[1]: expected integer, found "2"'),
    (lambda r: {"findings": [r]}, "the top level: expected array, found an object"),
]


@pytest.mark.parametrize("edit, problem", SCHEMA_ERRORS)
def test_an_insights_file_off_the_schema_is_refused_in_one_line(tmp_path, edit, problem):
    path = tmp_path / "insights.json"
    record = insights.record("low_performance", "t", [1, 2], effect=0.5, interval=[0.1, 0.9],
                             q_value=0.01)
    path.write_text(json.dumps(edit(record)))
    samples = {"a": pd.DataFrame({"image_id": [1, 2]})}
    with pytest.raises(StageError) as caught:
        report.read_insights(path, "analyze", samples, "a")
    assert str(caught.value) == f"{path}: {problem} (docs/insights.schema.json); re-run analyze"


def test_insights_files_name_val_images_of_their_scheme_and_compares_only_changes(tmp_path):
    path = tmp_path / "insights.json"
    samples = {"a": pd.DataFrame({"image_id": [1, 2]}), "b": pd.DataFrame({"image_id": [1]})}
    low = insights.record("low_performance", "t", [1, 2], effect=0.5)
    change = insights.scheme_changes({"a": [low], "b": []}, 0.5)

    def refused(document, stage, scheme) -> str:
        path.write_text(json.dumps(document))
        with pytest.raises(StageError) as caught:
            report.read_insights(path, stage, samples, scheme)
        return str(caught.value)

    assert refused([low], "analyze", "b") == (
        f"{path}: [0].image_ids: image 2 is not among b's val images (its samples.csv); "
        "re-run analyze")
    assert refused(change, "analyze", "a") == (
        f"{path}: [0]: a scheme_change record; those are compare's (compare/insights.json); "
        "re-run analyze")
    assert refused([low], "compare", None) == (
        f"{path}: [0]: expected a scheme_change record of one of a, b, found a low_performance "
        "record of null; re-run compare")
    other = [{**change[0], "evidence": {**change[0]["evidence"], "scheme": "c"}}]
    assert refused(other, "compare", None) == (
        f"{path}: [0]: expected a scheme_change record of one of a, b, found a scheme_change "
        'record of "c"; re-run compare')
    # a train duplicate names train images; every other finding val images of its scheme
    train = insights.record("duplicate", "d", [7, 8], evidence={"split": "train"})
    path.write_text(json.dumps([train, low]))
    assert report.read_insights(path, "analyze", samples, "a") == [train, low]
    path.write_text("[")
    with pytest.raises(StageError, match=re.escape(f"{path}: not valid JSON (")):
        report.read_insights(path, "analyze", samples, "a")
    with pytest.raises(StageError, match=re.escape(
            f"{tmp_path / 'absent.json'}: missing (run the compare stage first)")):
        report.read_insights(tmp_path / "absent.json", "compare", samples)


def test_a_train_json_whose_encoder_pretraining_is_no_text_is_refused(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**TRAIN_JSON, "encoder_pretraining": None}))
    with pytest.raises(StageError) as caught:
        report_inputs.read_train(path)
    assert str(caught.value) == (f"{path}: encoder_pretraining: expected a string, found null; "
                                 "re-run train")
    path.write_text(json.dumps({k: v for k, v in TRAIN_JSON.items()
                                if k != "encoder_pretraining"}))
    with pytest.raises(StageError) as caught:
        report_inputs.read_train(path)
    assert str(caught.value) == f"{path}: missing keys encoder_pretraining; re-run train"


def test_a_malformed_insights_file_stops_the_stage_with_one_line(pipeline, tmp_path, caplog):
    analysis = tmp_path / "analysis"
    shutil.copytree(pipeline["root"] / "analysis", analysis)
    path = analysis / "person_vehicle" / "insights.json"
    records = json.loads(path.read_text())
    assert records, "the run has findings to break"
    records[0]["interval"] = [0.5]
    path.write_text(json.dumps(records))
    out = tmp_path / "out" / "index.html"
    args = stage_args(pipeline["root"], analysis=analysis, out=out)
    assert report.main(cli_argv(pipeline["root"] / "params.yaml", args)) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"{path}: [0].interval: expected a list of at least 2 items, found a list of 1 item "
        "(docs/insights.schema.json); re-run analyze"]
    assert not out.exists()


def test_the_insights_section_shows_the_runs_findings_in_their_files_order(rendered):
    """On the real pipeline (the shim's files until analyze writes them): every record of each
    scheme's insights.json and of compare's, in the file's order, with its title; a link per
    finding with val images, naming exactly them; each finding's thumbnails inlined."""
    root, html, params = rendered["root"], rendered["html"], rendered["params"]
    section = html.split('<section id="insights">')[1].split("</section>")[0]
    mine, changes = section.split('id="insight-changes"')
    data = rendered["page"].data()
    thumbed = {s for s, t in zip(data["images"]["stem"], data["images"]["thumb"]) if t >= 0}
    per_page = params["report"]["insight_thumbnails"]
    for s in params["schemes"]:
        records = json.loads((root / "analysis" / s / "insights.json").read_text())
        listed = _findings(mine, s)
        assert [(t["type"], t["size"]) for t, _ in listed] == [
            (r["type"], r["size"]) for r in records]
        doc = json.loads((root / "metrics" / f"{s}.json").read_text())
        weak = {c for c in list(doc["iou"])[1:]
                if (doc["interval"]["iou"][c][1] or doc["iou"][c] or 0) < 0.10}
        for (_, text), r in zip(listed, records):
            assert r["title"] in text
            # a label issue naming a class the model has not learned is its failure
            failure = r["type"] == "label_issue" and any(
                re.search(rf"\b{c}\b", r["evidence"]["main_disagreement"]) for c in weak)
            assert text.startswith("model failure: ") == failure, (s, r["title"])
        samples = pd.read_csv(root / "analysis" / s / "samples.csv", dtype={"file_name": str})
        val = set(samples["image_id"])
        stems = dict(zip(samples["image_id"], samples["file_name"].map(lambda f: Path(f).stem)))
        links = re.findall(rf'class="link js-members" data-scheme="{s}" '
                           r'data-image-ids="([^"]*)"', mine)
        assert links == [" ".join(str(i) for i in r["image_ids"]) for r in records
                         if set(r["image_ids"]) & val]
        shown = [stems[i] for r in records for i in
                 [i for i in r["image_ids"] if i in val][:per_page]]
        assert set(shown) <= thumbed
    compared = json.loads((root / "compare" / "insights.json").read_text())
    assert compared, "the run's schemes differ in some finding"
    listed = [(m.group(1), m.group(2), _visible(m.group(3))) for m in re.finditer(
        r'<li class="finding[^"]*" data-type="scheme_change" data-scheme="([^"]+)" '
        r'data-size="(\d+)">(.*?)</li>', changes, re.S)]
    assert [(scheme, int(size)) for scheme, size, _ in listed] == [
        (r["evidence"]["scheme"], r["size"]) for r in compared]
    assert all(r["title"] in text for (_, _, text), r in zip(listed, compared))
    text = rendered["page"].all_text()
    for s in params["schemes"]:
        facts = json.loads((root / "models" / s / "seed0" / "train.json").read_text())
        assert (f"inference on cpu; the encoder's pretraining: {facts['encoder_pretraining']}"
                in text)
        samples = pd.read_csv(root / "analysis" / s / "samples.csv")
        scheme = next(p for p in data["per_scheme"] if p["name"] == s)
        assert scheme["ood"] == pytest.approx(samples["ood_score"].tolist(), rel=1e-3)


# ---------------------------------------------------------------- duplicates and leakage

# analyze's duplicates.csv for car_scheme (val images 1..8; train images 100..106), in the
# file's order (kind, then the a and b sides)
DUPLICATES = pd.DataFrame(
    [(100, "train", 101, "train", "exact_bytes", 0.0),
     (102, "train", 3, "val", "exact_bytes", 0.0), (2, "val", 6, "val", "exact_pixels", 0.0),
     (103, "train", 5, "val", "near_hash", 4.0), (104, "train", 105, "train", "near_hash", 1.0),
     (106, "train", 7, "val", "near_latent", 0.0031), (1, "val", 8, "val", "near_latent", 0.002)],
    columns=report_inputs.PAIR_COLUMNS)
LEAK = insights.record("leak", "2 val images with a copy among the training images (pairs: 1 "
                       "same bytes, 1 near by perceptual hash)", [3, 5], effect=0.25,
                       evidence={"pairs": [
                           {"image_id_a": 102, "image_id_b": 3, "kind": "exact_bytes",
                            "distance": 0.0},
                           {"image_id_a": 103, "image_id_b": 5, "kind": "near_hash",
                            "distance": 4.0}]})
INTERVALS = {"confidence": 0.95, "miou": [0.375, 0.4375], "pixel_accuracy": [0.75, 0.875],
             "pixel_accuracy_with_ignore": [0.625, 0.75],
             "iou": {"background": [0.875, 0.9375], "person": [0.25, 0.375], "car": [0.0, 0.0625]}}
LEAK_FREE = {"miou": 0.3125, "pixel_accuracy": 0.8125, "pixel_accuracy_with_ignore": 0.6875,
             "mean_class_accuracy": 0.5625, "fw_iou": 0.59375,
             "iou": {"background": 0.90625, "person": 0.28125, "car": None}, "images": 6,
             "interval": {"confidence": 0.95, "miou": [0.25, 0.375], "pixel_accuracy":
                          [0.75, 0.875], "pixel_accuracy_with_ignore": [0.625, 0.75],
                          "iou": {"background": [0.875, 0.9375], "person": [0.1875, 0.375],
                                  "car": [None, None]}},
             "excluded_image_ids": [3, 5]}


def pair_counts(**cells: tuple[int, int, int]) -> dict[str, dict[str, int]]:
    """analyze's summary.json duplicates.by_kind_and_split, written by hand: kind=(train-train,
    val-val, train-val), every other kind zeros."""
    kinds = ("exact_bytes", "exact_pixels", "near_hash", "near_latent")
    return {k: dict(zip(("train-train", "val-val", "train-val"), cells.get(k, (0, 0, 0))))
            for k in kinds}


def leaky_scheme(leak: bool = True) -> report.Scheme:
    s = car_scheme()
    s.metrics["interval"] = INTERVALS
    s.duplicates = DUPLICATES if leak else DUPLICATES[DUPLICATES["split_a"] == DUPLICATES[
        "split_b"]].reset_index(drop=True)
    s.duplicate_counts = (pair_counts(exact_bytes=(1, 0, 1), exact_pixels=(0, 1, 0),
                                      near_hash=(1, 0, 1), near_latent=(0, 1, 1)) if leak else
                          pair_counts(exact_bytes=(1, 0, 0), exact_pixels=(0, 1, 0),
                                      near_hash=(1, 0, 0), near_latent=(0, 1, 0)))
    s.insights = [LEAK] if leak else []
    s.leak_free = LEAK_FREE if leak else None
    return s


def pair_thumbs(evidence: list[dict]) -> dict[tuple[str, int], str]:
    """A distinct stand-in data URI per image, to find each one's on the page."""
    return {key: f"data:image/jpeg;base64,{key[0]}{key[1]:04d}"
            for key in report.duplicate_images(evidence)} if evidence else {}


def test_the_reports_duplicates_contract_is_analyzes():
    """The report spells out duplicates.csv's columns, kinds and split pairs instead of
    importing stages.lib.duplicates (narrower code dependencies): they must stay the same."""
    from stages.lib import duplicates
    from stages.report import findings as report_findings

    assert report_inputs.PAIR_COLUMNS == duplicates.PAIR_COLUMNS
    assert report_inputs.KINDS == duplicates.KINDS == tuple(report_findings.PAIR_KINDS)
    assert report_inputs.SPLIT_PAIRS == duplicates.SPLIT_PAIRS


def test_duplicate_evidence_counts_by_kind_and_split_and_shows_the_leaking_pairs_first():
    shown = report.duplicate_evidence(leaky_scheme(), 4, 6)
    assert shown["total"] == 7 and shown["splits"] == ["train-train", "val-val", "train-val"]
    assert [(c["kind"], c["cells"]) for c in shown["counts"]] == [
        ("exact_bytes", [1, 0, 1]), ("exact_pixels", [0, 1, 0]), ("near_hash", [1, 0, 1]),
        ("near_latent", [0, 1, 1])]
    # the two leaking pairs (the leak record's), then the file's first other pairs
    assert [((p["a"]["split"], p["a"]["id"]), (p["b"]["split"], p["b"]["id"]), p["leak"],
             p["distance"]) for p in shown["pairs"]] == [
        (("train", 102), ("val", 3), True, "identical"),
        (("train", 103), ("val", 5), True, "hashes 4 bits apart"),
        (("train", 100), ("train", 101), False, "identical"),
        (("val", 2), ("val", 6), False, "identical")]
    assert shown["more"] == 3 and shown["no_leak"] is None
    assert shown["leak"]["excluded"] == 2 and shown["leak"]["free_images"] == 6
    assert report.duplicate_images([shown, None]) == [
        ("train", 102), ("val", 3), ("train", 103), ("val", 5), ("train", 100), ("train", 101),
        ("val", 2), ("val", 6)]
    # a latent pair across the splits is listed, not a leak, and said so
    clean = report.duplicate_evidence(leaky_scheme(leak=False), 10, 6)
    assert clean["leak"] is None and clean["more"] == 0 and len(clean["pairs"]) == 4
    assert report.duplicate_evidence(car_scheme(), 4, 6) is None   # no duplicates.csv read
    # the counts are analyze's summary.json's, not a recount of the file
    s = leaky_scheme()
    s.duplicate_counts = pair_counts(exact_bytes=(2, 0, 0), exact_pixels=(0, 1, 0),
                                     near_hash=(0, 0, 2), near_latent=(0, 2, 0))
    assert [c["cells"] for c in report.duplicate_evidence(s, 4, 6)["counts"]] == [
        [2, 0, 0], [0, 1, 0], [0, 0, 2], [0, 2, 0]]


def _pairs_on(html: str) -> list[tuple[str, str, list[tuple[str, str]], str]]:
    """(data-split, data-kind, [(img src, alt)] , caption) of each pair shown."""
    return [(m.group(2), m.group(1), re.findall(r'<img src="([^"]+)" alt="([^"]+)">', m.group(3)),
             _visible(m.group(3)))
            for m in re.finditer(r'<li class="dup-pair[^"]*" data-kind="([^"]+)" '
                                 r'data-split="([^"]+)" data-ids="[^"]+">(.*?)</li>', html, re.S)]


def duplicates_section(s: report.Scheme) -> str:
    """The page's duplicates section for scheme s alone, 4 pairs shown (stand-in thumbnails)."""
    evidence = [report.duplicate_evidence(s, 4, 6)]
    params = {"report": {"title": "t", "thumbnail_px": 64, "min_class_iou": 0.1,
                         "insight_thumbnails": 2, "insights_shown": 8, "duplicate_pairs": 4},
              "analyze": ANALYZE, "compare": COMPARE, **TRAINING}
    html = report.render(report.build_context(params, [s], SYNTHETIC_PROVENANCE, [],
                                              pair_thumbs=pair_thumbs(evidence)))
    return html.split('<h3 id="duplicates">')[1].split("</section>")[0]


def test_the_page_shows_each_pair_with_both_thumbnails_and_the_metrics_without_the_leak():
    s = leaky_scheme()
    section = duplicates_section(s)
    page = Page.parse(section)
    assert page.tables["duplicate-counts-0"] == [
        ["kind", "train-train", "val-val", "train-val"],
        ["exact_bytes (same bytes)", "1", "0", "1"],
        ["exact_pixels (same pixels)", "0", "1", "0"],
        ["near_hash (near by perceptual hash)", "1", "0", "1"],
        ["near_latent (near in the latent space)", "0", "1", "1"]]
    assert _pairs_on(section) == [
        ("train-val", "exact_bytes", [("data:image/jpeg;base64,train0102",
                                       "train image 102 (person_car)"),
                                      ("data:image/jpeg;base64,val0003",
                                       "val image 3 (person_car)")],
         "train 102 val 3 leak train-val, same bytes: identical"),
        ("train-val", "near_hash", [("data:image/jpeg;base64,train0103",
                                     "train image 103 (person_car)"),
                                    ("data:image/jpeg;base64,val0005",
                                     "val image 5 (person_car)")],
         "train 103 val 5 leak train-val, near by perceptual hash: hashes 4 bits apart"),
        ("train-train", "exact_bytes", [("data:image/jpeg;base64,train0100",
                                         "train image 100 (person_car)"),
                                        ("data:image/jpeg;base64,train0101",
                                         "train image 101 (person_car)")],
         "train 100 train 101 train-train, same bytes: identical"),
        ("val-val", "exact_pixels", [("data:image/jpeg;base64,val0002",
                                      "val image 2 (person_car)"),
                                     ("data:image/jpeg;base64,val0006",
                                      "val image 6 (person_car)")],
         "val 2 val 6 val-val, same pixels: identical")]
    text = _visible(section)
    assert "3 more in analysis/person_car/duplicates.csv." in text
    assert ("2 val images of person_car have a copy among the training images. The metrics "
            "of the analysed model with and without them (metrics/person_car.json and "
            "analysis/person_car/leak_free_metrics.json, intervals in brackets):") in text
    assert page.tables["leak-free-0"] == [
        ["score", "all 8 val images", "without the 2 leaked (6 images)"],
        ["mIoU", "0.400 (0.375 to 0.438)", "0.312 (0.250 to 0.375)"],
        ["pixel accuracy (ignore excluded)", "0.800 (0.750 to 0.875)", "0.812 (0.750 to 0.875)"],
        ["pixel accuracy (ignore counted as error)", "0.700 (0.625 to 0.750)",
         "0.688 (0.625 to 0.750)"],
        ["mean class accuracy", "0.500", "0.562"],
        ["frequency-weighted IoU", "0.600", "0.594"],
        ["IoU background", "0.900 (0.875 to 0.938)", "0.906 (0.875 to 0.938)"],
        ["IoU person", "0.300 (0.250 to 0.375)", "0.281 (0.188 to 0.375)"],
        ["IoU car", "0.020 (0.000 to 0.062)", "—"]]
    assert "No val image" not in text


def test_without_a_leak_the_page_says_no_val_image_has_a_train_copy():
    s = leaky_scheme(leak=False)
    section = duplicates_section(s)
    radius = ANALYZE["duplicates"]["hash_radius"]
    assert re.findall(r'<p class="no-leak none-survives">(.*?)</p>', section) == [
        "No val image of person_car has a copy among the training images: analyze found no "
        "train-val pair of the same bytes, the same decoded pixels or perceptual hashes at most "
        f"{radius} bits apart, so its metrics need no recount without leaked images."]
    assert 'id="leak-free-0"' not in section and "more in analysis" not in section
    assert len(_pairs_on(section)) == 4
    # a latent pair across the splits is named, as no leak
    s.duplicates = DUPLICATES[DUPLICATES["kind"] == "near_latent"].reset_index(drop=True)
    s.duplicate_counts = pair_counts(near_latent=(0, 1, 1))
    shown = report.duplicate_evidence(s, 0, 6)
    assert shown["no_leak"].endswith(
        " The 1 train-val pair near only in the latent space (below) is not counted as leaks: "
        "distinct photographs come that near too.")
    assert shown["pairs"] == [] and shown["more"] == 2


# ---------------------------------------------------------------- clusters' train shares

def representation_record(kind: str, cluster: int, train_share: float, q: float) -> dict:
    return insights.record(kind, f"Cluster {cluster}", [1, 2], effect=0.25, q_value=0.01,
                           evidence={"cluster": cluster, "mean_loss": 0.7,
                                     "mean_loss_rest": 0.5, "val_share": 0.5,
                                     "train_share": train_share,
                                     "share_ratio": train_share / 0.5,
                                     "representation_q_value": q})


def test_clusters_show_the_train_share_beside_the_val_share_and_analyzes_reading():
    s = car_scheme()   # clusters.csv: train images 30 and 10, train shares 0.75 and 0.25
    s.insights = [representation_record("under_represented", 1, 0.25, 0.0123),
                  representation_record("low_performance", 0, 0.75, 0.875)]
    html = insight_page([s], None)
    table = Page.parse(html).tables["clusters-0"]
    assert table[0][:8] == ["cluster", "size", "mean loss", "pixel acc.", "grayscale share",
                            "train images", "train share", "val share"]
    assert [row[5:8] for row in table[2:]] == [["30", "75.0%", "50.0%"],
                                              ["10", "25.0%", "50.0%"]]
    cards = _cards(html)
    assert "train share 75.0% (30 train images) · val share 50.0%" in cards[("person_car", 0)]
    assert "train share 25.0% (10 train images) · val share 50.0%" in cards[("person_car", 1)]
    readings = dict(re.findall(r'data-cluster="(\d+)">.*?<p class="reading">(.*?)</p>', html,
                               re.S))
    assert readings == {
        "0": "High loss, but not under-represented in training: it holds 75.0% of the "
             "training images against 50.0% of the clustered val images (analyze&#39;s "
             "low_performance finding, Fisher q = 0.88); the loss points at the model or the "
             "labels rather than at missing data.",
        "1": "Under-represented: high loss, and it holds 25.0% of the training images against "
             "50.0% of the clustered val images (analyze&#39;s under_represented finding, "
             "Fisher q = 0.012): collect or label more images like these."}
    # a cluster without analyze's finding has no reading; noise (-1) has no shares
    s.insights = s.insights[:1]
    s.clusters = pd.concat([s.clusters, s.clusters.iloc[:1].assign(
        cluster=-1, train_images=np.nan, train_share=np.nan, val_share=np.nan)],
        ignore_index=True)
    html = insight_page([s], None)
    assert re.findall(r'data-cluster="(-?\d+)">.*?</h4>.*?(?:<p class="reading">|</article>)',
                      html, re.S) == ["0", "1", "-1"]
    assert html.count('<p class="reading">') == 1
    assert "train share — (— train images) · val share —" in _cards(html)[("person_car", -1)]


# ---------------------------------------------------------------- the Insights section's cap

def test_findings_past_insights_shown_are_in_a_collapsed_block_per_scheme_and_for_changes():
    a, b = car_scheme(), synthetic_scheme("person_vehicle", ["person", "vehicle"], [0.9, 0.3, 0.4])
    a.insights = car_findings()
    b.insights = car_findings()[:2]
    changes = insights.scheme_changes({"person_car": a.insights, "person_vehicle": []}, 0.5)
    params = {"report": {"title": "t", "thumbnail_px": 64, "min_class_iou": 0.1,
                         "insight_thumbnails": 2, "insights_shown": 2, "duplicate_pairs": 4},
              "analyze": ANALYZE, "compare": COMPARE, **TRAINING}
    html = report.render(report.build_context(params, [a, b], SYNTHETIC_PROVENANCE, [],
                                              compare_insights=changes))
    section = html.split('<section id="insights">')[1].split("</section>")[0]
    mine, changed = section.split('id="insight-changes"')
    blocks = re.findall(r'<details class="more-findings">\s*<summary>(.*?)</summary>\s*'
                        r'<ol class="findings" start="(\d+)">(.*?)</ol>\s*</details>', section,
                        re.S)
    assert [(summary, start) for summary, start, _ in blocks] == [
        ("3 more findings under person_car (ranked 3 to 5)", "3"),
        ("3 more findings that differ between the schemes (ranked 3 to 5)", "3")]
    titles = [r["title"] for r in car_findings()]
    # open: the first two of each list; collapsed: exactly the rest, in the file's order
    opened = mine.split('<details class="more-findings">')[0]
    assert [t for t in titles if t in unescape(opened)] == titles[:2]
    assert [t for t in titles if t in unescape(blocks[0][2])] == titles[2:]
    assert [(t["type"], t["size"]) for t, _ in _findings(blocks[0][2], "person_car")] == [
        ("duplicate", 2), ("label_issue", 1), ("label_issue", 2)]
    change_titles = [unescape(c["title"]) for c in changes]
    collapsed = [t for t in change_titles if t in unescape(blocks[1][2])]
    assert collapsed == change_titles[2:]
    assert [t for t in change_titles if t in unescape(changed.split("<details")[0])] == \
        change_titles[:2]
    # person_vehicle's two findings fit: no block of its own; its link is still there
    pv = mine.split('<h3 id="insights-1">')[1]
    assert "<details" not in pv and len(_findings(pv, "person_vehicle")) == 2
    # the collapsed findings keep their filter links
    assert re.findall(r'data-image-ids="([^"]*)"', blocks[0][2]) == ["3", "4 5"]
    # under the default cap all five are open
    html = insight_page([a, b], changes)
    assert "<details class=\"more-findings\">" not in html
    # one collapsed finding is one
    params["report"]["insights_shown"] = 4
    html = report.render(report.build_context(params, [a, b], SYNTHETIC_PROVENANCE, [],
                                              compare_insights=changes))
    section = html.split('<section id="insights">')[1].split("</section>")[0]
    assert re.findall(r"<summary>(.*?)</summary>", section) == [
        "1 more finding under person_car (ranked 5)",
        "1 more finding that differs between the schemes (ranked 5)"]


# ---------------------------------------------------------------- duplicates on the real run

def _duplicates_of(html: str, scheme: str) -> str:
    """The scheme's duplicates block: up to the next scheme's, or the section's end."""
    after = html.split(f'<div class="duplicates" data-scheme="{scheme}">')[1]
    return after.split('<div class="duplicates"')[0].split("</section>")[0]


def test_the_runs_page_counts_its_duplicate_pairs_and_says_no_val_image_leaks(rendered):
    """The sample has no train copy in val (docs/outputs.md): each scheme's block shows
    analyze's counts of duplicates.csv's rows by kind and split pair (recounted here from the
    file) and says plainly that nothing leaks."""
    root, html, params = rendered["root"], rendered["html"], rendered["params"]
    section = html.split('<h3 id="duplicates">')[1].split("</section>")[0]
    tables = Page.parse(section).tables
    for i, s in enumerate(params["schemes"]):
        assert not (root / "analysis" / s / "leak_free_metrics.json").exists()
        pairs = pd.read_csv(root / "analysis" / s / "duplicates.csv")
        splits = pairs["split_a"] + "-" + pairs["split_b"]
        expected = [[kind] + [str(int(((pairs["kind"] == kind) & (splits == split)).sum()))
                              for split in ("train-train", "val-val", "train-val")]
                    for kind in ("exact_bytes", "exact_pixels", "near_hash", "near_latent")]
        assert [[row[0].split()[0], *row[1:]] for row in tables[f"duplicate-counts-{i}"][1:]] \
            == expected
        block = _duplicates_of(section, s)
        assert (f"No val image of {s} has a copy among the training images: analyze found no "
                "train-val pair of the same bytes") in _visible(block)
        assert len(_pairs_on(block)) == min(len(pairs), params["report"]["duplicate_pairs"])


def test_a_leak_in_analyzes_files_shows_both_images_of_its_pairs_and_its_metrics(pipeline,
                                                                                tmp_path,
                                                                                caplog):
    """Hand-made analyze files on the real run: a train image's twin in val (a leak record
    and leak_free_metrics.json), and a latent-only train-val pair. The page shows both
    images of each pair, as thumbnails of their files (the train one found through the
    manifest), and the metrics without the leaked image beside those with it."""
    root, params = pipeline["root"], pipeline["params"]
    raw = root / "data" / "raw"
    s = next(iter(params["schemes"]))
    analysis = tmp_path / "analysis"
    shutil.copytree(root / "analysis", analysis)
    manifest = json.loads((raw / "manifest.json").read_text())
    train = manifest["splits"]["train"]["images"][:2]
    val = {i["id"]: i for i in manifest["splits"]["val"]["images"]}
    leaked, near = sorted(pd.read_csv(analysis / s / "samples.csv")["image_id"])[:2]
    pd.DataFrame([(train[0]["id"], "train", leaked, "val", "exact_bytes", 0.0),
                  (train[1]["id"], "train", near, "val", "near_latent", 0.004)],
                 columns=report_inputs.PAIR_COLUMNS).to_csv(analysis / s / "duplicates.csv",
                                                            index=False)
    summary = json.loads((analysis / s / "summary.json").read_text())
    summary["duplicates"]["by_kind_and_split"] = pair_counts(exact_bytes=(0, 0, 1),
                                                             near_latent=(0, 0, 1))
    (analysis / s / "summary.json").write_text(json.dumps(summary))
    found = json.loads((analysis / s / "insights.json").read_text())
    found.append(insights.record("leak", "1 val image with a copy among the training images "
                                 "(pairs: 1 same bytes)", [leaked], evidence={"pairs": [
                                     {"image_id_a": train[0]["id"], "image_id_b": leaked,
                                      "kind": "exact_bytes", "distance": 0.0}]}))
    (analysis / s / "insights.json").write_text(json.dumps(found))
    metrics = json.loads((root / "metrics" / f"{s}.json").read_text())
    free = {k: metrics[k] for k in ("miou", "pixel_accuracy", "pixel_accuracy_with_ignore",
                                    "mean_class_accuracy", "fw_iou", "iou", "interval")}
    free.update(miou=0.125, images=metrics["images"] - 1, excluded_image_ids=[leaked])
    (analysis / s / "leak_free_metrics.json").write_text(json.dumps(free))
    out = tmp_path / "index.html"
    args = stage_args(root, analysis=analysis, out=out)
    assert report.main(cli_argv(root / "params.yaml", args)) == 0
    html = out.read_text(encoding="utf-8")
    block = _duplicates_of(html, s)
    width = params["report"]["sample_thumbnail_px"]
    thumb = lambda entry: report.photo_thumbnail(raw / entry["path"], width)  # noqa: E731
    assert _pairs_on(block) == [
        ("train-val", "exact_bytes", [(thumb(train[0]), f"train image {train[0]['id']} ({s})"),
                                      (thumb(val[leaked]), f"val image {leaked} ({s})")],
         f"train {train[0]['id']} val {leaked} leak train-val, same bytes: identical"),
        ("train-val", "near_latent", [(thumb(train[1]), f"train image {train[1]['id']} ({s})"),
                                      (thumb(val[near]), f"val image {near} ({s})")],
         f"train {train[1]['id']} val {near} train-val, near in the latent space: cosine "
         "distance 0.004")]
    rows = Page.parse(block).tables["leak-free-0"]
    assert rows[0] == ["score", f"all {metrics['images']} val images",
                       f"without the 1 leaked ({metrics['images'] - 1} images)"]
    lo, hi = metrics["interval"]["miou"]
    assert rows[1] == ["mIoU", f"{metrics['miou']:.3f} ({lo:.3f} to {hi:.3f})",
                       f"0.125 ({lo:.3f} to {hi:.3f})"]
    assert "1 val image of " + s + " has a copy among the training images." in _visible(block)
    # the metrics file without its record, or the record without its file: one line each
    (analysis / s / "leak_free_metrics.json").unlink()
    assert report.main(cli_argv(root / "params.yaml", args)) == 2
    path = analysis / s / "leak_free_metrics.json"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"{path}: missing, but insights.json beside it has a leak record (1 val image); "
        "re-run analyze"]


@pytest.mark.parametrize("change, problem", [
    (lambda d: d.pop("by_kind_and_split"),
     "duplicates.by_kind_and_split.exact_bytes.train-train: expected a count of pairs, found "
     "null"),
    (lambda d: d["by_kind_and_split"]["near_hash"].update({"val-val": -1}),
     "duplicates.by_kind_and_split.near_hash.val-val: expected a count of pairs, found -1"),
    (lambda d: d["by_kind_and_split"]["near_latent"].update({"train-val": "2"}),
     'duplicates.by_kind_and_split.near_latent.train-val: expected a count of pairs, found "2"'),
    (lambda d: d["by_kind_and_split"].update({"exact_pixels": [0, 0, 0]}),
     "duplicates.by_kind_and_split.exact_pixels.train-train: expected a count of pairs, found "
     "null"),
    (lambda d: d["by_kind_and_split"]["exact_pixels"].update({"train-val": 7}),
     None),
])
def test_duplicate_counts_that_do_not_fit_duplicates_csv_are_refused(pipeline, tmp_path, caplog,
                                                                      change, problem):
    """analyze's summary.json counts the pairs of duplicates.csv beside it: a missing or
    non-count cell, or counts whose sum is not the file's rows (of another run), is one
    error line naming the file and the key, and no page is written."""
    root, params = pipeline["root"], pipeline["params"]
    s = next(iter(params["schemes"]))
    analysis = tmp_path / "analysis"
    shutil.copytree(root / "analysis", analysis)
    path = analysis / s / "summary.json"
    summary = json.loads(path.read_text())
    rows = len(pd.read_csv(analysis / s / "duplicates.csv"))
    change(summary["duplicates"])
    path.write_text(json.dumps(summary))
    out = tmp_path / "index.html"
    assert report.main(cli_argv(root / "params.yaml", stage_args(root, analysis=analysis,
                                                                 out=out))) == 2
    problem = problem or (f"duplicates.by_kind_and_split counts {rows + 7} pairs but "
                          f"duplicates.csv beside it has {rows} row{'' if rows == 1 else 's'}: "
                          "the two are of different runs")
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"{path}: {problem}; re-run analyze"]
    assert not out.exists()
