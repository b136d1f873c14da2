"""What several benchmarks share: the embedded sample downloaded and masked into a
temporary folder, and a steady-state timer."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEME = "person_car"


def default_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["base_url"] = str(ROOT / "data" / "sample")
    return params


def images_per_split(scale: float) -> int | None:
    """The whole sample (80 per split) from scale 1 up; fewer images for smoke runs."""
    return None if scale >= 1 else max(4, round(80 * scale))


def prepare_sample(dest: Path, params: dict | None = None,
                   per_split: int | None = None) -> tuple[Path, Path, dict]:
    """download + masks (one scheme) of the sample under dest: (raw, masks, params)."""
    from stages import download, masks

    params = copy.deepcopy(params or default_params())
    params["data"]["max_images"] = {"train": per_split, "val": per_split}
    raw, mask_dir = dest / "raw", dest / "masks" / SCHEME
    download.run(params, raw, dest / "ck")
    masks.run(params, SCHEME, raw, mask_dir)
    return raw, mask_dir, params


def steady_rate(step: Callable[[], int], warmup: int, repeats: int) -> float:
    """Items per second of `step` (which returns how many items it handled) after warm-up."""
    for _ in range(warmup):
        step()
    started, items = time.perf_counter(), 0
    for _ in range(repeats):
        items += step()
    return items / (time.perf_counter() - started)


# ---------------------------------------------------------------- Nx copies of the val split
# bench_analyze and bench_report measure a stage at 1x and 10x the sample's val images. The
# 10x set repeats every val image (symlinks), annotation, mask, metadata row and infer output
# under new ids (id + k * ID_STRIDE, file name {id:012d}), with a little seeded noise on the
# latent vectors so that clustering sees 10x distinct points. Copy 0 keeps the original ids.

ID_STRIDE = 1_000_000


def _new_name(image_id: int, k: int, suffix: str) -> str:
    return f"{image_id + k * ID_STRIDE:012d}{suffix}"


def replicate_raw(src: Path, dest: Path, factor: int) -> None:
    """download's folder with the val split repeated `factor` times: images (symlinks),
    annotations and manifest; train images and annotations once, as they are."""
    import json

    (dest / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (dest / "images" / split).mkdir(parents=True)
    for image in sorted((src / "images" / "train").iterdir()):
        (dest / "images" / "train" / image.name).symlink_to(image.resolve())
    if (src / "annotations" / "instances_train.json").is_file():
        (dest / "annotations" / "instances_train.json").symlink_to(
            (src / "annotations" / "instances_train.json").resolve())
    doc = json.loads((src / "annotations" / "instances_val.json").read_text())
    images, anns = [], []
    for k in range(factor):
        for image in doc["images"]:
            name = _new_name(image["id"], k, ".jpg")
            images.append({**image, "id": image["id"] + k * ID_STRIDE, "file_name": name})
            (dest / "images" / "val" / name).symlink_to(
                (src / "images" / "val" / image["file_name"]).resolve())
        anns += [{**a, "id": a["id"] + k * ID_STRIDE * 1000,
                  "image_id": a["image_id"] + k * ID_STRIDE} for a in doc["annotations"]]
    (dest / "annotations" / "instances_val.json").write_text(
        json.dumps({**doc, "images": images, "annotations": anns}))
    manifest_path = src / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        val = manifest["splits"]["val"]
        val["images"] = [{**entry, "id": entry["id"] + k * ID_STRIDE,
                          "path": f"images/val/{_new_name(entry['id'], k, '.jpg')}"}
                         for k in range(factor) for entry in val["images"]]
        (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))


def replicate_masks(src: Path, dest: Path, factor: int) -> None:
    """masks/{scheme} with its val label maps (symlinks) and metadata rows repeated."""
    import pandas as pd

    (dest / "val").mkdir(parents=True)
    meta = pd.read_csv(src / "metadata.csv")
    meta = meta[meta["split"] == "val"]
    for k in range(factor):
        for image_id, file_name in zip(meta["image_id"], meta["file_name"]):
            (dest / "val" / _new_name(image_id, k, ".png")).symlink_to(
                (src / "val" / f"{Path(file_name).stem}.png").resolve())
    pd.concat([meta.assign(image_id=meta["image_id"] + k * ID_STRIDE,
                           file_name=[_new_name(i, k, ".jpg") for i in meta["image_id"]])
               for k in range(factor)]).to_csv(dest / "metadata.csv", index=False)


def replicate_predictions(src: Path, dest: Path, factor: int) -> None:
    """predictions/{scheme} (infer's output) repeated: samples.csv, latents.npz (copies
    after the first with seeded noise of 10% of each dimension's spread), the predicted
    label maps (symlinks) and timing.json (its image count scaled); latents_train.npz once,
    as the train split is."""
    import json

    import numpy as np
    import pandas as pd

    (dest / "val").mkdir(parents=True)
    samples = pd.read_csv(src / "samples.csv", dtype={"stem": str})
    pd.concat([samples.assign(image_id=samples["image_id"] + k * ID_STRIDE,
                              stem=[_new_name(i, k, "") for i in samples["image_id"]])
               for k in range(factor)]).to_csv(dest / "samples.csv", index=False)
    for k in range(factor):
        for image_id, stem in zip(samples["image_id"], samples["stem"]):
            if (src / "val" / f"{stem}.png").is_file():
                (dest / "val" / _new_name(image_id, k, ".png")).symlink_to(
                    (src / "val" / f"{stem}.png").resolve())
    with np.load(src / "latents.npz") as npz:
        latents, ids = npz["latents"], npz["image_ids"]
        names, slices = npz["layer_names"], npz["layer_slices"]
    rng = np.random.default_rng(0)
    scale = latents.std(0, keepdims=True) * 0.1
    stacked = np.concatenate([latents + (rng.normal(size=latents.shape) * scale if k else 0)
                              for k in range(factor)]).astype(np.float32)
    np.savez(dest / "latents.npz", image_ids=np.concatenate([ids + k * ID_STRIDE
                                                             for k in range(factor)]),
             latents=stacked, layer_names=names, layer_slices=slices)
    if (src / "latents_train.npz").is_file():
        (dest / "latents_train.npz").symlink_to((src / "latents_train.npz").resolve())
    if (src / "timing.json").is_file():
        timing = json.loads((src / "timing.json").read_text())
        timing["images"] = timing.get("images", len(samples)) * factor
        (dest / "timing.json").write_text(json.dumps(timing, indent=1))


# ---------------------------------------------------------------- a stage in its own process

def resident_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    """This process's peak resident memory (the kernel's VmHWM), MiB. Not getrusage's
    ru_maxrss: Linux carries that over fork and exec, so a child started by a harness that
    holds 1 GB would report at least 1 GB whatever it does itself."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource  # not Linux: the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(module: str, args: list[str]) -> dict:
    """`python -m <module> child <args>` in a fresh process (so its peak RSS is that run's
    alone); returns the JSON object the child prints on its last line of stdout."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "child", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{module} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- goals beside figures

MEMORY_GOAL = 1.2   # peak RSS at 10x the images <= this times the peak at 1x


def memory_goal_column() -> str:
    return f"peak RSS vs 1x (goal <= {MEMORY_GOAL:g}x at 10x)"


def child_row(result: dict, factor: int, digits: int) -> dict:
    """The columns bench_analyze and bench_report share, from a measuring child's result."""
    return {"val images": result["images"], "size": f"{factor}x",
            "wall s": round(result["wall_s"], digits), "CPU s": round(result["cpu_s"], digits),
            "ms / image (wall)": round(1000 * result["wall_s"] / result["images"], 1),
            "peak RSS MiB": round(result["peak_mib"]),
            "of which imports MiB": round(result["baseline_mib"])}


def add_memory_goal(rows: list[dict], factors: list[int]) -> None:
    """The memory-goal column, last, on rows measured at `factors` (1x first)."""
    goals = memory_goal_cells([r["peak RSS MiB"] for r in rows], factors)
    for row, goal in zip(rows, goals):
        row[memory_goal_column()] = goal


def memory_goal_cells(peaks: list[float], factors: list[int]) -> list[str]:
    """Each row's peak RSS over the 1x row's, with met/missed on the 10x row."""
    cells = []
    for peak, factor in zip(peaks, factors):
        ratio = peak / peaks[0]
        verdict = f": {'met' if ratio <= MEMORY_GOAL else 'missed'}" if factor == 10 else ""
        cells.append(f"{ratio:.2f}x{verdict}")
    return cells


def memory_goal_note(peak_1x: float, peak_10x: float) -> str:
    ratio = peak_10x / peak_1x
    return (f"Goal: peak memory at 10x the images <= {MEMORY_GOAL:g}x the peak at 1x: "
            f"{'met' if ratio <= MEMORY_GOAL else 'missed'} ({ratio:.2f}x, "
            f"{peak_1x:.0f} -> {peak_10x:.0f} MiB).")
