"""COCO annotation files: loading, the category table, and scheme resolution."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val")


class AnnotationError(ValueError):
    """An annotation file that is not COCO instances JSON."""


def read_instances(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read COCO annotations: {exc}") from None
    return check_instances(data, str(path))


def check_instances(data: object, source: str) -> dict:
    if not isinstance(data, dict):
        raise AnnotationError(f"{source}: expected a JSON object with images/annotations/categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise AnnotationError(f"{source}: missing or non-list key(s): {', '.join(missing)}")
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
