"""report: the pure core on small synthetic schemes, and the whole stage on real pipeline
outputs (the embedded COCO sample run through every stage at tiny size, once per session)."""
from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, SAMPLE, small_params
from stages import report
from stages.lib.cli import StageError

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
    m, model, pred = root / "data" / "masks" / s, root / "models" / s, root / "predictions" / s
    masks.run(params, s, raw, m)
    train.run(params, s, raw, m, model, live=root / "metrics" / "train" / s)
    infer.run(params, model, raw, m, pred)
    evaluate.run(params, s, pred / "val", m / "val", root / "metrics" / f"{s}.json",
                 root / "metrics" / f"{s}.confusion.csv")
    analyze.run(params, pred, m, model, raw, root / "analysis" / s)
compare.run(params, root / "analysis", root / "compare")
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
    """The report rendered through the CLI, as a user (or DVC/Snakemake) runs it."""
    if "rendered" not in _BUILT:
        inputs = build_pipeline(tmp_path_factory)
        args = inputs["args"]
        assert report.main(cli_argv(inputs["root"] / "params.yaml", args)) == 0
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
        self._table: str | None = None
        self._cell: list[str] | None = None

    @classmethod
    def parse(cls, html: str) -> "Page":
        page = cls()
        page.feed(html)
        page.close()
        return page

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table" and attrs.get("id"):
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def all_text(self) -> str:
        return " ".join("".join(self.text).split())


def rows_by_label(table: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in table if len(row) > 1}


# ---------------------------------------------------------------- pure core, synthetic

def synthetic_scheme(name: str, classes: list[str], ious: list[float | None], seed: int = 0,
                     claims: dict | None = None) -> report.Scheme:
    rng = np.random.default_rng(seed)
    names = ["background", *classes]
    n = 8
    stems = [f"{i:012d}" for i in range(n)]
    samples = pd.DataFrame({
        "stem": stems, "file_name": [f"{s}.jpg" for s in stems],
        "loss": rng.uniform(0.2, 1.5, n), "pixel_accuracy": rng.uniform(0.5, 1, n),
        "x": rng.normal(size=n), "y": rng.normal(size=n), "cluster": np.arange(n) % 2,
        "background_fraction": rng.uniform(0, 1, n), "is_grayscale": np.arange(n) % 3 == 0,
        **{f"iou_{c}": rng.uniform(0, 1, n) for c in names}})
    bins = pd.DataFrame([{"field": f, "bin": b, "low": b / 2, "high": (b + 1) / 2,
                          "count": 4, "mean_loss": 0.5 + b * (0.3 if f == "brightness" else 0.1)}
                         for f in ("brightness", "is_grayscale", "width") for b in range(2)])
    curve = pd.DataFrame({"epoch": [1, 2], "value": [1.0, 0.8]})
    return report.Scheme(
        name=name, class_names=names,
        claims=claims or {c: {"categories": [c]} for c in classes},
        metrics={"miou": 0.4, "pixel_accuracy": 0.8, "pixel_accuracy_with_ignore": 0.7,
                 "mean_class_accuracy": 0.5, "fw_iou": 0.6, "images": n,
                 "iou": dict(zip(names, ious))},
        confusion=rng.integers(0, 1000, (len(names), len(names))),
        curves={"train_loss": curve, "val_loss": curve, "val_miou": curve},
        timing={"images": n, "device": "cpu", "batch_size": 4, "wall_s": 1.0,
                "throughput_img_s": 8.0,
                "latency_ms": {"total": 800.0, "mean": 100.0, "variance": 4.0, "median": 99.0}},
        samples=samples,
        clusters=pd.DataFrame({"cluster": [0, 1], "size": [4, 4], "mean_loss": [0.5, 0.7],
                               "mean_pixel_accuracy": [0.8, 0.7], "grayscale_share": [0.5, 0.0],
                               **{f"mean_iou_{c}": [0.1, 0.2] for c in names}}),
        metadata_loss=bins)


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


def test_verdicts_name_the_higher_scheme_and_flag_differently_defined_classes():
    a = synthetic_scheme("person_car", ["person", "car"], [0.9, 0.309, 0.262],
                         claims={"person": {"categories": ["person"]},
                                 "car": {"categories": ["car"]}})
    b = synthetic_scheme("person_vehicle", ["person", "vehicle"], [0.9, 0.319, 0.312],
                         claims={"person": {"categories": ["person"]},
                                 "vehicle": {"supercategories": ["vehicle"]}})
    background, person = report.verdicts([a, b])
    assert person == ("person: person_vehicle is higher than person_car by 0.010 IoU "
                      "(0.319 vs 0.309).")
    assert background.startswith(
        "background: person_car and person_vehicle score the same IoU (0.900)")
    assert "define this class differently" in background
    assert "differently" not in person
    assert "undefined in b" in report.verdict("x", [("a", 0.5), ("b", None)], True)


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


TRAINING = {"model": {"encoder_weights": "imagenet"}, "train": {"epochs": 20, "image_size": 128}}


def test_caveats_say_when_numbers_cannot_be_compared_with_the_study():
    scratch = {"model": {"encoder_weights": "none"}, "train": {"epochs": 3, "image_size": 64}}
    notes = " ".join(report.training_caveats(scratch, 80))
    assert "from scratch" in notes and "80 training images for 3 epochs at 64 px" in notes
    assert "not comparable with the study" in notes
    assert report.training_caveats(TRAINING, 82783) == []
    assert "20 epochs" in " ".join(report.training_caveats(TRAINING, 800))


def test_render_escapes_scheme_and_class_names():
    evil = synthetic_scheme(EVIL, [EVIL], [0.5, 0.25])
    plain = synthetic_scheme("plain", ["person"], [0.5, 0.2])
    params = {"report": {"title": EVIL, "thumbnail_px": 64}, "analyze": {"projection": "pca"},
              **TRAINING}
    provenance = {"git": {"commit": None, "dirty": None}, "date": "d", "versions": [("x", "1")],
                  "params_yaml": EVIL, "data": {"base_url": EVIL, "year": 2017, "seed": 0,
                                                "sha256": None, "images": {"val": 8}},
                  "models": [{"scheme": EVIL, "device": "cpu", "sha256": None}]}
    html = report.render(report.build_context(params, [evil, plain], provenance, []))
    assert "<script" not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 8
    page = Page.parse(html)
    table = page.tables["comparison-table"]
    assert table[0][:3] == ["class / score", EVIL, "plain"]
    assert EVIL in rows_by_label(table)


def synthetic_page(schemes: list[report.Scheme]) -> Page:
    params = {"report": {"title": "t", "thumbnail_px": 64}, "analyze": {"projection": "pca"},
              **TRAINING}
    provenance = {"git": {"commit": "abc1234", "dirty": False}, "date": "d", "versions": [],
                  "params_yaml": "", "data": {"base_url": "x", "year": 2017, "seed": 0,
                                              "sha256": None, "images": {}},
                  "models": []}
    return Page.parse(report.render(report.build_context(params, schemes, provenance, [])))


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
    with pytest.raises(Exception, match="undefined"):
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
    for name in classes:
        for i, s in enumerate(schemes):
            expected = (report.format_number(metrics[s]["iou"][name])
                        if name in metrics[s]["iou"] else "not a class")
            assert rows[name][i] == expected, (name, s)
    person = [metrics[s]["iou"]["person"] for s in schemes]
    if None not in person:
        assert rows["person"][2] == report.format_signed(person[1] - person[0])
    assert rows["car"][2] == rows["vehicle"][2] == ""
    for key, label in report.SUMMARY_METRICS:
        assert rows[label][:2] == [report.format_number(metrics[s][key]) for s in schemes]


def test_escapes_the_title_everywhere(rendered):
    html = rendered["html"]
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert rendered["page"].all_text().startswith(TITLE)
    assert f"<title>{TITLE}" not in html


def test_page_is_self_contained(rendered):
    tags = rendered["page"].tags
    images = [attrs for tag, attrs in tags if tag == "img"]
    examples = rendered["params"]["report"]["n_examples"]
    n_schemes = len(rendered["params"]["schemes"])
    # confusion x2, curves, population x2, metadata charts, example image + GT + prediction
    assert len(images) >= 2 * n_schemes + 1 + examples * (1 + 2 * n_schemes)
    assert all(re.fullmatch(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+", a["src"])
               for a in images)
    links = [v for _, attrs in tags for k, v in attrs.items() if k in ("src", "href", "srcset")]
    assert all(v.startswith(("data:", "#")) for v in links), links
    assert not [tag for tag, _ in tags if tag in ("script", "link", "iframe", "object")]
    assert "url(" not in rendered["html"] and "@import" not in rendered["html"]


def test_sections_toc_timing_and_examples(rendered):
    page, params, root = rendered["page"], rendered["params"], rendered["root"]
    headings = [t for t in re.findall(r"<h2>(.*?)</h2>", rendered["html"])]
    assert headings == ["1. Provenance", "2. Scheme comparison", "3. Inference timing",
                        "4. Population map", "5. Metadata vs loss", "6. Examples",
                        "7. Label issues", "8. Scheme differences"]
    ids = {attrs["id"] for _, attrs in page.tags if "id" in attrs}
    anchors = [attrs["href"][1:] for tag, attrs in page.tags
               if tag == "a" and attrs.get("href", "").startswith("#")]
    assert len(anchors) >= 6 and set(anchors) <= ids
    timing = rows_by_label(page.tables["timing-table"])
    for s in params["schemes"]:
        t = json.loads((root / "predictions" / s / "timing.json").read_text())
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
        src = pipeline["root"] / "predictions" / s
        (predictions / s / "val").mkdir(parents=True)
        (predictions / s / "timing.json").write_bytes((src / "timing.json").read_bytes())
    params = copy.deepcopy(pipeline["params"])
    with pytest.raises(StageError, match=r"predictions/person_car/val/\d{12}\.png: missing"):
        report.run(params, **stage_args(pipeline["root"], predictions=predictions,
                                        out=tmp_path / "index.html"))
