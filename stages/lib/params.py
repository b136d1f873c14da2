"""Load and validate params.yaml against the one JSON Schema both engines use."""
from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from stages.lib.coco import COCO_SUPERCATEGORIES

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "params.schema.yaml"


class ParamsError(ValueError):
    """params.yaml is unreadable or does not match the schema."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def validate_params(params: object, source: str = "params.yaml") -> dict:
    """Return params unchanged if valid; otherwise raise one error naming key and problem."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: {_describe(e)}" for e in errors]
        raise ParamsError("invalid params:\n  " + "\n  ".join(lines))
    _check_scheme_semantics(params, source)
    return params


def load_params(path: str | Path) -> dict:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return validate_params(params, str(path))


def scheme_class_names(params: dict, scheme: str) -> list[str]:
    """Class names in index order, background first."""
    if scheme not in params["schemes"]:
        known = ", ".join(params["schemes"])
        raise ParamsError(f"scheme {scheme!r} is not in params.yaml schemes (known: {known})")
    return ["background", *params["schemes"][scheme]["classes"]]


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    """One readable line per schema error, naming the full key path."""
    path = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = ", ".join(error.schema.get("properties", {})) or "none"
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        names = ", ".join(f"{path}.{k}" if path != "(top level)" else k for k in unknown)
        return f"{names}: unknown key (allowed here: {allowed})"
    if "propertyNames" in error.schema_path:
        return (f"{path}: {error.instance!r} is not a valid name (letters, digits and _, "
                "starting with a letter; 'background' is reserved for class 0)")
    return f"{path}: {error.message}"


def _check_scheme_semantics(params: dict, source: str) -> None:
    # JSON Schema cannot say "no COCO category claimed twice within one scheme", directly
    # or through a supercategory.
    for name, scheme in params["schemes"].items():
        owner: dict[str, str] = {}
        for cls, claim in scheme["classes"].items():
            claimed = list(claim.get("categories", []))
            for sup in claim.get("supercategories", []):
                claimed += COCO_SUPERCATEGORIES[sup]
            for category in claimed:
                if owner.get(category, cls) != cls:
                    raise ParamsError(
                        f"{source}: schemes.{name}.classes.{cls}: COCO category {category!r} "
                        f"is already claimed by class {owner[category]!r}")
                owner[category] = cls
        overlap = scheme["overlap"]
        if overlap != "ignore" and sorted(overlap) != sorted(scheme["classes"]):
            raise ParamsError(
                f"{source}: schemes.{name}.overlap: the priority list {overlap} must name every "
                f"class of the scheme exactly once ({', '.join(scheme['classes'])})")
