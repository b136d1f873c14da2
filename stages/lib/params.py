"""Load and validate params.yaml against the one JSON Schema both engines use."""
from __future__ import annotations

import functools
import math
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

import jsonschema
import yaml

from stages.lib.coco import COCO_SUPERCATEGORIES

# Read as package data so an installed wheel carries it. stages/schemas/params.schema.yaml is
# a symlink to workflow/schemas/params.schema.yaml (DESIGN.md's place for it, and the one
# copy both engines and DVC hash); building the wheel copies the bytes it points to.
SCHEMA = resources.files("stages") / "schemas" / "params.schema.yaml"

# Bounds on the params file itself, checked while it is read and composed (before anything
# is built or validated): params.yaml is about 8 KB and 200 nodes; a thousand checksums
# and a thousand image ids stay well below these. They are not params: they guard the
# reading of params.
MAX_FILE_BYTES = 1 << 20
MAX_NODES = 10_000   # counted with every alias expanded, so a billion-laughs file stops here
MAX_DEPTH = 16       # nesting levels; params.yaml has 6
MAX_ERRORS = 5       # schema problems named in the one error line
REPR_CHARS = 80      # longest value quoted in a message


class ParamsError(ValueError):
    """params.yaml is unreadable or does not match the schema."""


class SchemeRuleError(ParamsError):
    """A label scheme breaks one of check_scheme_rules' rules: "<dotted key>: <problem>"."""


def short_repr(value: object, limit: int = REPR_CHARS) -> str:
    """repr() cut to `limit` characters, saying how long it was: messages stay one short line."""
    return _cut(repr(value), limit)


def _cut(text: str, limit: int = REPR_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- validation

def _is_integer(checker, instance: object) -> bool:
    # JSON Schema counts 1.0 as an integer; range(), DataLoader and torch do not.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_finite_number(checker, instance: object) -> bool:
    # NaN passes every minimum and maximum (all comparisons are false); inf is never meant.
    if isinstance(instance, bool) or not isinstance(instance, (int, float)):
        return False
    return isinstance(instance, int) or math.isfinite(instance)


def _canonical(value: object) -> object:
    """A hashable form, equal exactly when JSON Schema calls two values equal (1 == 1.0,
    True != 1), so uniqueItems is one pass over a set instead of jsonschema's pairwise
    fallback, which is quadratic for lists it cannot sort (mixed types, objects)."""
    if isinstance(value, dict):
        return ("object", frozenset((key, _canonical(item)) for key, item in value.items()))
    if isinstance(value, list):
        return ("array", tuple(_canonical(item) for item in value))
    if isinstance(value, bool):
        return ("bool", value)
    try:
        hash(value)
    except TypeError:
        return ("other", repr(value))
    return value


def _unique_items(validator, unique: bool, instance: object, schema: dict):
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set = set()
    for item in instance:
        key = _canonical(item)
        if key in seen:
            yield jsonschema.ValidationError(f"{instance!r} has non-unique elements")
            return
        seen.add(key)


_Draft = jsonschema.Draft202012Validator
StrictValidator = jsonschema.validators.extend(
    _Draft,
    validators={"uniqueItems": _unique_items},
    type_checker=_Draft.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "number": _is_finite_number}))


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    return StrictValidator(load_schema())


def validate_params(params: object, source: str = "params.yaml") -> dict:
    """Return params unchanged if valid; otherwise raise one error line naming key and problem."""
    errors = sorted(_validator().iter_errors(params),
                    key=lambda e: [str(part) for part in e.absolute_path])
    if errors:
        problems = [f"{source}: {_describe(e)}" for e in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            problems.append(f"... and {len(errors) - MAX_ERRORS} more problems")
        raise ParamsError("; ".join(problems))
    _check_scheme_semantics(params, source)
    _check_ranges(params, source)
    return params


def check_scheme(params: dict, scheme: str) -> None:
    """An unknown scheme (a --scheme argument) fails by name, listing the known ones."""
    if scheme not in params["schemes"]:
        known = ", ".join(params["schemes"])
        raise ParamsError(f"scheme {short_repr(scheme)} is not in params.yaml schemes "
                          f"(known: {known})")


def scheme_class_names(params: dict, scheme: str) -> list[str]:
    """Class names in index order, background first."""
    check_scheme(params, scheme)
    return ["background", *params["schemes"][scheme]["classes"]]


def _key_path(error: jsonschema.ValidationError) -> str:
    return _join_path(error.absolute_path) or "(top level)"


def _join_path(parts) -> str:
    # Keys come from the file: a hostile one may be megabytes long.
    return ".".join(_cut(str(part)) for part in parts)


def _describe(error: jsonschema.ValidationError) -> str:
    """One readable line per schema error, naming the full key path, values cut short."""
    path = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = ", ".join(error.schema.get("properties", {})) or "none"
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})), key=str)
        shown = [_cut(str(k)) for k in unknown[:MAX_ERRORS]]
        if len(unknown) > MAX_ERRORS:
            shown.append(f"... ({len(unknown)} unknown keys)")
        names = ", ".join(f"{path}.{k}" if path != "(top level)" else k for k in shown)
        return f"{names}: unknown key (allowed here: {allowed})"
    if "propertyNames" in error.schema_path:
        return (f"{path}: {short_repr(error.instance)} is not a valid name (letters, digits and "
                "_, starting with a letter; 'background' is reserved for class 0)")
    # jsonschema quotes the whole offending value (repr): quote at most REPR_CHARS of it.
    message = error.message.replace(repr(error.instance), short_repr(error.instance))
    return f"{path}: {message}"


CROWD_RULES = ("ignore", "class", "background")


def check_scheme_rules(name: str, scheme: dict,
                       members: Mapping[str, Iterable[str]] = COCO_SUPERCATEGORIES) -> dict:
    """The rules of one label scheme that JSON Schema cannot state, checked in one place for
    params validation, for resolving a scheme against an annotation file (coco.resolve_scheme,
    `members` then from the file) and for masks' crowd and overlap rules. In this order:
    no two class names (background included) differ only in case; no category is claimed
    by two classes, directly or through a supercategory (`members`: supercategory -> its
    category names); crowd is one of CROWD_RULES; overlap is "ignore" or a priority list
    naming every class exactly once. Returns {category name: class name} of every claimed
    category; raises SchemeRuleError naming the key of the first rule broken."""
    classes = scheme["classes"]
    _refuse_case_twins(["background", *classes], f"schemes.{name}.classes")
    owner: dict[str, str] = {}
    for cls, claim in classes.items():
        claimed = list(claim.get("categories", []))
        for sup in claim.get("supercategories", []):
            claimed += members.get(sup, ())
        for category in claimed:
            if owner.get(category, cls) != cls:
                raise SchemeRuleError(
                    f"schemes.{name}.classes.{cls}: COCO category {category!r} is already "
                    f"claimed by class {owner[category]!r}")
            owner[category] = cls
    crowd = scheme.get("crowd", "ignore")
    if crowd not in CROWD_RULES:
        raise SchemeRuleError(f"schemes.{name}.crowd: {short_repr(crowd)} is not one of "
                              f"{CROWD_RULES}")
    overlap = scheme.get("overlap", "ignore")
    if overlap != "ignore" and sorted(overlap) != sorted(classes):
        raise SchemeRuleError(
            f"schemes.{name}.overlap: the priority list {short_repr(overlap)} must name every "
            f"class of the scheme exactly once ({_cut(', '.join(classes), 200)})")
    return owner


def _refuse_case_twins(names, where: str) -> None:
    # scheme names become folders and class names file names (DVCLive's val/iou/<class>):
    # two that differ only in case would be one file on macOS and Windows
    seen: dict[str, str] = {}
    for name in names:
        first = seen.setdefault(name.casefold(), name)
        if first != name:
            raise SchemeRuleError(f"{where}: {first!r} and {name!r} differ only in case; they "
                                  "would name the same file where case is folded (macOS, "
                                  "Windows)")


def _check_scheme_semantics(params: dict, source: str) -> None:
    try:
        _refuse_case_twins(params["schemes"], "schemes")
        for name, scheme in params["schemes"].items():
            check_scheme_rules(name, scheme)
    except SchemeRuleError as exc:
        raise ParamsError(f"{source}: {exc}") from None


def _check_ranges(params: dict, source: str) -> None:
    # JSON Schema cannot compare two values.
    clustering = params["analyze"]["clustering"]
    if clustering["k_min"] > clustering["k_max"]:
        raise ParamsError(f"{source}: analyze.clustering: k_min {clustering['k_min']} is above "
                          f"k_max {clustering['k_max']}")
    low, high = params["train"]["augment"]["crop_scale"]
    if low > high:
        raise ParamsError(f"{source}: train.augment.crop_scale: low {low} is above high {high}")


# ---------------------------------------------------------------- reading

def load_params(path: str | Path) -> dict:
    """params.yaml read within the bounds above, its keys checked, then validated."""
    path = Path(path)
    text = _read_bounded(path)
    loader = _CheckedLoader(text, str(path))
    try:
        params = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    finally:
        loader.dispose()
    return validate_params(params, str(path))


def _read_bounded(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ParamsError(f"{path}: larger than {MAX_FILE_BYTES} bytes; a params file is a few KB")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line: line and column, then the problem (no source snippet)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return _cut(where + " ".join(problem.split()), 200)


MERGE_TAG = "tag:yaml.org,2002:merge"


class _CheckedLoader(yaml.SafeLoader):
    """SafeLoader that refuses, while composing (before any object is built):
    duplicate keys (PyYAML keeps the last silently), nesting deeper than MAX_DEPTH, and
    more than MAX_NODES nodes with aliases expanded (a few KB of nested aliases can stand
    for 10^9 nodes, which validation or any copy would then walk)."""

    def __init__(self, stream: bytes, source: str):
        super().__init__(stream)
        self.source = source
        self.path: list[str] = []
        self.expanded_nodes = 0
        self.expanded_size: dict[int, int] = {}   # id(node) -> nodes it stands for, once composed

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._count_alias(self.peek_event())
            return super().compose_node(parent, index)
        event = self.peek_event()
        self.path.append(_label(index))
        if len(self.path) > MAX_DEPTH + 1:   # the document's root is path[0]
            self._refuse(event, f"nested deeper than {MAX_DEPTH} levels")
        before = self.expanded_nodes
        self._add_nodes(1, event)
        node = super().compose_node(parent, index)
        self.expanded_size[id(node)] = self.expanded_nodes - before
        self.path.pop()
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except ParamsError:
            raise
        except ValueError as exc:  # an integer of over 4300 digits, a 13th month...
            raise ParamsError(f"{self.source}: line {node.start_mark.line + 1}: "
                              f"unreadable value: {_cut(str(exc), 120)}") from None

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        self._refuse_duplicate_keys(node)
        return node

    def _count_alias(self, event) -> None:
        target = self.anchors.get(event.anchor)
        if target is None:
            return  # PyYAML reports the undefined alias
        if id(target) not in self.expanded_size:
            self._refuse(event, f"alias *{_cut(event.anchor)} refers to a node that contains "
                                "it (a cycle)")
        self._add_nodes(self.expanded_size[id(target)], event)

    def _add_nodes(self, count: int, event) -> None:
        self.expanded_nodes += count
        if self.expanded_nodes > MAX_NODES:
            self._refuse(event, f"more than {MAX_NODES} values with aliases expanded "
                                "(an alias bomb?); params.yaml has about 200")

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        first_line: dict[object, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue  # merge keys (<<) may be overridden: that is what they are for
            # Compared as built, so `1` and `01`, or `yes` and `true`, are the same key.
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                where = _join_path([*self.path[1:], key])
                raise ParamsError(f"{self.source}: {where}: duplicate key at lines "
                                  f"{first_line[key]} and {line}")
            first_line[key] = line

    def _refuse(self, event, problem: str) -> None:
        where = _join_path(self.path[1:]) or "(top level)"
        raise ParamsError(f"{self.source}: {where}: line {event.start_mark.line + 1}: {problem}")


def _label(index: object) -> str:
    """The path element of a node: its key (index is the key node), position, or '?' for a key."""
    if isinstance(index, yaml.ScalarNode):
        return index.value
    return "?" if index is None else str(index)


# ---------------------------------------------------------------- what a stage reads

SCHEME_PLACEHOLDER = "{scheme}"


def lookup(params: dict, key: str) -> object:
    """The value at a dotted key of params.yaml ("analyze.similars.k")."""
    value: object = params
    for part in key.split("."):
        value = value[part]
    return value


def select(params: dict, declared: tuple[str, ...], scheme: str | None = None) -> dict:
    """Only the declared keys of params, nested as in params.yaml, so the code reading them
    keeps its shape and any other key is a KeyError. A stage module lists what it reads in
    PARAMS (sections or dotted keys, "schemes.{scheme}" for the scheme it runs for); dvc.yaml
    and the rules list the same keys (tests/test_params_declared.py), so changing a key a
    stage does not read reruns nothing. Selecting twice gives the same dict."""
    selected: dict = {}
    for key in declared:
        if SCHEME_PLACEHOLDER in key:
            if scheme is None:
                raise ValueError(f"{key!r} is declared but no scheme was given")
            check_scheme(params, scheme)
            key = key.replace(SCHEME_PLACEHOLDER, scheme)
        *parents, last = key.split(".")
        source, target = params, selected
        for part in parents:
            source = source[part]
            target = target.setdefault(part, {})
        target[last] = source[last]
    return selected
