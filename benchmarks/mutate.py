"""`make mutate`: mutation testing of the core with mutmut (configured in pyproject.toml's
[tool.mutmut]), then a killed/survived score per module.

mutmut mutates every function of the files in only_mutate; this script runs the mutants of
the modules below only, and of infer, stages/lib/model.py and the report only the functions
named (infer's per-image scoring with model's full_size_probs, the report's comparison
tables), with one worker (`--max-children 1`: the machine's cores are shared). Not mutated
(pyproject.toml's do_not_mutate_patterns): log calls and argparse help texts, which are not
output contracts.

A mutant judged equivalent (no test can tell it from the original) is listed in EQUIVALENT
by its function and mutated line, with the reason, and left out of the score's denominator
(the script fails when a listed mutant no longer exists or a test killed it).

Usage: python -m benchmarks.mutate [--no-run] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> mutant-name patterns (mutmut's names: <module>.x_<function>__mutmut_<n>)
MODULES = {
    "stages/lib/metrics.py": ["stages.lib.metrics.*"],
    "stages/lib/buckets.py": ["stages.lib.buckets.*"],
    "stages/lib/labels.py": ["stages.lib.labels.*"],
    "stages/lib/fetch.py": ["stages.lib.fetch.*"],
    "stages/evaluate.py": ["stages.evaluate.*"],
    "stages/compare.py": ["stages.compare.*"],
    "stages/infer.py (scoring)": ["stages.infer.x_sample_scores__mutmut_*",
                                  "stages.infer.x_image_miou__mutmut_*"],
    "stages/lib/model.py (full_size_probs)": ["stages.lib.model.x_full_size_probs__mutmut_*"],
    "stages/report/tables.py (comparison tables)": [
        "stages.report.tables.x_comparison_row__mutmut_*",
        "stages.report.tables.x_comparison_table__mutmut_*",
        "stages.report.tables.x_verdict__mutmut_*", "stages.report.tables.x_verdicts__mutmut_*"],
}

# mutant name -> why no test can kill it (behaviour identical on every input it can get)
_CPU_ONLY = ("log_probs and gt both live on the CPU on every machine here (no accelerator), so "
             "gt.to(...) with another device argument or none is the same tensor")
_ASTYPE_NONE = ("astype(None) is astype(float): numpy's default dtype is float64, and "
                "pandas' too")
_ERRSTATE = ("_ratio divides by np.maximum(den, 1) >= 1, so no division in it can warn: the "
             "errstate around it (a guard) changes nothing")
_ALIGN = ("align_corners None or left out is F.interpolate's default, False, without a warning "
          "(torch 2.14)")
_NAN = 'float("NAN") is float("nan") (case-insensitive)'
_MODE_P = "a 2-D uint8 array becomes an L image, and putpalette turns L into P"
_UINT8 = "a P or L image (the only modes let through) is already uint8"
_CLIP = ("searchsorted over edges[1:-1] already returns 0..len(edges) - 2: the clip's bounds "
         "never bind")
_EXCESS = ("se is NaN, 0 or positive and finite; for each the mutated condition picks the "
           "same branch (NaN / NaN is NaN too)")
_ASARRAY = ("the values reaching assign are float, int or bool columns (compare passes "
            "pd.to_numeric's floats), which isnan and searchsorted take as they are")
_GUARD = ("the guard only spells out pandas' own result: the sample sd of one loss and the mean "
          "of none are NaN, and NaN / sqrt(n) is NaN")
_NON_BLOCKING = "non_blocking is a copy-scheduling hint: the tensor's values are the same"
# (function, its mutated line(s) as mutated_lines gives them) -> why no test can kill it:
# keyed by what the mutant is, not by mutmut's number for it
EQUIVALENT: dict[tuple[str, str], str] = {
    ("stages.lib.model.x_full_size_probs", 'resized = F.interpolate(logits[None].float(), '
     'size=size, mode="bilinear", align_corners=None)'): _ALIGN,
    ("stages.lib.model.x_full_size_probs", 'resized = F.interpolate(logits[None].float(), '
     'size=size, mode="bilinear", )'): _ALIGN,
    ("stages.infer.x_sample_scores",
     "target = gt.to(None, non_blocking=True)[None].long()"): _CPU_ONLY,
    ("stages.infer.x_sample_scores",
     "target = gt.to(non_blocking=True)[None].long()"): _CPU_ONLY,
    ("stages.infer.x_sample_scores",
     "target = gt.to(log_probs.device, )[None].long()"): _NON_BLOCKING,
    ("stages.infer.x_sample_scores",
     "target = gt.to(log_probs.device, non_blocking=False)[None].long()"): _NON_BLOCKING,
    ("stages.infer.x_sample_scores",
     '"loss": float(nll) / n_valid if n_valid else float("NAN"),'): _NAN,
    ("stages.infer.x_sample_scores", '"pixel_accuracy": float(np.trace(cm) / n_valid) if '
     'n_valid else float("NAN"),'): _NAN,
    ("stages.report.tables.x_comparison_row", '"pos" if row["delta"] >= 0 else "neg")'): (
        "reached only when |delta| >= SAME, so delta is never 0 there"),
    ("stages.lib.buckets.x_assign", "index = np.clip(np.searchsorted(edges[1:-1], v, "
     'side="right"), 0, len(edges) + 2)'): _CLIP,
    ("stages.lib.buckets.x_assign", "index = np.clip(np.searchsorted(edges[1:-1], v, "
     'side="right"), None, len(edges) - 2)'): _CLIP,
    ("stages.lib.buckets.x_assign", "index = np.clip(np.searchsorted(edges[1:-1], v, "
     'side="right"), 0, None)'): _CLIP,
    ("stages.lib.buckets.x_assign", "v = np.asarray(values, dtype=None)"): _ASARRAY,
    ("stages.lib.buckets.x_assign", "v = np.asarray(values, )"): _ASARRAY,
    ("stages.lib.buckets.x_bucket_table", "std = float(losses.std(ddof=1)) if (len(losses) >= "
     "2) or True else np.nan"): _GUARD,
    ("stages.lib.buckets.x_bucket_table", "se = std / np.sqrt(len(losses)) if (len(losses) >= "
     "2) or True else np.nan"): _GUARD,
    ("stages.lib.buckets.x_bucket_table", "mean = float(losses.mean()) if (len(losses)) or True "
     "else np.nan"): _GUARD,
    ("stages.lib.buckets.x_bin_edges",
     "v = values.astype(None).dropna().to_numpy()"): _ASTYPE_NONE,
    ("stages.lib.buckets.x_bucket_table", 'loss = samples["loss"].astype(None)'): _ASTYPE_NONE,
    ("stages.lib.buckets.x_bucket_table",
     'losses = members["loss"].astype(None).dropna()'): _ASTYPE_NONE,
    ("stages.lib.buckets.x_bin_edges", "edges = np.concatenate([[low], inner, inner[-2:] if "
     "len(inner) == 1 else []])"): "inner[-2:] is inner[-1:] when inner has one element",
    ("stages.lib.buckets.x_bucket_table", "excess = (mean - overall) / se if se and "
     "np.isfinite(se) or se > 0 else np.nan"): _EXCESS,
    ("stages.lib.buckets.x_bucket_table", "excess = (mean - overall) / se if se or "
     "np.isfinite(se) and se > 0 else np.nan"): _EXCESS,
    ("stages.lib.buckets.x_bucket_table", "excess = (mean - overall) / se if se and "
     "np.isfinite(se) and se >= 0 else np.nan"): _EXCESS,
    ("stages.lib.buckets.x_bucket_table", 'row.update({f"mean_{c}": members[c].mean() if (n) '
     "or True else np.nan for c in iou_cols})"): (
        "the mean of an empty column is NaN in pandas too, without a warning"),
    ("stages.lib.buckets.x_is_two_valued", "return pd.api.types.is_bool_dtype(None) or "
     "set(values.dropna().unique()) <= {0, 1}"): (
        "a boolean column's values are a subset of {0, 1} (True == 1), so the second test "
        "says yes for it too"),
    ("stages.lib.metrics.x__ratio",
     'with np.errstate(invalid=None, divide="ignore"):'): _ERRSTATE,
    ("stages.lib.metrics.x__ratio",
     'with np.errstate(invalid="ignore", divide=None):'): _ERRSTATE,
    ("stages.lib.metrics.x__ratio", 'with np.errstate(divide="ignore"):'): _ERRSTATE,
    ("stages.lib.metrics.x__ratio", 'with np.errstate(invalid="ignore", ):'): _ERRSTATE,
    ("stages.lib.metrics.x_per_class_iou",
     "tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(None)"): _ASTYPE_NONE,
    ("stages.lib.metrics.x_scores", "tp = np.diag(cm).astype(None)"): _ASTYPE_NONE,
    ("stages.lib.metrics.x_scores", "gt_count = cm.sum(1).astype(None)"): _ASTYPE_NONE,
    ("stages.lib.metrics.x_scores", "pred_count = cm.sum(0).astype(None)"): _ASTYPE_NONE,
    ("stages.lib.metrics.x_scores",
     "freq = gt_count / total if total else np.zeros_like(None)"): (
        "freq's value when total is 0 is never read: fw_iou is NaN then"),
    ("stages.lib.labels.x_label_image", "image = Image.fromarray(labels, mode=None)"): _MODE_P,
    ("stages.lib.labels.x_label_image", "image = Image.fromarray(labels, )"): _MODE_P,
    ("stages.lib.labels.x_read_labels",
     "return np.asarray(image, dtype=None).copy()"): _UINT8,
    ("stages.lib.labels.x_read_labels", "return np.asarray(image, ).copy()"): _UINT8,
    ("stages.lib.labels.x_save_labels", 'label_image(labels).save(tmp, format="PNG", '
     'compress_level=compress_level)'): "optimize left out: False is Pillow's PNG default",
    ("stages.lib.labels.x_save_labels", 'label_image(labels).save(tmp, format="png", '
     'optimize=False, compress_level=compress_level)'): "Pillow upper-cases format names",
}

KILLED = {1, 3}  # pytest's exit codes for failed tests / internal error (mutmut's "killed")
TIMEOUT = {36, 24, -24, 152, 255}


def meta_path(module: str) -> Path:
    return ROOT / "mutants" / (module.split(" ")[0] + ".meta")


RECORD = ROOT / "benchmarks" / "out" / "mutate.json"


def results() -> dict[str, dict[str, int | None]]:
    """module -> {mutant name: exit code} for the mutants in MODULES' patterns: mutmut's
    latest verdict, else the one recorded in RECORD. mutmut forgets every verdict when its
    configuration changes (a test added to the selection), so each run's verdicts are kept
    there: a module run earlier keeps its score while another runs."""
    recorded = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    out = {}
    for module, patterns in MODULES.items():
        codes = json.loads(meta_path(module).read_text())["exit_code_by_key"]
        out[module] = {name: code if code is not None else recorded.get(name)
                       for name, code in codes.items()
                       if any(fnmatch.fnmatch(name, p) for p in patterns)}
    return out


def mutated_lines(module: str, name: str, _trees: dict = {}) -> tuple[str, str]:  # noqa: B006
    """The original and the mutated text of a mutant's function, each the lines that differ
    joined and stripped: what a mutant is, whatever number mutmut gave it."""
    path = ROOT / "mutants" / module.split(" ")[0]
    if path not in _trees:
        source = path.read_text()
        lines = source.splitlines()
        _trees[path] = {n.name: lines[n.lineno:n.end_lineno]  # the body, without the def line
                        for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    functions = _trees[path]
    short = name.rsplit(".", 1)[1]
    orig = short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
    a, b = (functions[k] for k in (orig, short))
    diff = [line for line in difflib.ndiff(a, b) if line[:2] in ("- ", "+ ")]
    return (" / ".join(x[2:].strip() for x in diff if x[0] == "-"),
            " / ".join(x[2:].strip() for x in diff if x[0] == "+"))


def equivalence(module: str, name: str) -> tuple[str, str] | None:
    """The EQUIVALENT key this mutant matches, if any."""
    function = name.rsplit("__mutmut_", 1)[0]
    if not any(f == function for f, _ in EQUIVALENT):
        return None
    key = (function, mutated_lines(module, name)[1])
    return key if key in EQUIVALENT else None


def record(by_module: dict[str, dict[str, int | None]]) -> None:
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    codes = {n: c for module in by_module.values() for n, c in module.items() if c is not None}
    RECORD.write_text(json.dumps(codes, indent=0, sort_keys=True))


def score_rows(by_module: dict[str, dict[str, int | None]]) -> list[dict]:
    rows = []
    found = set()
    for module, codes in by_module.items():
        count = Counter()
        survivors = []
        for name, code in codes.items():
            key = equivalence(module, name)
            found.add(key)
            if code is None:
                count["not_checked"] += 1
            elif code in KILLED or code in TIMEOUT:
                count["killed"] += 1
                if key:
                    raise SystemExit(f"{name} {key} is listed as equivalent but a test killed it")
            elif key:
                count["equivalent"] += 1
            else:
                count["survived"] += 1
                survivors.append(name)
        live = len(codes) - count["equivalent"] - count["not_checked"]
        rows.append({"module": module, "mutants": len(codes), "killed": count["killed"],
                     "survived": count["survived"], "equivalent": count["equivalent"],
                     "not_checked": count["not_checked"],
                     "score": count["killed"] / live if live else float("nan"),
                     "survivors": sorted(survivors)})
    missing = set(EQUIVALENT) - found
    if missing:
        raise SystemExit(f"listed as equivalent but no such mutant: {sorted(missing)}")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| module | mutants | killed | survived | equivalent | not run | score |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        score = "not run" if r["score"] != r["score"] else f"{100 * r['score']:.1f}%"
        lines.append(f"| {r['module']} | {r['mutants']} | {r['killed']} | {r['survived']} | "
                     f"{r['equivalent']} | {r['not_checked']} | {score} |")
    lines += ["", "Equivalent mutants (left out of the score):", ""]
    lines += [f"- `{function.replace('.x_', '.')}`: `{mutated}`: {why}"
              for (function, mutated), why in sorted(EQUIVALENT.items())]
    return "\n".join(lines) + "\n"


def run_mutmut(modules: list[str]) -> None:
    patterns = [p for m in modules for p in MODULES[m]]
    mutmut = Path(sys.executable).parent / "mutmut"
    subprocess.run([str(mutmut), "run", "--max-children", "1", *patterns], cwd=ROOT,
                   check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true",
                        help="only score the results of the last run")
    parser.add_argument("--markdown", type=Path, help="write the score table here too")
    parser.add_argument("--module", action="append", choices=list(MODULES),
                        help="run only these modules' mutants (default: all)")
    args = parser.parse_args(argv)
    start, load = time.monotonic(), os.getloadavg()
    if (ROOT / "mutants").exists():
        record(results())
    if not args.no_run:
        run_mutmut(args.module or list(MODULES))
    by_module = results()
    record(by_module)
    rows = score_rows(by_module)
    table = markdown(rows)
    print(table)
    for r in rows:
        for name in r["survivors"]:
            print(f"survived: {name}  (mutmut show {name})")
    if not args.no_run:
        print(f"wall {time.monotonic() - start:.0f} s; load average at start "
              f"{load[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
