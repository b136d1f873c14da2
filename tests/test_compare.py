"""compare: two schemes' analyses (made by hand here) against each other: per-image deltas,
clusters and buckets that change, label issues of one scheme only, and the stage's files."""
from __future__ import annotations

import copy
import itertools
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import adjusted_rand_score

from stages import compare
from stages.lib import bootstrap, insights
from stages.lib.cli import StageError

N = 12


def scheme_folder(root, name: str, fraction_col: str, loss, clusters, flagged_ids,
                  image_ids=None, findings=()):
    """analysis/<name>/ as analyze writes it, with only the columns compare reads, and
    `findings` as its insights.json."""
    ids = list(range(100, 100 + N)) if image_ids is None else image_ids
    folder = root / name
    folder.mkdir(parents=True)
    fraction = np.linspace(0, 1, len(ids))
    samples = pd.DataFrame({
        "image_id": ids, "file_name": [f"{i:012d}.jpg" for i in ids], "loss": loss,
        "miou": (0.9 + 0.5) / 2, "iou_background": 0.9, "iou_person": 0.5, "cluster": clusters,
        "label_quality": np.linspace(0.1, 0.9, len(ids)),
        "label_quality_rank": np.arange(1, len(ids) + 1), fraction_col: fraction,
        "brightness": np.arange(len(ids), dtype=float)})
    samples.to_csv(folder / "samples.csv", index=False)
    bins = pd.DataFrame({"binning": "equal_width", "field": fraction_col, "bin": [0, 1],
                         "low": [0.0, 0.5], "high": [0.5, 1.0]})
    bins.to_csv(folder / "metadata_loss.csv", index=False)
    pd.DataFrame({"image_id": ids, "flagged": [i in flagged_ids for i in ids]}).to_csv(
        folder / "label_issues.csv", index=False)
    (folder / "insights.json").write_text(insights.to_json(list(findings)))
    return folder


@pytest.fixture
def two_schemes(tmp_path, params):
    # person_vehicle is worse than person_car on the images with fraction >= .5 (the last 6)
    base = np.full(N, 1.0) + np.tile([0.0, 0.02], N // 2)
    worse = base + np.where(np.arange(N) >= 6, 0.5, 0.0) + np.tile([0.01, -0.01], N // 2)
    scheme_folder(tmp_path / "analysis", "person_car", "car_fraction", base,
                  [0] * 6 + [1] * 6, {100, 101})
    scheme_folder(tmp_path / "analysis", "person_vehicle", "vehicle_fraction", worse,
                  [0, 1] * 6, {101, 111}, image_ids=list(range(100, 100 + N)))
    return tmp_path, params


def test_deltas_clusters_buckets_and_issues(two_schemes):
    root, params = two_schemes
    doc = compare.run(params, root / "analysis", root / "compare")
    out = root / "compare"
    assert sorted(p.name for p in out.iterdir()) == ["buckets.csv", "clusters.csv",
                                                    "insights.json", "label_issues.csv",
                                                    "samples.csv", "summary.json"]
    samples = pd.read_csv(out / "samples.csv")
    delta = samples["delta_loss_person_vehicle_vs_person_car"]
    np.testing.assert_allclose(delta, samples["loss_person_vehicle"] - samples["loss_person_car"])
    assert "delta_iou_person_person_vehicle_vs_person_car" in samples.columns
    assert "delta_iou_car_person_vehicle_vs_person_car" not in samples.columns  # not shared
    assert (samples["delta_miou_person_vehicle_vs_person_car"] == 0).all()
    clusters = pd.read_csv(out / "clusters.csv")
    top = clusters.iloc[0]
    # person_car's cluster 1 holds exactly the images that got worse: it changes most
    assert (top["clusters_of"], top["cluster"], top["images"]) == ("person_car", 1, 6)
    assert top["mean_delta_loss"] == pytest.approx(0.5, abs=0.02) and top["significant"]
    other = clusters[(clusters["clusters_of"] == "person_car") & (clusters["cluster"] == 0)]
    assert not other["significant"].iloc[0]
    bucket_rows = pd.read_csv(out / "buckets.csv")
    hot = bucket_rows.iloc[0]
    assert (hot["field"], hot["bin"], hot["images"]) in {("car_fraction", 1, 6),
                                                         ("vehicle_fraction", 1, 6)}
    assert hot["significant"] and hot["mean_delta_loss"] == pytest.approx(0.5, abs=0.02)
    issues = pd.read_csv(out / "label_issues.csv")
    assert issues.set_index("image_id")["only_in"].fillna("").to_dict() == {
        100: "person_car", 111: "person_vehicle", 101: ""}
    [pair] = doc["pairs"]
    assert (pair["a"], pair["b"], pair["images"]) == ("person_car", "person_vehicle", N)
    assert pair["label_issues_only_in"] == {"person_car": 1, "person_vehicle": 1}
    assert pair["loss"]["mean_delta_loss"] == pytest.approx(0.25, abs=0.01)
    assert -1 <= pair["cluster_agreement_ari"] <= 1
    # the fixture's clusterings: [0]*6 + [1]*6 against [0, 1]*6. By hand: a 2x2 table of 3s,
    # index 4*C(3,2) = 12, expected C(6,2)^2*2*2/C(12,2) = 150/11, max 30:
    # ARI = (12 - 150/11) / (30 - 150/11) = -0.1. sklearn agrees on the same labels.
    assert pair["cluster_agreement_ari"] == pytest.approx(-0.1, abs=1e-12)
    assert pair["cluster_agreement_ari"] == pytest.approx(
        adjusted_rand_score([0] * 6 + [1] * 6, [0, 1] * 6), abs=1e-12)
    # the fixture's known difference (worse = base + this): +0.5 on the last 6 images, and
    # +0.01/-0.01 alternating on all 12
    known = [0.01, -0.01] * 3 + [0.51, 0.49] * 3
    np.testing.assert_allclose(samples.sort_values("image_id")[
        "delta_loss_person_vehicle_vs_person_car"], known, atol=1e-12)
    json.loads((out / "summary.json").read_text(), parse_constant=lambda c: 1 / 0)


def test_samples_table_columns_and_ids_as_written(two_schemes):
    """samples.csv as text: the image ids as integers (COCO's), the file name once (from the
    first scheme), each scheme's columns (its classes' IoU where analyze wrote one: no
    iou_car or iou_vehicle in this fixture) in params order, then b - a for the pair."""
    root, params = two_schemes
    compare.run(params, root / "analysis", root / "compare")
    samples = pd.read_csv(root / "compare" / "samples.csv", dtype=str)
    per_scheme = lambda s: [f"loss_{s}", f"miou_{s}", f"iou_background_{s}",  # noqa: E731
                            f"iou_person_{s}", f"cluster_{s}", f"label_quality_{s}",
                            f"label_quality_rank_{s}", f"flagged_{s}"]
    pair = "person_vehicle_vs_person_car"
    assert list(samples.columns) == [
        "image_id", "file_name", *per_scheme("person_car"), *per_scheme("person_vehicle"),
        f"delta_loss_{pair}", f"delta_miou_{pair}", f"delta_iou_background_{pair}",
        f"delta_iou_person_{pair}"]
    assert samples["image_id"].tolist() == [str(i) for i in range(100, 100 + N)]
    assert samples["file_name"].tolist() == [f"{i:012d}.jpg" for i in range(100, 100 + N)]
    issues = pd.read_csv(root / "compare" / "label_issues.csv", dtype=str)
    assert issues["image_id"].tolist() == ["111", "100", "101"]
    # the values carried over (scheme_folder's), and the IoU deltas from them
    values = pd.read_csv(root / "compare" / "samples.csv")
    assert (values["iou_person_person_car"] == 0.5).all()
    assert (values["iou_background_person_vehicle"] == 0.9).all()
    np.testing.assert_allclose(values["label_quality_person_car"], np.linspace(0.1, 0.9, N))
    assert values["label_quality_rank_person_vehicle"].tolist() == list(range(1, N + 1))
    assert (values[f"delta_iou_person_{pair}"] == 0).all()


def test_iou_deltas_need_the_class_in_both_tables_and_ids_must_be_unique(two_schemes):
    """A delta per shared class whose IoU column both analyses wrote: person_vehicle's
    person IoU raised to 0.75 gives +0.25; with person_car's person column gone, no person
    delta (and no error). An image listed twice is refused in one line naming the file and
    the id."""
    root, params = two_schemes
    path = root / "analysis" / "person_vehicle" / "samples.csv"
    table = pd.read_csv(path)
    table["iou_person"] = 0.75
    table.to_csv(path, index=False)
    compare.run(params, root / "analysis", root / "compare")
    samples = pd.read_csv(root / "compare" / "samples.csv")
    pair = "person_vehicle_vs_person_car"
    assert (samples[f"delta_iou_person_{pair}"] == 0.25).all()
    assert (samples[f"delta_iou_background_{pair}"] == 0).all()
    car = root / "analysis" / "person_car" / "samples.csv"
    pd.read_csv(car).drop(columns="iou_person").to_csv(car, index=False)
    compare.run(params, root / "analysis", root / "compare")
    columns = pd.read_csv(root / "compare" / "samples.csv").columns
    assert "iou_person_person_vehicle" in columns and f"delta_iou_person_{pair}" not in columns
    pd.concat([table, table.iloc[[3]]]).to_csv(path, index=False)
    with pytest.raises(StageError) as caught:
        compare.run(params, root / "analysis", root / "compare")
    assert str(caught.value) == (f"{path}: image_id 103 is listed more than once (each image "
                                 "has one row); re-run analyze")


def test_an_image_listed_twice_is_refused_in_one_line(tmp_path, params, caplog):
    """In the first scheme's file (the merge's left side) as in the second's, and with one
    scheme, where nothing is merged: exit 2, one line from the compare logger naming the
    file and the first repeated id, nothing written."""
    ids = [100, 101, 102, 101, 102, 105, 106, 107, 108, 109, 110, 111]
    scheme_folder(tmp_path / "analysis", "person_car", "car_fraction", np.ones(N), [0] * N,
                  set(), image_ids=ids)
    scheme_folder(tmp_path / "analysis", "person_vehicle", "vehicle_fraction", np.ones(N),
                  [0] * N, set())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(tmp_path / "params.yaml"), "--analysis", str(tmp_path / "analysis"),
            "--out", str(tmp_path / "compare")]
    assert compare.main(argv) == 2
    path = tmp_path / "analysis" / "person_car" / "samples.csv"
    assert caplog.record_tuples == [("compare", logging.ERROR, (
        f"{path}: image_id 101 is listed more than once (each image has one row); "
        "re-run analyze"))]
    assert not (tmp_path / "compare").exists()
    params["schemes"] = {"person_car": params["schemes"]["person_car"]}
    with pytest.raises(StageError, match=r"person_car/samples\.csv: image_id 101 is listed"):
        compare.run(params, tmp_path / "analysis", tmp_path / "compare")


@pytest.mark.parametrize("table, bad, shown", [
    ("samples.csv", "abc", "'abc'"), ("samples.csv", "101.5", "'101.5'"),
    ("samples.csv", "", "''"), ("samples.csv", "-3", "'-3'"),
    ("label_issues.csv", "x7", "'x7'")])
def test_an_image_id_that_is_no_coco_id_is_refused_in_one_line(tmp_path, params, caplog,
                                                               table, bad, shown):
    """A non-numeric, fractional, empty or negative image_id in samples.csv or
    label_issues.csv: exit 2 and one line naming the file and the value, not a pandas
    traceback from casting it, and nothing written. Ids written as 101.0 are the same id."""
    for name in ("person_car", "person_vehicle"):
        scheme_folder(tmp_path / "analysis", name, "car_fraction", np.ones(N), [0] * N, {101})
    path = tmp_path / "analysis" / "person_vehicle" / table
    rows = pd.read_csv(path, dtype=str)
    rows.loc[1, "image_id"] = bad
    rows.to_csv(path, index=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(tmp_path / "params.yaml"), "--analysis", str(tmp_path / "analysis"),
            "--out", str(tmp_path / "compare")]
    assert compare.main(argv) == 2
    assert caplog.record_tuples == [("compare", logging.ERROR, (
        f"{path}: image_id {shown} is not a COCO image id (expected a whole number >= 0); "
        "re-run analyze"))]
    assert not (tmp_path / "compare").exists()
    rows.loc[1, "image_id"] = "101.0"
    rows.to_csv(path, index=False)
    assert compare.main(argv) == 0
    written = pd.read_csv(tmp_path / "compare" / "samples.csv")
    assert written["image_id"].tolist() == list(range(100, 100 + N))
    assert written.loc[written["flagged_person_vehicle"], "image_id"].tolist() == [101]
    if table == "samples.csv":
        # 101.0 and 101 are one id: refused as listed twice, and named as the int it is
        rows.loc[2, "image_id"] = "101"
        rows.to_csv(path, index=False)
        caplog.clear()
        assert compare.main(argv) == 2
        assert caplog.record_tuples == [("compare", logging.ERROR, (
            f"{path}: image_id 101 is listed more than once (each image has one row); "
            "re-run analyze"))]


def test_image_id_0_is_an_id():
    """The check takes every whole number >= 0, 0 included (the error says so)."""
    ids = compare._image_ids(pd.Series(["0", "7", "12.0"]), Path("s.csv"))
    assert ids.tolist() == [0, 7, 12] and ids.dtype == "int64"


def test_joined_samples_itself_refuses_an_image_twice():
    """read_scheme refuses a repeated id before joining; the pure core keeps its own check
    (pandas' one-to-one merge) for any other caller, on either side of the merge."""
    def table(ids):
        return pd.DataFrame({"image_id": ids, "loss": 1.0, "miou": 0.5, "cluster": 0,
                             "label_quality": 0.5, "label_quality_rank": 1})

    classes = {"a": ["background"], "b": ["background"]}
    flagged = {"a": set(), "b": set()}
    for ids_a, ids_b in (([1, 2, 2], [1, 2]), ([1, 2], [1, 1, 2])):
        with pytest.raises(pd.errors.MergeError, match="not a one-to-one merge"):
            compare.joined_samples({"a": table(ids_a), "b": table(ids_b)}, flagged, classes)


def test_only_shared_images_are_compared(tmp_path, params):
    scheme_folder(tmp_path / "analysis", "person_car", "car_fraction", np.ones(N),
                  [0, 1] * 6, set())
    scheme_folder(tmp_path / "analysis", "person_vehicle", "vehicle_fraction", np.ones(N),
                  [0, 1] * 6, set(), image_ids=list(range(106, 106 + N)))
    compare.run(params, tmp_path / "analysis", tmp_path / "compare")
    samples = pd.read_csv(tmp_path / "compare" / "samples.csv")
    assert samples["image_id"].tolist() == list(range(106, 100 + N))


def test_schemes_sharing_no_image_are_refused_and_one_empty_scheme_is_not(tmp_path, params):
    scheme_folder(tmp_path / "analysis", "person_car", "car_fraction", np.ones(N), [0, 1] * 6,
                  set())
    scheme_folder(tmp_path / "analysis", "person_vehicle", "vehicle_fraction", np.ones(N),
                  [0, 1] * 6, set(), image_ids=list(range(200, 200 + N)))
    with pytest.raises(StageError) as caught:
        compare.run(params, tmp_path / "analysis", tmp_path / "compare")
    assert str(caught.value) == (f"{tmp_path / 'analysis'}: the schemes share no val image; "
                                 "nothing to compare")
    assert not (tmp_path / "compare").exists()
    # one scheme (nothing to pair) whose analysis holds no image: empty tables, no error
    one = copy.deepcopy(params)
    del one["schemes"]["person_vehicle"]
    path = tmp_path / "analysis" / "person_car" / "samples.csv"
    pd.read_csv(path).iloc[:0].to_csv(path, index=False)
    doc = compare.run(one, tmp_path / "analysis", tmp_path / "compare")
    assert doc["pairs"] == [] and pd.read_csv(tmp_path / "compare" / "samples.csv").empty


def test_analyses_linked_from_a_cache_are_read(two_schemes, tmp_path):
    """DVC may link a stage's inputs into its cache: analysis/<scheme> pointing elsewhere is
    followed (inside() by the path's text). The summary names the run's compare settings."""
    root, params = two_schemes
    linked = tmp_path / "linked"
    linked.mkdir()
    for scheme in ("person_car", "person_vehicle"):
        (linked / scheme).symlink_to(root / "analysis" / scheme)
    doc = compare.run(params, linked, tmp_path / "compare")
    assert doc["pairs"][0]["images"] == N
    assert doc["significance"] == {"fdr": 0.1, "min_count": 3,
                                   "test": compare.SIGNIFICANCE_TEST}


def test_one_scheme_writes_tables_without_pairs(tmp_path, params):
    params = copy.deepcopy(params)
    del params["schemes"]["person_vehicle"]
    scheme_folder(tmp_path / "analysis", "person_car", "car_fraction", np.ones(N), [0] * N,
                  {100}, findings=[insights.record("weak_segment", "s", [100, 101], 1.0)])
    doc = compare.run(params, tmp_path / "analysis", tmp_path / "compare")
    assert doc["pairs"] == [] and doc["scheme_changes"] == 0
    assert (tmp_path / "compare" / "insights.json").read_text() == "[]\n"


def _finding(kind: str, ids, title: str, effect: float) -> dict:
    return insights.record(kind, title, ids, effect=effect, interval=[effect / 2, effect * 2],
                           q_value=0.01, evidence={"cluster": 0})


def test_findings_of_one_scheme_only_are_scheme_changes(tmp_path, params):
    """person_car's low-performance cluster (images 100-105) has a counterpart under
    person_vehicle (100-104: Jaccard 5/6); its weak segment (106-111) has none (the other
    scheme's segment shares 106 and 107 only: 2/6 < 0.5), nor has person_vehicle's
    out-of-distribution image. Each becomes one scheme_change record, ranked by its score,
    carrying the finding's effect, interval and q-value."""
    car = [_finding("low_performance", range(100, 106), "cluster 0 of person_car", 1.0),
           _finding("weak_segment", range(106, 112), "segment of person_car", 0.5)]
    vehicle = [_finding("low_performance", range(100, 105), "cluster 3 of person_vehicle", 1.0),
               _finding("weak_segment", [106, 107], "segment of person_vehicle", 0.5),
               _finding("out_of_distribution", [111], "far of person_vehicle", 2.0)]
    scheme_folder(tmp_path / "analysis", "person_car", "car_fraction", np.ones(N), [0] * N,
                  set(), findings=car)
    scheme_folder(tmp_path / "analysis", "person_vehicle", "vehicle_fraction", np.ones(N),
                  [0] * N, set(), findings=vehicle)
    doc = compare.run(params, tmp_path / "analysis", tmp_path / "compare")
    written = json.loads((tmp_path / "compare" / "insights.json").read_text())
    assert [(r["type"], r["evidence"]["scheme"], r["evidence"]["finding_type"], r["image_ids"],
             r["score"]) for r in written] == [
        ("scheme_change", "person_car", "weak_segment", list(range(106, 112)), 3.0),
        ("scheme_change", "person_vehicle", "out_of_distribution", [111], 2.0),
        ("scheme_change", "person_vehicle", "weak_segment", [106, 107], 1.0)]
    assert written[0]["evidence"] == {"scheme": "person_car", "other": "person_vehicle",
                                      "finding_type": "weak_segment",
                                      "closest_jaccard": pytest.approx(2 / 6)}
    assert (written[0]["effect"], written[0]["interval"], written[0]["q_value"]) == (
        0.5, [0.25, 1.0], 0.01)
    assert written[0]["title"].startswith("Under person_car, not under person_vehicle: "
                                          "segment of person_car")
    assert doc["scheme_changes"] == 3


def test_missing_or_damaged_insights_are_named(two_schemes):
    root, params = two_schemes
    path = root / "analysis" / "person_vehicle" / "insights.json"
    path.unlink()
    with pytest.raises(StageError, match=rf"^{path}: missing \(run the analyze stage first\)$"):
        compare.run(params, root / "analysis", root / "compare")
    path.write_text('[{"type": "leak"}]')
    with pytest.raises(StageError, match=rf"^{path}: record 0 has no title, image_ids, size, "
                                         r"effect, interval, q_value, score, evidence; "
                                         r"re-run analyze$"):
        compare.run(params, root / "analysis", root / "compare")
    # not JSON; JSON but no list of records (a list of texts, an object)
    path.write_text('[{"type": ')
    with pytest.raises(StageError, match=rf"^{path}: not JSON \(Expecting value: line 1 "
                                         r"column 11 \(char 10\)\); re-run analyze$"):
        compare.run(params, root / "analysis", root / "compare")
    for document in ('["type", "title"]', '{"type": "leak"}'):
        path.write_text(document)
        with pytest.raises(StageError, match=rf"^{path}: not a list of insight records; "
                                             r"re-run analyze$"):
            compare.run(params, root / "analysis", root / "compare")
    assert not (root / "compare").exists()


def test_missing_analysis_is_named(tmp_path, params, caplog):
    scheme_folder(tmp_path / "analysis", "person_car", "car_fraction", np.ones(N), [0] * N,
                  set())
    with pytest.raises(StageError, match=r"person_vehicle/samples\.csv: missing"):
        compare.run(params, tmp_path / "analysis", tmp_path / "compare")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = compare.main(["--params", str(tmp_path / "params.yaml"), "--analysis",
                         str(tmp_path / "analysis"), "--out", str(tmp_path / "compare")])
    assert code == 2 and "run the analyze stage first" in caplog.text
    assert not (tmp_path / "compare").exists()


def test_help_names_the_command_its_description_and_required_options(capsys, monkeypatch):
    """The command line as the README and dvc.yaml spell it (python -m stages.compare), the
    docstring's first sentence, whole, as the description (wide enough not to wrap);
    --analysis and --out are required, and argparse says so (exit 2) before anything runs."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as shown:
        compare.main(["--help"])
    out = capsys.readouterr().out
    assert shown.value.code == 0
    assert out.startswith("usage: python -m stages.compare [-h] --params PARAMS --analysis "
                          "ANALYSIS")
    assert out.split("\n\n")[1] == ("compare: the label schemes against each other, on the "
                                    "val images they share.")
    with pytest.raises(SystemExit) as refused:
        compare.main(["--params", "p.yaml"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: the following arguments are required: --analysis, --out\n")


def test_main_with_metrics_writes_the_differences_and_logs_as_compare(two_schemes, tmp_path,
                                                                      caplog):
    """main() end to end with --metrics (hand-made per_image.npz files, see
    per_image_files): summary.json gets the pair's person IoU difference, whose value and
    interval are computed by hand there; a failure is one line from the 'compare' logger."""
    root, params = two_schemes
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    metrics = per_image_files(tmp_path / "metrics")
    argv = ["--params", str(root / "params.yaml"), "--analysis", str(root / "analysis"),
            "--metrics", str(metrics), "--out", str(root / "compare")]
    assert compare.main(argv) == 0
    doc = json.loads((root / "compare" / "summary.json").read_text())
    assert doc["seeds"] == {"seeds": [0], "training_noise_measured": False}
    assert doc["bootstrap"] == {"samples": 1000, "confidence": 0.95, "seed": 0, "method":
                                "percentile bootstrap over val images, paired across schemes"}
    [pair] = doc["pairs"]
    assert pair["classes"]["person"]["delta_iou"] == pytest.approx(0.2, abs=1e-12)
    assert pair["images"] == N            # the analysis' images, not the npz's
    # an output folder that is a file: refused before any work, by the 'compare' logger
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    caplog.clear()
    assert compare.main(argv[:-1] + [str(blocked / "compare")]) == 2
    assert caplog.record_tuples == [(
        "compare", logging.ERROR, f"{blocked}: output folder not writable, compare cannot be "
        "written there (a file, not a folder)")]
    # two seeds: training noise is measured
    per_image_files(tmp_path / "metrics", seeds=2)
    doc = compare.run(params, root / "analysis", root / "compare", tmp_path / "metrics")
    assert doc["seeds"] == {"seeds": [0, 1], "training_noise_measured": True}


@pytest.mark.parametrize("column", ["label_quality", "miou"])
def test_analysis_without_a_column_is_refused(two_schemes, column):
    """An older analysis (no label_quality) or one from before infer wrote miou."""
    root, params = two_schemes
    path = root / "analysis" / "person_car" / "samples.csv"
    pd.read_csv(path).drop(columns=column).to_csv(path, index=False)
    with pytest.raises(StageError, match=f"missing columns {column}; re-run analyze"):
        compare.run(params, root / "analysis", root / "compare")


# ---------------------------------------------------------------- the pure core by hand

def test_group_change_by_hand():
    """Deltas 1, 2, 3 (and one missing): mean 2, sample sd 1, standard error 1/sqrt(3),
    z = 2 sqrt(3) = 3.46; the group means of the losses over all its rows. The two-sided
    Wilcoxon signed-rank test, exact: all three ranks positive, W+ = 6, the highest of the
    2^3 equally likely sign patterns, so p = 2 / 8 = 0.25; the same for the mirrored group."""
    delta = pd.Series([1.0, 2.0, 3.0, np.nan])
    loss_a, loss_b = pd.Series([1.0, 1.0, 1.0, 1.0]), pd.Series([2.0, 3.0, 4.0, 5.0])
    change = compare.group_change(delta, loss_a, loss_b, min_count=3)
    assert list(change) == ["images", "mean_loss_a", "mean_loss_b", "mean_delta_loss",
                            "se_delta_loss", "z", "p_value"]
    assert (change["images"], change["mean_loss_a"], change["mean_loss_b"],
            change["mean_delta_loss"]) == (3, 1.0, 3.5, 2.0)
    assert change["se_delta_loss"] == pytest.approx(1 / np.sqrt(3), rel=1e-12)
    assert change["z"] == pytest.approx(2 * np.sqrt(3), rel=1e-12)
    assert change["p_value"] == pytest.approx(0.25, rel=1e-12)
    assert np.isnan(compare.group_change(delta, loss_a, loss_b, 4)["p_value"])
    down = compare.group_change(-delta, loss_b, loss_a, 3)  # a worse group counts too
    assert down["z"] == pytest.approx(-2 * np.sqrt(3), rel=1e-12)
    assert down["p_value"] == pytest.approx(0.25, rel=1e-12)


def test_flagged_is_benjamini_hochberg_over_the_whole_table():
    """p 0.25, NaN (untested), 0.01 over two tests: q = 0.02 and min(0.25 * 2 / 2) = 0.25;
    significant where q <= fdr, the untested group never."""
    frame = pd.DataFrame({"id": [0, 1, 2], "p_value": [0.25, np.nan, 0.01]})
    out = compare._flagged(frame, 0.25)
    np.testing.assert_allclose(out["q_value"], [0.25, np.nan, 0.02], rtol=1e-12)
    assert out["significant"].tolist() == [True, False, True]
    assert compare._flagged(frame, 0.24)["significant"].tolist() == [False, False, True]
    assert list(out.columns) == ["id", "p_value", "q_value", "significant"]
    assert compare._flagged(pd.DataFrame(), 0.1).empty


def test_group_change_of_tiny_or_flat_groups_has_no_z():
    one = compare.group_change(pd.Series([0.5]), pd.Series([1.0]), pd.Series([1.5]), 2)
    assert one["images"] == 1 and one["mean_delta_loss"] == 0.5
    assert np.isnan(one["se_delta_loss"]) and np.isnan(one["z"]) and np.isnan(one["p_value"])
    flat = compare.group_change(pd.Series([1.0, 1.0]), pd.Series([1.0, 1.0]),
                                pd.Series([2.0, 2.0]), 1)
    assert flat["se_delta_loss"] == 0.0 and np.isnan(flat["z"])
    # no image changed: nothing to test
    still = compare.group_change(pd.Series([0.0, 0.0, 0.0]), pd.Series([1.0] * 3),
                                 pd.Series([1.0] * 3), 1)
    assert still["se_delta_loss"] == 0.0 and np.isnan(still["p_value"])
    none = compare.group_change(pd.Series([np.nan]), pd.Series([1.0]), pd.Series([2.0]), 0)
    assert none["images"] == 0
    assert all(np.isnan(none[k]) for k in ("mean_loss_a", "mean_loss_b", "mean_delta_loss",
                                           "se_delta_loss", "z", "p_value"))


def test_cluster_changes_by_hand():
    """Schemes p and q, four images: p's clusters 0 (images 1, 2) and 1 (3, 4), q's one
    cluster 5. With fdr 0 nothing is significant: rows by absolute mean change."""
    joined = pd.DataFrame({"image_id": [1, 2, 3, 4], "loss_p": [1.0, 2.0, 1.0, 1.0],
                           "loss_q": [1.5, 2.5, 1.25, 1.25], "cluster_p": [0, 0, 1, 1],
                           "cluster_q": [5, 5, 5, 5]})
    joined["delta_loss_q_vs_p"] = joined["loss_q"] - joined["loss_p"]
    table = compare.cluster_changes(joined, ["p", "q"], 0.0, 2)
    assert list(table.columns) == compare.CLUSTER_COLUMNS
    keys = ["a", "b", "clusters_of", "cluster", "images", "mean_loss_a", "mean_loss_b",
            "mean_delta_loss"]
    assert table[keys].values.tolist() == [["p", "q", "p", 0, 2, 1.5, 2.0, 0.5],
                                           ["p", "q", "q", 5, 4, 1.25, 1.625, 0.375],
                                           ["p", "q", "p", 1, 2, 1.0, 1.25, 0.25]]
    assert not table["significant"].any()


def test_group_change_of_two_images_has_a_z():
    """Deltas 1 and 3: mean 2, sample sd sqrt(2), standard error sqrt(2) / sqrt(2) = 1, z 2:
    two images are enough for a z (not for a p-value at min_count 3)."""
    change = compare.group_change(pd.Series([1.0, 3.0]), pd.Series([1.0, 1.0]),
                                  pd.Series([2.0, 4.0]), 3)
    assert (change["images"], change["mean_delta_loss"]) == (2, 2.0)
    assert change["se_delta_loss"] == pytest.approx(1.0, rel=1e-12)
    assert change["z"] == pytest.approx(2.0, rel=1e-12) and np.isnan(change["p_value"])


def test_ranked_orders_pairs_by_a_then_b():
    frame = pd.DataFrame({"a": ["x", "x", "w"], "b": ["z", "y", "z"], "id": [0, 1, 2],
                          "significant": False, "mean_delta_loss": [0.9, 0.1, 0.5]})
    assert compare._ranked(frame)["id"].tolist() == [2, 1, 0]


def test_ranked_puts_significant_then_biggest_changes_first_per_pair():
    frame = pd.DataFrame({"a": ["x", "x", "x", "p", "x"], "b": ["y", "y", "y", "q", "y"],
                          "id": [0, 1, 2, 3, 4], "significant": [False, True, False, False, True],
                          "mean_delta_loss": [-0.9, 0.1, 0.5, 0.0, -0.2]})
    ranked = compare._ranked(frame)
    assert ranked["id"].tolist() == [3, 4, 1, 0, 2]
    assert list(ranked.columns) == list(frame.columns) and ranked.index.tolist() == [0, 1, 2,
                                                                                      3, 4]
    assert compare._ranked(pd.DataFrame()).empty


def test_bucket_changes_by_hand():
    """Seven images, schemes p and q, each with its own bins (analyze's metadata_loss.csv),
    loss changes in binary fractions so every mean is exact. p bins brightness in three
    (5, 5, 5, 25, 25, 25, 25: the middle bin empty, no row) and car_fraction in two (the
    last image alone in the upper one); q bins a field its samples lack (skipped),
    vehicle_fraction (its bins listed out of order; the last image's value unreadable, in
    no bin), and brightness again: the same bins and changes as p's, so one row, p's. With
    fdr 0 nothing is significant: rows by absolute change, ties (0.5) in the bins' order."""
    ids = list(range(1, 8))
    loss_p = np.array([1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0])
    change = np.array([0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5])
    joined = pd.DataFrame({"image_id": ids, "loss_p": loss_p, "loss_q": loss_p + change,
                           "delta_loss_q_vs_p": change})
    brightness = [5, 5, 5, 25, 25, 25, 25]
    samples = {"p": pd.DataFrame({"image_id": ids, "brightness": brightness,
                                  "car_fraction": [0.1] * 6 + [0.9]}).iloc[::-1],
               "q": pd.DataFrame({"image_id": ids, "brightness": brightness,
                                  "vehicle_fraction": [0.1, 0.2, 0.6, 0.7, 0.8, 0.9,
                                                       "unknown"]})}
    columns = ["binning", "field", "bin", "low", "high"]
    bins_of = lambda rows: pd.DataFrame(rows, columns=columns)  # noqa: E731
    width = [("equal_width", "brightness", i, 10.0 * i, 10.0 * (i + 1)) for i in range(3)]
    bins = {"p": bins_of(width + [("equal_count", "car_fraction", 0, 0.0, 0.5),
                                  ("equal_count", "car_fraction", 1, 0.5, 1.0)]),
            "q": bins_of([("equal_width", "depth", 0, 0.0, 1.0),
                          ("equal_width", "depth", 1, 1.0, 2.0),
                          ("equal_width", "vehicle_fraction", 1, 0.5, 1.0),
                          ("equal_width", "vehicle_fraction", 0, 0.0, 0.5)] + width)}
    table = compare.bucket_changes(joined, samples, bins, ["p", "q"], fdr=0.0, min_count=3)
    assert list(table.columns) == compare.BUCKET_COLUMNS
    assert not table["significant"].any()
    keys = ["a", "b", "bins_of", "binning", "field", "bin", "low", "high", "images",
            "mean_loss_a", "mean_loss_b", "mean_delta_loss"]
    assert table[keys].values.tolist() == [
        ["p", "q", "p", "equal_width", "brightness", 2, 20.0, 30.0, 4, 1.0, 1.5, 0.5],
        ["p", "q", "p", "equal_count", "car_fraction", 1, 0.5, 1.0, 1, 1.0, 1.5, 0.5],
        ["p", "q", "q", "equal_width", "vehicle_fraction", 1, 0.5, 1.0, 4, 1.5, 1.96875,
         0.46875],
        ["p", "q", "p", "equal_count", "car_fraction", 0, 0.0, 0.5, 6, 1.5, 1.875, 0.375],
        ["p", "q", "p", "equal_width", "brightness", 0, 0.0, 10.0, 3, 2.0, 2.25, 0.25],
        ["p", "q", "q", "equal_width", "vehicle_fraction", 0, 0.0, 0.5, 2, 1.5, 1.6875,
         0.1875]]


def test_summary_lists_each_pairs_own_top_changes():
    """Three schemes: each pair's clusters_changing_most and buckets_changing_most are its
    own rows (a and b both match), the first N_TOP (5) in the tables' order; none for a
    pair without rows."""
    schemes = ["x", "y", "z"]
    joined = pd.DataFrame({"image_id": [1, 2, 3]})
    for s, loss in zip(schemes, ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.5, 1.5, 1.5])):
        joined[f"loss_{s}"], joined[f"cluster_{s}"] = loss, [0, 0, 1]
    for a, b in itertools.combinations(schemes, 2):
        joined[f"delta_loss_{b}_vs_{a}"] = joined[f"loss_{b}"] - joined[f"loss_{a}"]
        joined[f"delta_miou_{b}_vs_{a}"] = [0.25, 0.5, 0.75]
    pairs = [("x", "y")] * 7 + [("x", "z"), ("y", "z")] + [("z", "y")]
    rows = pd.DataFrame({"a": [a for a, _ in pairs], "b": [b for _, b in pairs],
                         "id": range(len(pairs))})
    issues = pd.DataFrame({"only_in": ["x", "y", "y", ""]})
    doc = compare.summary(joined, rows, rows.iloc[7:], issues, schemes, 0.1, 3)
    top = {(p["a"], p["b"]): ([r["id"] for r in p["clusters_changing_most"]],
                              [r["id"] for r in p["buckets_changing_most"]])
           for p in doc["pairs"]}
    assert top == {("x", "y"): ([0, 1, 2, 3, 4], []), ("x", "z"): ([7], [7]),
                   ("y", "z"): ([8], [8])}
    assert [p["label_issues_only_in"] for p in doc["pairs"]] == [
        {"x": 1, "y": 2}, {"x": 1, "z": 0}, {"y": 2, "z": 0}]
    assert [p["loss"]["mean_delta_loss"] for p in doc["pairs"]] == [1.0, 0.5, -0.5]
    assert [p["mean_delta_miou"] for p in doc["pairs"]] == [0.5, 0.5, 0.5]
    assert doc["schemes"] == schemes and doc["significance"] == {
        "fdr": 0.1, "min_count": 3, "test": compare.SIGNIFICANCE_TEST}


def test_issue_changes_by_hand():
    joined = pd.DataFrame({
        "image_id": [5, 3, 4, 2], "file_name": ["5.jpg", "3.jpg", "4.jpg", "2.jpg"],
        "flagged_a": [True, False, True, False], "flagged_b": [False, True, True, False],
        "label_quality_a": [0.1, 0.2, 0.3, 0.4], "label_quality_rank_a": [1, 2, 3, 4],
        "label_quality_b": [0.5, 0.6, 0.7, 0.8], "label_quality_rank_b": [4, 3, 2, 1]})
    out = compare.issue_changes(joined, ["a", "b"])
    assert out.to_dict("records") == [
        {"image_id": 3, "file_name": "3.jpg", "flagged_in": "b", "only_in": "b",
         "label_quality_a": 0.2, "label_quality_rank_a": 2, "label_quality_b": 0.6,
         "label_quality_rank_b": 3},
        {"image_id": 5, "file_name": "5.jpg", "flagged_in": "a", "only_in": "a",
         "label_quality_a": 0.1, "label_quality_rank_a": 1, "label_quality_b": 0.5,
         "label_quality_rank_b": 4},
        {"image_id": 4, "file_name": "4.jpg", "flagged_in": "a b", "only_in": "",
         "label_quality_a": 0.3, "label_quality_rank_a": 3, "label_quality_b": 0.7,
         "label_quality_rank_b": 2}]


def test_issue_changes_list_ids_in_increasing_order_within_each_group():
    """Flagged in b only: 9, 2, 7 (in the table's order) come out 2, 7, 9; no file_name
    column in, none out."""
    joined = pd.DataFrame({"image_id": [9, 2, 7, 1], "flagged_a": [False] * 4,
                           "flagged_b": [True, True, True, False],
                           "label_quality_a": 0.5, "label_quality_rank_a": 1,
                           "label_quality_b": 0.5, "label_quality_rank_b": 1})
    out = compare.issue_changes(joined, ["a", "b"])
    assert out["image_id"].tolist() == [2, 7, 9] and "file_name" not in out
    assert out["only_in"].tolist() == ["b"] * 3


def test_pair_name():
    assert compare.pair_name("person_car", "person_vehicle") == "person_vehicle_vs_person_car"


# ---------------------------------------------------------------- bootstrap differences

def test_found_share_by_hand():
    # categories: claimed by class 2, unclaimed, claimed by class 1, no pixel
    pixels = np.array([[1, 1, 2], [2, 1, 1], [3, 1, 0], [0, 0, 0]])
    share = compare.found_share(pixels, np.array([2, 0, 1, 0]))
    np.testing.assert_allclose(share, [0.5, 0.5, 0.25, np.nan])
    stacked = compare.found_share(np.stack([pixels, pixels[:, ::-1]]), np.array([2, 0, 1, 0]))
    np.testing.assert_allclose(stacked[1], [0.25, 0.75, 0.25, np.nan])


def test_found_share_of_one_pixel_categories():
    """A single pixel is a share of 1 or 0, not undefined: claimed by class 2 and predicted
    2; claimed by 2 and predicted 1; unclaimed and predicted background."""
    pixels = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(compare.found_share(pixels, np.array([2, 2, 0])),
                                  [1.0, 0.0, 0.0])


def evaluate_scheme(val_truth, scheme, pred, metrics):
    from stages import evaluate
    evaluate.run(val_truth["params"], scheme, pred, val_truth["root"] / "masks" / scheme / "val",
                 metrics / f"{scheme}.json", metrics / f"{scheme}.confusion.csv",
                 annotations=val_truth["annotations"],
                 per_image_out=metrics / f"{scheme}.per_image.npz")


def erase_person(folder, keep_every: int, phase: int = 0):
    """Predict background for person in all but every keep_every-th image (by name,
    counted from `phase`)."""
    from stages.lib.labels import read_labels, save_labels
    for i, path in enumerate(sorted(folder.glob("*.png"))):
        if (i - phase) % keep_every:
            labels = read_labels(path)
            save_labels(path, np.where(labels == 1, 0, labels).astype(np.uint8))


def test_a_planted_difference_is_found_with_its_interval(val_truth, tmp_path):
    from conftest import write_predictions
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    # person_car's model misses person in 3 of 4 images; person_vehicle's sees everything.
    # Each predicts the other scheme's classes: under person_car, trucks and buses come out
    # as class 2 (car), under person_vehicle they come out background.
    erase_person(write_predictions(val_truth, "person_vehicle", tmp_path / "a"), 4)
    write_predictions(val_truth, "person_car", tmp_path / "b")
    evaluate_scheme(val_truth, "person_car", tmp_path / "a", metrics)
    evaluate_scheme(val_truth, "person_vehicle", tmp_path / "b", metrics)
    seeds, found = compare.differences(val_truth["params"], metrics,
                                       ["person_car", "person_vehicle"])
    assert seeds == [0]
    pair = found[("person_car", "person_vehicle")]
    assert list(pair["classes"]) == ["person"]
    person = pair["classes"]["person"]
    ious = [json.loads((metrics / f"{s}.json").read_text())["iou"]["person"]
            for s in ("person_car", "person_vehicle")]
    assert (person["iou_a"], person["iou_b"]) == pytest.approx(ious, abs=1e-12)
    assert person["delta_iou"] == pytest.approx(ious[1] - ious[0], abs=1e-12)
    lo, hi = person["interval"]
    assert 0 < lo < person["delta_iou"] < hi and person["verdict"] == "higher"
    assert person["same_definition"]
    truck = pair["categories"]["truck"]
    assert (truck["claimed_by_a"], truck["claimed_by_b"]) == ("", "vehicle")
    assert truck["share_a"] > 0.95 and truck["share_b"] == 0 and truck["interval"][1] < 0
    # trucks show in 3 of the 80 val images: below compare.min_images (20), so not called...
    assert truck["images"] == 3 and truck["verdict"] == "no detectable difference"
    assert truck["reason"] == "fewer than compare.min_images val images show it"
    # ...and called once the rule lets 3 images do
    params = copy.deepcopy(val_truth["params"])
    params["compare"]["min_images"] = 3
    _, lowered = compare.differences(params, metrics, ["person_car", "person_vehicle"])
    assert lowered[("person_car", "person_vehicle")]["categories"]["truck"]["verdict"] == "lower"
    car = pair["categories"]["car"]
    # car is found in both (a few of its pixels are another scheme's crowd or overlap: 255,
    # predicted background here)
    assert car["share_a"] > 0.98 and car["share_b"] > 0.98 and abs(car["delta_share"]) < 0.01


def test_no_difference_is_found_where_none_was_planted(val_truth, tmp_path):
    from conftest import write_predictions
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    # Both models miss person in half the images, different halves: no real difference.
    a = write_predictions(val_truth, "person_car", tmp_path / "a")
    b = write_predictions(val_truth, "person_vehicle", tmp_path / "b")
    erase_person(a, 2)
    erase_person(b, 2, phase=1)
    evaluate_scheme(val_truth, "person_car", a, metrics)
    evaluate_scheme(val_truth, "person_vehicle", b, metrics)
    _, found = compare.differences(val_truth["params"], metrics, ["person_car", "person_vehicle"])
    pair = found[("person_car", "person_vehicle")]
    person = pair["classes"]["person"]
    assert person["verdict"] == "no detectable difference"
    assert person["interval"][0] < 0 < person["interval"][1]
    assert all(c["verdict"] == "no detectable difference" for c in pair["categories"].values()
               if c["claimed_by_a"] and c["claimed_by_b"])


def test_summary_carries_the_differences_and_the_bootstrap(two_schemes, val_truth, tmp_path):
    from conftest import write_predictions
    root, params = two_schemes
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for scheme in ("person_car", "person_vehicle"):
        evaluate_scheme(val_truth, scheme, write_predictions(val_truth, scheme, tmp_path / scheme),
                        metrics)
    doc = compare.run(params, root / "analysis", root / "compare", metrics)
    assert doc["bootstrap"] == {"samples": 1000, "confidence": 0.95, "seed": 0,
                                "method": "percentile bootstrap over val images, paired "
                                          "across schemes"}
    [pair] = json.loads((root / "compare" / "summary.json").read_text())["pairs"]
    assert set(pair["classes"]) == {"person"}
    assert {"car", "truck", "bus", "person"} <= set(pair["categories"])
    assert set(pair["classes"]["person"]) == {"iou_a", "iou_b", "delta_iou", "interval",
                                              "verdict", "reason", "images", "per_seed",
                                              "same_definition"}
    assert doc["seeds"] == {"seeds": [0], "training_noise_measured": False}


def test_a_per_image_file_of_other_classes_is_refused(val_truth, tmp_path):
    from conftest import write_predictions
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    evaluate_scheme(val_truth, "person_car", write_predictions(val_truth, "person_car",
                                                               tmp_path / "a"), metrics)
    (metrics / "person_car.per_image.npz").rename(metrics / "person_vehicle.per_image.npz")
    evaluate_scheme(val_truth, "person_car", tmp_path / "a", metrics)
    with pytest.raises(StageError, match=r"person_vehicle\.per_image\.npz: classes \['background"
                                         r"', 'person', 'car'\] differ from params.yaml \['backg"
                                         r"round', 'person', 'vehicle'\]; re-run evaluate"):
        compare.differences(val_truth["params"], metrics, ["person_car", "person_vehicle"])


# Hand-made per_image.npz files (the arrays evaluate writes) for params.yaml's two schemes,
# small enough to score by hand, and fast: the val_truth tests above evaluate 80 images.
# Categories person, car, truck: person_car claims person (1) and car (2), not truck;
# person_vehicle claims person (1), and car and truck as vehicle (2). Each image (every image
# alike, one seed) holds 10 person pixels, 5 car pixels and 4 truck pixels; rows are ground
# truth, columns predictions. person_car's model finds 8 of the 10 person pixels and takes 3
# of the 4 truck pixels (background to it) for car; person_vehicle's finds all of person and
# 2 of the truck pixels.
CATEGORIES = ["person", "car", "truck"]
IMAGE = {"person_car": ([[11, 0, 3], [2, 8, 0], [0, 0, 5]],       # confusion (K, K)
                        [[2, 8, 0], [0, 0, 5], [1, 0, 3]],        # category pixels (C, K)
                        [1, 2, 0]),                               # claims per category
         "person_vehicle": ([[10, 0, 0], [0, 10, 0], [2, 0, 7]],
                            [[0, 10, 0], [0, 0, 5], [2, 0, 2]],
                            [1, 2, 2])}
CLASSES = {"person_car": ["background", "person", "car"],
           "person_vehicle": ["background", "person", "vehicle"]}


def write_per_image(path, scheme: str, confusion, pixels, stems=None, seeds=(0,), **replace):
    """One scheme's per_image.npz: confusion (N, S, K, K), category pixels (N, S, C, K)."""
    arrays = {"stems": np.array(stems or [f"{i:012d}" for i in range(len(confusion))]),
              "class_names": np.array(CLASSES[scheme]),
              "seeds": None if seeds is None else np.array(seeds, np.int64),
              "confusion": np.asarray(confusion, np.int64),
              "category_names": np.array(CATEGORIES),
              "category_claims": np.array(IMAGE[scheme][2], np.int64),
              "category_pixels": np.asarray(pixels, np.int64), **replace}
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **{k: v for k, v in arrays.items() if v is not None})
    return path


def per_image_files(metrics, n: int = 4, seeds: int = 1):
    """Both schemes' files, n alike images, each seed's counts alike."""
    metrics.mkdir(parents=True, exist_ok=True)
    for scheme, (confusion, pixels, _) in IMAGE.items():
        write_per_image(metrics / f"{scheme}.per_image.npz", scheme,
                        np.tile(confusion, (n, seeds, 1, 1)), np.tile(pixels, (n, seeds, 1, 1)),
                        seeds=list(range(seeds)))
    return metrics


def test_differences_of_hand_made_files_by_hand(tmp_path, params):
    """Every image alike: each resample's sums are 4 times one image's, so every resampled
    score equals the point one and each interval is [delta, delta]. person IoU: 8 / (10 + 8
    - 8) = 0.8 against 10 / 10 = 1, +0.2, higher (the 4 images that show it are exactly
    compare.min_images, set to 4 here). Found shares: person 0.8 -> 1 (+0.2, higher); car 5/5
    in both (0, no difference); truck, unclaimed by person_car, 3 of 4 pixels not background =
    0.75, claimed by vehicle in person_vehicle, 2 of 4 = 0.5 (-0.25, lower)."""
    params["compare"]["min_images"] = 4
    seeds, found = compare.differences(params, per_image_files(tmp_path / "m"),
                                       ["person_car", "person_vehicle"])
    assert seeds == [0] and list(found) == [("person_car", "person_vehicle")]
    pair = found[("person_car", "person_vehicle")]
    assert list(pair) == ["classes", "categories"] and list(pair["classes"]) == ["person"]
    close = lambda x: pytest.approx(x, abs=1e-12)  # noqa: E731
    assert pair["classes"]["person"] == {
        "iou_a": close(0.8), "iou_b": 1.0, "interval": [close(0.2), close(0.2)],
        "verdict": "higher", "reason": None, "images": 4, "per_seed": [close(0.2)],
        "delta_iou": close(0.2), "same_definition": True}
    assert list(pair["categories"]) == CATEGORIES
    expected = {"person": (0.8, 1.0, 0.2, "higher", "person", "person"),
                "car": (1.0, 1.0, 0.0, "no detectable difference", "car", "vehicle"),
                "truck": (0.75, 0.5, -0.25, "lower", "", "vehicle")}
    for name, (a, b, delta, verdict, by_a, by_b) in expected.items():
        assert pair["categories"][name] == {
            "share_a": close(a), "share_b": close(b), "interval": [close(delta), close(delta)],
            "verdict": verdict, "reason": None, "images": 4, "per_seed": [close(delta)],
            "delta_share": close(delta), "claimed_by_a": by_a, "claimed_by_b": by_b}, name


def test_differences_pair_images_by_stem_and_keep_the_shared_ones(tmp_path, params):
    """person_vehicle's file lists the images in the other order, and a fifth image of its
    own. Each image has 10 person pixels and no false positive, so IoU = found / 10 summed:
    person_car finds 2, 4, 6, 8 (IoU 20 / 40 = 0.5), person_vehicle 2 more in each image
    (28 / 40 = 0.7). Paired by stem, every resample's difference is 2 * 4 / 40 = 0.2: an
    interval of zero width; paired by position it would spread. The fifth image (all of
    person missed) would pull person_vehicle's IoU down to 28 / 50. compare.min_images is the
    4 shared images, so the verdict is called."""
    params["compare"]["min_images"] = 4
    metrics = tmp_path / "m"
    metrics.mkdir()
    found_a, found_b = np.array([2, 4, 6, 8]), np.array([4, 6, 8, 10, 0])
    stems = ["a", "b", "c", "d"]

    def counts(found):
        confusion = np.zeros((len(found), 1, 3, 3), np.int64)
        confusion[:, 0, 1, 1], confusion[:, 0, 1, 0] = found, 10 - found
        return confusion, confusion[:, :, None, 1, :].repeat(3, axis=2)

    write_per_image(metrics / "person_car.per_image.npz", "person_car", *counts(found_a),
                    stems=stems)
    confusion, pixels = counts(found_b)
    order = [3, 2, 1, 0, 4]
    write_per_image(metrics / "person_vehicle.per_image.npz", "person_vehicle",
                    confusion[order], pixels[order], stems=["d", "c", "b", "a", "e"])
    _, found = compare.differences(params, metrics, ["person_car", "person_vehicle"])
    person = found[("person_car", "person_vehicle")]["classes"]["person"]
    assert (person["iou_a"], person["iou_b"]) == pytest.approx((0.5, 0.7), abs=1e-12)
    assert person["interval"] == pytest.approx([0.2, 0.2], abs=1e-12)
    assert person["images"] == 4 and person["verdict"] == "higher"


def test_per_image_files_linked_from_a_cache_are_read(tmp_path, params):
    """DVC may link a stage's inputs into its cache, outside the metrics folder: compare
    follows the link (inside(), by the text of the path, not where it resolves)."""
    cache = per_image_files(tmp_path / "cache")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for name in ("person_car.per_image.npz", "person_vehicle.per_image.npz"):
        (metrics / name).symlink_to(cache / name)
    seeds, found = compare.differences(params, metrics, ["person_car", "person_vehicle"])
    person = found[("person_car", "person_vehicle")]["classes"]["person"]
    assert seeds == [0] and person["delta_iou"] == pytest.approx(0.2, abs=1e-12)


def test_take_keeps_the_named_images_in_the_order_asked():
    per = synthetic_per_image(np.array([[10, 11], [20, 21], [30, 31]]))
    taken = per.take(["000000000002", "000000000000"])
    assert taken.stems == ["000000000002", "000000000000"] and taken.seeds == [0, 1]
    assert taken.confusion[:, :, 1, 1].tolist() == [[30, 31], [10, 11]]
    assert taken.category_pixels[:, :, 0, 1].tolist() == [[30, 31], [10, 11]]
    assert (taken.class_names, taken.category_names) == (per.class_names, per.category_names)
    assert taken.category_claims.tolist() == [1]


def test_per_image_files_that_cannot_be_compared_are_refused_in_one_line(tmp_path, params):
    metrics = per_image_files(tmp_path / "m")
    other = metrics / "person_vehicle.per_image.npz"
    schemes = ["person_car", "person_vehicle"]

    def refused(message: str):
        with pytest.raises(StageError) as caught:
            compare.differences(params, metrics, schemes)
        assert str(caught.value) == message

    confusion, pixels, _ = IMAGE["person_vehicle"]
    one = (np.array([[confusion]]), np.array([[pixels]]))     # one image, one seed
    write_per_image(other, "person_vehicle", *one, seeds=[0, 1])
    refused(f"{other}: confusion of shape (1, 1, 3, 3), expected (images, 2 seeds, K, K); "
            "re-run evaluate")
    write_per_image(other, "person_vehicle", one[0][:, 0], one[1])
    refused(f"{other}: confusion of shape (1, 3, 3), expected (images, 1 seeds, K, K); "
            "re-run evaluate")
    write_per_image(other, "person_vehicle", *one, class_names=np.array(CLASSES["person_car"]))
    refused(f"{other}: classes ['background', 'person', 'car'] differ from params.yaml "
            "['background', 'person', 'vehicle']; re-run evaluate")
    write_per_image(other, "person_vehicle", one[0].repeat(2, axis=1),
                    one[1].repeat(2, axis=1), seeds=[0, 1])
    refused(f"{metrics}/person_vehicle.per_image.npz: seeds [0, 1] differ from person_car's "
            "[0]; re-run evaluate for both")
    write_per_image(other, "person_vehicle", *one, category_names=np.array(CATEGORIES[::-1]))
    refused(f"{metrics}/person_vehicle.per_image.npz: its COCO categories differ from "
            "person_car's; evaluate both on the same val annotations")
    write_per_image(other, "person_vehicle", *one, stems=["elsewhere"])
    refused(f"{metrics}: the schemes' per_image.npz share no val image")
    write_per_image(other, "person_vehicle", *one, seeds=None, category_pixels=None)
    refused(f"{other}: missing arrays seeds, category_pixels; re-run evaluate")
    other.write_text("not an archive")
    with pytest.raises(StageError, match=re.escape(f"{other}: not an evaluate per-image file (")):
        compare.differences(params, metrics, schemes)
    other.unlink()
    refused(f"{other}: missing (run the evaluate stage first)")


def synthetic_per_image(person_hits: np.ndarray, shown: int | None = None) -> compare.PerImage:
    """Two classes (background, person), N images x S seeds: each image has 100 person
    pixels, of which person_hits[n, s] are predicted person (the rest background), and 100
    background pixels predicted right. With `shown`, only the first `shown` images hold
    person at all. One category, person, claimed by class 1."""
    n, seeds = person_hits.shape
    confusion = np.zeros((n, seeds, 2, 2), np.int64)
    confusion[..., 0, 0] = 100
    confusion[..., 1, 1] = person_hits
    confusion[..., 1, 0] = 100 - person_hits
    if shown is not None:
        confusion[shown:, :, 1, :] = 0
    pixels = confusion[:, :, None, 1, :]        # the person row: (N, S, 1, K)
    return compare.PerImage([f"{i:012d}" for i in range(n)], ["background", "person"],
                            confusion, ["person"], np.array([1]), pixels, list(range(seeds)))


SETTINGS = bootstrap.Settings(samples=400, confidence=0.95, seed=0)
CLAIMS = {"a": {"person": {"categories": ["person"]}}, "b": {"person": {"categories": ["person"]}}}


def _person(a_hits, b_hits, shown=None, min_images=3) -> dict:
    pair = compare.scheme_differences({"a": synthetic_per_image(a_hits, shown),
                                       "b": synthetic_per_image(b_hits, shown)},
                                      CLAIMS, SETTINGS, min_images)[("a", "b")]
    return pair["classes"]["person"]


def test_two_seeds_that_agree_give_the_mean_difference_and_a_verdict():
    rng = np.random.default_rng(0)
    a = rng.integers(30, 50, (40, 2))
    b = a + rng.integers(10, 20, (40, 2))           # b finds more person pixels, both seeds
    person = _person(a, b)
    # hand: tp / (gt + pred - tp), with 4000 person pixels and none predicted from background
    iou = lambda h: h.sum(0) / 4000   # noqa: E731
    a_iou, b_iou = iou(a), iou(b)
    assert person["per_seed"] == pytest.approx(list(b_iou - a_iou))
    assert person["delta_iou"] == pytest.approx(np.mean(b_iou - a_iou))
    assert (person["iou_a"], person["iou_b"]) == pytest.approx((a_iou.mean(), b_iou.mean()))
    assert person["verdict"] == "higher" and person["reason"] is None
    assert 0 < person["interval"][0] < person["delta_iou"] < person["interval"][1]
    assert person["images"] == 40


def test_seeds_that_disagree_in_sign_give_no_verdict_even_when_the_mean_is_clear():
    rng = np.random.default_rng(1)
    a = rng.integers(30, 50, (40, 2))
    b = a.copy()
    b[:, 0] += 40                                   # seed 0: b far better
    b[:, 1] -= 5                                    # seed 1: b a little worse
    person = _person(a, b)
    assert person["per_seed"][0] > 0 > person["per_seed"][1]
    assert person["interval"][0] > 0                 # the mean alone would say "higher"
    assert person["verdict"] == "no detectable difference"
    assert person["reason"] == "the seeds disagree on its sign"


def test_a_class_shown_in_too_few_images_gets_no_verdict():
    a = np.full((40, 1), 30)
    b = np.full((40, 1), 90)                        # b far better, but in 2 images only
    person = _person(a, b, shown=2)
    assert person["images"] == 2 and person["interval"][0] > 0
    assert person["verdict"] == "no detectable difference"
    assert person["reason"] == "fewer than compare.min_images val images show it"
    assert _person(a, b, shown=3)["verdict"] == "higher"   # at min_images: called


def test_a_class_no_image_shows_has_null_scores_and_no_verdict():
    """No person pixel anywhere: every IoU is 0 / 0, undefined; written as null (JSON has no
    NaN), with no interval and no verdict."""
    person = _person(np.full((5, 2), 30), np.full((5, 2), 60), shown=0)
    assert person == {"iou_a": None, "iou_b": None, "interval": [None, None],
                      "verdict": "no detectable difference", "reason": None, "images": 0,
                      "per_seed": [None, None], "delta_iou": None, "same_definition": True}


def test_images_showing_a_class_or_category_count_ground_truth_pixels():
    """Four images, one seed. person in the ground truth: scheme a's in images 0 (one pixel)
    and 3, scheme b's in images 2 (one pixel) and 3: 3 images show it in either. Categories
    (scheme a's counts): person in images 0 and 3; car in none (no entry); truck in image
    1 only, with one pixel."""
    def scheme(person_rows, names):
        confusion = np.zeros((4, 1, 3, 3), np.int64)
        confusion[:, 0, 1] = person_rows
        pixels = np.zeros((4, 1, 3, 3), np.int64)
        pixels[:, 0, 0] = person_rows
        pixels[1, 0, 2] = [1, 0, 0]
        return compare.PerImage(["0", "1", "2", "3"], names, confusion, CATEGORIES,
                                np.array([1, 2, 0]), pixels, [0])

    a = scheme([[0, 1, 0], [0, 0, 0], [0, 0, 0], [3, 2, 0]], CLASSES["person_car"])
    b = scheme([[0, 0, 0], [0, 0, 0], [1, 0, 0], [3, 2, 0]], CLASSES["person_vehicle"])
    pair = compare.scheme_differences({"a": a, "b": b}, CLAIMS, SETTINGS, 3)[("a", "b")]
    assert pair["classes"]["person"]["images"] == 3
    assert {name: entry["images"] for name, entry in pair["categories"].items()} == {
        "person": 2, "truck": 1}


def joined_frame(rng, n=80):
    """compare's joined table for two schemes with no real difference: each image's two
    losses are exchangeable (one noisy draw each around the image's difficulty)."""
    difficulty = rng.gamma(2.0, 0.5, n)
    a, b = difficulty + rng.normal(0, 0.2, n), difficulty + rng.normal(0, 0.2, n)
    return pd.DataFrame({"image_id": range(n), "loss_person_car": a, "loss_person_vehicle": b,
                         "delta_loss_person_vehicle_vs_person_car": b - a,
                         "cluster_person_car": rng.integers(0, 6, n),
                         "cluster_person_vehicle": rng.integers(0, 6, n)})


def test_no_change_flags_almost_nothing_and_a_planted_one_is_found():
    rng = np.random.default_rng(0)
    schemes = ["person_car", "person_vehicle"]
    counts = [int(compare.cluster_changes(joined_frame(rng), schemes, 0.1, 3)["significant"]
                  .sum()) for _ in range(20)]
    assert np.mean(counts) <= 0.5, counts
    joined = joined_frame(rng)
    hit = joined["cluster_person_car"] == 2
    joined.loc[hit, "loss_person_vehicle"] += 0.5
    joined["delta_loss_person_vehicle_vs_person_car"] = (joined["loss_person_vehicle"]
                                                         - joined["loss_person_car"])
    table = compare.cluster_changes(joined, schemes, 0.1, 3)
    found = table[table["significant"]]
    assert list(zip(found["clusters_of"], found["cluster"])) == [("person_car", 2)]
    assert found["q_value"].iloc[0] <= 0.1 and found["p_value"].iloc[0] < found["q_value"].iloc[0]


def test_one_scheme_writes_empty_tables_with_their_header(tmp_path, params):
    params = copy.deepcopy(params)
    del params["schemes"]["person_vehicle"]
    scheme_folder(tmp_path / "analysis", "person_car", "car_fraction", np.ones(N), [0] * N,
                  {100})
    compare.run(params, tmp_path / "analysis", tmp_path / "compare")
    change = ["images", "mean_loss_a", "mean_loss_b", "mean_delta_loss", "se_delta_loss", "z",
              "p_value", "q_value", "significant"]
    for name, columns in (("clusters.csv", ["a", "b", "clusters_of", "cluster", *change]),
                          ("buckets.csv", ["a", "b", "bins_of", "binning", "field", "bin", "low",
                                           "high", *change])):
        table = pd.read_csv(tmp_path / "compare" / name)
        assert list(table.columns) == columns and len(table) == 0, name


def test_two_schemes_tables_keep_the_documented_columns(two_schemes):
    root, params = two_schemes
    compare.run(params, root / "analysis", root / "compare")
    assert list(pd.read_csv(root / "compare" / "clusters.csv").columns) == list(
        compare.CLUSTER_COLUMNS)
    assert list(pd.read_csv(root / "compare" / "buckets.csv").columns) == list(
        compare.BUCKET_COLUMNS)


def test_miou_is_analyzes_column_not_recomputed(two_schemes):
    """compare carries infer's per-image miou (through analyze's samples.csv) as it is: a
    column unlike the mean of the iou_* columns comes out unchanged, deltas from it."""
    root, params = two_schemes
    path = root / "analysis" / "person_vehicle" / "samples.csv"
    table = pd.read_csv(path)
    table["miou"] = np.linspace(0.2, 0.4, N)  # the iou_* columns still average 0.7
    table.to_csv(path, index=False)
    compare.run(params, root / "analysis", root / "compare")
    samples = pd.read_csv(root / "compare" / "samples.csv").sort_values("image_id")
    np.testing.assert_allclose(samples["miou_person_vehicle"], np.linspace(0.2, 0.4, N))
    np.testing.assert_allclose(samples["miou_person_car"], 0.7)
    np.testing.assert_allclose(samples["delta_miou_person_vehicle_vs_person_car"],
                               np.linspace(0.2, 0.4, N) - 0.7, atol=1e-12)


def test_per_image_files_of_other_annotations_are_refused(val_truth, tmp_path):
    from conftest import write_predictions
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for scheme in ("person_car", "person_vehicle"):
        evaluate_scheme(val_truth, scheme, write_predictions(val_truth, scheme, tmp_path / scheme),
                        metrics)
    path = metrics / "person_vehicle.per_image.npz"
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["category_names"] = arrays["category_names"][::-1]
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    with pytest.raises(StageError, match=r"person_vehicle\.per_image\.npz: its COCO categories "
                                         r"differ from person_car's; evaluate both on the same "
                                         r"val annotations"):
        compare.differences(val_truth["params"], metrics, ["person_car", "person_vehicle"])
