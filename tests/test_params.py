"""params.yaml validation: the JSON Schema plus the checks JSON Schema cannot express."""
from __future__ import annotations

import copy
import json
import zipfile

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
                                              "infer", "analyze", "compare", "report"}


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
    assert "train.epochs: 'ten' is not of type 'integer'" in message
    assert message.count("\n") == 1  # exactly one problem reported


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
    with pytest.raises(AnnotationError, match="'car' is claimed by two classes"):
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
    params["data"]["checksums"] = {"zips/val2017.zip": "sha1:4950dc9d00dbe1c933ee0170f5797584351d2a41"}
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
