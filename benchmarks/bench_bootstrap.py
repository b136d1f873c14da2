"""bootstrap: the paired percentile bootstrap of evaluate and compare (stages/lib/bootstrap.py)
at COCO scale: 1000 resamples over 40,000 val images with 3 classes, two schemes paired (as
compare runs it), each in its own process for its peak memory; then 10x the images and 10x
the resamples. Per-image confusion matrices are synthetic (seeded), the size of real ones.

Goals (issue 16): at most 10 s for 1000 resamples over 40,000 images; peak memory flat from
1x to 10x (benchmarks/common.MEMORY_GOAL).
"""
from __future__ import annotations

import json
import sys
import time

from benchmarks.common import (MEMORY_GOAL, memory_goal_cells, memory_goal_column, peak_mib,
                               resident_mib, run_child)

IMAGES, SAMPLES, CLASSES = 40_000, 1000, 3
GOAL_SECONDS = 10.0


def child(images: int, samples: int) -> dict:
    import numpy as np

    from stages.lib import bootstrap

    rng = np.random.default_rng(0)
    cms = [rng.integers(0, 5000, size=(images, CLASSES, CLASSES)) for _ in range(2)]
    ignored = rng.integers(0, 500, size=images)
    baseline = resident_mib()
    started, cpu = time.perf_counter(), time.process_time()
    settings = bootstrap.Settings(samples=samples)
    interval = bootstrap.scheme_interval(cms[0], ignored, ["background", "person", "car"],
                                         settings)
    a, b = bootstrap.resampled_sums(cms, settings)
    zeros = np.zeros(samples)
    delta = (bootstrap.confusion_scores(b, zeros)["iou"][:, 1]
             - bootstrap.confusion_scores(a, zeros)["iou"][:, 1])
    paired = bootstrap.interval(delta, settings.confidence)
    return {"images": images, "samples": samples, "wall_s": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu, "peak_mib": peak_mib(),
            "baseline_mib": baseline, "checks": [interval["miou"], paired]}


def run(scale: float) -> dict:
    images = max(1000, round(IMAGES * scale))
    cases = [(images, SAMPLES, "1x"), (10 * images, SAMPLES, "10x images"),
             (images, 10 * SAMPLES, "10x resamples")]
    rows = []
    for n, samples, label in cases:
        result = run_child("benchmarks.bench_bootstrap", [n, samples])
        rows.append({"case": label, "val images": n, "resamples": samples,
                     "wall s": round(result["wall_s"], 2), "CPU s": round(result["cpu_s"], 2),
                     "peak RSS MiB": round(result["peak_mib"]),
                     "of which data MiB": round(result["baseline_mib"]),
                     "working MiB": round(result["peak_mib"] - result["baseline_mib"])})
    first = rows[0]["wall s"]
    speed = "met" if first <= GOAL_SECONDS else "missed"
    for row, cell in zip(rows, memory_goal_cells([r["working MiB"] for r in rows], [1, 10, 10])):
        row[memory_goal_column().replace("peak RSS", "working MiB")] = cell
    notes = [f"Goal: 1000 resamples over {images} images, {CLASSES} classes (one scheme's "
             f"intervals, then two schemes paired, as evaluate and compare run them) in at most "
             f"{GOAL_SECONDS:g} s: {speed} ({first:.2f} s).",
             f"Goal: memory flat from 1x to 10x: the working memory (peak RSS minus the "
             f"process holding the data) at 10x <= {MEMORY_GOAL:g}x the 1x run's. The per-image "
             "matrices are the input and grow with the images (N x K x K int64, what compare "
             "reads from per_image.npz): 'of which data MiB' is the process after building "
             "them. The resampling draws at most bootstrap.BATCH_CELLS weights at once and "
             "converts at most bootstrap.CHUNK_CELLS counts to float64 at once, so its own "
             "memory is the same whatever N and the number of resamples (a float64 copy of "
             "the whole input, as before, made 10x the images cost 1.59x the peak).",
             "Synthetic per-image confusion matrices (seeded integers) of real size; the "
             "bootstrap's cost does not depend on their values."]
    return {"title": "bootstrap: paired intervals over val images", "table": rows,
            "notes": notes}


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        raise SystemExit("usage: python -m benchmarks.bench_bootstrap child IMAGES SAMPLES "
                         "(the harness runs this; use python -m benchmarks bootstrap)")
    print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]))))
