"""COCO annotation files: loading (whole or streamed), the category table, and scheme
resolution."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterable, Iterator

import ijson

SPLITS = ("train", "val")

# The 80 COCO "things" categories by supercategory (identical in 2014 and 2017).
# params.yaml names classes by these; the schema's enums must list the same names
# (tests/test_params.py checks).
COCO_SUPERCATEGORIES: dict[str, tuple[str, ...]] = {
    'person': ('person',),
    'vehicle': ('bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',),
    'outdoor': ('traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench',),
    'animal': ('bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe',),
    'accessory': ('backpack', 'umbrella', 'handbag', 'tie', 'suitcase',),
    'sports': ('frisbee', 'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket',),
    'kitchen': ('bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl',),
    'food': ('banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake',),
    'furniture': ('chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet',),
    'electronic': ('tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',),
    'appliance': ('microwave', 'oven', 'toaster', 'sink', 'refrigerator',),
    'indoor': ('book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush',),
}
COCO_CATEGORIES: dict[str, str] = {
    name: sup for sup, names in COCO_SUPERCATEGORIES.items() for name in names}


class AnnotationError(ValueError):
    """An annotation file that is not COCO instances JSON."""


def read_instances(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read COCO annotations: {exc}") from None
    return check_instances(data, str(path))


def check_instances(data: object, source: str) -> dict:
    if not isinstance(data, dict):
        raise AnnotationError(f"{source}: {NOT_AN_OBJECT}")
    missing_lists(source, {k: isinstance(data.get(k), list) for k in INSTANCE_LISTS})
    return data


INSTANCE_LISTS = ("images", "annotations", "categories")
NOT_AN_OBJECT = "expected a JSON object with images/annotations/categories"


def missing_lists(source: str, is_list: dict[str, bool]) -> None:
    """Raises AnnotationError naming the keys of INSTANCE_LISTS that are not lists."""
    missing = [k for k in INSTANCE_LISTS if not is_list[k]]
    if missing:
        raise AnnotationError(f"{source}: missing or non-list key(s): {', '.join(missing)}")


# ---------------------------------------------------------------- streaming
# ijson's C parser (yajl) is stricter than the json module: NaN, Infinity and integers
# beyond 64 bits are errors. Callers fall back to read_instances on StreamError.

class StreamError(ValueError):
    """The file is not JSON a streaming parser accepts; the message is one line."""


def stream_error(exc: Exception) -> StreamError:
    return StreamError(" ".join(str(exc).split()))   # yajl points at the byte over 3 lines


def is_object(handle: BinaryIO) -> bool:
    """Whether the document is a JSON object (reads its first token only)."""
    try:
        return next(ijson.parse(handle), ("", None, None))[1] == "start_map"
    except ijson.JSONError as exc:
        raise stream_error(exc) from None


def top_level_value(handle: BinaryIO, key: str, missing: object = None) -> object:
    """The whole value of one top-level key, read up to its end (for small values)."""
    try:
        return next(ijson.items(handle, key, use_float=True), missing)
    except ijson.JSONError as exc:
        raise stream_error(exc) from None


def array_items(handle: BinaryIO, key: str) -> Iterator[object]:
    """The items of the top-level array `key`, one at a time. The C parser reads on to the
    end of the file (so the whole file is checked), fast; for the big array."""
    try:
        yield from ijson.items(handle, f"{key}.item", use_float=True)
    except ijson.JSONError as exc:
        raise stream_error(exc) from None


class ArrayUntilEnd:
    """The items of the top-level array `key`, reading the file only up to that array's
    end. Every token up to there passes through Python: for a small array that comes
    before the big one (images before annotations). `is_list` says, once iterated,
    whether `key` was present as an array."""

    def __init__(self, handle: BinaryIO, key: str):
        self.handle, self.key, self.is_list = handle, key, False

    def __iter__(self) -> Iterator[object]:
        try:
            yield from ijson.items(self._events(), f"{self.key}.item", use_float=True)
        except ijson.JSONError as exc:
            raise stream_error(exc) from None

    def _events(self) -> Iterator[tuple]:
        for event in ijson.parse(self.handle, use_float=True):
            yield event
            if event[0] == self.key:
                if event[1] == "start_array":
                    self.is_list = True
                elif event[1] == "end_array":
                    return


_ABSENT = object()


def stream_instances(open_file: Callable[[], ContextManager[BinaryIO]], source: str,
                     consume_images: Callable[[Iterable], None],
                     consume_annotations: Callable[[Iterable], None],
                     small_keys: tuple[str, ...] = ("categories",)) -> dict:
    """Streamed passes over a COCO instances file, one per call of open_file, with the
    checks check_instances makes, never holding its big arrays: each consumer is handed
    its array's items to iterate through (images read only up to their array's end).
    Returns the small top-level values of small_keys that are present. Raises
    AnnotationError for a file that is not instances JSON, StreamError for JSON only the
    json module reads (the caller then reads it whole), and whatever the consumers raise."""
    with open_file() as handle:
        if not is_object(handle):
            raise AnnotationError(f"{source}: {NOT_AN_OBJECT}")
    small = {}
    for key in small_keys:
        with open_file() as handle:
            value = top_level_value(handle, key, missing=_ABSENT)
        if value is not _ABSENT:
            small[key] = value
    with open_file() as handle:
        images = ArrayUntilEnd(handle, "images")
        consume_images(images)
    with open_file() as handle:
        annotations = _Counted(array_items(handle, "annotations"))
        consume_annotations(annotations)
    annotations_listed = annotations.n > 0
    if not annotations_listed:   # no items: an empty list, or no list at all?
        with open_file() as handle:
            annotations_listed = isinstance(top_level_value(handle, "annotations"), list)
    missing_lists(source, {"images": images.is_list, "annotations": annotations_listed,
                           "categories": isinstance(small.get("categories"), list)})
    return small


class _Counted:
    def __init__(self, items: Iterable):
        self.items, self.n = items, 0

    def __iter__(self) -> Iterator:
        for item in self.items:
            self.n += 1
            yield item


@dataclass(frozen=True)
class SchemeMap:
    """How one label scheme maps COCO category ids to class indices (1..K)."""

    name: str
    class_names: tuple[str, ...]          # background first
    class_of_category: dict[int, int]     # COCO category id -> class index

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resolve_scheme(name: str, scheme: dict, categories: list[dict]) -> SchemeMap:
    """Turn a params scheme (names of categories/supercategories) into category ids."""
    by_name = {c["name"]: c for c in categories}
    by_super: dict[str, list[dict]] = {}
    for cat in categories:
        by_super.setdefault(cat["supercategory"], []).append(cat)
    class_of: dict[int, int] = {}
    for index, (cls, claim) in enumerate(scheme["classes"].items(), start=1):
        claimed = [_lookup(by_name, n, "category", name, cls) for n in claim.get("categories", [])]
        for sup in claim.get("supercategories", []):
            if sup not in by_super:
                raise AnnotationError(
                    f"schemes.{name}.classes.{cls}: supercategory {sup!r} not in the annotations "
                    f"(valid: {', '.join(sorted(by_super))})")
            claimed.extend(by_super[sup])
        for cat in claimed:
            if class_of.get(cat["id"], index) != index:
                raise AnnotationError(
                    f"schemes.{name}: category {cat['name']!r} is claimed by two classes")
            class_of[cat["id"]] = index
    return SchemeMap(name, ("background", *scheme["classes"]), class_of)


def _lookup(by_name: dict, value: str, kind: str, scheme: str, cls: str) -> dict:
    if value not in by_name:
        raise AnnotationError(
            f"schemes.{scheme}.classes.{cls}: {kind} {value!r} not in the annotations "
            f"(valid: {', '.join(sorted(by_name))})")
    return by_name[value]
