"""masks: one palette PNG per image (pixel value = class index, 255 = ignore) for one label
scheme, plus a per-image metadata table.

Rules: class 0 is every pixel no class claims; objects of unclaimed categories, crowd or
not, are background like everything else. Per scheme, `crowd` decides what a crowd region
of a claimed category becomes (ignore: 255; class: its class, like an instance;
background: dropped, so its pixels keep whatever else claims them) and `overlap` what a
pixel claimed by two different classes becomes (ignore: 255; or a priority list of the
classes, first wins). Images are read on their stored pixel grid, never EXIF-rotated:
COCO annotations and the JSON width/height refer to that grid. The colour statistics come
from the JPEG decoded at 1/masks.colour_stats_scale of its size (DCT scaling: the entropy
decoding is the same, the inverse transforms and the statistics are a fraction), so no
image is decoded at full resolution unless that scale is 1.

An annotation file in merge order (images ascending by id, annotations by image_id, as
download writes them) is streamed: checked in one pass before any image work, then each
image joined with its annotations as they come, so memory does not grow with the number
of images. Any other file is grouped in memory, with a log line saying why.

Layout written under --out:
  {split}/{file stem}.png   for split in train, val
  metadata.csv              one row per image, ordered by split then image id
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import logging
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.coco import (SPLITS, AnnotationError, ArrayUntilEnd, SchemeMap, StreamError,
                              array_items, read_instances, resolve_scheme, stream_instances)
from stages.lib.images import decode
from stages.lib.io import atomic_dir
from stages.lib.labels import IGNORE_INDEX, save_labels
from stages.lib.names import FileNames, inside, plain_name_problem, safe_filename
from stages.lib.parallel import ordered_map
from stages.lib.params import check_scheme_rules, load_params, scheme_class_names, select

log = logging.getLogger("masks")

# Why an annotation drew less than it claims: malformed parts dropped (polygons of fewer
# than 3 points or an odd number of coordinates, RLEs of another size), no segmentation
# at all, or a well-formed one that covers no pixel.
FLAWS = ("degenerate", "empty", "zero_area")
# ITU-R BT.601 luma, the weights of Pillow's convert("L").
LUMA = (0.299, 0.587, 0.114)
IMAGE_COLUMNS = ("width", "height", "is_grayscale", "grayscale_score", "colourfulness",
                 "brightness", "contrast", "n_annotations",
                 *(f"n_{flaw}_annotations" for flaw in FLAWS),
                 "crowd_fraction", "ignore_fraction", "n_unclaimed_objects")
# Only what rasterising and the metadata read travels to the workers.
IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("category_id", "iscrowd", "segmentation", "area")


# ---------------------------------------------------------------- pure core: rules

@dataclass(frozen=True)
class LabelRules:
    """What crowd regions and overlaps of claimed categories become."""

    crowd: str = "ignore"                    # one of params.CROWD_RULES
    priority: tuple[int, ...] | None = None  # class indices, first wins; None: overlap -> 255


def label_rules(scheme_params: dict, scheme: SchemeMap) -> LabelRules:
    """Raises SchemeRuleError (a ValueError) for a crowd or overlap rule params validation
    would refuse (stages.lib.params.check_scheme_rules, with the scheme's resolved classes)."""
    crowd = scheme_params.get("crowd", "ignore")
    overlap = scheme_params.get("overlap", "ignore")
    check_scheme_rules(scheme.name, {"classes": dict.fromkeys(scheme.class_names[1:], {}),
                                     "crowd": crowd, "overlap": overlap})
    if overlap == "ignore":
        return LabelRules(crowd, None)
    return LabelRules(crowd, tuple(scheme.class_names.index(name) for name in overlap))


def count_column(category_name: str) -> str:
    """count_<category>, spaces as "_"; analyze names a figure after the column, so any
    other character a file name cannot hold is made safe (names.safe_filename)."""
    return "count_" + safe_filename(str(category_name).replace(" ", "_"))


def mask_name(file_name: str) -> str:
    """An image's mask (and prediction) file: its stem, as a PNG."""
    return f"{Path(file_name).stem}.png"


@dataclass(frozen=True)
class Plan:
    """Everything an image needs besides its own annotations; the same for a whole split."""

    scheme: SchemeMap
    rules: LabelRules = LabelRules()
    tolerance: float = 6.0
    colour_scale: int = 1     # colour statistics from the image decoded at 1/colour_scale
    # (category id, column) of every category the scheme does not claim, by id: the same
    # columns for every image, whatever it shows.
    counted: tuple[tuple[int, str], ...] = field(default=())

    def columns(self) -> list[str]:
        classes = ["background_fraction"]
        for name in self.scheme.class_names[1:]:
            classes += [f"{name}_fraction", f"{name}_instances", f"{name}_mean_area"]
        return ["image_id", "file_name", "split", *IMAGE_COLUMNS, *classes,
                *(column for _, column in self.counted)]


def make_plan(scheme_name: str, scheme_params: dict, categories: list[dict],
              tolerance: float, colour_scale: int = 1, source: str = "categories") -> Plan:
    """Raises AnnotationError (a scheme naming categories the file lacks), ValueError, or
    StageError (two categories whose columns would be one, `source` named)."""
    scheme = resolve_scheme(scheme_name, scheme_params, categories)
    plan = Plan(scheme, label_rules(scheme_params, scheme), tolerance, colour_scale)
    columns = FileNames(f"{source}: metadata columns")
    for column in plan.columns():
        columns.claim(column, f"column {column!r}")
    counted = tuple((c["id"], columns.claim(count_column(c["name"]),
                                            f"category {c['id']} {c['name']!r}"))
                    for c in sorted(categories, key=lambda c: c["id"])
                    if c["id"] not in scheme.class_of_category)
    return dataclasses.replace(plan, counted=counted)


# ---------------------------------------------------------------- pure core: decoding

@dataclass(frozen=True)
class Decoded:
    """One annotation as a compressed RLE, with what went wrong decoding it."""

    category_id: int
    crowd: bool
    rle: dict | None      # None when nothing could be drawn
    pixels: int           # pixels the RLE covers
    area: float           # the annotation's `area` field (COCO's instance area), else pixels
    flaw: str | None      # one of FLAWS, or None


def decode_annotation(ann: dict, height: int, width: int) -> Decoded:
    """Polygons, uncompressed RLE and compressed RLE (the cases of pycocotools'
    COCO.annToRLE, without needing a COCO index); malformed input never raises."""
    segm = ann.get("segmentation")
    if not segm:
        rle, flaw = None, "empty"
    elif isinstance(segm, list):
        rle, flaw = _polygons_rle(segm, height, width)
    elif isinstance(segm, dict):
        rle, flaw = _dict_rle(segm, height, width)
    else:
        rle, flaw = None, "degenerate"
    pixels = int(mask_utils.area(rle)) if rle is not None else 0
    if flaw is None and pixels == 0:
        flaw = "zero_area"
    area = ann.get("area")
    if not isinstance(area, (int, float)) or isinstance(area, bool) or not np.isfinite(area):
        area = pixels
    return Decoded(ann["category_id"], bool(ann.get("iscrowd", 0)), rle, pixels, float(area),
                   flaw)


def _polygons_rle(parts: list, height: int, width: int) -> tuple[dict | None, str | None]:
    polygons = [p for p in (_polygon(part) for part in parts) if p is not None]
    flaw = None if len(polygons) == len(parts) else "degenerate"
    if not polygons:
        return None, flaw
    rles = mask_utils.frPyObjects(polygons, height, width)
    # merge() of one RLE is a copy of it: skipped for the usual single polygon.
    return (rles[0] if len(rles) == 1 else mask_utils.merge(rles)), flaw


def _polygon(part: object) -> np.ndarray | None:
    # pycocotools takes a first part of 4 numbers for a box and silently drops an odd last
    # coordinate, so both are refused here rather than drawn wrong.
    if not isinstance(part, list) or len(part) < 6 or len(part) % 2:
        return None
    try:
        coords = np.asarray(part, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if coords.ndim != 1 or not np.isfinite(coords).all():
        return None
    return coords


def _dict_rle(segm: dict, height: int, width: int) -> tuple[dict | None, str | None]:
    # pycocotools' C decoder trusts the counts: a run total other than height*width writes
    # past its buffer, so totals are checked before anything is decoded.
    size, counts = segm.get("size"), segm.get("counts")
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        return None, "degenerate"
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            return None, "degenerate"
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts},
                                      height, width), None
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            return None, "degenerate"
    if isinstance(counts, bytes) and _compressed_total(counts) == height * width:
        return {"size": [height, width], "counts": counts}, None
    return None, "degenerate"


def _compressed_total(counts: bytes) -> int | None:
    """Sum of the runs of a COCO compressed RLE string (pycocotools' rleFrString), or None
    when a run is negative."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            c = counts[p] - 48 if p < len(counts) else -48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return sum(runs)


def annotation_rle(ann: dict, height: int, width: int) -> dict:
    """One compressed RLE of an annotation (empty when nothing is drawable)."""
    rle = decode_annotation(ann, height, width).rle
    if rle is None:
        return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
    return rle


# ---------------------------------------------------------------- pure core: labels

def label_map(height: int, width: int, decoded: list[Decoded], scheme: SchemeMap,
              rules: LabelRules) -> np.ndarray:
    """The label map of one image under one scheme and its crowd/overlap rules."""
    by_class: dict[int, list[dict]] = {}
    crowds: list[dict] = []
    for ann in decoded:
        cls = scheme.class_of_category.get(ann.category_id)
        if cls is None or ann.rle is None:
            continue
        if ann.crowd and rules.crowd == "ignore":
            crowds.append(ann.rle)
        elif not ann.crowd or rules.crowd == "class":
            by_class.setdefault(cls, []).append(ann.rle)
    if not by_class and not crowds:   # nothing claimed (many images): all background
        return np.zeros((height, width), np.uint8)
    # Built transposed: RLEs decode column-major, so every region is then a contiguous
    # array and no step below walks memory across the grain.
    labels = np.zeros((width, height), np.uint8)
    if rules.priority is None:
        claims = np.zeros((width, height), np.uint8)
        # One merged RLE per class: instances of one class never conflict with each other.
        for cls, rles in sorted(by_class.items()):
            region = _region(rles)
            claims += region
            np.copyto(labels, cls, where=region)
        np.copyto(labels, IGNORE_INDEX, where=claims > 1)
    else:
        # Lowest priority first, so each class overwrites those it takes precedence over.
        for cls in reversed(rules.priority):
            if cls in by_class:
                np.copyto(labels, cls, where=_region(by_class[cls]))
    if crowds:
        np.copyto(labels, IGNORE_INDEX, where=_region(crowds))
    return np.ascontiguousarray(labels.T)


def rasterize(height: int, width: int, anns: list[dict], scheme: SchemeMap,
              rules: LabelRules = LabelRules()) -> np.ndarray:
    """The label map of one image from its COCO annotation dicts."""
    return label_map(height, width, [decode_annotation(a, height, width) for a in anns],
                     scheme, rules)


def _region(rles: list[dict]) -> np.ndarray:
    """The union of RLEs as a bool array, transposed (width x height, C order): decode's
    own column-major buffer, viewed, not copied."""
    merged = rles[0] if len(rles) == 1 else mask_utils.merge(rles)
    return mask_utils.decode(merged).T.view(bool)


def _union_pixels(rles: list[dict]) -> int:
    merged = rles[0] if len(rles) == 1 else mask_utils.merge(rles)
    return int(mask_utils.area(merged))


# ---------------------------------------------------------------- pure core: metadata

def grayscale_score(pixels: np.ndarray) -> float:
    """Mean absolute channel difference (0 for a true grayscale image)."""
    if pixels.ndim == 2:
        return 0.0
    rgb = pixels[..., :3].astype(np.int16)
    return float((np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])).mean() / 2)


def channel_moments(pixels: np.ndarray) -> tuple[list[int], list[list[int]], int]:
    """Per-channel sums and sums of products, as exact integers: the mean and variance of
    any weighted sum of channels follow without building a float image (a third of the
    time of float64 statistics, and no BLAS threads fighting the worker processes)."""
    n = pixels.shape[0] * pixels.shape[1]
    channels = 1 if pixels.ndim == 2 else 3
    planes = np.empty((channels, n), np.int64)
    planes[:] = pixels.reshape(n, -1)[:, :channels].T
    sums = [int(s) for s in planes.sum(axis=1)]
    products = [[0] * channels for _ in range(channels)]
    for i in range(channels):
        for j in range(i, channels):
            products[i][j] = products[j][i] = int(np.dot(planes[i], planes[j]))
    return sums, products, n


def weighted_stats(moments: tuple, weights) -> tuple[float, float]:
    """Mean and standard deviation over the pixels of sum_c weights[c] * channel c."""
    sums, products, n = moments
    mean = sum(w * s for w, s in zip(weights, sums)) / n
    square = sum(wi * wj * products[i][j] for i, wi in enumerate(weights)
                 for j, wj in enumerate(weights)) / n
    return mean, math.sqrt(max(square - mean * mean, 0.0))


def colourfulness(pixels: np.ndarray, moments: tuple | None = None) -> float:
    """Hasler & Suesstrunk (2003): std and mean of the opponent channels rg = R - G and
    yb = (R + G) / 2 - B, combined as sigma_rgyb + 0.3 * mu_rgyb (0 for grayscale)."""
    if pixels.ndim == 2:
        return 0.0
    moments = moments or channel_moments(pixels)
    rg_mean, rg_std = weighted_stats(moments, (1.0, -1.0, 0.0))
    yb_mean, yb_std = weighted_stats(moments, (0.5, 0.5, -1.0))
    return math.hypot(rg_std, yb_std) + 0.3 * math.hypot(rg_mean, yb_mean)


def pixel_stats(pixels: np.ndarray, tolerance: float) -> dict:
    """Colour facts of one decoded image (0-255 scale), rounded for a readable table:
    brightness is the mean luminance, contrast its standard deviation (RMS contrast)."""
    gray = grayscale_score(pixels)
    moments = channel_moments(pixels)
    brightness, contrast = weighted_stats(moments, (1.0,) if pixels.ndim == 2 else LUMA)
    return {"is_grayscale": bool(gray <= tolerance), "grayscale_score": round(gray, 3),
            "colourfulness": round(colourfulness(pixels, moments), 3),
            "brightness": round(brightness, 3), "contrast": round(contrast, 3)}


def image_metadata(pixels: np.ndarray, labels: np.ndarray, decoded: list[Decoded],
                   plan: Plan) -> dict:
    """Per-image facts the analysis plots against loss, in plan.columns() order. `pixels`
    only feed the colour statistics: any decoded size will do."""
    total = labels.size
    class_of = plan.scheme.class_of_category
    crowds = [d.rle for d in decoded if d.crowd and d.rle is not None]
    row = {"width": labels.shape[1], "height": labels.shape[0],
           **pixel_stats(pixels, plan.tolerance), "n_annotations": len(decoded)}
    for flaw in FLAWS:
        row[f"n_{flaw}_annotations"] = sum(d.flaw == flaw for d in decoded)
    # The union's pixel count, not the `area` fields: a crowd RLE's area is not its pixel
    # count, and overlapping crowds must not count twice. Counted on the RLE, not decoded.
    row["crowd_fraction"] = float(_union_pixels(crowds) / total) if crowds else 0.0
    # One comparison per class: much faster than a bincount for a few classes; the
    # background is what is left.
    counts = {k: int(np.count_nonzero(labels == k))
              for k in (*range(1, plan.scheme.num_classes), IGNORE_INDEX)}
    counts[0] = total - sum(counts.values())
    row["ignore_fraction"] = float(counts[IGNORE_INDEX] / total)
    row["n_unclaimed_objects"] = sum(d.category_id not in class_of for d in decoded)
    row["background_fraction"] = float(counts[0] / total)
    for index, name in enumerate(plan.scheme.class_names[1:], start=1):
        # Instances are the non-crowd objects that drew something.
        areas = [d.area for d in decoded
                 if class_of.get(d.category_id) == index and not d.crowd and d.pixels]
        row[f"{name}_fraction"] = float(counts[index] / total)
        row[f"{name}_instances"] = len(areas)
        # fsum: exactly rounded, so the annotations' order in the file does not matter.
        row[f"{name}_mean_area"] = math.fsum(areas) / len(areas) / total if areas else 0.0
    per_category = collections.Counter(d.category_id for d in decoded)
    for category_id, column in plan.counted:
        row[column] = per_category[category_id]  # a crowd region counts once
    return row


# ---------------------------------------------------------------- one image (in a worker)

@dataclass(frozen=True)
class SplitJob:
    """What every image task of a split shares; sent once to each worker."""

    split: str
    plan: Plan
    images: Path       # folder of the split's JPEGs
    out: Path          # folder of the split's PNGs
    ann_file: Path     # named in errors about listed images


def read_pixels(path: Path, ann_file: Path, scale: int = 1) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 HxW (grayscale) or HxWx3, CMYK and palette made RGB, and the stored (height,
    width). A JPEG is decoded at 1/scale of its stored size (stages.lib.images.decode);
    other formats, and scale 1, at full size."""
    if not path.is_file():
        raise StageError(f"{path}: missing (listed in {ann_file})")
    return decode(path, scale=scale, keep_grey=True, failure="cannot read image")


def process_image(job: SplitJob, image: dict, anns: list[dict]) -> dict:
    """Read, rasterise, write the PNG (atomically), return the metadata row."""
    path = job.images / image["file_name"]
    pixels, stored = read_pixels(path, job.ann_file, job.plan.colour_scale)
    height, width = image["height"], image["width"]
    if stored != (height, width):
        raise StageError(f"{path}: stored size {stored[1]}x{stored[0]} differs from "
                         f"the annotation's {width}x{height}")
    decoded = [decode_annotation(a, height, width) for a in anns]
    labels = label_map(height, width, decoded, job.plan.scheme, job.plan.rules)
    save_labels(inside(job.out, mask_name(image["file_name"])), labels)
    return {"image_id": image["id"], "file_name": image["file_name"], "split": job.split,
            **image_metadata(pixels, labels, decoded, job.plan)}


Task = tuple[str, dict, list[dict]]   # (split, image entry, its annotations)
_JOBS: dict[str, SplitJob] = {}       # a worker's splits, set once by its initializer


def _init_worker(jobs: dict[str, SplitJob]) -> None:
    _JOBS.clear()
    _JOBS.update(jobs)


def _process_task(task: Task) -> dict:
    split, image, anns = task
    return process_image(_JOBS[split], image, anns)


def map_ordered(jobs: dict[str, SplitJob], tasks: Iterable[Task],
                workers: int) -> Iterator[dict]:
    """Rows in task order, computed by `workers` processes with a bounded number of tasks
    in flight: memory stays flat however many images there are."""
    if workers == 1:
        _init_worker(jobs)
        yield from map(_process_task, tasks)
        return
    # spawn: the parent may hold threads (torch in tests), which fork would copy mid-lock;
    # and spawned workers are waited-for children, so their peak memory is measurable.
    # One pool for both splits: starting workers costs about half a second each.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(jobs,)) as pool:
        # A StageError already names its image's file: it surfaces as the one line it is.
        yield from ordered_map(_process_task, tasks, pool, 4 * workers,
                               named_errors=(StageError,))


def worker_count(requested: int) -> int:
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(requested, available))


# ---------------------------------------------------------------- run

@dataclass
class Summary:
    """What the stage's log line reports."""

    workers: int
    n_images: int = 0
    n_grayscale: int = 0
    n_annotations: int = 0
    flaws: collections.Counter = field(default_factory=collections.Counter)

    def add(self, row: dict) -> None:
        self.n_images += 1
        self.n_grayscale += bool(row["is_grayscale"])
        self.n_annotations += row["n_annotations"]
        for flaw in FLAWS:
            self.flaws[flaw] += row[f"n_{flaw}_annotations"]


# The params this stage reads: run() sees only these (stages.lib.params.select), and dvc.yaml's
# and the rule's `params:` list the same keys. The scheme it draws, and its own section.
PARAMS = ("schemes.{scheme}", "masks")


def run(params: dict, scheme_name: str, raw: Path, out: Path) -> Summary:
    params = select(params, PARAMS, scheme=scheme_name)
    scheme_class_names(params, scheme_name)  # an unknown scheme fails here, by name
    summary = Summary(worker_count(params["masks"]["workers"]))
    with atomic_dir(out) as tmp:
        # Both annotation files first: a broken one fails before any image work, and the
        # workers start once with both splits' plans.
        work = [split_job(params, scheme_name, raw, split, tmp / split) for split in SPLITS]
        columns = work[0][0].plan.columns()
        for job, _ in work[1:]:
            if job.plan.columns() != columns:
                raise StageError(f"{job.ann_file}: categories differ from "
                                 f"{work[0][0].ann_file}'s, so metadata columns would not line up")
        for job, _ in work:
            job.out.mkdir()
        total = sum(tasks.count for _, tasks in work)
        # The table is atomic with its folder: only ever seen inside the finished one.
        with open(tmp / "metadata.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, lineterminator="\n")
            writer.writeheader()
            rows = map_ordered({job.split: job for job, _ in work}, _drain(work),
                               summary.workers)
            for row in tqdm(rows, total=total, desc=f"masks {scheme_name}", unit="img",
                            disable=None):
                writer.writerow(row)
                summary.add(row)
            handle.flush()
            os.fsync(handle.fileno())
    log.info("%s: %d masks (%d workers), %d grayscale; %d annotations: %d degenerate, "
             "%d empty, %d zero-area", scheme_name, summary.n_images, summary.workers,
             summary.n_grayscale, summary.n_annotations, summary.flaws["degenerate"],
             summary.flaws["empty"], summary.flaws["zero_area"])
    return summary


def _drain(work: list[tuple[SplitJob, "SplitTasks"]]) -> Iterator[Task]:
    for job, tasks in work:
        for image, anns in tasks.pairs:
            yield job.split, image, anns


def split_job(params: dict, scheme_name: str, raw: Path, split: str,
              out: Path) -> tuple[SplitJob, "SplitTasks"]:
    ann_file = raw / "annotations" / f"instances_{split}.json"
    try:
        categories, tasks = split_tasks(ann_file)
        plan = make_plan(scheme_name, params["schemes"][scheme_name], categories,
                         params["masks"]["grayscale_tolerance"],
                         params["masks"]["colour_stats_scale"], source=str(ann_file))
    except (AnnotationError, ValueError) as exc:
        raise StageError(str(exc)) from None
    job = SplitJob(split, plan, raw / "images" / split, out, ann_file)
    return job, tasks


# ---------------------------------------------------------------- reading annotations

@dataclass
class SplitTasks:
    """A split's (image, its annotations) pairs in image id order, and how many."""

    count: int
    pairs: Iterator[tuple[dict, list[dict]]]


def split_tasks(ann_file: Path) -> tuple[list, SplitTasks]:
    """The categories and tasks of one annotation file: streamed when the file is in merge
    order, else grouped in memory (with a log line saying why)."""
    try:
        scan = scan_instances(ann_file)
    except StreamError as exc:
        reason = f"not JSON the streaming parser accepts ({exc})"
    else:
        if scan.unordered is None:
            log.info("%s: %d images, annotations streamed", ann_file, scan.n_images)
            return scan.categories, SplitTasks(scan.n_images, streamed_tasks(ann_file))
        reason = scan.unordered
    log.info("%s: %s; grouping the annotations in memory", ann_file, reason)
    data = read_instances(ann_file)
    tasks = image_tasks(data, ann_file)
    return data["categories"], SplitTasks(len(tasks), _released(tasks))


@dataclass(frozen=True)
class Scan:
    categories: list
    n_images: int
    unordered: str | None    # why the file is not in merge order, or None


def scan_instances(path: Path) -> Scan:
    """One streamed read of an annotation file, before any image work: the checks
    image_tasks makes, the image count, and whether images ascend by id and annotations by
    image_id. Memory stays flat. Raises AnnotationError or StageError for bad content,
    StreamError for what only the json module reads (NaN, integers beyond 64 bits) or
    malformed JSON (which read_instances then reports)."""
    scanned = {}
    try:
        small = stream_instances(
            lambda: open(path, "rb"), str(path),
            lambda images: scanned.update(images=_scan_images(images, path)),
            lambda annotations: scanned.update(annotations=_scan_annotations(annotations, path)))
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read COCO annotations: {exc}") from None
    (n_images, unordered), (_, unordered_anns) = scanned["images"], scanned["annotations"]
    return Scan(small["categories"], n_images, unordered or unordered_anns)


def _scan_images(images: Iterable, source: Path) -> tuple[int, str | None]:
    count, previous, unordered = 0, None, None
    for count, image in enumerate(images, start=1):
        problem = _image_entry_problem(image)
        if problem:
            raise StageError(f"{source}: images[{count - 1}]: {problem}")
        if unordered is None and previous is not None and image["id"] <= previous:
            unordered = f"images[{count - 1}] (id {image['id']}) does not follow id {previous}"
        previous = image["id"]
    return count, unordered


def _scan_annotations(annotations: Iterable, source: Path) -> tuple[int, str | None]:
    count, previous, unordered = 0, None, None
    for count, ann in enumerate(annotations, start=1):
        _check_annotation(ann, count - 1, source)
        if unordered is not None:
            continue
        image_id = ann["image_id"]
        if not isinstance(image_id, int):
            unordered = f"annotations[{count - 1}]: image_id {image_id!r} is not an integer"
        elif previous is not None and image_id < previous:
            unordered = (f"annotations[{count - 1}] (image_id {image_id}) comes after "
                         f"image_id {previous}")
        previous = image_id
    return count, unordered


def streamed_tasks(path: Path) -> Iterator[tuple[dict, list[dict]]]:
    """Tasks of a file scan_instances found in merge order: two readers of the file, one
    over its images and one over its annotations, joined as they go."""
    try:
        with open(path, "rb") as images, open(path, "rb") as annotations:
            pairs = merge_join(ArrayUntilEnd(images, "images"), array_items(annotations,
                                                                             "annotations"))
            for image, anns in pairs:
                yield _task(image, anns)
    except (OSError, StreamError) as exc:   # changed since the scan
        raise StageError(f"{path}: cannot read COCO annotations: {exc}") from None


def merge_join(images: Iterable[dict],
               annotations: Iterable[dict]) -> Iterator[tuple[dict, list[dict]]]:
    """Each image with its annotations, for images ascending by id and annotations by
    image_id; an image's annotations keep their file order, and annotations of no listed
    image are skipped: exactly what grouping in memory gives."""
    annotations = iter(annotations)
    pending = next(annotations, None)
    for image in images:
        while pending is not None and pending["image_id"] < image["id"]:
            pending = next(annotations, None)
        own = []
        while pending is not None and pending["image_id"] == image["id"]:
            own.append(pending)
            pending = next(annotations, None)
        yield image, own


def image_tasks(data: dict, source: Path) -> list[tuple[dict, list[dict]]]:
    """(image, its annotations) by image id, grouped in memory."""
    anns_of: dict[object, list[dict]] = {}
    for index, ann in enumerate(data["annotations"]):
        _check_annotation(ann, index, source)
        anns_of.setdefault(ann["image_id"], []).append(ann)
    tasks = []
    for index, image in enumerate(data["images"]):
        problem = _image_entry_problem(image)
        if problem:
            raise StageError(f"{source}: images[{index}]: {problem}")
        tasks.append(_task(image, anns_of.get(image["id"], [])))
    return sorted(tasks, key=lambda task: task[0]["id"])


def _task(image: dict, anns: list[dict]) -> tuple[dict, list[dict]]:
    """Only the keys the workers read."""
    return ({k: image[k] for k in IMAGE_KEYS},
            [{k: ann[k] for k in ANNOTATION_KEYS if k in ann} for ann in anns])


def _released(tasks: list) -> Iterator:
    """The tasks in order, each dropped once handed out, so the parent's share of the
    annotations shrinks as the run goes."""
    tasks.reverse()
    while tasks:
        yield tasks.pop()


def _check_annotation(ann: object, index: int, source: Path) -> None:
    if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
        raise StageError(f"{source}: annotations[{index}] lacks image_id or category_id")


def _image_entry_problem(image: object) -> str | None:
    if not isinstance(image, dict):
        return "not an object"
    missing = [k for k in IMAGE_KEYS if k not in image]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(image["id"], int) or not isinstance(image["file_name"], str):
        return f"id {image['id']!r} / file_name {image['file_name']!r} must be int / string"
    problem = plain_name_problem(image["file_name"])
    if problem:   # its mask is named after it: refused rather than renamed and lost
        return f"file_name {image['file_name']!r} of image {image['id']} {problem}"
    for key in ("width", "height"):
        if not isinstance(image[key], int) or image[key] < 1:
            return f"{key} {image[key]!r} is not a positive integer"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("masks", __doc__)
    parser.add_argument("--scheme", required=True, help="scheme name in params.yaml")
    parser.add_argument("--raw", required=True, type=Path, help="folder written by download")
    parser.add_argument("--out", required=True, type=Path, help="mask folder to create")
    args = parser.parse_args(argv)
    return run_main("masks", lambda: run(load_params(args.params), args.scheme, args.raw,
                                         args.out), outputs=(args.out,))


if __name__ == "__main__":
    raise SystemExit(main())
