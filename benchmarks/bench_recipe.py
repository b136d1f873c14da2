"""recipe: the small-data training recipes (train.loss, class_weights, sampler, schedule,
augment, lr, epochs) side by side on the embedded sample, for every scheme: the val IoU per
class at full size (the evaluate stage's metrics), its spread over images (IQR of infer's
per-image IoU, images showing the class), and the training seconds. Each recipe is also
trained the other way round (HELD-OUT: trained on the sample's val split, scored on its
train split), so that the choice is not tuned to one set of 80 images.

Each training (train, infer, evaluate at params.yaml's other settings) runs in its own
process (`python -m benchmarks.bench_recipe child ...`) with one torch thread, two at a time
on this 2-core machine: every recipe is measured in the same run, under the same load. On
the sample, each recipe is trained with every seed of SEEDS: a difference smaller than the
spread between two seeds of one recipe is noise (on 80 images it is as large as 0.02-0.05
IoU).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import default_params, images_per_split, run_child

JITTER = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05}
NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
PLAIN = {"loss": "ce", "sampler": "uniform", "schedule": "cosine", "warmup": 0,
         "lr": 0.001, "epochs": 15,
         "augment": {"resize": "squash", "crop_scale": [1.0, 1.0], "rare_crop": 0.0,
                     "colour_jitter": NO_JITTER}}
SMALL_DATA = {"loss": "weighted_ce", "class_weights": "inverse_sqrt", "sampler": "uniform",
              "schedule": "warmup_cosine", "warmup": 2, "lr": 0.002, "epochs": 24,
              "augment": {"resize": "squash", "crop_scale": [0.3, 1.0], "rare_crop": 0.0,
                          "colour_jitter": JITTER}}
# (name, train-section values over params.yaml's): the first is the default before issue 15.
BALANCED = {**SMALL_DATA, "sampler": "class_balanced"}   # "A": the default until 40 epochs
CANDIDATES = [
    ("ce, no augmentation, cosine, 15 epochs (before issue 15)", PLAIN),
    ("weighted CE (inverse sqrt) + crop 0.3-1 + jitter, warm-up cosine, lr 2e-3, 24 epochs",
     SMALL_DATA),
    ("A: the same + class-balanced sampler", BALANCED),
    ("A with plain CE (the sampler alone, no class weights)", {**BALANCED, "loss": "ce"}),
    ("A + soft Dice", {**BALANCED, "loss": "weighted_ce_dice"}),
    ("A + half the crops centred on the rarest class",
     {**BALANCED, "augment": {**BALANCED["augment"], "rare_crop": 0.5}}),
    ("A, batch 4", {**BALANCED, "batch_size": 4}),
    ("A at 192 px", {**BALANCED, "image_size": 192}),
    ("A, 40 epochs, validated every 4th (the default)",
     {**BALANCED, "epochs": 40, "val_every": 4}),
]
SEEDS = (0, 1)   # the sample rows; held-out rows train seed 0
JOBS = 2


def swapped(raw: Path, masks: Path, dest: Path) -> tuple[Path, Path]:
    """download's and masks' folders with train and val exchanged (symlinks)."""
    new_raw, new_masks = dest / "raw", dest / "masks"
    for folder in (new_raw / "annotations", new_raw / "images", new_masks):
        folder.mkdir(parents=True)
    for a, b in (("train", "val"), ("val", "train")):
        (new_raw / "annotations" / f"instances_{a}.json").symlink_to(
            raw / "annotations" / f"instances_{b}.json")
        (new_raw / "images" / a).symlink_to(raw / "images" / b)
        (new_masks / a).symlink_to(masks / b)
    return new_raw, new_masks


def iqr(values) -> float:
    import numpy as np

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan")
    high, low = np.percentile(values, [75, 25])
    return float(high - low)


def child(argv: list[str]) -> None:
    """Train (with seed argv[5]), infer and evaluate one recipe on one scheme; print the
    figures as JSON."""
    import pandas as pd
    import torch

    params_file, scheme, raw, masks, out = argv[0], argv[1], *map(Path, argv[2:5])
    seed = int(argv[5])
    torch.set_num_threads(1)
    from stages import evaluate, infer, train

    params = json.loads(Path(params_file).read_text())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    last = train.run(params, scheme, raw, masks, out / "model", seed=seed)
    train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    infer.run(params, out / "model", raw, masks, out / "pred")
    metrics = evaluate.run(params, scheme, out / "pred" / "val", masks / "val",
                           out / "metrics.json", out / "confusion.csv")
    samples = pd.read_csv(out / "pred" / "samples.csv")
    spread = {name: iqr(samples[f"iou_{name}"]) for name in metrics["iou"]}
    interval = metrics.get("interval", {}).get("iou", {})
    print(json.dumps({"iou": metrics["iou"], "miou": metrics["miou"], "iqr": spread,
                      "interval": interval,
                      "val_iou_128": last.get("val_iou", {}), "train_wall_s": train_wall,
                      "train_cpu_s": train_cpu}))


def candidate_params(base: dict, values: dict, scale: float = 1.0) -> dict:
    """params.yaml's values with one candidate's train values over them (a smoke run at
    scale < 1: few epochs at 64 px)."""
    params = copy.deepcopy(base)
    params["train"].update(copy.deepcopy(values))
    if scale < 1:
        params["train"].update(epochs=max(1, round(params["train"]["epochs"] * scale)),
                               image_size=64, warmup=0)
    return params


def _task(args: tuple) -> tuple:
    key, params_file, scheme, raw, masks, out = args
    started = time.perf_counter()
    result = run_child("benchmarks.bench_recipe", [params_file, scheme, raw, masks, out,
                                                   key[-1]])
    print(f"  {key}: {result['iou']} ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr, flush=True)
    return key, result


def run(scale: float) -> dict:
    from benchmarks.common import prepare_sample
    from stages import masks as masks_stage

    base = default_params()
    schemes = list(base["schemes"])
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_recipe.") as tmp:
        tmp = Path(tmp)
        raw, first_masks, base = prepare_sample(tmp, base, images_per_split(scale))
        mask_dirs = {schemes[0]: first_masks}
        for scheme in schemes[1:]:
            mask_dirs[scheme] = tmp / "masks" / scheme
            masks_stage.run(base, scheme, raw, mask_dirs[scheme])
        data = {}
        for scheme in schemes:
            data[(scheme, "sample")] = (raw, mask_dirs[scheme])
            data[(scheme, "held-out")] = swapped(raw, mask_dirs[scheme], tmp / "swap" / scheme)
        tasks = []
        for index, (_, values) in enumerate(CANDIDATES):
            params_file = tmp / f"params{index}.json"
            params_file.write_text(json.dumps(candidate_params(base, values, scale)))
            for (scheme, direction), (r, m) in data.items():
                for seed in SEEDS if direction == "sample" else SEEDS[:1]:
                    tasks.append(((index, scheme, direction, seed), params_file, scheme, r, m,
                                  tmp / "runs" / f"{index}-{scheme}-{direction}-{seed}"))
        with ThreadPoolExecutor(JOBS) as pool:
            results = dict(pool.map(_task, tasks))
    load_after = os.getloadavg()[0]
    return {"title": TITLE, "table": table(results, schemes),
            "notes": notes(base, scale, load_before, load_after),
            "candidates": {name: values for name, values in CANDIDATES}}


TITLE = "recipe: small-data training recipes on the sample (val IoU at full size)"


def table(results: dict, schemes: list[str]) -> list[dict]:
    """One row per (recipe, scheme, direction, seed) measured, from the children's results
    keyed (candidate index, scheme, "sample" / "held-out", seed); combinations not in
    `results` are left out."""
    rows = []
    for index, (name, _) in enumerate(CANDIDATES):
        for scheme in schemes:
            for direction in ("sample", "held-out"):
                for seed in SEEDS:
                    r = results.get((index, scheme, direction, seed))
                    if r is not None:
                        rows.append(_row(name, scheme, direction, seed, r))
    return rows


def _row(name: str, scheme: str, direction: str, seed: int, r: dict) -> dict:
    classes = [c for c in r["iou"] if c != "background"]
    row = {"recipe": name, "scheme": scheme,
           "trained on / scored on": ("train / val" if direction == "sample"
                                      else "val / train (held-out)"),
           "seed": seed}
    for slot, cls in enumerate(classes):
        label = "person" if slot == 0 else "car / vehicle"
        row[f"{label} IoU"] = _num(r["iou"][cls])
        row[f"{label} 95% interval"] = _interval(r.get("interval", {}).get(cls))
        row[f"{label} per-image IQR"] = _num(r["iqr"][cls])
    row["mIoU"] = _num(r["miou"])
    row["train CPU s"] = round(r["train_cpu_s"])
    row["train wall s (1 thread)"] = round(r["train_wall_s"])
    return row


def _interval(bounds) -> str:
    """evaluate's bootstrap interval of an IoU (over the val images), as [low, high]."""
    if not bounds or any(b is None for b in bounds):
        return "n/a"
    return f"[{_num(bounds[0])}, {_num(bounds[1])}]"


def _num(value) -> str:
    """Three decimals (the table's default for floats below 10 is two: too coarse for an
    IoU of 0.005)."""
    return "n/a" if value is None or value != value else f"{float(value):.3f}"


def notes(params: dict, scale: float, load_before: float, load_after: float) -> list[str]:
    size = params["train"]["image_size"] if scale >= 1 else 64
    return [
        f"IoU from the evaluate stage's metrics (full size: predictions at {size} px resized "
        "back to each image's own size); per-image IQR: the spread (75th - 25th percentile) "
        "of infer's per-image IoU over the images whose ground truth or prediction shows the "
        "class. 95% interval: evaluate's percentile bootstrap over the val images (the "
        "metrics file's `interval`). mIoU over background and the two classes.",
        "held-out rows: the same recipe trained on the sample's 80 val images and scored on "
        "its 80 train images. A recipe that wins only on the sample rows is tuned to them.",
        f"Each training ran in its own process with 1 torch thread, {JOBS} at a time: on 2 "
        "cores the pipeline trains its two schemes the same way (train's threads are "
        "train.cpu_threads, 1), so its training wall seconds are "
        "about the CPU seconds here.",
        f"Load average (1 min) {load_before:.1f} before and {load_after:.1f} after: the "
        "machine is shared, so compare the seconds of rows of this one run, not across runs.",
        "Candidate values: the JSON result (benchmarks/out/recipe.json, `candidates`).",
    ]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    child(sys.argv[2:])
