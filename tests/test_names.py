"""Names from data becoming paths (issue 13, item 1): the helpers on hostile names (a
slash, "..", "../../x", an absolute path, a NUL byte, 300 characters, names differing only
in case, unicode), and masks and analyze on mirrors whose annotations carry such names:
nothing is ever written outside the output folder. The stage tests import no helper
before running the stage, so on code without the helpers they fail on what the stage
did, not on an import."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import SAMPLE, small_params
from stages import analyze, masks
from stages.lib.coco import COCO_CATEGORIES

HOSTILE = {
    "slash": "a/b",
    "dotdot": "..",
    "escape": "../../x",
    "absolute": "/{tmp}/outside/x",      # inside the test's tmp_path, to see a write there
    "nul": "a\0b",
    "long": "y" * 300,
    "unicode": "Fahrrad-自転車 ünï",
    "hidden": ".hidden",
}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def hostile(key: str, tmp_path: Path) -> str:
    return HOSTILE[key].replace("/{tmp}", str(tmp_path))


def h8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


# ---------------------------------------------------------------- the helpers

@pytest.mark.parametrize("key", sorted(HOSTILE))
def test_a_made_safe_name_is_written_inside_the_folder_only(tmp_path, key):
    from stages.lib.io import atomic_path
    from stages.lib.names import FileNames, inside, safe_filename

    name = hostile(key, tmp_path)
    out = tmp_path / "out"
    before = tree(tmp_path)
    safe = safe_filename(name, ".png", FileNames(str(out)))
    with atomic_path(inside(out, safe)) as tmp:
        tmp.write_bytes(b"png")
    assert tree(tmp_path) - before == {"out", f"out/{safe}"}
    assert tree(tmp_path) >= before
    # portable, visible, short, stable, and marked with a hash of the original
    assert safe.endswith(f"-{h8(name)}.png") and not safe.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in safe)
    assert len(safe) <= 100 + 1 + 8 + 4
    assert safe_filename(name, ".png") == safe


def test_portable_names_are_kept_and_spaces_are_the_callers_choice():
    from stages.lib.names import safe_filename

    assert safe_filename("count_traffic_light") == "count_traffic_light"
    assert safe_filename("person_fraction", ".png") == "person_fraction.png"
    assert safe_filename("../../x", ".png") == f"_._.._x-{h8('../../x')}.png"
    assert safe_filename("traffic light") == f"traffic_light-{h8('traffic light')}"
    # cut to 100 characters; two long names sharing those stay two names
    a, b = safe_filename("y" * 300), safe_filename("y" * 299 + "z")
    assert a == "y" * 100 + f"-{h8('y' * 300)}" and a != b


@pytest.mark.parametrize("name, problem", [
    ("a/b.jpg", "has a folder separator"),
    ("../../x.jpg", "has a folder separator"),
    ("/etc/passwd", "has a folder separator"),
    ("a\\b.jpg", "has a folder separator"),
    ("..", "is not a file name"),
    ("", "is not a file name"),
    ("a\0b.jpg", r"has a control character \(NUL, newline, ...\)"),
    ("a\nb.jpg", r"has a control character \(NUL, newline, ...\)"),
    (".hidden.jpg", r"starts with a dot \(hidden, like segflow's temporaries\)"),
    ("y" * 300, "is 300 bytes long \\(at most 180\\)"),
    ("\udc80.jpg", "is not valid Unicode"),
    (17, "is a int, not a string"),
])
def test_an_image_file_name_that_is_not_plain_is_refused_with_why(name, problem):
    from stages.lib.cli import StageError
    from stages.lib.names import check_plain_name, plain_name_problem

    with pytest.raises(StageError, match=f"^instances_val.json: image 7: file name "
                                         f".* {problem}$"):
        check_plain_name(name, "instances_val.json: image 7")
    assert plain_name_problem("000000000139.jpg") is None
    assert plain_name_problem("Fahrrad-自転車.jpg") is None   # unicode is a plain name


def test_names_differing_only_in_case_or_normalisation_are_one_file(tmp_path):
    from stages.lib.cli import StageError
    from stages.lib.names import FileNames, safe_filename

    used = FileNames("analysis/metadata")
    assert safe_filename("Car", ".png", used, "category 3 'Car'") == "Car.png"
    assert safe_filename("Car", ".png", used, "category 3 'Car'") == "Car.png"  # same owner
    with pytest.raises(StageError, match=r"^analysis/metadata: category 3 'Car' and category "
                                         r"9 'car' would both be named 'Car.png' and "
                                         r"'car.png', one file where case is folded"):
        safe_filename("car", ".png", used, "category 9 'car'")
    images = FileNames("val")
    images.claim("caf\u00e9.png", "image 1")             # composed é
    with pytest.raises(StageError, match="image 1 and image 2 would both be named"):
        images.claim("cafe\u0301.png", "image 2")        # e + combining accent: macOS's form
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("names", [("..", "x"), ("a/../../x",), ("/etc/passwd",),
                                   ("count_../../../escape.png",), ("a\0b",)])
@pytest.mark.parametrize("resolve", [True, False])
def test_inside_refuses_what_leaves_the_folder(tmp_path, names, resolve):
    from stages.lib.cli import StageError
    from stages.lib.names import inside

    with pytest.raises(StageError, match="outside|NUL byte"):
        inside(tmp_path / "out", *names, resolve=resolve)
    assert inside(tmp_path / "out", "metadata", "x.png", resolve=resolve) == \
        tmp_path / "out" / "metadata" / "x.png"


def test_inside_follows_links_for_outputs_only(tmp_path):
    """An output folder holds no link out of it; an input may (DVC links into its cache)."""
    from stages.lib.cli import StageError
    from stages.lib.names import inside

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    with pytest.raises(StageError, match="outside"):
        inside(tmp_path / "out", "link", "x.png")
    assert inside(tmp_path / "out", "link", "x.png", resolve=False) == \
        tmp_path / "out" / "link" / "x.png"


# ---------------------------------------------------------------- masks on hostile mirrors

CATEGORIES = [{"id": i, "name": name, "supercategory": sup}
              for i, (name, sup) in enumerate(COCO_CATEGORIES.items(), start=1)]


def tiny_raw(root: Path, file_names: list[str], categories: list[dict] = CATEGORIES) -> Path:
    """A raw folder with images of the given file names in train (each a small JPEG written
    where the name points, relative to images/train, when that is writable inside root),
    and one plain val image."""
    (root / "annotations").mkdir(parents=True)
    for split, names in (("train", file_names), ("val", ["val.jpg"])):
        folder = root / "images" / split
        folder.mkdir(parents=True)
        images = []
        for image_id, name in enumerate(names, start=1):
            target = Path(os.path.normpath(folder / name)) if "\0" not in name else None
            if target is not None and len(target.name) < 255 and root in target.parents:
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12, 8), (20 * image_id, 90, 30)).save(target, format="JPEG")
            images.append({"id": image_id, "file_name": name, "width": 12, "height": 8})
        doc = {"images": images, "annotations": [], "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def run_masks(tmp_path: Path, params: dict, raw: Path, out: Path) -> int | BaseException:
    params = copy.deepcopy(params)
    params["masks"]["workers"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        return masks.main(["--params", str(tmp_path / "params.yaml"), "--scheme", "person_car",
                           "--raw", str(raw), "--out", str(out)])
    except Exception as exc:    # what the stage did is asserted first, then this
        return exc


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("key, problem", [
    ("escape", "has a folder separator"), ("slash", "has a folder separator"),
    ("absolute", "has a folder separator"),
    ("nul", "has a control character (NUL, newline, ...)"),
    ("long", "is 304 bytes long (at most 180)"),
    ("hidden", "starts with a dot (hidden, like segflow's temporaries)")])
def test_masks_refuses_an_image_file_name_that_is_not_plain(tmp_path, params, caplog, key,
                                                            problem):
    name = hostile(key, tmp_path / "raw" / "elsewhere") + ".jpg"
    raw = tiny_raw(tmp_path / "raw", ["first.jpg", name])
    before = tree(tmp_path)
    outcome = run_masks(tmp_path, params, raw, tmp_path / "masks")
    assert tree(tmp_path) - before <= {"params.yaml"}        # no mask, no folder, anywhere
    assert outcome == 2
    ann = raw / "annotations" / "instances_train.json"
    assert error_lines(caplog) == [f"{ann}: images[1]: file_name {name!r} of image 2 {problem}"]


def renamed(categories: list[dict], names: dict[str, str]) -> list[dict]:
    return [{**c, "name": names.get(c["name"], c["name"])} for c in categories]


def test_masks_names_count_columns_of_hostile_categories_safely(tmp_path, params):
    names = {"bus": "../../../escape", "truck": "a\0b", "boat": "y" * 300,
             "bench": "Fahrrad-自転車", "bird": "/abs/olute"}
    raw = tiny_raw(tmp_path / "raw", ["one.jpg"], renamed(CATEGORIES, names))
    assert run_masks(tmp_path, params, raw, tmp_path / "masks") == 0
    columns = pd.read_csv(tmp_path / "masks" / "metadata.csv").columns
    assert [c for c in columns if c.startswith("count_")][:12] == [
        "count_bicycle", "count_motorcycle", "count_airplane",
        f"count__._.._.._escape-{h8(names['bus'])}", "count_train",
        f"count_a_b-{h8(names['truck'])}", f"count_{'y' * 100}-{h8(names['boat'])}",
        "count_traffic_light", "count_fire_hydrant", "count_stop_sign", "count_parking_meter",
        f"count_Fahrrad-___-{h8(names['bench'])}"]
    assert f"count__abs_olute-{h8(names['bird'])}" in columns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks", "params.yaml", "raw"]


def test_masks_refuses_categories_whose_columns_differ_only_in_case(tmp_path, params, caplog):
    raw = tiny_raw(tmp_path / "raw", ["one.jpg"], renamed(CATEGORIES, {"bus": "Boat"}))
    assert run_masks(tmp_path, params, raw, tmp_path / "masks") == 2
    assert error_lines(caplog) == [
        f"{raw / 'annotations' / 'instances_train.json'}: metadata columns: category 6 'Boat' "
        "and category 9 'boat' would both be named 'count_Boat' and 'count_boat', one file "
        "where case is folded (macOS, Windows)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "raw"]


# ---------------------------------------------------------------- analyze on the real sample

@pytest.fixture(scope="module")
def predicted(tmp_path_factory, default_params, one_torch_thread):
    """12 real val images through download, masks, a one-epoch train and infer."""
    from stages import download, infer, train

    root = tmp_path_factory.mktemp("names")
    params = small_params(default_params, train=4, val=12, size=64, epochs=1)
    params["data"]["base_url"] = str(SAMPLE)
    params["train"]["device"] = params["infer"]["device"] = params["analyze"]["device"] = "cpu"
    # every bin of two or more samples whose mean loss is above the mean is flagged: the
    # fields named after the renamed categories get their figure drawn
    # fdr 1: every bin of 2+ samples is flagged (q <= 1), so every field's chart is drawn
    params["analyze"]["buckets"].update(fdr=1.0, min_count=2)
    download.run(params, root / "raw")
    masks.run(params, "person_car", root / "raw", root / "masks")
    deterministic = torch_deterministic()
    train.run(params, "person_car", root / "raw", root / "masks", root / "model")
    torch_deterministic(deterministic)
    infer.run(params, root / "model", root / "raw", root / "masks", root / "pred")
    return {"root": root, "params": params}


def torch_deterministic(value: bool | None = None) -> bool:
    import torch

    if value is not None:
        torch.use_deterministic_algorithms(value)
    return torch.are_deterministic_algorithms_enabled()


def test_analyze_charts_categories_named_like_paths_inside_its_folder(predicted, tmp_path,
                                                                     caplog):
    """Categories of the sample renamed in the annotations (every split, as a mirror would
    serve them): the first would have put its chart beside the output folder, the second
    inside it but outside metadata/; a NUL byte and 300 characters; unicode."""
    root, params = predicted["root"], predicted["params"]
    names = {"bottle": "../../../../escape", "cup": "../../../escape", "bowl": "\0" + "z" * 300,
             "cell phone": "Handy-携帯"}
    ws = tmp_path / "ws"
    shutil.copytree(root / "raw", ws / "raw")
    for split in ("train", "val"):
        path = ws / "raw" / "annotations" / f"instances_{split}.json"
        doc = json.loads(path.read_text())
        doc["categories"] = renamed(doc["categories"], names)
        path.write_text(json.dumps(doc))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert masks.main(["--params", str(tmp_path / "params.yaml"), "--scheme", "person_car",
                       "--raw", str(ws / "raw"), "--out", str(ws / "masks")]) == 0
    before = tree(tmp_path)
    try:
        outcome = analyze.main(["--params", str(tmp_path / "params.yaml"),
                                "--predictions", str(root / "pred"), "--masks", str(ws / "masks"),
                                "--model", str(root / "model"), "--raw", str(ws / "raw"),
                                "--out", str(ws / "analysis")])
    except Exception as exc:    # what the stage wrote is asserted first, then this
        outcome = exc
    written = tree(tmp_path) - before
    assert {w for w in written if not w.startswith("ws/analysis/")} == {"ws/analysis"}
    assert outcome == 0, error_lines(caplog)

    from stages.lib.names import safe_filename

    bins = pd.read_csv(ws / "analysis" / "metadata_loss.csv", keep_default_na=False)
    figures = {w for w in written if w.startswith("ws/analysis/metadata/")}
    for original in names.values():
        field = "count_" + safe_filename(original)
        rows = bins[bins["field"] == field]
        assert len(rows) and rows["flagged"].any(), field   # the branch that drew it ran
        figure = f"metadata/{safe_filename(field, '.png')}"   # a long field is cut again
        assert set(rows["figure"]) == {figure} and f"ws/analysis/{figure}" in figures
    # every figure is where its rows say, and only those
    drawn = set(bins.loc[bins["figure"] != "", "figure"])
    assert {f"ws/analysis/{f}" for f in drawn} == figures
    assert "metadata/brightness.png" in drawn and "metadata/person_fraction.png" in drawn

