"""The source files a stage's code is made of, found by following its `stages.*` imports.

Both engines need them as explicit dependencies: DVC only hashes what dvc.yaml lists, and
Snakemake's code trigger hashes the `shell:` string, never the module it runs. The
Snakemake rules call this; a test checks that dvc.yaml lists exactly the same files.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The files a stage reads as code besides its modules (globs, relative to the repo): the
# templates it renders, and the schema it holds its inputs to (a change to the insights
# contract changes what the report accepts; the package's link to docs/, as the report
# reads it).
TEMPLATES = {"report": ["stages/templates/report.html.j2", "stages/templates/report.js",
                        "stages/templates/report.css", "stages/templates/report/*.html.j2",
                        "stages/schemas/insights.schema.json"]}


def stage_code(stage: str, root: Path = ROOT) -> list[str]:
    """Repo-relative paths of stages/<stage>.py (or, for a package, every module of
    stages/<stage>/), every stages.* module it imports (transitively) and the templates it
    renders, sorted."""
    seen: set[str] = set()
    package = root / "stages" / stage
    pending = ([p.relative_to(root).as_posix() for p in sorted(package.glob("*.py"))]
               if package.is_dir() else [f"stages/{stage}.py"])
    while pending:
        rel = pending.pop()
        if rel in seen:
            continue
        seen.add(rel)
        pending.extend(_imported_stage_modules(root / rel, root))
    templates = {p.relative_to(root).as_posix() for pattern in TEMPLATES.get(stage, [])
                 for p in root.glob(pattern)}
    return sorted(seen | templates)


def _imported_stage_modules(path: Path, root: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
            modules.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
    files = []
    for module in modules:
        # stages/__init__.py and stages/lib/__init__.py hold no code (docstrings only).
        if module in ("stages", "stages.lib") or not module.startswith("stages."):
            continue
        base = root / module.replace(".", "/")
        for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
            if candidate.is_file():
                files.append(candidate.relative_to(root).as_posix())
    return files


def declared_params(stage: str, root: Path = ROOT) -> tuple[str, ...]:
    """The PARAMS a stage module declares (stages.lib.params.select), read from its source
    so the Snakefile need not import the stages (train and infer import torch)."""
    path = root / "stages" / stage / "__init__.py"
    if not path.is_file():
        path = root / "stages" / f"{stage}.py"
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "PARAMS"):
            return tuple(ast.literal_eval(node.value))
    raise LookupError(f"{path}: no PARAMS declaration")
