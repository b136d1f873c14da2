"""download: COCO annotations and a reproducible choice of images, from the COCO server or
any folder/URL laid out like it, into one raw-data folder with a manifest.

Layout read (as on http://images.cocodataset.org, years 2014 and 2017):
  {base}/annotations/annotations_trainval{year}.zip  ->  annotations/instances_{split}{year}.json
  {base}/{split}{year}/{file_name}                   ->  one image (mode: subset)
  {base}/zips/{split}{year}.zip                      ->  every image of a split (mode: archives)
Layout written under --out:
  annotations/instances_{split}.json   exactly the selected images and their annotations
                                       (images by id, annotations by image id then id)
  images/{split}/{file_name}
  manifest.json                        source, selection, bytes and sha256 of every file
Work in progress lives in --checkpoints (default: a hidden folder beside --out): complete
files under their names, partial ones as *.part. A killed or failed run resumes from there,
and the folder becomes --out in one rename when everything is verified.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import urllib.parse
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator

from PIL import Image
from tqdm import tqdm

from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.coco import (SPLITS, AnnotationError, BoundedReader, DuplicateImages, ImageKeys,
                             LimitError, StreamError, array_items, check_instances,
                             resolve_scheme, short_repr, stream_instances)
from stages.lib.fetch import CorruptFile, FetchError, Fetcher, file_digest, verify_checksum
from stages.lib.io import atomic_path, publish_dir, write_json
from stages.lib.names import plain_name_problem
from stages.lib.params import load_params

log = logging.getLogger("download")
IMAGE_KEYS = frozenset({"id", "file_name"})
ANNOTATION_KEYS = frozenset({"id", "image_id", "category_id"})
SMALL_KEYS = ("info", "licenses", "categories")   # what the subsets keep besides their lists


# ---------------------------------------------------------------- pure core

def select_images(images: list[dict], max_images: int | None, seed: int,
                  positive_ids: set[int] | None = None,
                  background_share: float = 0.0) -> list[dict]:
    """A seeded, order-independent choice of up to max_images images, sorted by id.

    With positive_ids (images showing a category some scheme claims), the choice is drawn
    from those, plus `background_share` of it from the other images."""
    ordered = sorted(images, key=lambda im: im["id"])
    rng = random.Random(seed)
    if positive_ids is None:
        chosen = ordered if max_images is None or max_images >= len(ordered) else \
            rng.sample(ordered, max_images)
        return sorted(chosen, key=lambda im: im["id"])
    positives = [im for im in ordered if im["id"] in positive_ids]
    negatives = [im for im in ordered if im["id"] not in positive_ids]
    n_pos, n_neg = _split_counts(len(positives), len(negatives), max_images, background_share)
    chosen = rng.sample(positives, n_pos) + rng.sample(negatives, n_neg)
    return sorted(chosen, key=lambda im: im["id"])


def _split_counts(available_pos: int, available_neg: int, total: int | None,
                  share: float) -> tuple[int, int]:
    if total is None:
        if share >= 1:
            return 0, available_neg
        return available_pos, min(available_neg, round(available_pos * share / (1 - share)))
    n_neg = min(available_neg, round(total * share))
    return min(available_pos, total - round(total * share)), n_neg


def categories_by_image(annotations: Iterable[object], source: str) -> dict[object, set]:
    """The category ids each image shows, checking every annotation has what the subset
    needs (image_id, category_id, id for merge order)."""
    shown: dict[object, set] = {}
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not ANNOTATION_KEYS <= ann.keys():
            raise StageError(f"{source}: annotations[{index}] is not an object with "
                             f"{', '.join(sorted(ANNOTATION_KEYS))}")
        _check_integers(ann, ANNOTATION_KEYS, f"{source}: annotations[{index}]")
        shown.setdefault(ann["image_id"], set()).add(ann["category_id"])
    return shown


def check_images(images: list[object], source: str) -> None:
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not IMAGE_KEYS <= image.keys():
            raise StageError(f"{source}: images[{index}] is not an object with "
                             f"{', '.join(sorted(IMAGE_KEYS))}")
        _check_integers(image, ("id",), f"{source}: images[{index}]")
        if not isinstance(image["file_name"], str):
            raise StageError(f"{source}: images[{index}]: file_name "
                             f"{short_repr(image['file_name'])} is not a string")


def _check_integers(entry: dict, keys: Iterable[str], where: str) -> None:
    """Ids are compared, sorted and matched across files: other types (a string id beside
    integer ones, a list) would make that fail or mismatch."""
    for key in sorted(keys):
        if not isinstance(entry[key], int) or isinstance(entry[key], bool):
            raise StageError(f"{where}: {key} {short_repr(entry[key])} is not an integer")


def images_showing(shown: dict[object, set], category_ids: set[int]) -> set:
    return {image_id for image_id, cats in shown.items() if cats & category_ids}


def subset_json(small: dict, images: list[dict], annotations: Iterable[dict]) -> Iterator[str]:
    """The text of the annotation file restricted to `images` (the small keys kept), in
    merge order: the small keys (categories among them) first, then images by id, then
    annotations by image id and id, so masks can join them in one streamed pass. The
    chosen annotations wait for the sort as JSON text, about a fifth of their size as
    Python objects (a few hundred MB of text at COCO 2014 train's size)."""
    ids = {im["id"] for im in images}
    chosen = sorted(((a["image_id"], a["id"], json.dumps(a)) for a in annotations
                     if a["image_id"] in ids), key=lambda t: (t[0], t[1]))
    head = json.dumps({**small, "images": sorted(images, key=lambda im: im["id"])})
    yield head[:-1] + ', "annotations": ['
    for index, (_, _, text) in enumerate(chosen):
        yield ", " + text if index else text
    yield "]}"


def subset_instances(data: dict, images: list[dict]) -> dict:
    """subset_json of an annotation file held in memory, as a dict (tests, benchmarks)."""
    small = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    return json.loads("".join(subset_json(small, images, data["annotations"])))


def image_relpath(split: str, year: int, file_name: str) -> str:
    """Where the official layout keeps an image (2014 names: COCO_val2014_000000xxxxxx.jpg)."""
    problem = plain_name_problem(file_name)   # the one rule every stage names files by
    if problem:
        raise StageError(f"image file_name {file_name!r} is not a plain file name: {problem}")
    return f"{split}{year}/{file_name}"


def image_source_path(image: dict, split: str, year: int) -> str:
    """The path of the image's coco_url under the base (so a mirror of the server works as
    the server does), or the official layout when coco_url is absent or unusable."""
    default = image_relpath(split, year, image["file_name"])
    path = urllib.parse.urlsplit(image.get("coco_url") or "").path.lstrip("/")
    parts = PurePosixPath(path).parts
    if len(parts) == 2 and parts[1] == image["file_name"] and parts[0] not in (".", ".."):
        return path
    return default


def annotations_relpath(year: int) -> str:
    return f"annotations/annotations_trainval{year}.zip"


def archive_relpath(split: str, year: int) -> str:
    return f"zips/{split}{year}.zip"


def unsafe_entries(infos: list[zipfile.ZipInfo]) -> list[str]:
    """Zip entries that would land outside the target folder: absolute paths, drive letters,
    '..' components, or symbolic links (which could point anywhere)."""
    bad = []
    for info in infos:
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
        if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]) or is_link:
            bad.append(info.filename)
    return bad


def scheme_category_ids(params: dict, categories: list[dict]) -> set[int]:
    """COCO category ids that some scheme claims."""
    ids: set[int] = set()
    for name, scheme in params["schemes"].items():
        try:
            ids |= set(resolve_scheme(name, scheme, categories).class_of_category)
        except AnnotationError as exc:
            raise StageError(str(exc)) from None
    return ids


# ---------------------------------------------------------------- run

# The params this stage reads, listed by dvc.yaml's and the rule's `params:` alike. Not yet
# enforced by select(): with data.filter.scheme_categories_only on, _select() also reads
# every scheme's classes, which neither engine can declare without rerunning download on
# any scheme change (the issue-14 note says what is left).
PARAMS = ("data",)


def run(params: dict, out: Path, checkpoints: Path | None = None) -> dict:
    data = params["data"]
    staging = checkpoints or out.parent / f".{out.name}.partial"
    _prepare_staging(staging, data)
    with _Progress() as progress:
        fetcher = Fetcher(data["base_url"], timeout_s=data["timeout_s"], retries=data["retries"],
                          backoff_s=data["backoff_s"], checksums=data["checksums"],
                          on_bytes=progress.add_bytes, limits=data["limits"],
                          allow_redirect_hosts=data["allow_redirect_hosts"])
        instances = _load_annotations(fetcher, data, staging)
        selected, counts = _select(params, instances)
        job = _Job(fetcher, data, staging, progress)
        if data["mode"] == "archives":
            failures = job.from_archives(selected, {s: instances[s].images for s in SPLITS})
        else:
            failures = job.one_by_one(selected)
    _log_summary(fetcher, failures)
    if failures:
        # one warning per file for the log, one line for the user
        for failure in sorted(failures):
            log.warning("could not fetch %s", failure)
        raise StageError(
            f"could not fetch {len(failures)} file(s) (each logged above; first: "
            f"{sorted(failures)[0]}); the complete ones stay in {staging} and a rerun "
            "resumes from there")
    manifest = _write_outputs(staging, data, instances, selected, counts)
    publish_dir(staging, out)
    return manifest


def _prepare_staging(staging: Path, data: dict) -> None:
    """Reuse what an interrupted run left only if it came from the same source and year."""
    marker = staging / "source.json"
    source = {"base_url": data["base_url"], "year": data["year"]}
    if staging.exists():
        try:
            previous = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous == source:
            log.info("resuming from %s", staging)
            return
        log.warning("%s holds files from another source or year: starting afresh", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_json(marker, source)


@dataclass
class SplitIndex:
    """What selection needs of one split's annotation file: its small top-level values,
    every image, the category ids each image shows, and how to read its annotations again
    (to write the subset) without holding them."""

    small: dict
    images: list[dict]
    shown: dict[object, set]
    annotations: Callable[[], Iterator[dict]]


def _load_annotations(fetcher: Fetcher, data: dict, staging: Path) -> dict[str, SplitIndex]:
    year = data["year"]
    relpath = annotations_relpath(year)
    archive = fetcher.local_path(relpath)
    if archive is None:
        archive = staging / Path(relpath).name
        _fetch_or_fail(fetcher, relpath, archive, _check_zip, cap="annotations_bytes")
    else:
        _verify_local(fetcher, relpath, archive)
    names = {split: f"annotations/instances_{split}{year}.json" for split in SPLITS}
    indexes = {split: index_annotations(archive, names[split], fetcher.url(relpath),
                                        data["limits"]) for split in SPLITS}
    refuse_duplicates({names[split]: indexes[split].images for split in SPLITS},
                      fetcher.url(relpath))
    return indexes


def refuse_duplicates(images: dict[str, list[dict]], source: str) -> None:
    """Each file's own duplicates were refused as it was read; here the same id or file
    across the splits' files (`images` by file name): the same image in train and val, or
    two images that masks would write to one file name."""
    keys = ImageKeys()
    for name, listed in images.items():
        for index, image in enumerate(listed):
            keys.add(f"{name} images[{index}]", image)
    try:
        keys.check(source)
    except DuplicateImages as exc:
        raise StageError(str(exc)) from None


@dataclass(frozen=True)
class UnpackBound:
    """How far one zip member may unpack: a byte cap from data.limits (`key` names it), and
    limits.compression_ratio times its packed size (a few KB of zeros unpack to GBs)."""

    key: str
    max_bytes: int
    ratio: float

    @classmethod
    def of(cls, limits: dict, key: str) -> "UnpackBound":
        return cls(key, limits[key], limits["compression_ratio"])

    def problem(self, info: zipfile.ZipInfo) -> str | None:
        """What the member's header says that is past the bound, or None."""
        if info.file_size > self.max_bytes:
            return (f"{info.filename}: {info.file_size} bytes unpacked, over "
                    f"limits.{self.key} ({self.max_bytes})")
        if info.file_size > self.ratio * info.compress_size:
            return (f"{info.filename}: {info.file_size} bytes unpacked from "
                    f"{info.compress_size}, over limits.compression_ratio ({self.ratio:g}x)")
        return None

    def cap(self, info: zipfile.ZipInfo) -> int:
        """The bytes to read at most, whatever the header says."""
        return min(self.max_bytes, int(self.ratio * info.compress_size))

    def describe(self, info: zipfile.ZipInfo) -> str:
        return (f"limits.{self.key} {self.max_bytes}, or limits.compression_ratio "
                f"{self.ratio:g} x {info.compress_size} packed bytes")


class _Member:
    """One JSON file inside the annotation archive, opened afresh for each streamed pass,
    and read within data.limits: its size from the zip's header before a byte is read,
    then while reading (BoundedReader: its size, and every string and number)."""

    def __init__(self, archive: Path, name: str, origin: str, limits: dict):
        self.archive, self.name, self.origin = archive, name, origin
        self.source = f"{origin}:{name}"
        self.bound = UnpackBound.of(limits, "annotations_bytes")
        self.scalar_bytes = limits["json_string_bytes"]

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        with self._unzipped() as (handle, info):
            yield BoundedReader(handle, self.source, self.scalar_bytes, self.bound.cap(info),
                                self._reopen, "limits.json_string_bytes",
                                self.bound.describe(info))

    @contextmanager
    def _reopen(self) -> Iterator[BinaryIO]:
        with self._unzipped() as (handle, _):
            yield handle

    @contextmanager
    def _unzipped(self) -> Iterator[tuple[BinaryIO, zipfile.ZipInfo]]:
        try:
            with zipfile.ZipFile(self.archive) as zf:
                try:
                    info = zf.getinfo(self.name)
                except KeyError:
                    raise StageError(f"{self.origin}: no member {self.name}") from None
                problem = self.bound.problem(info)
                if problem:
                    raise StageError(f"{self.origin}: refusing {problem}")
                with zf.open(info) as handle:
                    yield handle, info
        except zipfile.BadZipFile as exc:
            raise StageError(f"{self.origin}: not a zip file: {exc}") from None

    def annotations(self) -> Iterator[dict]:
        with self.open() as handle:
            try:
                yield from array_items(handle, "annotations")
            except StreamError as exc:   # it was read once already: changed since?
                raise StageError(f"{self.source}: cannot read the annotations: {exc}") from None


def index_annotations(archive: Path, name: str, origin: str, limits: dict) -> SplitIndex:
    """Index the COCO instances JSON `name` inside the zip `archive` (named `origin` in
    messages), read within data.limits (`limits`): what the stage selects and writes from.
    Streamed passes over the file (a few hundred MB at full COCO, many times that as Python
    objects: BENCHMARKS.md, bench_annotations), the annotations never held; JSON only the json
    module reads (NaN, integers beyond 64 bits) is read whole instead, with a log line.
    Refusals are one StageError naming the member."""
    member = _Member(archive, name, origin, limits)
    try:
        return _streamed_index(member)
    except StreamError as exc:
        log.info("%s: not JSON the streaming parser accepts (%s); reading it whole",
                 member.source, exc)
    except (LimitError, DuplicateImages) as exc:
        raise StageError(str(exc)) from None
    except AnnotationError as exc:
        raise StageError(f"not COCO instances JSON: {exc}") from None
    data = _read_whole(member)
    check_images(data["images"], member.source)
    small = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    return SplitIndex(small, data["images"], categories_by_image(data["annotations"],
                                                                 member.source),
                      lambda: iter(data["annotations"]))


def _read_whole(member: _Member) -> dict:
    with member.open() as handle:
        try:
            return check_instances(json.load(handle), member.source)
        except (LimitError, DuplicateImages) as exc:
            raise StageError(str(exc)) from None
        except AnnotationError as exc:
            raise StageError(f"not COCO instances JSON: {exc}") from None
        except ValueError as exc:   # also integers of over 4300 digits, which int() refuses
            raise StageError(f"{member.source}: not valid JSON: {exc}") from None
        except RecursionError:
            raise StageError(f"{member.source}: arrays or objects nested deeper than "
                             "Python's json module reads") from None


def _streamed_index(member: _Member) -> SplitIndex:
    found = {}
    small = stream_instances(
        member.open, member.source, lambda images: found.update(images=list(images)),
        lambda annotations: found.update(shown=categories_by_image(annotations, member.source)),
        SMALL_KEYS)
    check_images(found["images"], member.source)
    return SplitIndex(small, found["images"], found["shown"], member.annotations)


def _verify_local(fetcher: Fetcher, relpath: str, path: Path) -> None:
    """An archive read in place from a local mirror: it must exist and match its checksum."""
    if not path.is_file():
        raise StageError(f"{path}: no such file (expected {relpath} under {fetcher.base})")
    expected = fetcher.checksums.get(relpath)
    if expected:
        try:
            verify_checksum(path, expected)
        except CorruptFile as exc:
            raise StageError(f"{path}: {exc}") from None


def _fetch_or_fail(fetcher: Fetcher, relpath: str, dest: Path, check=None, cap=None) -> None:
    try:
        fetcher.fetch(relpath, dest, check, cap)
    except FetchError as exc:
        raise StageError(f"cannot fetch {exc}") from None


def _select(params: dict, instances: dict[str, SplitIndex]) -> tuple[dict, dict]:
    data = params["data"]
    selected, counts = {}, {}
    for split in SPLITS:
        images = instances[split].images
        positives = None
        if data["filter"]["scheme_categories_only"]:
            wanted = scheme_category_ids(params, instances[split].small["categories"])
            positives = images_showing(instances[split].shown, wanted)
        selected[split] = select_images(images, data["max_images"][split], data["seed"],
                                        positives, data["filter"]["background_share"])
        counts[split] = {"available": len(images),
                         "with_scheme_categories": None if positives is None else len(positives)}
        log.info("%s: %d of %d images selected", split, len(selected[split]), len(images))
    return selected, counts


class _Job:
    """Fetches the selected images into the staging folder, collecting failures."""

    def __init__(self, fetcher: Fetcher, data: dict, staging: Path, progress: "_Progress"):
        self.fetcher, self.data, self.staging, self.progress = fetcher, data, staging, progress
        self.year = data["year"]

    def dest(self, split: str, image: dict) -> Path:
        image_relpath(split, self.year, image["file_name"])  # refuses names with folders
        return self.staging / "images" / split / image["file_name"]

    def one_by_one(self, selected: dict[str, list[dict]]) -> list[str]:
        tasks = [(split, image) for split in SPLITS for image in selected[split]]
        self.progress.expect_files(len(tasks))
        return self._in_pool(lambda task: self._fetch_image(*task), tasks)

    def _fetch_image(self, split: str, image: dict) -> None:
        self.fetcher.fetch(image_source_path(image, split, self.year), self.dest(split, image),
                           check_jpeg, cap="image_bytes")

    def from_archives(self, selected: dict[str, list[dict]],
                      listed: dict[str, list[dict]]) -> list[str]:
        """The selected images out of each split's archive, which may hold only the images
        `listed` in that split's annotations."""
        self.progress.expect_files(sum(map(len, selected.values())))
        failures = []
        for split in SPLITS:
            missing = [im for im in selected[split] if not self.dest(split, im).exists()]
            self.fetcher.counters.add(skipped=len(selected[split]) - len(missing))
            self.progress.files_done(len(selected[split]) - len(missing))
            if missing:
                failures += self._extract_split(split, missing, listed[split])
        return failures

    def _extract_split(self, split: str, images: list[dict], listed: list[dict]) -> list[str]:
        relpath = archive_relpath(split, self.year)
        archive = self.fetcher.local_path(relpath)
        if archive is None:
            archive = self.staging / relpath
            try:
                self.fetcher.fetch(relpath, archive, _check_zip, cap="archive_bytes")
            except FetchError as exc:
                return [str(exc)]
        else:
            _verify_local(self.fetcher, relpath, archive)
        reader = _ArchiveReader(archive, self.fetcher.url(relpath), f"{split}{self.year}",
                                {im["file_name"] for im in listed},
                                UnpackBound.of(self.data["limits"], "image_bytes"))
        failures = self._in_pool(lambda image: self._extract_image(reader, split, image), images)
        if not failures and self.fetcher.remote:
            archive.unlink()   # every image is out: 18 GB back to the user
        return failures

    def _extract_image(self, reader: "_ArchiveReader", split: str, image: dict) -> None:
        dest = self.dest(split, image)
        member = image_relpath(split, self.year, image["file_name"])
        try:
            reader.extract(member, dest)
            self.fetcher.counters.add(extracted=1)
        except (CorruptFile, KeyError, zipfile.BadZipFile) as exc:
            # A member that is missing or damaged in the archive: the server also has
            # each image on its own, so fetch that one.
            log.warning("%s in %s: %s; fetching it on its own", member, reader.origin, exc)
            self.fetcher.counters.add(retried=1)
            self._fetch_image(split, image)

    def _in_pool(self, work, tasks: list) -> list[str]:
        failures = []
        with ThreadPoolExecutor(max_workers=self.data["workers"]) as pool:
            futures = [pool.submit(work, task) for task in tasks]
            for future in as_completed(futures):
                try:
                    future.result()
                except FetchError as exc:
                    failures.append(str(exc))
                except BaseException:
                    pool.shutdown(cancel_futures=True)   # refused input: no more work
                    raise
                self.progress.files_done(1)
        return failures


class _ArchiveReader:
    """Extracts members of one split's zip from many threads (one handle per thread),
    after refusing the whole archive, before a byte is written, if any entry would land
    outside the target folder, is not one of the split's images (`folder`/name, or the
    folder itself), or says it unpacks past `bound`; each member is then read within the
    bound whatever its header said."""

    def __init__(self, path: Path, origin: str, folder: str, names: set[str],
                 bound: UnpackBound):
        self.path, self.origin, self.bound = path, origin, bound
        self._local = threading.local()
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except zipfile.BadZipFile as exc:
            raise StageError(f"{origin}: not a zip file: {exc}") from None
        bad = unsafe_entries(infos)
        if bad:
            raise StageError(f"{origin}: refusing an archive whose entries would land outside "
                             f"the target folder: {', '.join(bad[:5])}")
        foreign = foreign_entries(infos, folder, names)
        if foreign:
            raise StageError(f"{origin}: refusing an archive with entries that are not "
                             f"images of {folder} in its annotations ({len(foreign)}): "
                             f"{', '.join(map(repr, foreign[:5]))}")
        oversized = [problem for problem in map(bound.problem, infos) if problem]
        if oversized:
            raise StageError(f"{origin}: refusing an archive whose members unpack too far: "
                             f"{'; '.join(oversized[:5])}")

    def extract(self, member: str, dest: Path) -> None:
        zf = getattr(self._local, "zf", None)
        if zf is None:
            zf = self._local.zf = zipfile.ZipFile(self.path)
        info = zf.getinfo(member)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            with zf.open(info) as source, open(tmp, "wb") as out:
                if not copy_capped(source, out, self.bound.cap(info)):
                    raise StageError(f"{self.origin}: refusing {member}: it unpacks past "
                                     f"{self.bound.describe(info)}")
            check_jpeg(tmp)       # zipfile checked the CRC at the end


def foreign_entries(infos: list[zipfile.ZipInfo], folder: str, names: set[str]) -> list[str]:
    """Entries that are neither `folder`/ itself nor `folder`/ one of `names`."""
    allowed = {f"{folder}/", *(f"{folder}/{name}" for name in names)}
    return [info.filename for info in infos if info.filename not in allowed]


COPY_BYTES = 1 << 20


def copy_capped(source: BinaryIO, out: BinaryIO, cap: int) -> bool:
    """Copies source to out if it holds at most `cap` bytes (True); else False, with at
    most `cap` bytes written."""
    copied = 0
    while chunk := source.read(min(COPY_BYTES, cap - copied + 1)):
        copied += len(chunk)
        if copied > cap:
            return False
        out.write(chunk)
    return True


def check_jpeg(path: Path) -> None:
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises many types for a broken file
        raise CorruptFile(f"not a decodable image: {exc}") from None


def _check_zip(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise CorruptFile("not a zip file")


def _write_outputs(staging: Path, data: dict, instances: dict[str, SplitIndex], selected: dict,
                   counts: dict) -> dict:
    """Annotation subsets and the manifest into staging, then everything else out of it."""
    manifest = {"base_url": data["base_url"], "year": data["year"], "mode": data["mode"],
                "seed": data["seed"], "filter": data["filter"], "splits": {}}
    with ThreadPoolExecutor(max_workers=data["workers"]) as pool:
        for split in SPLITS:
            ann_path = staging / "annotations" / f"instances_{split}.json"
            index = instances[split]
            with atomic_path(ann_path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
                handle.writelines(subset_json(index.small, selected[split], index.annotations()))
            paths = [staging / "images" / split / im["file_name"] for im in selected[split]]
            records = list(pool.map(lambda p: _file_record(p, staging), paths))
            manifest["splits"][split] = {
                **counts[split], "annotations": _file_record(ann_path, staging),
                "images": [{"id": im["id"], **rec} for im, rec in zip(selected[split], records)]}
    write_json(staging / "manifest.json", manifest)
    _remove_unlisted(staging, selected)
    return json.loads((staging / "manifest.json").read_text())


def _remove_unlisted(staging: Path, selected: dict[str, list[dict]]) -> None:
    """Archives, partial files and images of an earlier selection are not output."""
    keep = {Path("manifest.json"), Path("annotations"), Path("images"),
            *(Path("annotations") / f"instances_{s}.json" for s in SPLITS),
            *(Path("images") / s for s in SPLITS),
            *(Path("images") / s / im["file_name"] for s in SPLITS for im in selected[s])}
    for path in sorted(staging.rglob("*"), reverse=True):
        if path.relative_to(staging) not in keep:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for split in SPLITS:
        (staging / "images" / split).mkdir(parents=True, exist_ok=True)


def _file_record(path: Path, root: Path) -> dict:
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size,
            "sha256": file_digest(path)}


def _log_summary(fetcher: Fetcher, failures: list[str]) -> None:
    c = fetcher.counters
    log.info("fetched %d, extracted %d, skipped %d (already complete), %d retries, %d failed; "
             "%.1f MB received", c.fetched, c.extracted, c.skipped, c.retried, len(failures),
             c.received_bytes / 1e6)


class _Progress:
    """Two progress bars: files and bytes (silent when not on a terminal)."""

    def __enter__(self) -> "_Progress":
        self.files = tqdm(desc="files", unit="file", position=0, disable=None)
        self.bytes = tqdm(desc="bytes", unit="B", unit_scale=True, unit_divisor=1024,
                          position=1, disable=None)
        return self

    def __exit__(self, *exc) -> None:
        self.files.close()
        self.bytes.close()

    def expect_files(self, n: int) -> None:
        self.files.reset(total=n)

    def files_done(self, n: int) -> None:
        self.files.update(n)

    def add_bytes(self, n: int) -> None:
        self.bytes.update(n)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("download", __doc__)
    parser.add_argument("--out", required=True, type=Path, help="raw data folder to create")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="folder for work in progress (resumed by a rerun)")
    args = parser.parse_args(argv)
    return run_main("download", lambda: run(load_params(args.params), args.out, args.checkpoints),
                    outputs=(args.out, args.checkpoints))


if __name__ == "__main__":
    raise SystemExit(main())
