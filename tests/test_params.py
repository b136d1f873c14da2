"""params.yaml validation: the JSON Schema plus the checks JSON Schema cannot express."""
from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT, SAMPLE
from stages.lib.coco import AnnotationError, read_instances, resolve_scheme
from stages.lib.params import (ParamsError, load_params, load_schema, scheme_class_names,
                               validate_params)


def _error(params: dict) -> str:
    with pytest.raises(ParamsError) as info:
        validate_params(params)
    return str(info.value)


def test_default_params_yaml_is_valid(default_params):
    assert validate_params(copy.deepcopy(default_params)) == default_params
    loaded = load_params(ROOT / "params.yaml")
    assert loaded == default_params
    assert list(loaded["schemes"]) == ["person_car", "person_vehicle"]


def test_schema_requires_every_section():
    assert set(load_schema()["required"]) == {"data", "schemes", "masks", "model", "train",
                                              "infer", "evaluate", "analyze", "compare",
                                              "report"}


@pytest.mark.parametrize("path, key", [
    ((), "foo"),
    (("data",), "mirror"),
    (("data", "max_images"), "test"),
    (("train",), "epoch"),
    (("infer",), "workers"),
    (("schemes", "person_car"), "ignore_overlaps"),
    (("schemes", "person_car", "classes", "person"), "colour"),
])
def test_unknown_key_anywhere_is_named_with_its_path(params, path, key):
    node = params
    for part in path:
        node = node[part]
    node[key] = 1
    message = _error(params)
    where = ".".join((*path, key))
    assert f"params.yaml: {where}: unknown key (allowed here: " in message


def test_wrong_type_names_the_key(params):
    params["train"]["epochs"] = "ten"
    message = _error(params)
    assert message == "params.yaml: train.epochs: 'ten' is not of type 'integer'"


def test_all_problems_reported_at_once(params):
    params["train"]["epochs"] = 0
    params["infer"]["batch_size"] = "big"
    params["analyze"]["projection"] = "isomap"
    message = _error(params)
    for key in ("train.epochs", "infer.batch_size", "analyze.projection"):
        assert f"params.yaml: {key}:" in message


@pytest.mark.parametrize("section, key, value", [
    ("train", "image_size", 100),      # not a multiple of 32
    ("train", "device", "tpu"),
    ("data", "year", 2015),
    ("model", "dropout", 1.0),
    ("masks", "grayscale_tolerance", -1),
    ("masks", "colour_stats_scale", 3),    # libjpeg scales by 1/2, 1/4, 1/8 only
])
def test_out_of_range_values_fail(params, section, key, value):
    params[section][key] = value
    assert f"{section}.{key}:" in _error(params)


def test_missing_key_fails(params):
    del params["train"]["lr"]
    assert "train: 'lr' is a required property" in _error(params)


def test_unknown_category_lists_valid_names(params):
    params["schemes"]["person_car"]["classes"]["car"]["categories"] = ["kar"]
    message = _error(params)
    assert "schemes.person_car.classes.car.categories.0: 'kar' is not one of" in message
    for valid in ("'person'", "'car'", "'truck'", "'toothbrush'", "'hair drier'"):
        assert valid in message


def test_unknown_supercategory_lists_valid_names(params):
    params["schemes"]["person_vehicle"]["classes"]["vehicle"]["supercategories"] = ["vehicles"]
    message = _error(params)
    assert "schemes.person_vehicle.classes.vehicle.supercategories.0: 'vehicles' is not one of" \
        in message
    for valid in ("'vehicle'", "'animal'", "'kitchen'"):
        assert valid in message


def test_category_claimed_twice_in_one_scheme_fails(params):
    params["schemes"]["person_car"]["classes"]["car"]["categories"] = ["car", "person"]
    message = _error(params)
    assert "schemes.person_car.classes.car: COCO category 'person' is already claimed" in message
    assert "'person' is already claimed by class 'person'" in message


def test_supercategory_claimed_twice_in_one_scheme_fails(params):
    params["schemes"]["person_vehicle"]["classes"]["person"] = {"supercategories": ["vehicle"]}
    message = _error(params)
    assert "schemes.person_vehicle.classes.vehicle: COCO category 'bicycle' is already " \
        "claimed by class 'person'" in message


def test_same_category_in_two_schemes_is_fine(params):
    # person is claimed in both default schemes: only duplicates within a scheme are errors
    assert validate_params(params) is params


def test_category_claimed_directly_and_via_supercategory_fails_when_resolved(params):
    params["schemes"]["person_vehicle"]["classes"]["car"] = {"categories": ["car"]}
    instances = _val_instances()
    # one wording with params validation (stages.lib.params.check_scheme_rules), naming the key
    with pytest.raises(AnnotationError, match=r"^schemes\.person_vehicle\.classes\.car: COCO "
                                              r"category 'car' is already claimed by class "
                                              r"'vehicle'$"):
        resolve_scheme("person_vehicle", params["schemes"]["person_vehicle"],
                       instances["categories"])


def test_category_claimed_directly_and_via_supercategory_fails_validation(params):
    params["schemes"]["person_vehicle"]["classes"]["car"] = {"categories": ["car"]}
    assert "car" in _error(params)


def test_background_is_not_a_class_name(params):
    params["schemes"]["person_car"]["classes"]["background"] = {"categories": ["dog"]}
    message = _error(params)
    assert "schemes.person_car.classes" in message
    assert "'background'" in message


def test_class_name_must_be_an_identifier(params):
    params["schemes"]["person_car"]["classes"]["two words"] = {"categories": ["dog"]}
    assert "schemes.person_car.classes: 'two words' is not a valid name" in _error(params)


def test_empty_class_fails(params):
    params["schemes"]["person_car"]["classes"]["car"] = {}
    assert "schemes.person_car.classes.car" in _error(params)


def test_scheme_class_names_order(params):
    assert scheme_class_names(params, "person_car") == ["background", "person", "car"]
    assert scheme_class_names(params, "person_vehicle") == ["background", "person", "vehicle"]
    params["schemes"]["many"] = {"classes": {"zebra": {"categories": ["zebra"]},
                                             "animal": {"supercategories": ["animal"]},
                                             "bus": {"categories": ["bus"]}}}
    # zebra and animal overlap as names but this is caught only on resolution, not here
    assert scheme_class_names(params, "many") == ["background", "zebra", "animal", "bus"]


def test_unknown_scheme_name_lists_known(params):
    with pytest.raises(ParamsError, match=r"'nope'.*known: person_car, person_vehicle"):
        scheme_class_names(params, "nope")


def test_load_params_file_errors(tmp_path, params):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ParamsError, match="None is not of type 'object'"):
        load_params(empty)
    params["train"]["epochs"] = "ten"
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=rf"{typo}: train.epochs"):
        load_params(typo)


def _val_instances() -> dict:
    with zipfile.ZipFile(SAMPLE / "annotations" / "annotations_trainval2017.zip") as zf:
        return json.loads(zf.read("annotations/instances_val2017.json"))


def test_resolve_scheme_maps_supercategory_to_every_member(params):
    cats = _val_instances()["categories"]
    scheme = resolve_scheme("person_vehicle", params["schemes"]["person_vehicle"], cats)
    vehicle_ids = {c["id"] for c in cats if c["supercategory"] == "vehicle"}
    assert len(vehicle_ids) == 8
    assert scheme.class_names == ("background", "person", "vehicle")
    assert scheme.class_of_category == {1: 1, **{i: 2 for i in vehicle_ids}}
    car = resolve_scheme("person_car", params["schemes"]["person_car"], cats)
    assert car.class_of_category == {1: 1, 3: 2}
    assert car.num_classes == 3


def test_read_instances_rejects_non_coco(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"images": []}')
    with pytest.raises(AnnotationError, match="annotations, categories"):
        read_instances(path)


def test_schema_enums_list_exactly_the_coco_table():
    from stages.lib.coco import COCO_CATEGORIES, COCO_SUPERCATEGORIES
    from stages.lib.params import load_schema
    defs = load_schema()["$defs"]
    assert defs["coco_category"]["enum"] == list(COCO_CATEGORIES)
    assert sorted(defs["coco_supercategory"]["enum"]) == sorted(COCO_SUPERCATEGORIES)


def test_image_size_below_64_is_refused(params):
    # 32 px leaves a 1x1 bottleneck, where BatchNorm cannot train on a batch of one.
    params["train"]["image_size"] = 32
    assert "train.image_size: 32 is less than the minimum of 64" in _error(params)


@pytest.mark.parametrize("section, key, value", [
    ("data", "mode", "torrent"),
    ("data", "backoff_s", -1),
    ("masks", "workers", 0),
])
def test_new_data_and_masks_values_are_checked(params, section, key, value):
    params[section][key] = value
    assert f"{section}.{key}:" in _error(params)


def test_background_share_must_be_a_fraction(params):
    params["data"]["filter"]["background_share"] = 1.5
    assert "data.filter.background_share: 1.5 is greater than the maximum of 1" in _error(params)


def test_checksum_must_name_its_algorithm(params):
    params["data"]["checksums"] = {"zips/val2017.zip": "4950dc9d00dbe1c933ee0170f5797584351d2a41"}
    assert "data.checksums.zips/val2017.zip: " in _error(params)
    params["data"]["checksums"] = {
        "zips/val2017.zip": "sha1:4950dc9d00dbe1c933ee0170f5797584351d2a41"}
    validate_params(params)


@pytest.mark.parametrize("value", ["nearest", "priority"])
def test_crowd_rule_is_an_enum(params, value):
    params["schemes"]["person_car"]["crowd"] = value
    assert "schemes.person_car.crowd: " in _error(params)


def test_overlap_priority_must_list_every_class_once(params):
    params["schemes"]["person_car"]["overlap"] = ["car", "person"]
    validate_params(params)
    params["schemes"]["person_car"]["overlap"] = ["car"]
    message = _error(params)
    assert "schemes.person_car.overlap: the priority list ['car'] must name every class" in message
    params["schemes"]["person_car"]["overlap"] = ["car", "bus"]
    assert "schemes.person_car.overlap" in _error(params)
    params["schemes"]["person_car"]["overlap"] = "first"
    assert "schemes.person_car.overlap: 'first' is not valid" in _error(params)


# ---------------------------------------------------------------- issue 13: hostile params
# Each input below passed validation (or crashed the loader) before: the file is built
# here, from params.yaml's own text with one edit.

PARAMS_TEXT = (ROOT / "params.yaml").read_text()
TITLE_LINE = 'title: "segflow: label-scheme comparison on COCO"'


def _params_file(tmp_path, old: str, new: str, prefix: str = "") -> Path:
    assert PARAMS_TEXT.count(old) == 1, old
    path = tmp_path / "params.yaml"
    path.write_text(prefix + PARAMS_TEXT.replace(old, new))
    return path


def _load_error(path) -> str:
    with pytest.raises(ParamsError) as info:
        load_params(path)
    return str(info.value)


def _line_of(path, fragment: str) -> int:
    text = path.read_text()
    return text.count("\n", 0, text.index(fragment)) + 1


def _alias_bomb(levels: int, width: int = 10, mapping: bool = False) -> str:
    """A top-level `bomb:` list of anchors, each level `width` aliases of the one before: a
    few hundred bytes standing for width**levels values once expanded (billion laughs)."""
    def collection(items):
        if mapping:
            return "{" + ", ".join(f"k{i}: {item}" for i, item in enumerate(items)) + "}"
        return "[" + ", ".join(items) + "]"
    lines = ["bomb:", f"  - &l0 {collection(['lol'] * width)}"]
    lines += [f"  - &l{n} {collection([f'*l{n - 1}'] * width)}" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("section, key, value", [
    ("train", "epochs", 1.0),
    ("train", "batch_size", 4.0),
    ("infer", "num_workers", 0.0),
    ("masks", "colour_stats_scale", 4.0),   # an enum of integers: 4.0 == 4 for enum alone
    ("data", "year", 2017.0),
])
def test_a_float_is_not_an_integer(params, section, key, value):
    params[section][key] = value
    assert _error(params) == f"params.yaml: {section}.{key}: {value} is not of type 'integer'"


@pytest.mark.parametrize("old, new, key, shown", [
    ("  lr: 0.002\n", "  lr: .nan\n", "train.lr", "nan"),
    ("  lr: 0.002\n", "  lr: .NaN\n", "train.lr", "nan"),
    ("  weight_decay: 0.0001\n", "  weight_decay: .inf\n", "train.weight_decay", "inf"),
    ("  backoff_s: 0.5 ", "  backoff_s: .nan ", "data.backoff_s", "nan"),
    ("  timeout_s: 60 ", "  timeout_s: .inf ", "data.timeout_s", "inf"),
    ("  fdr: 0.1\n  # A verdict", "  fdr: .inf\n  # A verdict", "compare.fdr",
     "inf"),
    # refused before too, as below 0
    ("  fdr: 0.1\n  # A verdict", "  fdr: -.inf\n  # A verdict", "compare.fdr",
     "-inf"),
])
def test_numbers_are_finite(tmp_path, old, new, key, shown):
    path = _params_file(tmp_path, old, new)
    assert _load_error(path) == f"{path}: {key}: {shown} is not of type 'number'"


def _numeric_schemas(node, where=()):
    """(path, schema) of every integer or number in the schema, $defs included."""
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number") or str(node.get("$ref", "")).endswith(
                "/positive_int"):
            yield ".".join(where), node
        for key, child in node.items():
            yield from _numeric_schemas(child, (*where, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _numeric_schemas(child, (*where, str(index)))


def test_every_integer_and_number_in_the_schema_has_a_maximum():
    schema = load_schema()
    unbounded = []
    for where, node in _numeric_schemas(schema):
        if where == "$defs.positive_int":
            continue  # a building block: every use adds its own maximum (checked below)
        ref = node.get("$ref", "").rsplit("/", 1)[-1]
        bounds = {**schema["$defs"].get(ref, {}), **node}
        if not {"maximum", "exclusiveMaximum", "enum"} & set(bounds):
            unbounded.append(where)
    assert unbounded == []


@pytest.mark.parametrize("path, value, maximum", [
    (("train", "num_workers"), 100000, 64),
    (("infer", "num_workers"), 100000, 64),
    (("train", "epochs"), 10 ** 9, 10000),
    (("analyze", "batch_size"), 10 ** 6, 4096),
    (("analyze", "seed"), 2 ** 32, 4294967295),          # scikit-learn refuses larger seeds
    (("analyze", "clustering", "k_max"), 10 ** 6, 100),
    (("data", "max_images", "train"), 10 ** 12, None),   # oneOf with null
])
def test_integers_have_sensible_maxima(params, path, value, maximum):
    node = params
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    where = ".".join(path)
    expected = (f"{value} is greater than the maximum of {maximum}" if maximum
                else f"{value} is not valid under any of the given schemas")
    assert _error(params) == f"params.yaml: {where}: {expected}"


@pytest.mark.parametrize("old, new, key, first, second", [
    ("  epochs: 40\n", "  epochs: 1\n  epochs: 500\n", "train.epochs",
     "  epochs: 1\n", "  epochs: 500"),
    ("  epochs: 40\n", '  epochs: 1\n  "epochs": 500\n', "train.epochs",
     "  epochs: 1\n", '  "epochs": 500'),
    ("      car: {categories: [car]}\n",
     "      car: {categories: [car]}\n      car: {categories: [bus]}\n",
     "schemes.person_car.classes.car", "      car: {categories: [car]}",
     "      car: {categories: [bus]}"),
    ("  n_examples: 6 ", "  n_examples: 6\n  n_examples: 7 ", "report.n_examples",
     "  n_examples: 6\n", "  n_examples: 7"),
    ("\ncompare:\n", "\ncompare: {min_count: 3, fdr: 0.1}\ncompare:\n", "compare",
     "\ncompare: {", "\ncompare:\n"),
    ("  buckets:\n", "  buckets:\n    fdr: 0.2\n", "analyze.buckets.fdr", "    fdr: 0.2",
     "    fdr: 0.1"),
])
def test_duplicate_key_is_refused_with_both_line_numbers(tmp_path, old, new, key, first, second):
    path = _params_file(tmp_path, old, new)
    lines = _line_of(path, first.lstrip("\n")), _line_of(path, second.lstrip("\n"))
    assert lines[0] < lines[1]
    assert _load_error(path) == f"{path}: {key}: duplicate key at lines {lines[0]} and {lines[1]}"


def test_merge_keys_may_be_overridden_but_not_repeated(tmp_path):
    # A merge (<<) is YAML's way to say "these, except": an explicit key beside it is not
    # a duplicate. Repeating the explicit key is.
    merged = ("  person_vehicle:\n    <<: *base\n    overlap: [vehicle, person]\n"
              "    classes:\n      person: {categories: [person]}\n"
              "      vehicle: {supercategories: [vehicle]}\n")
    old = PARAMS_TEXT[PARAMS_TEXT.index("  person_vehicle:\n"):PARAMS_TEXT.index("\nmasks:")]
    text = PARAMS_TEXT.replace("  person_car:\n", "  person_car: &base\n").replace(old, merged)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    loaded = load_params(path)["schemes"]["person_vehicle"]
    assert loaded == {"classes": {"person": {"categories": ["person"]},
                                  "vehicle": {"supercategories": ["vehicle"]}},
                      "crowd": "ignore", "overlap": ["vehicle", "person"]}
    path.write_text(text.replace("    overlap: [vehicle, person]\n",
                                 "    overlap: [vehicle, person]\n    overlap: ignore\n"))
    first = _line_of(path, "    overlap: [vehicle, person]")
    assert _load_error(path) == (f"{path}: schemes.person_vehicle.overlap: duplicate key at "
                                 f"lines {first} and {first + 1}")


@pytest.mark.parametrize("mapping", [False, True], ids=["lists", "mappings"])
def test_alias_bomb_is_refused_before_validation(tmp_path, mapping):
    # 10^6 values here, so that the old loader's answer (the expanded value quoted in the
    # message) stays a few MB; the stage and Snakemake tests below use 10^9.
    path = _params_file(tmp_path, TITLE_LINE, "title: *l5",
                        prefix=_alias_bomb(levels=6, mapping=mapping))
    message = _load_error(path)
    assert message == (f"{path}: bomb.3: line 5: more than 10000 values with aliases "
                       "expanded (an alias bomb?); params.yaml has about 200")


def test_alias_cycle_is_refused(tmp_path):
    path = _params_file(tmp_path, "  image_ids: []", "  image_ids: &ids [1, *ids]")
    line = _line_of(path, "&ids")
    assert _load_error(path) == (f"{path}: analyze.similars.image_ids: line {line}: alias "
                                 "*ids refers to a node that contains it (a cycle)")


def test_unreadable_values_are_one_error_line(tmp_path):
    # Each of these raised from inside PyYAML (RecursionError, ValueError) with a traceback.
    path = _params_file(tmp_path, "  image_ids: []", "  image_ids: " + "[" * 1000 + "]" * 1000)
    line = _line_of(path, "image_ids")
    assert _load_error(path) == (f"{path}: analyze.similars.image_ids{'.0' * 14}: "
                                 f"line {line}: nested deeper than 16 levels")
    path = _params_file(tmp_path, "  epochs: 40\n", "  epochs: 1" + "0" * 5000 + "\n")
    line = _line_of(path, "  epochs:")
    assert _load_error(path).startswith(f"{path}: line {line}: unreadable value: Exceeds the "
                                        "limit (4300 digits) for integer string conversion")
    path = _params_file(tmp_path, "  seed: 0\n  filter:", "  seed: 2024-13-45\n  filter:")
    line = _line_of(path, "2024-13-45")
    assert _load_error(path) == f"{path}: line {line}: unreadable value: month must be in 1..12"


def test_params_file_size_is_bounded(tmp_path):
    path = _params_file(tmp_path, "\nmasks:", "\n" + ("# padding\n" * 200_000) + "masks:")
    assert _load_error(path) == (f"{path}: larger than 1048576 bytes; a params file is a few KB")


LONG = "x" * 100_000


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p["train"].update(epochs=LONG),
     f"params.yaml: train.epochs: '{'x' * 79}... (100002 chars) is not of type 'integer'"),
    (lambda p: p["train"].update({LONG: 1}),
     f"params.yaml: train.{'x' * 80}... (100000 chars): unknown key (allowed here: device, "
     "nproc, image_size, epochs, batch_size, lr, weight_decay, seeds, num_workers, hflip, "
     "loss, class_weights, sampler, schedule, warmup, val_every, cpu_threads, augment)"),
    (lambda p: p["report"].update(title=list(range(20_000))),
     f"params.yaml: report.title: {repr(list(range(20_000)))[:80]}... "
     f"({len(repr(list(range(20_000))))} chars) is not of type 'string'"),
    (lambda p: p["schemes"].update({LONG: p["schemes"]["person_car"]}),
     f"params.yaml: schemes: '{'x' * 79}... (100002 chars) is not a valid name (letters, "
     "digits and _, starting with a letter; 'background' is reserved for class 0)"),
], ids=["value", "unknown_key", "list", "scheme_name"])
def test_error_messages_cut_long_values(params, edit, expected):
    edit(params)
    message = _error(params)
    assert message == expected
    # the value is cut to 80 characters; the rest is the key and, for an unknown key, the
    # allowed list (18 train keys since train.val_every and cpu_threads)
    assert len(message) < 320


def test_many_problems_are_counted_not_listed(params):
    params["analyze"]["similars"]["image_ids"] = [f"id{i}" for i in range(1000)]
    message = _error(params)
    problems = message.split("; ")
    assert problems[0] == ("params.yaml: analyze.similars.image_ids.0: "
                           "'id0' is not of type 'integer'")
    assert problems[-1] == "... and 995 more problems"
    assert len(problems) == 6 and "\n" not in message


def test_unique_items_check_is_linear(tmp_path, monkeypatch, params):
    # jsonschema checks uniqueItems on a list it cannot sort (objects, mixed types) by
    # comparing every pair: 3000 objects, within the node bound, cost 4.5 million
    # comparisons. Counted here through jsonschema's own equality, which that path calls.
    calls = []
    real_equal = jsonschema._utils.equal
    monkeypatch.setattr(jsonschema._utils, "equal",
                        lambda a, b: calls.append(1) or real_equal(a, b))
    ids = "[" + ", ".join(f"{{n: {i}}}" for i in range(3000)) + "]"
    path = _params_file(tmp_path, "  image_ids: []", f"  image_ids: {ids}")
    message = _load_error(path)
    assert len(calls) < 3000
    assert message.startswith(f"{path}: analyze.similars.image_ids: [{{'n': 0}}, {{'n': 1}}, ")
    assert "is too long" in message and "non-unique" not in message
    # Still JSON Schema's equality: 1 == 1.0 at any depth, but a boolean is never a number.
    for ids, unique in [([1, 1.0], False), ([True, 1], True), ([[1], [1], "x"], False),
                        ([{"a": [1, 2]}, {"a": [1, 2.0]}], False), ([{"a": 1}, {"a": True}], True)]:
        params["analyze"]["similars"]["image_ids"] = ids
        duplicate = f"analyze.similars.image_ids: {ids!r} has non-unique elements"
        assert (duplicate in _error(params)) is not unique, ids


def test_k_min_above_k_max_is_a_params_error(params):
    params["analyze"]["clustering"].update(k_min=5, k_max=3)
    assert _error(params) == "params.yaml: analyze.clustering: k_min 5 is above k_max 3"


# ---------------------------------------------------------------- the same, as a user sees it

HOSTILE = {
    # a few hundred bytes standing for 10^9 values: the old code quoted it in full
    "alias_bomb": (TITLE_LINE, "title: *l8", _alias_bomb(levels=9),
                   "bomb.3: line 5: more than 10000 values with aliases expanded (an alias "
                   "bomb?); params.yaml has about 200"),
    "duplicate_key": ("  epochs: 40\n", "  epochs: 1\n  epochs: 500\n", "",
                      "train.epochs: duplicate key at lines {line} and {next}"),
    "float_epochs": ("  epochs: 40\n", "  epochs: 1.0\n", "",
                     "train.epochs: 1.0 is not of type 'integer'"),
    "deep_nesting": ("  image_ids: []", "  image_ids: " + "[" * 1000 + "]" * 1000, "",
                     "analyze.similars.image_ids" + ".0" * 14 + ": line {line}: nested "
                     "deeper than 16 levels"),
}


def _hostile_file(tmp_path, name: str) -> tuple[Path, str]:
    old, new, prefix, expected = HOSTILE[name]
    path = _params_file(tmp_path, old, new, prefix)
    line = _line_of(path, new.strip().split("\n")[0])
    return path, expected.format(line=line, next=line + 1)


def _bounded(memory_bytes: int = 4 << 30):
    # The old code expands a 10^9-value bomb: the child gets this much address space
    # and no more, so that it fails with MemoryError instead of taking the machine's.
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    return limit


def _run(cmd, cwd, env=None) -> subprocess.CompletedProcess:
    # timeout: a hang guard only (the old code walks 10^9 values); a refusal takes ~1 s.
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=_bounded())


@pytest.mark.parametrize("name", ["alias_bomb", "duplicate_key", "deep_nesting"])
def test_stage_main_refuses_hostile_params_in_one_line(tmp_path, name):
    work = tmp_path / "work"
    work.mkdir()
    path, expected = _hostile_file(work, name)
    before = sorted(p.name for p in work.iterdir())
    result = _run([sys.executable, "-m", "stages.compare", "--params", str(path),
                   "--analysis", str(work / "analysis"), "--out", str(work / "comparison")],
                  cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].endswith(f" compare ERROR {path}: {expected}")
    assert len(lines[0]) < 300
    assert sorted(p.name for p in work.iterdir()) == before   # nothing written


@pytest.mark.parametrize("name", ["alias_bomb", "duplicate_key", "float_epochs"])
def test_snakemake_refuses_what_the_stages_refuse(tmp_path, name):
    # A copy of the workflow (and of the stages it imports) with the hostile params.yaml.
    for part in ("Snakefile", "workflow", "stages"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy2
        copy(ROOT / part, tmp_path / part)
    _, expected = _hostile_file(tmp_path, name)
    before = sorted(p.name for p in tmp_path.iterdir())
    env = {**os.environ, "PYTHONPATH": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = _run([str(Path(sys.executable).parent / "snakemake"), "-n", "--cores", "1"],
                  cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"params.yaml: {expected}", output[-2000:]
    assert "Traceback" not in output and 'File "' not in output
    assert len(output) < 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # not even .snakemake/


@pytest.mark.parametrize("where", ["schemes", "classes"])
def test_names_that_differ_only_in_case_are_refused(params, where):
    # they become folders and files: one file on a case-folding file system
    params = copy.deepcopy(params)
    if where == "schemes":
        params["schemes"]["Person_car"] = copy.deepcopy(params["schemes"]["person_car"])
        match = r"schemes: 'person_car' and 'Person_car' differ only in case"
    else:
        params["schemes"]["person_car"]["classes"]["Car"] = {"categories": ["truck"]}
        match = r"schemes.person_car.classes: 'car' and 'Car' differ only in case"
    with pytest.raises(ParamsError, match=match):
        validate_params(params)


def test_schema_lists_exactly_the_models_latent_layers():
    # JSON Schema cannot import the constant: this keeps the two in step
    from stages.lib.model import LATENT_LAYERS

    layer = load_schema()["properties"]["analyze"]["$defs"]["layer"]
    assert layer == {"enum": list(LATENT_LAYERS)}


# ---------------------------------------------------------------- scheme rules, one function

SCHEME = {"classes": {"pet": {"categories": ["dog"]}, "wheels": {"supercategories": ["vehicle"]}},
          "crowd": "ignore", "overlap": "ignore"}


def test_scheme_rules_return_each_claimed_category_with_its_class():
    from stages.lib.params import check_scheme_rules

    owner = check_scheme_rules("s", SCHEME, {"vehicle": ["car", "bus"], "animal": ["dog"]})
    assert owner == {"dog": "pet", "car": "wheels", "bus": "wheels"}
    # by default with COCO's own supercategories
    assert sorted(check_scheme_rules("s", SCHEME)) == sorted(
        ["dog", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"])


@pytest.mark.parametrize("change, message", [
    ({"classes": {"pet": {"categories": ["dog"]}, "Pet": {"categories": ["cat"]}}},
     "schemes.s.classes: 'pet' and 'Pet' differ only in case; they would name the same file "
     "where case is folded (macOS, Windows)"),
    ({"classes": {"Background": {"categories": ["dog"]}}},
     "schemes.s.classes: 'background' and 'Background' differ only in case; they would name "
     "the same file where case is folded (macOS, Windows)"),
    ({"crowd": "drop"}, "schemes.s.crowd: 'drop' is not one of ('ignore', 'class', 'background')"),
    ({"overlap": ["pet"]}, "schemes.s.overlap: the priority list ['pet'] must name every class "
                           "of the scheme exactly once (pet, wheels)"),
    ({"overlap": ["pet", "pet"]}, "schemes.s.overlap: the priority list ['pet', 'pet'] must name "
                                  "every class of the scheme exactly once (pet, wheels)"),
])
def test_scheme_rules_name_the_key_of_the_rule_broken(change, message):
    from stages.lib.params import SchemeRuleError, check_scheme_rules

    with pytest.raises(SchemeRuleError) as info:
        check_scheme_rules("s", {**SCHEME, **change})
    assert str(info.value) == message


def test_resolving_uses_the_files_supercategories_where_validation_uses_cocos(params):
    # an annotation file whose 'vehicle' also holds 'dog': valid params, a clash in this file
    categories = [{"id": 1, "name": "dog", "supercategory": "vehicle"},
                  {"id": 2, "name": "car", "supercategory": "vehicle"}]
    assert validate_params(params) is params
    scheme = {**SCHEME, "classes": {"pet": {"categories": ["dog"]},
                                    "wheels": {"supercategories": ["vehicle"]}}}
    with pytest.raises(AnnotationError, match=r"^schemes\.s\.classes\.wheels: COCO category "
                                              r"'dog' is already claimed by class 'pet'$"):
        resolve_scheme("s", scheme, categories)
    fine = {**scheme, "classes": {"wheels": {"supercategories": ["vehicle"]}}}
    assert resolve_scheme("s", fine, categories).class_of_category == {1: 1, 2: 1}


def test_every_caller_of_the_scheme_rules_gives_the_same_words(params):
    from stages import masks

    params["schemes"]["person_car"]["overlap"] = ["car"]
    expected = ("schemes.person_car.overlap: the priority list ['car'] must name every class "
                "of the scheme exactly once (person, car)")
    assert _error(params) == f"params.yaml: {expected}"
    categories = _val_instances()["categories"]
    with pytest.raises(AnnotationError) as resolving:
        resolve_scheme("person_car", params["schemes"]["person_car"], categories)
    scheme = resolve_scheme("person_car", {**params["schemes"]["person_car"],
                                           "overlap": "ignore"}, categories)
    with pytest.raises(ValueError) as labelling:
        masks.label_rules({"overlap": ["car"]}, scheme)
    assert str(resolving.value) == str(labelling.value) == expected


def test_k_range_upside_down_stops_analyze_before_it_reads_anything(params, tmp_path, caplog):
    # moved from test_analyze.py: analyze.run no longer checks it, params validation does
    from stages import analyze

    params["analyze"]["clustering"].update(k_min=5, k_max=3)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    missing = tmp_path / "missing"
    code = analyze.main(["--params", str(params_file), "--predictions", str(missing),
                         "--masks", str(missing), "--model", str(missing), "--raw", str(missing),
                         "--out", str(tmp_path / "out")])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and len(errors) == 1
    assert "k_min 5 is above k_max 3" in errors[0]   # the moved test's own assertion
    assert errors[0] == f"{params_file}: analyze.clustering: k_min 5 is above k_max 3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
