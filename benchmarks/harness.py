"""Run benchmark modules, keep their raw results as JSON and their tables in BENCHMARKS.md.

A module's section of BENCHMARKS.md lies between `<!-- bench:<name>:start -->` and
`<!-- bench:<name>:end -->`; rerunning one benchmark rewrites only its own section (added
at the end the first time), so figures measured on different days stay apart, each with
the machine it was measured on.
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import importlib
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VERSIONS = ("torch", "numpy", "pillow", "pycocotools")
PROJECTION = "projection"   # not a benchmark: benchmarks/projection.py, from the JSON results


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def machine_info() -> dict:
    """What the figures depend on, for the reader of BENCHMARKS.md."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info = {"cpu": cpu_model(), "cores_usable": usable, "cores_total": os.cpu_count(),
            "python": platform.python_version(), "load_1min": round(os.getloadavg()[0], 2),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for name in VERSIONS:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_one(name: str, scale: float) -> dict:
    module = importlib.import_module(f"benchmarks.bench_{name}")
    started = time.perf_counter()
    result = module.run(scale)
    check_result(name, result)
    return {"name": name, "scale": scale, "machine": machine_info(),
            "wall_s": round(time.perf_counter() - started, 1), **result}


def check_result(name: str, result: dict) -> None:
    """A module's result must render: a title, rows with one set of columns, notes."""
    table = result.get("table")
    if not isinstance(result.get("title"), str) or not table or not isinstance(table, list):
        raise ValueError(f"bench_{name}.run() must return a title and a non-empty table")
    columns = list(table[0])
    for row in table:
        if list(row) != columns:
            raise ValueError(f"bench_{name}: row {row} does not have the columns {columns}")
    if not all(isinstance(n, str) for n in result.get("notes", [])):
        raise ValueError(f"bench_{name}: notes must be strings")


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value).replace("|", "\\|")


def section(result: dict) -> str:
    m = result["machine"]
    versions = ", ".join(f"{name} {m[name]}" for name in VERSIONS)
    lines = [f"## {result['title']}", "",
             f"Measured {m['date']} on {m['cpu']}, {m['cores_usable']} usable cores "
             f"(of {m['cores_total']}; load average {m['load_1min']:g} at the start); "
             f"Python {m['python']}, {versions}. Scale "
             f"{result['scale']:g}; `python -m benchmarks {result['name']}` took "
             f"{result['wall_s']:.0f} s.", "", markdown_table(result["table"]), ""]
    lines += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def update_markdown(text: str, name: str, body: str) -> str:
    """Replace the text between a benchmark's markers, or append a marked section."""
    start, end = markers(name)
    block = f"{start}\n{body}{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_outputs(result: dict, out: Path, markdown: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['name']}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_section(out, markdown, result["name"], section(result))


def write_section(out: Path, markdown: Path, name: str, body: str) -> None:
    """Rewrite one section of the markdown file under a lock in the out folder: two
    benchmarks run side by side (one per terminal) must not lose each other's section."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".markdown.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = markdown.read_text() if markdown.exists() else "# Benchmarks\n"
        markdown.write_text(update_markdown(text, name, body))


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*",
                        help=f"benchmarks to run (default all: {', '.join(names)}, then "
                             f"{PROJECTION}); '{PROJECTION}' rewrites the full-COCO projection "
                             "from the JSON results")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="problem size relative to the default (e.g. 0.05 for a smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="folder of the JSON results")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="markdown file whose sections are rewritten")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(names) - {PROJECTION})
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)} (available: {', '.join(names)}, "
                     f"and {PROJECTION})")
    if args.scale <= 0:
        parser.error("--scale must be positive")
    for name in [n for n in args.names if n != PROJECTION] or ([] if args.names else names):
        print(f"benchmark {name} (scale {args.scale:g}) ...", file=sys.stderr, flush=True)
        result = run_one(name, args.scale)
        write_outputs(result, args.out, args.markdown)
        print(markdown_table(result["table"]), file=sys.stderr, flush=True)
    # The projection reads every result in --out: after all benchmarks, or when asked for.
    if not args.names or PROJECTION in args.names:
        from benchmarks import projection

        print(f"{PROJECTION} from {args.out}/*.json ...", file=sys.stderr, flush=True)
        print(projection.write(args.out, args.markdown), file=sys.stderr, flush=True)
    return 0
