"""COCO annotation files: loading (whole or streamed), the category table, and scheme
resolution."""
from __future__ import annotations

import json
import re
import reprlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, ContextManager, Iterable, Iterator

import ijson
import numpy as np

SPLITS = ("train", "val")

# The 80 COCO "things" categories by supercategory (identical in 2014 and 2017).
# params.yaml names classes by these; the schema's enums must list the same names
# (tests/test_params.py checks).
COCO_SUPERCATEGORIES: dict[str, tuple[str, ...]] = {
    'person': ('person',),
    'vehicle': ('bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',),
    'outdoor': ('traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench',),
    'animal': ('bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra',
               'giraffe',),
    'accessory': ('backpack', 'umbrella', 'handbag', 'tie', 'suitcase',),
    'sports': ('frisbee', 'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat',
               'baseball glove', 'skateboard', 'surfboard', 'tennis racket',),
    'kitchen': ('bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl',),
    'food': ('banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza',
             'donut', 'cake',),
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
    keys = ImageKeys()
    for index, image in enumerate(data["images"]):
        keys.add(f"images[{index}]", image)
    keys.check(source)
    return data


INSTANCE_LISTS = ("images", "annotations", "categories")
NOT_AN_OBJECT = "expected a JSON object with images/annotations/categories"


def missing_lists(source: str, is_list: dict[str, bool]) -> None:
    """Raises AnnotationError naming the keys of INSTANCE_LISTS that are not lists."""
    missing = [k for k in INSTANCE_LISTS if not is_list[k]]
    if missing:
        raise AnnotationError(f"{source}: missing or non-list key(s): {', '.join(missing)}")


# ---------------------------------------------------------------- duplicate images

class DuplicateImages(AnnotationError):
    """Image entries that share an id, a file name or a stem; the message names them all."""


MAX_NAMED = 5   # duplicates named in the message; the rest counted


class ImageKeys:
    """Finds image entries listed twice over every file added: by id, or by the file their
    stem names (masks and infer write {stem}.png, so 'a.jpg' and 'a.png' would share one
    mask; compared as a case-folding file system compares them). The later entry's labels
    would be lost or counted twice downstream, so each clash is recorded, with where both
    entries are. Entries without an integer id and a string file_name are left to the
    callers' own checks."""

    def __init__(self):
        self._first: dict[tuple, tuple[str, int, str]] = {}
        self.clashes: list[str] = []

    def add(self, where: str, image: object) -> None:
        if not (isinstance(image, dict) and _usable_id(image.get("id"))
                and isinstance(image.get("file_name"), str)):
            return
        entry = (where, image["id"], image["file_name"])
        earlier = {self._first.setdefault(key, entry) for key in _image_keys(image)} - {entry}
        self.clashes += [_clash(entry, first) for first in sorted(earlier)]

    def check(self, source: str) -> None:
        if not self.clashes:
            return
        n = len(self.clashes)
        named = "; ".join(self.clashes[:MAX_NAMED])
        raise DuplicateImages(
            f"{source}: {n} image {'entry repeats' if n == 1 else 'entries repeat'} an earlier "
            f"one's id or file (each image must be listed once): {named}"
            + (f"; and {n - MAX_NAMED} more" if n > MAX_NAMED else ""))


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother = 80, 80


def short_repr(value: object) -> str:
    """repr() for messages: a value from a file may be up to limits.json_string_bytes long."""
    return _SHORT.repr(value)


def _usable_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)   # True would equal 1


def _image_keys(image: dict) -> tuple[tuple, tuple]:
    return ("id", image["id"]), ("mask", _mask_key(image["file_name"]))


def _mask_key(file_name: str) -> str:
    stem = PurePosixPath(file_name).stem
    return unicodedata.normalize("NFC", stem).casefold()


def _clash(entry: tuple[str, int, str], first: tuple[str, int, str]) -> str:
    (where, image_id, name), (first_where, first_id, first_name) = entry, first
    shared = ["id"] if image_id == first_id else []
    if name == first_name:
        shared.append("file_name")
    elif _mask_key(name) == _mask_key(first_name):
        shared.append("stem")
    return (f"{where} (id {short_repr(image_id)}, {short_repr(name)}) has the "
            f"{' and '.join(shared)} of {first_where} (id {short_repr(first_id)}, "
            f"{short_repr(first_name)})")


# ---------------------------------------------------------------- streaming
# ijson's C parser (yajl) is stricter than the json module: NaN, Infinity and integers
# beyond 64 bits are errors. Callers fall back to read_instances on StreamError.

class StreamError(ValueError):
    """The file is not JSON a streaming parser accepts; the message is one line."""


def stream_error(exc: Exception) -> StreamError:
    return StreamError(" ".join(str(exc).split()))   # yajl points at the byte over 3 lines


def is_object(handle: BinaryIO) -> bool:
    """Whether the document is a JSON object (reads its first token only). use_float, as
    in every pass: without it ijson hands integers to int(), and one of over 4300 digits
    (int's limit) in its first read crashed the interpreter (a segmentation fault)."""
    try:
        return next(ijson.parse(handle, use_float=True), ("", None, None))[1] == "start_map"
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
    AnnotationError for a file that is not instances JSON (DuplicateImages for an image
    listed twice), StreamError for JSON only the json module reads (the caller then reads
    it whole), and whatever the consumers raise."""
    with open_file() as handle:
        if not is_object(handle):
            raise AnnotationError(f"{source}: {NOT_AN_OBJECT}")
    small = {}
    for key in small_keys:
        with open_file() as handle:
            value = top_level_value(handle, key, missing=_ABSENT)
        if value is not _ABSENT:
            small[key] = value
    keys = ImageKeys()
    with open_file() as handle:
        images = ArrayUntilEnd(handle, "images")
        consume_images(_keyed(images, keys))
    keys.check(source)
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


def _keyed(images: Iterable, keys: ImageKeys) -> Iterator:
    for index, image in enumerate(images):
        keys.add(f"images[{index}]", image)
        yield image


class _Counted:
    def __init__(self, items: Iterable):
        self.items, self.n = items, 0

    def __iter__(self) -> Iterator:
        for item in self.items:
            self.n += 1
            yield item


# ---------------------------------------------------------------- bounded reading
# yajl re-reads a token that spans two of its reads from the token's start at every read:
# one long string or number costs time quadratic in its length (see BENCHMARKS.md,
# bench_hostile: a 64 MiB `info` string). ijson's prefixes ("info.item.item...") cost memory
# quadratic in the nesting depth. Bounding every string, number and the depth keeps each
# pass linear.

class LimitError(AnnotationError):
    """An annotation file past one of data.limits (or MAX_DEPTH); the message names the
    file, where in it, and the bound."""


NUMBER_BYTES = b"+-.0123456789eE"
# The subsets are written back with the json module, which recurses once per level within
# Python's 1000 frames; COCO itself nests 4 deep (annotations[i].segmentation[j][k]).
MAX_DEPTH = 500
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_STRING = re.compile(rb'"[^"]*"')


class JSONScan:
    """Finds the first string or number longer than `limit` bytes, or the first nesting
    deeper than `max_depth`, in JSON text fed piece by piece, in linear time and without
    parsing. Escapes are blanked first (same length), so every quote left delimits a
    string. Pieces are at most `limit` bytes, so only a token that crosses from one piece
    into the next can be too long, and only the ends of a piece are looked at: the rest is
    bytes.count/find/strip/translate in C."""

    def __init__(self, limit: int, max_depth: int = MAX_DEPTH):
        self.limit, self.max_depth = limit, max_depth
        self.offset = 0                        # bytes scanned before the current piece
        self.open_quote: int | None = None     # offset of a string's quote still open
        self.escape_open = False               # the last piece ended inside an escape
        self.number_run = 0                    # number bytes ending the last piece
        self.depth = 0                         # arrays and objects open

    def feed(self, data: bytes) -> tuple[int, str] | None:
        """(offset, "string", "number" or "depth") of the first thing over a bound, or
        None: where the string or number starts, or the bracket one level too deep."""
        for start in range(0, len(data), self.limit):
            piece = data[start:start + self.limit] if len(data) > self.limit else data
            found = self._piece(piece)
            if found:
                return found
        return None

    def _piece(self, piece: bytes) -> tuple[int, str] | None:
        in_string_before = self.open_quote is not None
        text = self._unescaped(piece)
        found = [self._strings(text),
                 self._numbers(piece, in_string_before, self.open_quote is not None),
                 self._depth(text, in_string_before)]
        self.offset += len(piece)
        found = [f for f in found if f is not None]
        return min(found) if found else None

    def _unescaped(self, piece: bytes) -> bytes:
        if self.escape_open and piece:
            piece = b"_" + piece[1:]
        if b"\\" in piece:
            piece = piece.replace(b"\\\\", b"__").replace(b'\\"', b"__")
        self.escape_open = piece.endswith(b"\\")
        return piece

    def _strings(self, text: bytes) -> tuple[int, str] | None:
        quotes, end = text.count(b'"'), self.offset + len(text)
        if self.open_quote is not None:
            close = text.find(b'"')
            length = (end if close < 0 else self.offset + close) - self.open_quote - 1
            if length > self.limit:
                return self.open_quote, "string"
            if close < 0:
                return None
            quotes -= 1
        self.open_quote = self.offset + text.rfind(b'"') if quotes % 2 else None
        return None

    def _numbers(self, piece: bytes, in_string_before: bool,
                 in_string_after: bool) -> tuple[int, str] | None:
        # Number bytes inside a string are the string check's business.
        lead = len(piece) - len(piece.lstrip(NUMBER_BYTES))
        run = 0 if in_string_before else self.number_run + lead
        if run > self.limit:
            return self.offset - self.number_run, "number"
        if in_string_after:
            self.number_run = 0
        elif lead == len(piece):
            self.number_run = run
        else:
            self.number_run = len(piece) - len(piece.rstrip(NUMBER_BYTES))
        return None

    def _depth(self, text: bytes, in_string_before: bool) -> tuple[int, str] | None:
        marks = text.translate(None, _NOT_STRUCTURE)      # quotes and brackets only
        # Adjacent quotes go first (strings without brackets, COCO's all): that keeps the
        # parity of every other quote, so only strings holding brackets need the regex.
        marks = (b'"' + marks if in_string_before else marks).replace(b'""', b"")
        if marks.count(b'"') > 1:
            marks = _STRING.sub(b"", marks)
        outside = marks.split(b'"', 1)[0]                 # a string still open at the end
        opens = outside.count(b"[") + outside.count(b"{")
        if self.depth + opens > self.max_depth and self._deepest(outside) > self.max_depth:
            return self._too_deep_at(text, in_string_before), "depth"
        self.depth += 2 * opens - len(outside)
        return None

    def _deepest(self, brackets: bytes) -> int:
        return self.depth + int(np.cumsum(_steps(np.frombuffer(brackets, np.uint8))).max())

    def _too_deep_at(self, text: bytes, in_string_before: bool) -> int:
        """The offset of the bracket that opens one level too many (once, to name it)."""
        codes = np.frombuffer(text, np.uint8)
        inside = (np.cumsum(codes == ord('"')) + in_string_before) % 2 == 1
        at = np.flatnonzero(np.isin(codes, list(b"[]{}")) & ~inside)
        depths = self.depth + np.cumsum(_steps(codes[at]))
        return self.offset + int(at[np.argmax(depths > self.max_depth)])


def _steps(brackets: np.ndarray) -> np.ndarray:
    return np.where((brackets & 0x06) == 0x02, 1, -1)    # "[" "{" open, "]" "}" close


class BoundedReader:
    """A binary file read through JSONScan and a cap on its size: a parser never gets the
    bytes of a scalar over `scalar_bytes`, of nesting over MAX_DEPTH, nor more than
    `max_bytes` in all. The LimitError names the key path there, found by reading the file
    again (with `reopen`) up to it."""

    def __init__(self, raw: BinaryIO, source: str, scalar_bytes: int, max_bytes: int,
                 reopen: Callable[[], ContextManager[BinaryIO]], scalar_bound: str,
                 size_bound: str):
        self.raw, self.source, self.reopen = raw, source, reopen
        self.scan, self.max_bytes = JSONScan(scalar_bytes), max_bytes
        self.scalar_bound, self.size_bound = scalar_bound, size_bound

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:   # json.load: everything, still in scanned pieces
            return b"".join(iter(lambda: self.read(READ_BYTES), b""))
        data = self.raw.read(n)
        if self.scan.offset + len(data) > self.max_bytes:
            raise LimitError(f"{self.source}: unpacks to more than {self.max_bytes} bytes "
                             f"({self.size_bound})")
        found = self.scan.feed(data)
        if found:
            raise self._past_bound(*found)
        return data

    def _past_bound(self, offset: int, kind: str) -> LimitError:
        with self.reopen() as again:
            where = json_path_at(again, offset) or "the value"
        if kind == "depth":
            where = where if len(where) <= 80 else where[:77] + "..."
            return LimitError(f"{self.source}: arrays and objects nested over {MAX_DEPTH} deep "
                              f"(the most the json module writes back) in {where}, at byte "
                              f"{offset}")
        return LimitError(f"{self.source}: {where} is a {kind} of over {self.scan.limit} "
                          f"bytes ({self.scalar_bound}), at byte {offset}")


READ_BYTES = 1 << 16   # ijson's own read size


def json_path_at(handle: BinaryIO, offset: int) -> str | None:
    """The key path of the value (or key) that starts at byte `offset` of a JSON document,
    e.g. "info.description" or "annotations[3].segmentation[0]", or None when yajl stops
    before it (at JSON only the json module reads): the text up to there read with every
    event passing through Python, so for error messages only."""
    path: list = []         # per open container: its current key (None: none yet) or index
    last = None
    try:
        for last, value in ijson.basic_parse(_Head(handle, offset), use_float=True):
            if last == "map_key":
                path[-1] = value
            elif last in ("end_map", "end_array"):
                path.pop()
            else:
                if path and isinstance(path[-1], int):
                    path[-1] += 1
                if last in ("start_map", "start_array"):
                    path.append(None if last == "start_map" else -1)
    except ijson.JSONError as exc:
        if "premature EOF" not in str(exc):     # else the text ends at the value, as meant
            return None
    if path and isinstance(path[-1], int):
        return _format_path(path[:-1] + [path[-1] + 1])
    if path and last != "map_key":
        return f"a key in {_format_path(path[:-1])}" if len(path) > 1 else "a top-level key"
    return _format_path(path)


def _format_path(path: list) -> str:
    text = ""
    for step in path:
        if isinstance(step, int):
            text += f"[{step}]"
        else:
            step = step if len(step) <= 40 else step[:37] + "..."
            text += f".{step}" if step.isidentifier() else f"[{json.dumps(step)}]"
    return text.lstrip(".") or "the top-level value"


class _Head:
    """The first `size` bytes of a binary file."""

    def __init__(self, handle: BinaryIO, size: int):
        self.handle, self.left = handle, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.handle.read(n)
        self.left -= len(data)
        return data


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
    # Imported here: params imports this module's category tables at its top.
    from stages.lib.params import SchemeRuleError, check_scheme_rules

    by_name = {c["name"]: c for c in categories}
    by_super: dict[str, list[str]] = {}
    for cat in categories:
        by_super.setdefault(cat["supercategory"], []).append(cat["name"])
    for cls, claim in scheme["classes"].items():
        for category in claim.get("categories", []):
            _lookup(by_name, category, "category", name, cls)
        for sup in claim.get("supercategories", []):
            if sup not in by_super:
                raise AnnotationError(
                    f"schemes.{name}.classes.{cls}: supercategory {sup!r} not in the annotations "
                    f"(valid: {', '.join(sorted(by_super))})")
    try:   # with the file's own supercategories, which need not be COCO's
        owner = check_scheme_rules(name, scheme, by_super)
    except SchemeRuleError as exc:
        raise AnnotationError(str(exc)) from None
    index = {cls: i for i, cls in enumerate(scheme["classes"], start=1)}
    class_of = {c["id"]: index[owner[c["name"]]] for c in categories if c["name"] in owner}
    return SchemeMap(name, ("background", *scheme["classes"]), class_of)


def _lookup(by_name: dict, value: str, kind: str, scheme: str, cls: str) -> dict:
    if value not in by_name:
        raise AnnotationError(
            f"schemes.{scheme}.classes.{cls}: {kind} {value!r} not in the annotations "
            f"(valid: {', '.join(sorted(by_name))})")
    return by_name[value]
