"""masks: images/s of the stage (1 and masks.workers workers) side by side with a naive
per-annotation COCO.annToMask loop and the JPEG-read + PNG-write limit (in full, and at
the stage's colour-statistics scale), with the peak memory of each, at 1x and 10x the
sample's image count; and whether issue 8's two goals are met (stage >= 0.8x the limit,
main-process peak RSS at 10x <= 1.2x of 1x).

Every measurement runs in a fresh process (`python -m benchmarks.bench_masks child ...`),
so its peak memory belongs to that measurement alone. Peaks are the kernel's high-water
marks (VmHWM in /proc/<pid>/status, Linux): the process's own, and the largest among its
worker processes, read while they run. (getrusage's ru_maxrss would not do: a child made
by fork starts with its parent's RSS as its maximum, and keeps it across exec.) The 10x
data set repeats the embedded sample's images and annotations under new ids, in a
temporary raw folder of symlinks.
"""
from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SCHEME = "person_car"
SPLITS = ("train", "val")
SAMPLE_PER_SPLIT = 80
FACTORS = (1, 10)
ID_STRIDE = 1_000_000      # COCO 2017 image ids stay below 600,000
# The goals of issue 8, checked at the largest factor.
GOAL_RATE_TO_LIMIT = 0.8   # stage images/s >= this x the JPEG read + PNG write limit
GOAL_RSS_GROWTH = 1.2      # stage main-process peak RSS at 10x <= this x at 1x
METHODS = {"stage": "masks stage (run)", "naive": "naive annToMask loop",
           "limit": "JPEG read + PNG write limit",
           "limit_reduced": "JPEG read at the stats scale + PNG write",
           "core": "label maps only: stage core", "core_naive": "label maps only: annToMask"}


# ---------------------------------------------------------------- data

def build_raw(dest: Path, per_split: int, factor: int) -> int:
    """A raw folder as download writes it: the first `per_split` sample images of each split
    (by id), repeated `factor` times under new ids. Returns the number of images."""
    from stages.download import subset_instances

    total = 0
    with zipfile.ZipFile(SAMPLE / "annotations" / "annotations_trainval2017.zip") as zf:
        for split in SPLITS:
            data = json.loads(zf.read(f"annotations/instances_{split}2017.json"))
            images = sorted(data["images"], key=lambda im: im["id"])[:per_split]
            doc = replicate(data, images, factor)
            folder = dest / "images" / split
            folder.mkdir(parents=True)
            originals = {im["id"]: im["file_name"] for im in images}
            for image in doc["images"]:
                source = SAMPLE / f"{split}2017" / originals[image["id"] % ID_STRIDE]
                (folder / image["file_name"]).symlink_to(source)
            (dest / "annotations").mkdir(exist_ok=True)
            (dest / "annotations" / f"instances_{split}.json").write_text(
                json.dumps(subset_instances(doc, doc["images"])))  # download's order
            total += len(doc["images"])
    return total


def replicate(data: dict, images: list[dict], factor: int) -> dict:
    """Copy k of every image and its annotations gets id + k * ID_STRIDE."""
    keep = {im["id"] for im in images}
    anns = [a for a in data["annotations"] if a["image_id"] in keep]
    out_images, out_anns = [], []
    for k in range(factor):
        offset = k * ID_STRIDE
        for image in images:
            new_id = image["id"] + offset
            out_images.append({**image, "id": new_id, "file_name": f"{new_id:012d}.jpg"})
        out_anns += [{**a, "id": a["id"] + offset * 1000, "image_id": a["image_id"] + offset}
                     for a in anns]
    return {"images": out_images, "annotations": out_anns, "categories": data["categories"]}


# ---------------------------------------------------------------- the methods (in a child)
# Each returns (images, workers used, (wall s, CPU s) of the timed part, or None when the
# whole call is timed).

def stage(raw: Path, out: Path, workers: int) -> tuple[int, int, tuple | None]:
    from stages import masks
    from stages.lib.params import load_params

    params = load_params(ROOT / "params.yaml")
    params["masks"]["workers"] = workers
    summary = masks.run(params, SCHEME, raw, out)
    return summary.n_images, summary.workers, None


def naive_labels(coco, image_id: int, class_of: dict[int, int]) -> np.ndarray:
    """What one would write first: annToMask per annotation, then the stage's default
    rules (crowd regions and overlaps: ignore)."""
    from stages.lib.labels import IGNORE_INDEX

    info = coco.imgs[image_id]
    claims = np.zeros((info["height"], info["width"]), np.uint8)
    labels = np.zeros_like(claims)
    crowd = np.zeros(claims.shape, bool)
    regions: dict[int, np.ndarray] = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
        cls = class_of.get(ann["category_id"])
        if cls is None:
            continue
        m = coco.annToMask(ann).astype(bool)
        if ann["iscrowd"]:
            crowd |= m
        else:
            regions[cls] = regions.get(cls, np.zeros_like(m)) | m
    for cls in sorted(regions):
        claims += regions[cls]
        labels[regions[cls]] = cls
    labels[(claims > 1) | crowd] = IGNORE_INDEX
    return labels


def coco_index(ann_file: Path):
    """pycocotools' COCO index and the scheme's category -> class map."""
    from pycocotools.coco import COCO

    from stages import masks
    from stages.lib.params import load_params

    with contextlib.redirect_stdout(sys.stderr):  # COCO() prints progress
        coco = COCO(str(ann_file))
    scheme_params = load_params(ROOT / "params.yaml")["schemes"][SCHEME]
    plan = masks.make_plan(SCHEME, scheme_params, coco.dataset["categories"], 6.0)
    return coco, plan


def naive(raw: Path, out: Path, workers: int) -> tuple[int, int, tuple | None]:
    """The naive stage: COCO index, read each JPEG, naive_labels, the same PNG writer.
    Labels only, no metadata."""
    from stages import masks
    from stages.lib.io import atomic_dir
    from stages.lib.labels import save_labels

    count = 0
    with atomic_dir(out) as folder:   # the stage's own output discipline, for a fair race
        for split in SPLITS:
            ann_file = raw / "annotations" / f"instances_{split}.json"
            coco, plan = coco_index(ann_file)
            for image_id in sorted(coco.imgs):
                name = coco.imgs[image_id]["file_name"]
                masks.read_pixels(raw / "images" / split / name, ann_file)
                labels = naive_labels(coco, image_id, plan.scheme.class_of_category)
                save_labels(folder / split / f"{Path(name).stem}.png", labels)
                count += 1
    return count, 1, None


def limit(raw: Path, out: Path, workers: int, scale: int = 1) -> tuple[int, int, tuple | None]:
    """The floor of any masks stage in one process: decode every JPEG (in full, or at
    1/scale), write a palette PNG of its size (the same atomic writers), nothing else."""
    from stages import masks
    from stages.lib.io import atomic_dir
    from stages.lib.labels import save_labels

    count = 0
    with atomic_dir(out) as folder:
        for split in SPLITS:
            ann_file = raw / "annotations" / f"instances_{split}.json"
            for image in sorted(json.loads(ann_file.read_text())["images"],
                                key=lambda im: im["id"]):
                _, size = masks.read_pixels(raw / "images" / split / image["file_name"], ann_file,
                                            scale)
                save_labels(folder / split / f"{Path(image['file_name']).stem}.png",
                            np.zeros(size, np.uint8))
                count += 1
    return count, 1, None


def limit_reduced(raw: Path, out: Path, workers: int) -> tuple[int, int, tuple | None]:
    """The limit with the stage's own decode: at 1/masks.colour_stats_scale."""
    from stages.lib.params import load_params

    scale = load_params(ROOT / "params.yaml")["masks"]["colour_stats_scale"]
    return limit(raw, out, workers, scale)


def core(raw: Path, out: Path, workers: int) -> tuple[int, int, tuple | None]:
    """The stage's label maps alone (decode_annotation + label_map), no file I/O; only the
    loop over images is timed."""
    from stages import masks

    count, timed = 0, np.zeros(2)
    for split in SPLITS:
        ann_file = raw / "annotations" / f"instances_{split}.json"
        _, plan = coco_index(ann_file)
        tasks = masks.image_tasks(json.loads(ann_file.read_text()), ann_file)
        started = np.array([time.perf_counter(), time.process_time()])
        for image, anns in tasks:
            h, w = image["height"], image["width"]
            masks.label_map(h, w, [masks.decode_annotation(a, h, w) for a in anns],
                            plan.scheme, plan.rules)
        timed += [time.perf_counter(), time.process_time()] - started
        count += len(tasks)
    return count, 1, tuple(timed)


def core_naive(raw: Path, out: Path, workers: int) -> tuple[int, int, tuple | None]:
    """naive_labels alone, no file I/O; only the loop over images is timed."""
    count, timed = 0, np.zeros(2)
    for split in SPLITS:
        coco, plan = coco_index(raw / "annotations" / f"instances_{split}.json")
        started = np.array([time.perf_counter(), time.process_time()])
        for image_id in sorted(coco.imgs):
            naive_labels(coco, image_id, plan.scheme.class_of_category)
        timed += [time.perf_counter(), time.process_time()] - started
        count += len(coco.imgs)
    return count, 1, tuple(timed)


def peak_kib(pid: int | str = "self") -> int:
    """The high-water mark of a process's resident memory, in KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class WorkerPeak(threading.Thread):
    """The largest VmHWM among this process's descendants, read every 50 ms. VmHWM only
    grows, so a spike between two reads is still seen; only a child's last 50 ms are not."""

    def __init__(self):
        super().__init__(daemon=True)
        self.kib = 0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.wait(0.05):
            for child in me.children(recursive=True):
                self.kib = max(self.kib, peak_kib(child.pid))

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.kib


def cpu_seconds() -> float:
    """User + system CPU time of this process and of the workers it has waited for: the
    work done, whatever else the machine was busy with."""
    me, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def child(method: str, workers: int, raw: Path, out: Path) -> dict:
    """One measurement, in this process: wall time of the work and the memory peaks."""
    func = {"stage": stage, "naive": naive, "limit": limit, "limit_reduced": limit_reduced,
            "core": core, "core_naive": core_naive}[method]
    sampler = WorkerPeak()
    sampler.start()
    started = time.perf_counter()
    cpu_before = cpu_seconds()
    images, used, timed = func(raw, out, workers)
    seconds, cpu = timed or (time.perf_counter() - started, cpu_seconds() - cpu_before)
    worker_kib = sampler.stop()
    return {"method": method, "workers": used, "images": images, "seconds": seconds, "cpu": cpu,
            "main_mib": peak_kib() / 1024, "worker_mib": worker_kib / 1024 if used > 1 else None}


# ---------------------------------------------------------------- parent

def measure(method: str, workers: int, raw: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_masks", "child", method, str(workers),
           str(raw), str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_pngs(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    files_b = sorted(p.relative_to(b) for p in b.rglob("*.png"))
    return bool(files_a) and files_a == files_b and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def run(scale: float) -> dict:
    from stages import masks
    from stages.lib.params import load_params

    workers = masks.worker_count(load_params(ROOT / "params.yaml")["masks"]["workers"])
    per_split = max(1, round(SAMPLE_PER_SPLIT * scale))
    runs = [("stage", 1), ("stage", workers), ("naive", 1), ("limit", 1), ("limit_reduced", 1),
            ("core", 1), ("core_naive", 1)]
    runs = list(dict.fromkeys(runs))  # one stage row when only one worker is usable
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_masks.") as tmp:
        tmp = Path(tmp)
        for factor in FACTORS:
            raw = tmp / f"raw_{factor}x"
            build_raw(raw, per_split, factor)
            for method, w in runs:
                out = tmp / f"{method}_{w}_{factor}x"
                result = measure(method, w, raw, out)
                results[method, w, factor] = result
                rows.append(table_row(result, factor))
        identical = same_pngs(tmp / "stage_1_1x", tmp / "naive_1_1x")
    return {"title": "masks: throughput and peak memory", "table": rows,
            "notes": notes(results, workers, per_split, identical)}


def table_row(result: dict, factor: int) -> dict:
    worker = result["worker_mib"]
    return {"method": METHODS[result["method"]], "workers": result["workers"],
            "data": f"{factor}x", "images": result["images"],
            # 3 significant digits: a smoke run's rows take milliseconds, never "0.00"
            "seconds": float(f"{result['seconds']:.3g}"),
            "images/s": round(result["images"] / result["seconds"], 1),
            "CPU ms/image": round(1000 * result["cpu"] / result["images"], 1),
            "peak RSS main (MiB)": round(result["main_mib"], 1),
            "peak RSS per worker (MiB)": "in main" if worker is None else round(worker, 1)}


def notes(results: dict, workers: int, per_split: int, identical: bool) -> list[str]:
    big = max(FACTORS)

    def rate(method: str, w: int) -> float:
        r = results[method, w, big]
        return r["images"] / r["seconds"]

    def cpu(method: str, w: int) -> float:
        r = results[method, w, big]
        return r["cpu"] / r["images"]

    lines = [
        f"Data: {2 * per_split} sample images (1x: {per_split} per split, both splits) and "
        f"{big} copies of them under new ids ({big}x); scheme {SCHEME}, default rules.",
        *goals(results, workers),
        f"At {big}x the stage runs at {rate('stage', 1) / rate('naive', 1):.1f}x the naive "
        f"loop's speed in one process"
        + (f"; {workers} workers give {rate('stage', workers) / rate('stage', 1):.2f}x "
           "one worker." if workers > 1 else "."),
        "The limit decodes every JPEG in full, as a stage that needs every pixel must. The "
        "stage uses the pixels for its colour statistics only and decodes at "
        "1/masks.colour_stats_scale (libjpeg's DCT scaling; the entropy decoding, most of "
        "a JPEG's cost, is the same), so part of its standing against the limit is work it "
        "no longer does. Its own floor is the 'JPEG read at the stats scale' row: the stage "
        f"runs at {rate('stage', 1) / rate('limit_reduced', 1):.0%} of it "
        f"({cpu('stage', 1) * 1000:.1f} against {cpu('limit_reduced', 1) * 1000:.1f} CPU ms "
        "per image).",
        "The stage also computes the metadata row (colour statistics, per-class and "
        "per-category counts) and its time includes reading the JSON and starting the "
        "worker processes; the naive loop and the limits write labels only. The two "
        "'label maps only' rows time rasterising alone (annotations already in memory, no "
        f"JPEG, no PNG): there the stage core runs at "
        f"{rate('core', 1) / rate('core_naive', 1):.1f}x annToMask's speed.",
        "The naive loop's PNGs are byte-identical to the stage's at 1x: "
        f"{'yes' if identical else 'NO'}.",
        "Peak RSS: the kernel's high-water mark (VmHWM) of the measuring process (main) and "
        "the largest of its worker processes; with 1 worker the stage runs in the main "
        "process. The stage streams its annotation files (download writes them in merge "
        "order), so main holds one image's annotations at a time (a few in flight with "
        "workers); the naive loop, the limits and the core rows parse the JSON whole, and "
        "grow with it. A worker holds one image at a time.",
        "Timings come from one run each on a machine that may be shared (see the load "
        "average above): wall-clock rates suffer from it, CPU ms per image (the process and "
        "its workers, user + system) much less.",
    ]
    return lines


def goals(results: dict, workers: int) -> list[str]:
    """The two goals of issue 8, each with its measured ratio and met / missed."""
    big, small = max(FACTORS), min(FACTORS)
    stage, limit = results["stage", 1, big], results["limit", 1, big]
    speed = (stage["images"] / stage["seconds"]) / (limit["images"] / limit["seconds"])
    cpu = (limit["cpu"] / limit["images"]) / (stage["cpu"] / stage["images"])
    growth = {w: results["stage", w, big]["main_mib"] / results["stage", w, small]["main_mib"]
              for w in dict.fromkeys((1, workers))}
    peaks = "; ".join(
        f"{w} worker{'s' * (w > 1)}: {results['stage', w, small]['main_mib']:.1f} -> "
        f"{results['stage', w, big]['main_mib']:.1f} MiB, {ratio:.2f}x"
        for w, ratio in growth.items())

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    return [
        f"Goal: stage >= {GOAL_RATE_TO_LIMIT}x of the I/O limit (images/s at {big}x, one "
        f"process each, the 'JPEG read + PNG write limit' row): {speed:.2f}x, "
        f"{verdict(speed >= GOAL_RATE_TO_LIMIT)} (by CPU ms per image: {cpu:.2f}x).",
        f"Goal: peak RSS at {big}x <= {GOAL_RSS_GROWTH}x of {small}x (the stage's main "
        f"process): {peaks}; {verdict(max(growth.values()) <= GOAL_RSS_GROWTH)}.",
    ]


def child_main(argv: list[str]) -> int:
    method, workers, raw, out = argv[1], int(argv[2]), Path(argv[3]), Path(argv[4])
    print(json.dumps(child(method, workers, raw, out)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        raise SystemExit("usage: python -m benchmarks.bench_masks child METHOD WORKERS RAW OUT "
                         "(the harness runs this; use python -m benchmarks masks)")
    raise SystemExit(child_main(sys.argv[1:]))
