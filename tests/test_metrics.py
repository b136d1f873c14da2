"""Confusion matrix and every score from it, checked against numbers computed by hand."""
from __future__ import annotations

import json
import logging
import re
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml

from stages import evaluate
from stages.lib.cli import StageError
from stages.lib.io import json_safe, write_json
from stages.lib.labels import IGNORE_INDEX, save_labels
from stages.lib.metrics import confusion_matrix, per_class_iou, scores

I = IGNORE_INDEX  # noqa: E741

# Four classes: 0 background, 1 person, 2 car, 3 a class that occurs nowhere.
GT = np.array([[0, 0, 1, 1],
               [0, I, 1, 2],
               [2, 2, I, 0]], np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [0, 0, 1, 2],
                 [1, 2, 2, 0]], np.uint8)
# (gt, pred) over the 10 non-ignored pixels:
#   gt 0: (0,0) x3, (0,1) x1      gt 1: (1,1) x3      gt 2: (2,2) x2, (2,1) x1
CM = np.array([[3, 1, 0, 0],
               [0, 3, 0, 0],
               [0, 1, 2, 0],
               [0, 0, 0, 0]])
# tp = 3,3,2,0; gt count = 4,3,3,0; pred count = 3,5,2,0; 2 ignored pixels
IOU = [3 / (4 + 3 - 3), 3 / (3 + 5 - 3), 2 / (3 + 2 - 2), math.nan]   # 0.75, 0.6, 2/3, nan
MIOU = (0.75 + 0.6 + 2 / 3) / 3                                        # 0.672222...
PIXEL_ACCURACY = 8 / 10
PIXEL_ACCURACY_WITH_IGNORE = 8 / 12
CLASS_ACCURACY = [3 / 4, 3 / 3, 2 / 3, math.nan]
MEAN_CLASS_ACCURACY = (0.75 + 1 + 2 / 3) / 3                           # 0.805555...
FW_IOU = 0.4 * 0.75 + 0.3 * 0.6 + 0.3 * (2 / 3)                        # 0.68
DICE = [6 / 7, 6 / 8, 4 / 5, math.nan]


def _close(actual, expected):
    """Element-wise equality to 1e-12 where NaN must match NaN."""
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    assert actual.shape == expected.shape
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), (actual, expected)
    np.testing.assert_allclose(actual[~np.isnan(actual)], expected[~np.isnan(expected)],
                               rtol=0, atol=1e-12)


def test_confusion_matrix_hand_case():
    cm = confusion_matrix(GT, PRED, 4)
    assert cm.dtype.kind == "i"
    assert cm.tolist() == CM.tolist()
    assert cm.sum() == 10  # the two 255 pixels are dropped, whatever was predicted there


def test_confusion_matrix_rows_are_ground_truth():
    cm = confusion_matrix(np.array([2, 2, 2]), np.array([0, 0, 1]), 3)
    assert cm[2].tolist() == [2, 1, 0]
    assert cm[:, 2].tolist() == [0, 0, 0]


def test_prediction_under_ignore_pixel_is_not_checked():
    # an out-of-range prediction where gt is 255 does not matter: the pixel is dropped
    cm = confusion_matrix(np.array([I, 1], np.uint8), np.array([9, 1], np.uint8), 2)
    assert cm.tolist() == [[0, 0], [0, 1]]


@pytest.mark.parametrize("gt, pred, value", [
    ([0, 4], [0, 1], 4),            # gt class 4 with 4 classes
    ([0, 1], [0, 4], 4),            # predicted class 4
    ([0, 1], [0, 255], 255),        # prediction 255 on a labelled pixel
    ([0, 1], [0, -1], -1),          # negative prediction
])
def test_out_of_range_labels_raise(gt, pred, value):
    with pytest.raises(ValueError, match=r"label values \[.*\] outside 0\.\.3") as info:
        confusion_matrix(np.array(gt), np.array(pred), 4)
    listed = json.loads(str(info.value).split("label values ")[1].split(" outside")[0])
    assert value in listed


@pytest.mark.parametrize("gt, pred, values", [
    ([0, 4, I], [0, 1, 7], [4]),     # gt class 4; the 7 under ignore is not checked
    ([0, 1], [0, 255], [255]),       # prediction 255 on a labelled pixel
    ([5, 1, 0], [0, 6, 0], [5, 6]),  # both sides bad
])
def test_out_of_range_uint8_maps_raise_with_the_values(gt, pred, values):
    with pytest.raises(ValueError, match=re.escape(f"label values {values} outside 0..3")):
        confusion_matrix(np.array(gt, np.uint8), np.array(pred, np.uint8), 4)


@pytest.mark.parametrize("num_classes", [2, 3, 21])
def test_uint8_fast_path_equals_the_general_one(num_classes):
    rng = np.random.default_rng(num_classes)
    gt = rng.integers(0, num_classes, (97, 131)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.2] = I
    pred = rng.integers(0, num_classes, gt.shape).astype(np.uint8)
    fast = confusion_matrix(gt, pred, num_classes)
    general = confusion_matrix(gt.astype(np.int32), pred.astype(np.int32), num_classes)
    assert fast.dtype == general.dtype == np.int64
    assert np.array_equal(fast, general) and fast.sum() == int((gt != I).sum())


def test_out_of_range_message_lists_only_bad_values():
    with pytest.raises(ValueError, match=r"label values \[4\] outside 0\.\.3"):
        confusion_matrix(np.array([0, 4]), np.array([0, 1]), 4)


def test_negative_ground_truth_raises():
    with pytest.raises(ValueError, match=r"^label values \[-1\] outside 0\.\.3$"):
        confusion_matrix(np.array([0, -1]), np.array([0, 1]), 4)


def test_negative_prediction_raises():
    with pytest.raises(ValueError, match=r"^label values \[-2\] outside 0\.\.3$"):
        confusion_matrix(np.array([0, 1]), np.array([0, -2]), 4)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="ground truth has 12 pixels, prediction 11"):
        confusion_matrix(GT, PRED.ravel()[:11], 4)


def test_every_score_by_hand():
    s = scores(CM, ignored_pixels=2)
    _close(s["iou"], IOU)
    _close(per_class_iou(CM), IOU)
    assert s["miou"] == pytest.approx(MIOU, abs=1e-12)
    assert s["miou"] == pytest.approx(0.6722222222, abs=1e-9)
    assert s["pixel_accuracy"] == pytest.approx(PIXEL_ACCURACY, abs=1e-12)
    assert s["pixel_accuracy_with_ignore"] == pytest.approx(PIXEL_ACCURACY_WITH_IGNORE, abs=1e-12)
    _close(s["class_accuracy"], CLASS_ACCURACY)
    assert s["mean_class_accuracy"] == pytest.approx(MEAN_CLASS_ACCURACY, abs=1e-12)
    assert s["fw_iou"] == pytest.approx(FW_IOU, abs=1e-12)
    assert s["fw_iou"] == pytest.approx(0.68, abs=1e-12)
    _close(s["dice"], DICE)


def test_without_ignored_pixels_both_accuracies_agree():
    s = scores(CM)
    assert s["pixel_accuracy"] == s["pixel_accuracy_with_ignore"] == pytest.approx(0.8)


def test_class_only_in_prediction_has_zero_iou_and_counts_in_miou():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    s = scores(confusion_matrix(gt, pred, 3))
    # class 0: tp 1, gt 2, pred 1 -> 1/2; class 1: 1; class 2: tp 0, pred 1 -> 0
    _close(s["iou"], [0.5, 1.0, 0.0])
    assert s["miou"] == pytest.approx(0.5)
    _close(s["class_accuracy"], [0.5, 1.0, math.nan])
    assert s["mean_class_accuracy"] == pytest.approx(0.75)
    _close(s["dice"], [2 / 3, 1.0, 0.0])


def test_empty_matrix_gives_nan_not_errors():
    s = scores(np.zeros((3, 3), np.int64), ignored_pixels=5)
    assert math.isnan(s["miou"]) and math.isnan(s["pixel_accuracy"])
    assert s["pixel_accuracy_with_ignore"] == 0.0
    assert math.isnan(s["fw_iou"]) and math.isnan(s["mean_class_accuracy"])


@pytest.mark.parametrize("ignored", [0, 5])
def test_empty_matrix_scores_are_nan_without_numpy_warnings(ignored):
    """An image with no labelled pixel (every one ignore) is scored without 0/0: NaN for
    every figure that has no pixel, and no RuntimeWarning in the stage's log."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = scores(np.zeros((3, 3), np.int64), ignored_pixels=ignored)
    for key in ("miou", "pixel_accuracy", "mean_class_accuracy", "fw_iou"):
        assert math.isnan(s[key]), key
    assert s["pixel_accuracy_with_ignore"] == 0.0 if ignored else math.isnan(
        s["pixel_accuracy_with_ignore"])
    for key in ("iou", "class_accuracy", "dice", "precision", "recall"):
        assert np.isnan(s[key]).all() and len(s[key]) == 3, key


def test_accuracy_counting_ignore_when_as_many_pixels_are_ignored_as_labelled():
    # 8 right of 10 labelled pixels, 10 more ignored: 8 / 20
    assert scores(CM, ignored_pixels=10)["pixel_accuracy_with_ignore"] == 0.4

def test_one_labelled_pixel_has_a_mean_class_accuracy():
    assert scores(np.array([[1, 0], [0, 0]]))["mean_class_accuracy"] == 1.0


@pytest.mark.parametrize("gt_dtype, pred_dtype", [(np.uint8, np.int64), (np.int64, np.uint8)])
def test_mixed_dtypes_take_the_general_path(gt_dtype, pred_dtype):
    """Only two uint8 maps take the byte-pair fast path: a uint8 map with an int64 one is
    counted, and checked for negative values, like two int64 maps."""
    assert confusion_matrix(GT.astype(gt_dtype), PRED.astype(pred_dtype), 4).tolist() == \
        CM.tolist()
    gt, pred = np.array([0, 1]), np.array([0, 1])
    bad = (gt if gt_dtype == np.int64 else pred).copy()
    bad[1] = -1
    gt, pred = (bad, pred) if gt_dtype == np.int64 else (gt, bad)
    with pytest.raises(ValueError, match=r"^label values \[-1\] outside 0\.\.3$"):
        confusion_matrix(gt.astype(gt_dtype), pred.astype(pred_dtype), 4)

def test_uint8_prediction_equal_to_the_class_count_is_named():
    with pytest.raises(ValueError, match=r"^label values \[4\] outside 0\.\.3$"):
        confusion_matrix(np.array([0, 1], np.uint8), np.array([0, 4], np.uint8), 4)

def test_json_safe_turns_nan_into_null():
    safe = json_safe({"iou": scores(CM)["iou"], "x": np.float32(0.5), "n": np.int64(3),
                      "inf": float("inf"), 1: (math.nan,)})
    assert safe == {"iou": [0.75, 0.6, pytest.approx(2 / 3), None], "x": 0.5, "n": 3,
                    "inf": None, "1": [None]}
    json.dumps(safe, allow_nan=False)


# ---------------------------------------------------------------- stages.evaluate core

def _summed(pairs, class_names: list[str]) -> tuple[np.ndarray, int, list[dict]]:
    """The whole-set matrix and ignore count as evaluate makes them (run() sums _scored's
    per-image matrices), and each image's row: through evaluate's own per-image code."""
    scored = [evaluate._scored(str(i), gt, [pred], class_names)
              for i, (gt, pred) in enumerate(pairs)]
    return (sum(s.confusion[0] for s in scored), sum(s.ignored for s in scored),
            [s.row for s in scored])


def test_scored_sums_pairs_and_counts_ignore():
    pairs = [(GT[:, :2], PRED[:, :2]), (GT[:, 2:], PRED[:, 2:])]
    cm, ignored, _ = _summed(pairs, ["background", "person", "car", "bus"])
    assert cm.tolist() == CM.tolist()
    assert ignored == 2


def test_scored_counts_in_integers_and_gives_each_images_own_row():
    """One row per image, scored from that image's matrix alone. By hand: the left half
    (GT[:, :2]) has background 0->0 twice, 0->1 once, car 2->1 and 2->2, one ignored
    pixel: accuracy 3/5, background IoU 2 / (3 + 2 - 2), car IoU 1 / (2 + 1 - 1); the right
    half is all right (person 3 of 3, one ignored)."""
    names = ["background", "person", "car", "bus"]
    left_scored = evaluate._scored("left", GT[:, :2], [PRED[:, :2]], names)
    assert left_scored.stem == "left" and left_scored.confusion.dtype == np.int64
    assert left_scored.confusion.shape == (1, 4, 4) and left_scored.categories is None
    cm, ignored, rows = _summed([(GT[:, :2], PRED[:, :2]), (GT[:, 2:], PRED[:, 2:])], names)
    assert (cm.tolist(), ignored) == (CM.tolist(), 2)
    assert len(rows) == 2
    left, right = rows
    assert (left["pixels_evaluated"], left["pixels_ignored"]) == (5, 1)
    assert left["pixel_accuracy"] == pytest.approx(3 / 5, abs=1e-12)
    assert (left["iou_background"], left["iou_car"]) == pytest.approx((2 / 3, 1 / 2), abs=1e-12)
    # person: predicted twice, in the ground truth never: 0; bus: neither, undefined
    assert left["iou_person"] == 0.0 and math.isnan(left["iou_bus"])
    assert (right["pixels_evaluated"], right["pixels_ignored"]) == (5, 1)
    assert (right["pixel_accuracy"], right["iou_person"]) == (1.0, 1.0)


def test_metrics_document_by_hand():
    names = ["background", "person", "car", "bus"]
    doc = evaluate.metrics_document(CM, 2, names, images=1)
    assert list(doc)[:5] == ["miou", "pixel_accuracy", "pixel_accuracy_with_ignore",
                             "mean_class_accuracy", "fw_iou"]
    assert doc["miou"] == pytest.approx(MIOU)
    assert doc["pixel_accuracy"] == pytest.approx(0.8)
    assert doc["pixel_accuracy_with_ignore"] == pytest.approx(8 / 12)
    assert doc["mean_class_accuracy"] == pytest.approx(MEAN_CLASS_ACCURACY)
    assert doc["fw_iou"] == pytest.approx(0.68)
    assert list(doc["iou"]) == names
    assert doc["iou"]["background"] == pytest.approx(0.75)
    assert doc["iou"]["person"] == pytest.approx(0.6)
    assert doc["iou"]["car"] == pytest.approx(2 / 3)
    assert math.isnan(doc["iou"]["bus"])
    assert doc["dice"]["background"] == pytest.approx(6 / 7)
    assert doc["class_accuracy"]["car"] == pytest.approx(2 / 3)
    assert (doc["images"], doc["pixels_evaluated"], doc["pixels_ignored"]) == (1, 10, 2)


PRECISION = [3 / 3, 3 / 5, 2 / 2, math.nan]  # tp / predicted count; bus never predicted


def test_metrics_document_precision_recall_and_keys_by_hand():
    names = ["background", "person", "car", "bus"]
    doc = evaluate.metrics_document(CM, 2, names, images=3)
    assert list(doc) == ["miou", "pixel_accuracy", "pixel_accuracy_with_ignore",
                         "mean_class_accuracy", "fw_iou", "iou", "dice", "class_accuracy",
                         "precision", "recall", "images", "pixels_evaluated", "pixels_ignored"]
    for key, expected in {"iou": IOU, "dice": DICE, "class_accuracy": CLASS_ACCURACY,
                          "precision": PRECISION, "recall": CLASS_ACCURACY}.items():
        assert list(doc[key]) == names and all(type(v) is float for v in doc[key].values())
        _close(list(doc[key].values()), expected)
    assert (doc["images"], doc["pixels_evaluated"], doc["pixels_ignored"]) == (3, 10, 2)


def test_sample_row_by_hand():
    names = ["background", "person", "car", "bus"]
    row = evaluate.sample_row(CM, 2, names)
    per_class = {"iou": IOU, "dice": DICE, "precision": PRECISION, "recall": CLASS_ACCURACY}
    assert list(row) == ["pixels_evaluated", "pixels_ignored", "miou", "pixel_accuracy",
                         "pixel_accuracy_with_ignore", "mean_class_accuracy", "fw_iou"] + [
        f"{key}_{name}" for key in per_class for name in names]
    assert (row["pixels_evaluated"], row["pixels_ignored"]) == (10, 2)
    _close([row[k] for k in ("miou", "pixel_accuracy", "pixel_accuracy_with_ignore",
                             "mean_class_accuracy", "fw_iou")],
           [MIOU, PIXEL_ACCURACY, PIXEL_ACCURACY_WITH_IGNORE, MEAN_CLASS_ACCURACY, FW_IOU])
    for key, expected in per_class.items():
        _close([row[f"{key}_{name}"] for name in names], expected)

def test_metrics_document_json_has_null_for_absent_class(tmp_path):
    doc = evaluate.metrics_document(CM, 2, ["background", "person", "car", "bus"], images=1)
    write_json(tmp_path / "m.json", doc)
    text = (tmp_path / "m.json").read_text()
    loaded = json.loads(text, parse_constant=_no_constants)
    assert loaded["iou"]["bus"] is None
    assert loaded["dice"]["bus"] is None
    assert loaded["class_accuracy"]["bus"] is None
    assert loaded["iou"]["person"] == pytest.approx(0.6)


def _no_constants(name):
    raise AssertionError(f"JSON contains {name}")


# ---------------------------------------------------------------- stages.evaluate.run

# person_car scheme: 0 background, 1 person, 2 car (car occurs nowhere)
GT_A = np.array([[0, 1, 1], [I, 0, 1]], np.uint8)
PRED_A = np.array([[0, 1, 0], [0, 0, 1]], np.uint8)
GT_B = np.array([[1, 1], [0, I]], np.uint8)
PRED_B = np.array([[1, 0], [0, 0]], np.uint8)
# cm rows gt: bg [3,0,0], person [2,3,0], car [0,0,0]; 2 ignored


@pytest.fixture
def folders(tmp_path):
    """gt and seed 0's val predictions, laid out as infer writes them (pred/seed0/val):
    run() takes the val folder, the command line the scheme's predictions folder."""
    gt, pred = tmp_path / "gt", tmp_path / "pred" / "seed0" / "val"
    save_labels(gt / "000000000001.png", GT_A)
    save_labels(gt / "000000000002.png", GT_B)
    save_labels(pred / "000000000001.png", PRED_A)
    save_labels(pred / "000000000002.png", PRED_B)
    return gt, pred


def test_run_on_png_folders(params, folders, tmp_path):
    gt, pred = folders
    out, confusion = tmp_path / "metrics" / "person_car.json", tmp_path / "cm.csv"
    evaluate.run(params, "person_car", pred, gt, out, confusion)
    doc = json.loads(out.read_text(), parse_constant=_no_constants)
    assert doc["miou"] == pytest.approx(0.6)            # (3/5 + 3/5) / 2, car absent
    assert doc["pixel_accuracy"] == pytest.approx(6 / 8)
    assert doc["pixel_accuracy_with_ignore"] == pytest.approx(6 / 10)
    assert doc["mean_class_accuracy"] == pytest.approx((1 + 3 / 5) / 2)
    assert doc["fw_iou"] == pytest.approx(3 / 8 * 0.6 + 5 / 8 * 0.6)
    assert doc["iou"] == {"background": pytest.approx(0.6), "person": pytest.approx(0.6),
                          "car": None}
    assert doc["dice"] == {"background": pytest.approx(0.75), "person": pytest.approx(0.75),
                           "car": None}
    assert doc["class_accuracy"] == {"background": 1.0, "person": pytest.approx(0.6),
                                     "car": None}
    assert (doc["images"], doc["pixels_evaluated"], doc["pixels_ignored"]) == (2, 8, 2)
    table = pd.read_csv(confusion)
    assert list(table.columns) == ["ground_truth", "background", "person", "car"]
    assert table["ground_truth"].tolist() == ["background", "person", "car"]
    assert table[["background", "person", "car"]].to_numpy().tolist() == \
        [[3, 0, 0], [2, 3, 0], [0, 0, 0]]


def test_main_cli(params, folders, tmp_path):
    gt, pred = folders
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    out = tmp_path / "m.json"
    code = evaluate.main(["--params", str(params_file), "--scheme", "person_car", "--pred",
                          str(tmp_path / "pred"), "--gt", str(gt), "--out", str(out), "--confusion",
                          str(tmp_path / "cm.csv")])
    assert code == 0
    assert json.loads(out.read_text())["pixel_accuracy"] == pytest.approx(0.75)


def _main_argv(params, folders, tmp_path, out_dir):
    gt, pred = folders
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return ["--params", str(params_file), "--scheme", "person_car", "--pred",
            str(pred.parent.parent),
            "--gt", str(gt), "--out", str(out_dir / "m.json"), "--confusion",
            str(out_dir / "cm.csv"), "--confusion-plot", str(out_dir / "cm.png"), "--samples",
            str(out_dir / "samples.csv")]


def test_main_cli_writes_every_output(params, folders, tmp_path):
    out = tmp_path / "out"
    assert evaluate.main(_main_argv(params, folders, tmp_path, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cm.csv", "cm.png", "m.json",
                                                     "samples.csv"]
    assert json.loads((out / "m.json").read_text())["images"] == 2
    assert pd.read_csv(out / "samples.csv", dtype={"stem": str})["stem"].tolist() == [
        "000000000001", "000000000002"]
    assert pd.read_csv(out / "cm.csv")["ground_truth"].tolist() == ["background", "person",
                                                                     "car"]


@pytest.mark.parametrize("name", ["m.json", "cm.csv", "cm.png", "samples.csv"])
def test_main_checks_each_output_folder_before_evaluating(params, folders, tmp_path, caplog,
                                                          name):
    """Each output goes to its own folder; the one whose folder is a regular file stops the
    stage with exit code 2 and one line naming it, before anything is written."""
    argv = _main_argv(params, folders, tmp_path, tmp_path / "out")
    i = argv.index(str(tmp_path / "out" / name))
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    argv[i] = str(blocked / name)
    assert evaluate.main(argv) == 2
    assert f"{blocked}: output folder not writable, {name} cannot be written there (a file, " \
           "not a folder)" in caplog.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

def test_missing_prediction_names_the_file(params, folders, tmp_path):
    gt, pred = folders
    (pred / "000000000002.png").unlink()
    out = tmp_path / "m.json"
    with pytest.raises(StageError, match=r"pred/seed0/val/000000000002\.png: prediction missing"):
        evaluate.run(params, "person_car", pred, gt, out, tmp_path / "cm.csv")
    assert not out.exists()


def test_prediction_of_wrong_size_names_the_file(params, folders, tmp_path):
    gt, pred = folders
    save_labels(pred / "000000000001.png", np.zeros((3, 2), np.uint8))
    with pytest.raises(StageError, match=r"000000000001\.png: size \(3, 2\) differs"):
        evaluate.run(params, "person_car", pred, gt, tmp_path / "m.json", tmp_path / "cm.csv")


def test_no_ground_truth_is_an_error(params, tmp_path):
    (tmp_path / "gt").mkdir()
    with pytest.raises(StageError, match="no ground-truth masks"):
        evaluate.run(params, "person_car", tmp_path, tmp_path / "gt", tmp_path / "m.json",
                     tmp_path / "cm.csv")


def test_unknown_scheme_exit_code_2(params, folders, tmp_path, caplog):
    gt, pred = folders
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    code = evaluate.main(["--params", str(params_file), "--scheme", "person_bus", "--pred",
                          str(pred), "--gt", str(gt), "--out", str(tmp_path / "m.json"),
                          "--confusion", str(tmp_path / "cm.csv")])
    assert code == 2
    assert "'person_bus'" in caplog.text


def test_help_required_options_and_errors_under_the_evaluate_logger(params, folders, tmp_path,
                                                                    capsys, caplog):
    """The command line as README and dvc.yaml spell it (python -m stages.evaluate), the
    docstring's first line as its description; argparse names the five required options
    (exit 2); a stage error is one line from the 'evaluate' logger."""
    with pytest.raises(SystemExit) as shown:
        evaluate.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert shown.value.code == 0
    assert out.startswith("usage: python -m stages.evaluate [-h] --params PARAMS --scheme "
                          "SCHEME --pred PRED --gt GT --out OUT --confusion CONFUSION")
    assert "evaluate: one confusion matrix over the whole val set, and every score from it." \
        in out
    with pytest.raises(SystemExit) as refused:
        evaluate.main(["--params", "p.yaml"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.endswith("error: the following arguments are required: "
                                            "--scheme, --pred, --gt, --out, --confusion\n")
    argv = _main_argv(params, folders, tmp_path, tmp_path / "out")
    argv[argv.index("--scheme") + 1] = "person_bus"
    assert evaluate.main(argv) == 2
    [(logger, level, message)] = caplog.record_tuples
    assert (logger, level) == ("evaluate", logging.ERROR) and "'person_bus'" in message


# ---------------------------------------------------------------- against torchmetrics

def torchmetrics_scores(pairs, num_classes: int) -> dict:
    """Every figure of stages.lib.metrics.scores, from torchmetrics updated image by image
    (ignore_index=255, undefined ratios as NaN). torchmetrics has no frequency-weighted IoU
    and no accuracy that counts ignore pixels as errors: the first is built from its
    per-class IoU and its confusion matrix, the second by giving the ignore pixels a class
    of their own that no prediction can have. Mean class accuracy is the mean of its
    per-class accuracies over the classes in the ground truth. Only the Jaccard index takes NaN
    for 0/0; the others give 0 there (zero_division=0), which the comparison below accounts for."""
    import torch
    from torchmetrics import classification as tmc

    k, nan = num_classes, float("nan")
    common = {"num_classes": k, "ignore_index": IGNORE_INDEX}
    metrics = {
        "cm": tmc.MulticlassConfusionMatrix(**common),
        "iou": tmc.MulticlassJaccardIndex(average=None, zero_division=nan, **common),
        "miou": tmc.MulticlassJaccardIndex(average="macro", **common),
        "pixel_accuracy": tmc.MulticlassAccuracy(average="micro", **common),
        "class_accuracy": tmc.MulticlassAccuracy(average=None, zero_division=0, **common),
        "dice": tmc.MulticlassF1Score(average=None, zero_division=0, **common),
        "precision": tmc.MulticlassPrecision(average=None, zero_division=0, **common),
        "recall": tmc.MulticlassRecall(average=None, zero_division=0, **common),
    }
    with_ignore = tmc.MulticlassAccuracy(num_classes=k + 1, average="micro")
    for gt, pred in pairs:
        gt_t = torch.from_numpy(np.asarray(gt).astype(np.int64))[None]
        pred_t = torch.from_numpy(np.asarray(pred).astype(np.int64))[None]
        for metric in metrics.values():
            metric.update(pred_t, gt_t)
        with_ignore.update(pred_t, torch.where(gt_t == IGNORE_INDEX, k, gt_t))
    out = {name: metric.compute().numpy() for name, metric in metrics.items()}
    out = {name: (float(v) if v.ndim == 0 else v.astype(float)) for name, v in out.items()}
    out["pixel_accuracy_with_ignore"] = float(with_ignore.compute())
    support = out["cm"].sum(1)
    out["fw_iou"] = float(np.nansum(support / support.sum() * out["iou"]))
    # Mean class accuracy in the FCN sense: over the classes the ground truth has.
    # (torchmetrics' macro average also counts a class that is only predicted, as 0.)
    out["mean_class_accuracy"] = float(out["class_accuracy"][support > 0].mean())
    return out


def _assert_same_as_torchmetrics(pairs, num_classes: int):
    reference = torchmetrics_scores(pairs, num_classes)
    cm, ignored, _ = _summed(pairs, [f"class{k}" for k in range(num_classes)])
    assert cm.tolist() == reference["cm"].astype(np.int64).tolist()  # identical, not close
    ours = scores(cm, ignored)
    np.testing.assert_allclose(ours["iou"], reference["iou"], rtol=1e-6, atol=1e-7,
                               equal_nan=True)
    support, predicted = cm.sum(1), cm.sum(0)
    undefined = {"class_accuracy": support == 0, "recall": support == 0,
                 "precision": predicted == 0, "dice": support + predicted == 0}
    for key, zero_over_zero in undefined.items():
        assert np.array_equal(np.isnan(ours[key]), zero_over_zero), key
        np.testing.assert_allclose(ours[key][~zero_over_zero], reference[key][~zero_over_zero],
                                   rtol=1e-6, atol=1e-7, err_msg=key)
        assert (reference[key][zero_over_zero] == 0).all(), key  # torchmetrics' 0 for 0/0
    for key in ("miou", "pixel_accuracy", "pixel_accuracy_with_ignore",
                "mean_class_accuracy", "fw_iou"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-7), key
    return ours, reference


def test_hand_case_matches_torchmetrics():
    ours, reference = _assert_same_as_torchmetrics([(GT, PRED)], 4)
    # and both match the hand-computed figures (torchmetrics computes in float32)
    np.testing.assert_allclose(reference["iou"], IOU, atol=1e-6, equal_nan=True)
    assert reference["miou"] == pytest.approx(MIOU, abs=1e-6)
    assert reference["pixel_accuracy_with_ignore"] == pytest.approx(PIXEL_ACCURACY_WITH_IGNORE)
    np.testing.assert_allclose(reference["dice"][:3], DICE[:3], atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_label_maps_match_torchmetrics(seed):
    """Several images of different sizes, ignore pixels, a class only predicted (3), a class
    only in the ground truth (4: never predicted, precision undefined), one absent (5)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for h, w in [(17, 23), (31, 9), (8, 40)]:
        gt = rng.choice([0, 1, 2, 4, IGNORE_INDEX], size=(h, w), p=[.4, .2, .2, .1, .1])
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.choice([0, 1, 2, 3], size=(h, w)))
        pred = np.where(pred == IGNORE_INDEX, 0, pred)
        pred = np.where(pred == 4, 1, pred)
        pairs.append((gt.astype(np.uint8), pred.astype(np.uint8)))
    ours, _ = _assert_same_as_torchmetrics(pairs, 6)
    assert ours["iou"][3] == 0.0 and math.isnan(ours["iou"][5])
    assert math.isnan(ours["precision"][4]) and ours["recall"][4] == 0.0


def test_per_sample_rows_sum_to_the_whole_set(folders, tmp_path, params):
    gt, pred = folders
    out, samples = tmp_path / "m.json", tmp_path / "samples.csv"
    evaluate.run(params, "person_car", pred, gt, out, tmp_path / "cm.csv",
                 tmp_path / "cm.png", samples)
    table = pd.read_csv(samples, dtype={"stem": str})
    assert table["stem"].tolist() == ["000000000001", "000000000002"]
    assert table["pixels_evaluated"].sum() == 8 and table["pixels_ignored"].sum() == 2
    # image 1: gt [[0,1,1],[I,0,1]] pred [[0,1,0],[0,0,1]]
    first = table.iloc[0]
    assert first["pixel_accuracy"] == pytest.approx(4 / 5)
    assert first["pixel_accuracy_with_ignore"] == pytest.approx(4 / 6)
    assert first["iou_person"] == pytest.approx(2 / 3)
    assert first["precision_person"] == pytest.approx(1.0)
    assert first["recall_person"] == pytest.approx(2 / 3)
    assert math.isnan(first["iou_car"]) and math.isnan(first["precision_car"])
    ref, _ = _assert_same_as_torchmetrics([(GT_A, PRED_A)], 3)
    assert first["miou"] == pytest.approx(ref["miou"])
    from PIL import Image
    with Image.open(tmp_path / "cm.png") as image:
        assert image.format == "PNG" and image.width > 100


def test_metrics_json_keys_for_dvc(params, folders, tmp_path):
    """`dvc metrics` flattens nested keys with dots: summary figures at the top, one
    `<figure>.<class>` key per class, nothing else nested deeper, but for the bootstrap
    `interval` (issue 16's contract): [lo, hi] pairs under the same names."""
    gt, pred = folders
    evaluate.run(params, "person_car", pred, gt, tmp_path / "m.json", tmp_path / "cm.csv")
    doc = json.loads((tmp_path / "m.json").read_text())
    interval = doc.pop("interval")
    assert list(interval) == ["confidence", "method", "samples", "seed", "miou",
                              "pixel_accuracy", "pixel_accuracy_with_ignore", "iou"]
    assert list(interval["iou"]) == ["background", "person", "car"]
    for pair in [interval[k] for k in ("miou", "pixel_accuracy", "pixel_accuracy_with_ignore")
                 ] + list(interval["iou"].values()):
        assert len(pair) == 2 and (pair == [None, None] or pair[0] <= pair[1])
    assert doc.pop("seeds")["seeds"] == [0]   # its own test: below
    for key, value in doc.items():
        if isinstance(value, dict):
            assert key in {"iou", "dice", "class_accuracy", "precision", "recall"}
            assert list(value) == ["background", "person", "car"]
            assert all(v is None or isinstance(v, float) for v in value.values())
        else:
            assert isinstance(value, (int, float)), key


def test_two_seeds_each_score_per_seed_with_mean_spread_and_interval(params, folders, tmp_path):
    """Seed 0 as in test_run_on_png_folders (mIoU 0.6); seed 1 predicts every labelled pixel
    right (mIoU 1). The top level stays seed 0's model, the one analysed; "seeds" gives
    both, their mean 0.8, min 0.6, max 1, and an interval of the mean between the seeds'
    own extremes (each resample's mean of two mIoUs in [0.6-ish, 1])."""
    gt, pred = folders
    perfect = pred.parent.parent / "seed1" / "val"
    for name, truth in (("000000000001.png", GT_A), ("000000000002.png", GT_B)):
        save_labels(perfect / name, np.where(truth == I, 0, truth).astype(np.uint8))
    params = {**params, "train": {**params["train"], "seeds": [0, 1]}}
    evaluate.run(params, "person_car", {0: pred, 1: perfect}, gt, tmp_path / "m.json",
                 tmp_path / "cm.csv")
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["miou"] == pytest.approx(0.6)
    block = doc["seeds"]
    assert block["seeds"] == [0, 1]
    miou = block["miou"]
    assert miou["per_seed"] == [pytest.approx(0.6), pytest.approx(1.0)]
    assert (miou["mean"], miou["min"], miou["max"]) == (pytest.approx(0.8), pytest.approx(0.6),
                                                        pytest.approx(1.0))
    assert 0.5 <= miou["interval"][0] <= 0.8 <= miou["interval"][1] <= 1.0
    assert block["pixel_accuracy"]["per_seed"] == [pytest.approx(6 / 8), pytest.approx(1.0)]
    assert block["iou"]["person"]["per_seed"] == [pytest.approx(0.6), pytest.approx(1.0)]
    assert block["iou"]["car"] == {"per_seed": [None, None], "mean": None, "min": None,
                                   "max": None, "interval": [None, None]}


def test_seeds_must_match_train_seeds(params, folders, tmp_path):
    gt, pred = folders
    two = {**params, "train": {**params["train"], "seeds": [0, 1]}}
    with pytest.raises(StageError, match=rf"^{pred}: one prediction folder, but train.seeds "
                                         r"lists 2 seeds \[0, 1\]$"):
        evaluate.run(two, "person_car", pred, gt, tmp_path / "m.json", tmp_path / "cm.csv")
    with pytest.raises(StageError, match=r"^predictions of seeds \[1\], but train.seeds is "
                                         r"\[0\]$"):
        evaluate.run(params, "person_car", {1: pred}, gt, tmp_path / "m.json",
                     tmp_path / "cm.csv")
    assert not (tmp_path / "m.json").exists()


def test_a_missing_seed_folder_or_annotated_ground_truth_is_named(params, folders, tmp_path):
    gt, pred = folders
    two = {**params, "train": {**params["train"], "seeds": [0, 1]}}
    missing = tmp_path / "pred" / "seed1" / "val"
    with pytest.raises(StageError) as caught:
        evaluate.run(two, "person_car", {0: pred, 1: missing}, gt, tmp_path / "m.json",
                     tmp_path / "cm.csv")
    assert str(caught.value) == f"{missing}: no predictions of seed 1 (run infer for it)"
    annotations = tmp_path / "instances_val.json"
    annotations.write_text(json.dumps(TINY_COCO))
    (gt / "000000000002.png").unlink()
    with pytest.raises(StageError) as caught:
        evaluate.run(params, "person_car", pred, gt, tmp_path / "m.json", tmp_path / "cm.csv",
                     annotations=annotations, categories_out=tmp_path / "categories.csv")
    assert str(caught.value) == (f"{gt / '000000000002.png'}: ground truth missing for an "
                                 "annotated image; re-run masks")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "categories.csv").exists()


def test_samples_lead_with_the_stem_and_the_plot_is_titled_by_scheme(params, folders, tmp_path,
                                                                    monkeypatch):
    """samples.csv's first column names the image; the confusion plot's title names the
    scheme (the figure's arguments recorded on their way to the real plotting code)."""
    gt, pred = folders
    titles = []
    real = evaluate.confusion_figure
    monkeypatch.setattr(evaluate, "confusion_figure",
                        lambda cm, names, title: titles.append(title) or real(cm, names, title))
    evaluate.run(params, "person_car", pred, gt, tmp_path / "m.json", tmp_path / "cm.csv",
                 tmp_path / "cm.png", tmp_path / "samples.csv")
    assert titles == ["person_car: confusion"]
    assert list(pd.read_csv(tmp_path / "samples.csv").columns)[:3] == [
        "stem", "pixels_evaluated", "pixels_ignored"]


# The val COCO instances of the two images above, as uncompressed RLE (column-major runs,
# from a 0 run): image 1 (2 x 3) holds a person on (0,1) (0,2) (1,2) and a truck on (0,0)
# (1,0); image 2 (2 x 2) a person on (0,0) (0,1) and a car on (1,0). Their ids run against
# their names (COCO's ids are the names' numbers; not so here), so that the outputs' order
# by name differs from the annotations' order by id.
TINY_COCO = {
    "images": [{"id": 3, "file_name": "000000000002.jpg", "height": 2, "width": 2},
               {"id": 7, "file_name": "000000000001.jpg", "height": 2, "width": 3}],
    "annotations": [
        {"id": 1, "image_id": 3, "category_id": 1, "iscrowd": 0,
         "segmentation": {"counts": [0, 1, 1, 1, 1], "size": [2, 2]}},
        {"id": 2, "image_id": 3, "category_id": 3, "iscrowd": 0,
         "segmentation": {"counts": [1, 1, 2], "size": [2, 2]}},
        {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 0,
         "segmentation": {"counts": [2, 1, 1, 2], "size": [2, 3]}},
        {"id": 4, "image_id": 7, "category_id": 8, "iscrowd": 0,
         "segmentation": {"counts": [0, 2, 4], "size": [2, 3]}},
        # none of these three is an instance: a crowd region, a segmentation that draws
        # nothing, and one of no pixel
        {"id": 5, "image_id": 7, "category_id": 3, "iscrowd": 1,
         "segmentation": {"counts": [3, 1, 2], "size": [2, 3]}},
        {"id": 6, "image_id": 3, "category_id": 8, "iscrowd": 0, "segmentation": []},
        {"id": 7, "image_id": 7, "category_id": 1, "iscrowd": 0,
         "segmentation": {"counts": [6], "size": [2, 3]}}],
    # out of id order on purpose: evaluate lists categories by id
    "categories": [{"id": 8, "name": "truck", "supercategory": "vehicle"},
                   {"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"}]}


def test_main_with_annotations_and_two_seeds_by_hand(params, folders, tmp_path, monkeypatch):
    """The command line with --annotations, --categories and --per-image, two seeds (seed 1
    predicts every labelled pixel right, and image 2's car pixel as car), every count by
    hand from the arrays above: the table is seed 0's, per_image.npz has both.
    Seed 0's person pixels: image 1's predicted person, background, person at (0,1) (0,2)
    (1,2); image 2's person, background: 5 pixels, shares 0.4 / 0.6 / 0, both instances at
    least half found (recall 1). car: its one pixel predicted background (recall 0); truck,
    no class of person_car's: both pixels background (pull 0)."""
    gt, pred = folders
    perfect = pred.parent.parent / "seed1" / "val"
    for name, truth in (("000000000001.png", GT_A), ("000000000002.png", GT_B)):
        save_labels(perfect / name, np.where(truth == I, 0, truth).astype(np.uint8))
    save_labels(perfect / "000000000002.png", np.array([[1, 1], [2, 0]], np.uint8))
    params = {**params, "train": {**params["train"], "seeds": [0, 1]}}
    out = tmp_path / "out"
    annotations = tmp_path / "instances_val.json"
    annotations.write_text(json.dumps(TINY_COCO))
    argv = _main_argv(params, folders, tmp_path, out) + [
        "--annotations", str(annotations), "--categories", str(out / "categories.csv"),
        "--per-image", str(out / "per_image.npz")]
    titles = []   # the confusion plot's, on their way to the real plotting code
    real = evaluate.confusion_figure
    monkeypatch.setattr(evaluate, "confusion_figure",
                        lambda cm, names, title: titles.append(title) or real(cm, names, title))
    assert evaluate.main(argv) == 0
    assert titles == ["person_car: confusion"]
    table = pd.read_csv(out / "categories.csv", keep_default_na=False, na_values=[""])
    assert list(table.columns) == ["category", "supercategory", "claimed_by", "instances",
                                   "pixels", "pred_background", "pred_person", "pred_car",
                                   "instance_recall", "instance_pull"]
    rows = table.astype(object).where(table.notna(), None).values.tolist()
    assert rows == [["person", "person", "person", 2, 5, 0.4, 0.6, 0.0, 1.0, None],
                    ["car", "vehicle", "car", 1, 1, 1.0, 0.0, 0.0, 0.0, None],
                    ["truck", "vehicle", None, 1, 2, 1.0, 0.0, 0.0, None, 0.0]]
    with np.load(out / "per_image.npz") as npz:
        arrays = {key: npz[key].tolist() for key in npz}
    assert arrays == {
        "stems": ["000000000001", "000000000002"],
        "class_names": ["background", "person", "car"], "seeds": [0, 1],
        # (image, seed, ground truth, prediction)
        "confusion": [[[[2, 0, 0], [1, 2, 0], [0, 0, 0]], [[2, 0, 0], [0, 3, 0], [0, 0, 0]]],
                      [[[1, 0, 0], [1, 1, 0], [0, 0, 0]], [[0, 0, 1], [0, 2, 0], [0, 0, 0]]]],
        "ignored": [1, 1], "category_ids": [1, 3, 8],
        "category_names": ["person", "car", "truck"], "category_claims": [1, 2, 0],
        # (image, seed, category, prediction)
        "category_pixels": [[[[1, 2, 0], [0, 0, 0], [2, 0, 0]],
                             [[0, 3, 0], [0, 0, 0], [2, 0, 0]]],
                            [[[1, 1, 0], [1, 0, 0], [0, 0, 0]],
                             [[0, 2, 0], [0, 0, 1], [0, 0, 0]]]],
        "category_instances": [[1, 0, 1], [1, 1, 0]],          # (image, category)
        "category_hits": [[[1, 0, 0], [1, 0, 0]], [[1, 0, 0], [1, 1, 0]]]}
    doc = json.loads((out / "m.json").read_text())
    assert doc["miou"] == pytest.approx(0.6) and doc["seeds"]["seeds"] == [0, 1]


def test_a_mask_of_an_image_the_annotations_do_not_list_is_named(params, folders, tmp_path):
    gt, pred = folders
    annotations = tmp_path / "instances_val.json"
    annotations.write_text(json.dumps(TINY_COCO))
    save_labels(gt / "000000000009.png", GT_B)
    with pytest.raises(StageError) as caught:
        evaluate.run(params, "person_car", pred, gt, tmp_path / "m.json", tmp_path / "cm.csv",
                     annotations=annotations, per_image_out=tmp_path / "p.npz")
    assert str(caught.value) == (f"{gt / '000000000009'}.png: image not in {annotations}; "
                                 "re-run masks")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p.npz").exists()


def test_one_seed_per_image_counts_instances_from_the_ground_truth(params, folders, tmp_path):
    """With a single seed (params.yaml's), the instance counts come from that one entry."""
    gt, pred = folders
    annotations = tmp_path / "instances_val.json"
    annotations.write_text(json.dumps(TINY_COCO))
    evaluate.run(params, "person_car", pred, gt, tmp_path / "m.json", tmp_path / "cm.csv",
                 annotations=annotations, per_image_out=tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz") as npz:
        assert npz["seeds"].tolist() == [0] and npz["confusion"].shape == (2, 1, 3, 3)
        assert npz["category_instances"].tolist() == [[1, 0, 1], [1, 1, 0]]


def test_annotations_without_a_category_the_scheme_claims_are_refused(params, folders,
                                                                     tmp_path, caplog):
    """One line from the evaluate logger naming the annotation file, then the scheme, class
    and category (exit 2, nothing written), not a traceback."""
    gt, pred = folders
    annotations = tmp_path / "instances_val.json"
    annotations.write_text(json.dumps({**TINY_COCO, "categories": [
        c for c in TINY_COCO["categories"] if c["name"] != "car"]}))
    expected = (f"{annotations}: schemes.person_car.classes.car: category 'car' not in the "
                "annotations (valid: person, truck)")
    with pytest.raises(StageError) as caught:
        evaluate.run(params, "person_car", pred, gt, tmp_path / "m.json", tmp_path / "cm.csv",
                     annotations=annotations, per_image_out=tmp_path / "p.npz")
    assert str(caught.value) == expected
    out = tmp_path / "out"
    argv = _main_argv(params, folders, tmp_path, out) + [
        "--annotations", str(annotations), "--per-image", str(out / "per_image.npz")]
    assert evaluate.main(argv) == 2
    assert caplog.record_tuples == [("evaluate", logging.ERROR, expected)]
    assert not out.exists() or not any(out.iterdir())


def test_an_unreadable_annotation_file_is_named_once(params, folders, tmp_path):
    """The reader's own message already starts with the file: not named twice."""
    gt, pred = folders
    annotations = tmp_path / "instances_val.json"
    annotations.write_text("[]")
    with pytest.raises(StageError) as caught:
        evaluate.run(params, "person_car", pred, gt, tmp_path / "m.json", tmp_path / "cm.csv",
                     annotations=annotations, per_image_out=tmp_path / "p.npz")
    assert str(caught.value) == (f"{annotations}: expected a JSON object with "
                                 "images/annotations/categories")


@pytest.mark.parametrize("option", ["categories_out", "per_image_out"])
def test_category_outputs_without_annotations_are_refused(params, folders, tmp_path, option):
    gt, pred = folders
    with pytest.raises(StageError) as caught:
        evaluate.run(params, "person_car", pred, gt, tmp_path / "m.json", tmp_path / "cm.csv",
                     **{option: tmp_path / "out"})
    assert str(caught.value) == "evaluate: --categories and --per-image need --annotations"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "pred"]   # nothing written


def test_dvc_metrics_diff_between_two_schemes(params, folders, tmp_path):
    """Two evaluations (person_car, then person_vehicle in the same file) committed one
    after the other: `dvc metrics diff` reports every figure by a readable dotted key."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    dvc = Path(sys.executable).parent / "dvc"
    # dvc is a required dependency (pyproject.toml): its absence is a broken install, not
    # a reason to skip
    assert dvc.is_file(), f"dvc is not installed beside {sys.executable}"
    gt, pred = folders
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@segflow", "-c", "user.name=t"]
    run = lambda *cmd: subprocess.run(cmd, cwd=repo, check=True, capture_output=True,  # noqa: E731
                                      text=True).stdout
    run("git", "init", "-q")
    run(str(dvc), "init", "-q")
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics.json\n")
    evaluate.run(params, "person_car", pred, gt, repo / "metrics.json", tmp_path / "cm.csv")
    run(*git, "add", "-A")
    run(*git, "commit", "-qm", "person_car")
    # person_vehicle: same label maps, class 2 is now "vehicle" and is predicted once
    shutil.copytree(pred, tmp_path / "pred2")
    save_labels(tmp_path / "pred2" / "000000000002.png", np.array([[1, 0], [2, 0]], np.uint8))
    evaluate.run(params, "person_vehicle", tmp_path / "pred2", gt, repo / "metrics.json",
                 tmp_path / "cm.csv")
    diff = json.loads(run(str(dvc), "metrics", "diff", "--all", "--json"))["metrics.json"]
    assert {"miou", "pixel_accuracy", "pixel_accuracy_with_ignore", "iou.person",
            "iou.background", "dice.person", "precision.person", "recall.person"} <= set(diff)
    assert diff["iou.person"]["old"] == pytest.approx(0.6)
    assert diff["iou.person"]["new"] == pytest.approx(0.6)
    assert diff["iou.vehicle"]["old"] is None and diff["iou.vehicle"]["new"] == 0.0
    assert diff["pixel_accuracy"]["diff"] == pytest.approx(-1 / 8)
