"""Provenance: what the page says about where its numbers come from (the git state, the
params and their differences from HEAD, the data's and models' identity, library versions,
the machine, the stage times)."""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import pandas as pd
import yaml

from stages.lib.cli import StageError
from stages.lib.tables import read_json, read_table
from stages.report.inputs import Scheme
from stages.report.tables import finite

LIBRARIES = ["torch", "torchvision", "numpy", "pandas", "matplotlib", "scikit-learn", "pillow",
             "jinja2", "pycocotools", "snakemake", "dvc", "dvclive"]


def flatten(document: object, prefix: str = "") -> dict[str, object]:
    """{"a.b": value} for nested mappings; lists and scalars are leaves."""
    if isinstance(document, dict) and document:
        out = {}
        for key, value in document.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: document}


def params_diff(base: dict | None, used: dict) -> list[dict]:
    """Every key whose value differs between the reference params and those used:
    changed, added (not in the reference) or removed (only in the reference)."""
    if base is None:
        return []
    a, b = flatten(base), flatten(used)
    rows = []
    for key in list(dict.fromkeys([*b, *a])):
        if key not in a:
            rows.append({"key": key, "base": None, "used": b[key], "what": "added"})
        elif key not in b:
            rows.append({"key": key, "base": a[key], "used": None, "what": "removed"})
        elif a[key] != b[key]:
            rows.append({"key": key, "base": a[key], "used": b[key], "what": "changed"})
    return [{**r, "base": _yaml_value(r["base"]), "used": _yaml_value(r["used"])} for r in rows]


def _yaml_value(value) -> str:
    return "—" if value is None else json.dumps(value, ensure_ascii=False)


STAGE_ORDER = ["download", "masks", "train", "infer", "evaluate", "analyze", "compare"]
BENCHMARK_COLUMNS = ["s", "cpu_time", "max_rss"]
NO_STAGE_TIMES = "DVC records no stage times; run through Snakemake for them."


def benchmark_key(path: Path) -> tuple[str, str]:
    """(stage, scheme) of a Snakemake benchmark file: <stage>/<scheme>.tsv for a job per
    scheme, <stage>.tsv under the benchmark folder for one over all schemes."""
    return (path.stem, "") if path.parent.name == "benchmark" else (path.parent.name, path.stem)


def stage_times(benchmarks: dict[tuple[str, str], pd.DataFrame]) -> list[dict]:
    """One row per (stage, scheme) job from its Snakemake benchmark (the last run's wall s,
    CPU s, peak RSS), in pipeline order."""
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    rows = []
    for stage, scheme in sorted(benchmarks, key=lambda k: (order.get(k[0], len(order)), k)):
        last = benchmarks[(stage, scheme)].iloc[-1]
        rows.append({"stage": stage, "scheme": scheme, "wall_s": finite(last["s"]),
                     "cpu_s": finite(last["cpu_time"]), "max_rss_mb": finite(last["max_rss"])})
    return rows


def read_stage_times(paths: list[Path] | None) -> list[dict] | None:
    """Stage times from the Snakemake benchmark files given (declared inputs of the report's
    rule); None when not given: DVC keeps no stage times. Under Snakemake a job whose outputs
    DVC made has no file (the rule leaves it out), so the list may be short or empty."""
    if paths is None:
        return None
    tables = {}
    for path in paths:
        frame = read_table(path, BENCHMARK_COLUMNS, sep="\t")
        if not len(frame):
            raise StageError(f"{path}: no benchmark row; re-run its Snakemake job")
        tables[benchmark_key(path)] = frame
    return stage_times(tables)


def git_state(repo: Path, pipeline_paths: list[Path] = ()) -> dict:
    """The commit, and whether the user changed anything since: a changed, added, deleted
    or untracked file counts unless it lies in one of the pipeline's own paths (its
    outputs, logs, dvc.lock), which every run writes, tracked (DVC's `cache: false`
    metrics) or not."""
    try:
        commit = _git(repo, "rev-parse", "--short", "HEAD")
        # Unstripped: a porcelain line may start with a space (" M file").
        listed = subprocess.run(["git", "status", "--porcelain=v1", "-z"], cwd=repo,
                                capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    own = [p.resolve() for p in pipeline_paths if p is not None]
    return {"commit": commit,
            "dirty": any(_users(repo / rel, own) for rel in porcelain_paths(listed))}


def _users(path: Path, own: list[Path]) -> bool:
    """Whether a changed path holds something outside the pipeline's own paths. git
    lists an untracked folder once (data/ when only data/raw exists): its files are
    looked at, skipping the pipeline's folders inside it."""
    path = path.resolve()
    if any(_within(path, o) for o in own):
        return False
    if not path.is_dir():
        return True
    for dirpath, dirs, files in os.walk(path):
        if any(not any(_within(Path(dirpath, f), o) for o in own) for f in files):
            return True
        dirs[:] = [d for d in dirs if not any(_within(Path(dirpath, d), o) for o in own)]
    return False


def porcelain_paths(listed: str) -> list[str]:
    """The paths of `git status --porcelain=v1 -z` (a rename's both); an untracked folder
    is one entry ending in '/'."""
    paths, entries = [], iter(listed.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC":  # the next entry is where it came from
            paths.append(next(entries, ""))
    return [p for p in paths if p]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def committed_params(repo: Path) -> dict | None:
    """params.yaml as committed at HEAD: the reference the used params are compared with."""
    try:
        return yaml.safe_load(_git(repo, "show", "HEAD:params.yaml"))
    except (OSError, subprocess.SubprocessError, yaml.YAMLError):
        return None


def report_date() -> str:
    # SOURCE_DATE_EPOCH lets a rebuild produce the same bytes (reproducible-builds.org).
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch
              else dt.datetime.now(dt.timezone.utc))
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def library_versions() -> list[tuple[str, str]]:
    versions = [("python", platform.python_version())]
    for name in LIBRARIES:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((name, "not installed"))
    return versions


def sha256_file(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None


def data_source(raw: Path) -> dict:
    """Where the data came from; its identity is the manifest's sha256 (the manifest lists
    every image's sha256)."""
    manifest_path = raw / "manifest.json"
    manifest = read_json(manifest_path, ["base_url", "year", "seed", "splits"])
    return {"base_url": manifest["base_url"], "year": manifest["year"], "seed": manifest["seed"],
            "manifest_sha256": sha256_file(manifest_path),
            "images": {split: len(body["images"]) for split, body in manifest["splits"].items()}}


def record(params: dict, raw: Path, schemes: list[Scheme],
           benchmarks: list[Path] | None = None, pipeline_paths: list[Path] = ()) -> dict:
    # The project is the working folder (both engines run stages from it), not the folder
    # this module sits in: an installed wheel puts it in site-packages, outside any checkout.
    project = Path.cwd()
    git = git_state(project, pipeline_paths)
    return {
        "git": git, "date": report_date(), "versions": library_versions(),
        "params_yaml": yaml.safe_dump(params, sort_keys=False, allow_unicode=True),
        "params_base": f"params.yaml at HEAD (commit {git['commit']})" if git["commit"] else None,
        "params_diff": params_diff(committed_params(project), params) if git["commit"] else [],
        "data": data_source(raw),
        "models": [{"scheme": s.name, "device": s.timing["device"],
                    "device_train": s.train["device"],
                    **{k: s.train[k] for k in ("precision", "epochs", "wall_s", "torch_version",
                                               "model_sha256", "encoder_pretraining")}}
                   for s in schemes],
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "stage_times": read_stage_times(benchmarks),
    }
