"""report: wall time, CPU time, peak memory and page size of the report stage at 1x and 10x
the sample's val images, every scheme of params.yaml.

The inputs are real stage outputs: the sample downloaded and masked, each scheme trained
briefly (a few train images, for the training curves and a model file), then infer,
evaluate, analyze and compare at 1x. The 10x set repeats infer's outputs, the val images,
masks and metadata under new ids (benchmarks/common.py, as bench_analyze does), and then
runs evaluate, analyze and compare on it, so the report reads what those stages write for
10x the images. Building happens in child processes (train's process-wide torch settings
stay out of the harness); each report runs in a fresh process
(`python -m benchmarks.bench_report child report ...`), so its peak RSS (the kernel's
VmHWM, which exec resets, unlike getrusage's ru_maxrss) is that run's alone.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stages.lib.names import seed_dir
from benchmarks.common import (add_memory_goal, child_row, default_params, memory_goal_note,
                               peak_mib, replicate_masks, replicate_predictions, replicate_raw,
                               resident_mib, run_child)

FACTORS = (1, 10)
SAMPLE_VAL = 80
TRAIN_IMAGES = 8     # enough for a model file and training curves; report's cost is val's
EPOCHS = 2


def bench_params(scale: float) -> dict:
    params = default_params()
    for stage in ("train", "infer", "analyze"):
        params[stage]["device"] = "cpu"
    per_split = SAMPLE_VAL if scale >= 1 else max(4, round(SAMPLE_VAL * scale))
    params["data"]["max_images"] = {"train": TRAIN_IMAGES, "val": per_split}
    params["train"]["epochs"] = EPOCHS
    if scale < 1:   # a smoke run: small images, one k, few figures
        params["train"].update(image_size=64, epochs=1, batch_size=4)
        params["analyze"]["clustering"].update(k_min=2, k_max=2)
        params["analyze"].update(figure_px=64, representatives=2)
        params["analyze"]["label_issues"]["top"] = 2
        params["analyze"]["heatmaps"]["channels"] = 1
    return params


def layout(root: Path) -> dict:
    """The report's inputs under root, as report.run takes them."""
    return {"raw": root / "data" / "raw", "masks": root / "data" / "masks",
            "models": root / "models", "predictions": root / "predictions",
            "metrics": root / "metrics", "analysis": root / "analysis",
            "compare": root / "compare"}


def build(params: dict, root: Path, base: Path | None, factor: int) -> dict:
    """Every input of the report under root: from scratch at 1x (base None), else base's
    outputs repeated `factor` times, then evaluate, analyze and compare run on them."""
    from stages import analyze, compare, download, evaluate, infer, masks, train

    p, seconds = layout(root), {}

    def timed(what: str, func, *args, **kwargs):
        started = time.perf_counter()
        func(*args, **kwargs)
        seconds[what] = seconds.get(what, 0.0) + time.perf_counter() - started

    if base is None:
        timed("download", download.run, params, p["raw"], root / "ck")
    else:
        b = layout(base)
        replicate_raw(b["raw"], p["raw"], factor)
        shutil.copytree(b["models"], p["models"])
        shutil.copytree(b["metrics"] / "train", p["metrics"] / "train")
    for s in params["schemes"]:
        # one training seed (params.yaml's first): its model and predictions, as the engines
        # lay them out
        m, run = p["masks"] / s, seed_dir(params["train"]["seeds"][0])
        model, pred = p["models"] / s / run, p["predictions"] / s / run
        if base is None:
            timed("masks", masks.run, params, s, p["raw"], m)
            timed("train", train.run, params, s, p["raw"], m, model,
                  live=p["metrics"] / "train" / s / run)
            timed("infer", infer.run, params, model, p["raw"], m, pred)
        else:
            replicate_masks(b["masks"] / s, m, factor)
            replicate_predictions(b["predictions"] / s / run, pred, factor)
        timed("evaluate", evaluate.run, params, s, pred / "val", m / "val",
              p["metrics"] / f"{s}.json", p["metrics"] / f"{s}.confusion.csv",
              p["metrics"] / f"{s}.confusion.png",
              annotations=p["raw"] / "annotations" / "instances_val.json",
              categories_out=p["metrics"] / f"{s}.categories.csv",
              per_image_out=p["metrics"] / f"{s}.per_image.npz")
        timed("analyze", analyze.run, params, pred, m, model, p["raw"], p["analysis"] / s)
    timed("compare", compare.run, params, p["analysis"], p["compare"], p["metrics"])
    return seconds


def report_child(params: dict, root: Path, out: Path) -> dict:
    from stages import report   # no torch; DVC's modules are imported during the run

    baseline = resident_mib()  # pandas, matplotlib, scikit-learn, jinja2... imported
    started, cpu = time.perf_counter(), time.process_time()
    report.run(params, **layout(root), out=out)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    images = sum(1 for _ in (root / "data" / "raw" / "images" / "val").iterdir())
    return {"images": images, "wall_s": wall, "cpu_s": cpu, "peak_mib": peak_mib(),
            "baseline_mib": baseline, "page_mb": out.stat().st_size / 1e6}


def child(argv: list[str]) -> None:
    from stages.lib.params import load_params

    mode, params_file, root, *rest = argv
    params = load_params(params_file)
    if mode == "build":
        base, factor = rest
        result = build(params, Path(root), None if base == "-" else Path(base), int(factor))
    else:
        result = report_child(params, Path(root), Path(rest[0]))
    print(json.dumps(result))


def run(scale: float) -> dict:
    params = bench_params(scale)
    rows, built = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_report.") as tmp:
        tmp = Path(tmp)
        params_file = tmp / "params.yaml"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        for factor in FACTORS:
            root = tmp / f"x{factor}"
            base = "-" if factor == 1 else tmp / "x1"
            built[factor] = run_child("benchmarks.bench_report",
                                      ["build", params_file, root, base, factor])
            result = run_child("benchmarks.bench_report",
                               ["report", params_file, root, tmp / f"report{factor}.html"])
            rows.append({**child_row(result, factor, 2), "page MB": round(result["page_mb"], 2)})
    add_memory_goal(rows, list(FACTORS))
    return {"title": "report: time, peak memory and page size at 1x and 10x the sample",
            "table": rows, "notes": notes(params, rows, built)}


def notes(params: dict, rows: list[dict], built: dict) -> list[str]:
    a, b = rows[0], rows[-1]
    cfg = params["report"]
    extra = b["val images"] - a["val images"]
    per_image_ms = 1000 * (b["wall s"] - a["wall s"]) / max(extra, 1)
    fixed_s = a["wall s"] - per_image_ms * a["val images"] / 1000
    per_image_kib = 1024 * (b["peak RSS MiB"] - a["peak RSS MiB"]) / max(extra, 1)
    schemes = list(params["schemes"])
    return [
        memory_goal_note(a["peak RSS MiB"], b["peak RSS MiB"]),
        f"{len(schemes)} schemes ({', '.join(schemes)}), default report params (n_examples "
        f"{cfg['n_examples']}, max_thumbnails {cfg['max_thumbnails']}, sample_thumbnail_px "
        f"{cfg['sample_thumbnail_px']}); inputs from the stages themselves: each scheme trained "
        f"{params['train']['epochs']} epoch(s) on {TRAIN_IMAGES} train images at "
        f"{params['train']['image_size']} px (for a model and curves), then infer, evaluate, "
        f"analyze, compare at 1x; at 10x evaluate, analyze and compare ran again on the "
        f"repeated infer outputs (analyze at 10x took {built[10].get('analyze', 0):.0f} s for "
        "both schemes).",
        f"From 1x to 10x: {per_image_ms:.1f} ms and {per_image_kib:.0f} KiB of peak RSS per "
        f"extra val image, over a fixed {max(fixed_s, 0):.1f} s (imports excluded). The "
        "page's size is bounded by report.max_thumbnails (the per-sample data grows, the "
        "inlined photos stop growing past it).",
        "The time includes reading analyze's neighbours and bin members (the report computes "
        "neither), the thumbnails, the figures and the sha256 of data/raw/manifest.json (the "
        "models' come from train.json).",
    ]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    child(sys.argv[2:])
