"""download: COCO annotations and a reproducible subset of images, from the COCO server
or any folder/URL laid out like it, into one raw-data folder with a manifest.

Layout read (as on http://images.cocodataset.org):
  {base}/annotations/annotations_trainval{year}.zip  ->  annotations/instances_{split}{year}.json
  {base}/{split}{year}/{file_name}                   ->  one image
Layout written under --out:
  annotations/instances_{split}.json   exactly the selected images and their annotations
  images/{split}/{file_name}
  manifest.json                        source, selection, bytes and sha256 of every file
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.coco import SPLITS, AnnotationError, check_instances
from stages.lib.io import atomic_dir, atomic_path, write_json
from stages.lib.params import load_params

log = logging.getLogger("download")


# ---------------------------------------------------------------- pure core

def select_images(images: list[dict], max_images: int | None, seed: int) -> list[dict]:
    """A seeded, order-independent choice of up to max_images images, sorted by id."""
    ordered = sorted(images, key=lambda im: im["id"])
    if max_images is None or max_images >= len(ordered):
        return ordered
    chosen = random.Random(seed).sample(ordered, max_images)
    return sorted(chosen, key=lambda im: im["id"])


def subset_instances(data: dict, images: list[dict]) -> dict:
    """The annotation file restricted to `images` (all categories kept)."""
    ids = {im["id"] for im in images}
    subset = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    subset["images"] = images
    subset["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    return subset


def image_relpath(split: str, year: int, file_name: str) -> str:
    name = PurePosixPath(file_name)
    if name.name != file_name or file_name in ("", ".", ".."):
        raise StageError(f"image file_name {file_name!r} is not a plain file name")
    return f"{split}{year}/{file_name}"


def backoff_seconds(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter, so parallel retries do not stampede."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


# ---------------------------------------------------------------- sources

@dataclass
class Source:
    """A COCO-server-like tree: an http(s)/file URL or a local folder."""

    base: str
    timeout_s: float = 60.0
    retries: int = 4

    def is_remote(self) -> bool:
        return urllib.parse.urlsplit(self.base).scheme in ("http", "https")

    def fetch(self, relpath: str, dest: Path) -> int:
        """Copy base/relpath to dest atomically (with retries for http); return bytes."""
        for attempt in range(self.retries + 1):
            try:
                with atomic_path(dest) as tmp:
                    size = self._copy_to(relpath, tmp)
                return size
            except (urllib.error.URLError, OSError, ConnectionError) as exc:
                if not self.is_remote() or _is_permanent(exc) or attempt == self.retries:
                    raise StageError(f"cannot fetch {self.describe(relpath)}: {exc}") from None
                delay = backoff_seconds(attempt)
                log.warning("retry %d for %s in %.1fs: %s", attempt + 1, relpath, delay, exc)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def describe(self, relpath: str) -> str:
        return f"{self.base.rstrip('/')}/{relpath}"

    def _copy_to(self, relpath: str, tmp: Path) -> int:
        if self.is_remote():
            return _http_copy(self.describe(relpath), tmp, self.timeout_s)
        shutil.copyfile(self._local_path(relpath), tmp)
        return tmp.stat().st_size

    def _local_path(self, relpath: str) -> Path:
        parts = urllib.parse.urlsplit(self.base)
        root = Path(urllib.parse.unquote(parts.path)) if parts.scheme == "file" else Path(self.base)
        return root / relpath


def _http_copy(url: str, tmp: Path, timeout_s: float) -> int:
    request = urllib.request.Request(url, headers={"User-Agent": "segflow"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response, open(tmp, "wb") as out:
        expected = response.headers.get("Content-Length")
        shutil.copyfileobj(response, out, length=1 << 20)
        size = out.tell()
    if expected is not None and int(expected) != size:
        raise ConnectionError(f"truncated body: {size} of {expected} bytes")
    return size


def _is_permanent(exc: Exception) -> bool:
    return isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403, 404, 410)


# ---------------------------------------------------------------- run

def run(params: dict, out: Path) -> dict:
    data = params["data"]
    source = Source(data["base_url"], data["timeout_s"], data["retries"])
    year = data["year"]
    with atomic_dir(out) as tmp:
        instances = _fetch_annotations(source, year, tmp)
        manifest = {"base_url": data["base_url"], "year": year, "seed": data["seed"], "splits": {}}
        for split in SPLITS:
            chosen = select_images(instances[split]["images"], data["max_images"][split], data["seed"])
            ann_path = tmp / "annotations" / f"instances_{split}.json"
            ann_path.parent.mkdir(parents=True, exist_ok=True)
            ann_path.write_text(json.dumps(subset_instances(instances[split], chosen)))
            files = _fetch_images(source, split, year, chosen, tmp / "images" / split, data["workers"])
            manifest["splits"][split] = {
                "annotations": _file_record(ann_path, tmp), "images": files}
            log.info("%s: %d of %d images", split, len(chosen), len(instances[split]["images"]))
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _fetch_annotations(source: Source, year: int, tmp: Path) -> dict[str, dict]:
    archive = tmp / f".annotations_trainval{year}.zip"
    source.fetch(f"annotations/annotations_trainval{year}.zip", archive)
    instances = {}
    try:
        with zipfile.ZipFile(archive) as zf:
            for split in SPLITS:
                member = f"annotations/instances_{split}{year}.json"
                try:
                    raw = zf.read(member)
                except KeyError:
                    raise StageError(f"{source.describe(archive.name[1:])}: no member {member}") from None
                try:
                    instances[split] = check_instances(json.load(io.BytesIO(raw)), member)
                except (json.JSONDecodeError, AnnotationError) as exc:
                    raise StageError(f"{member}: not COCO instances JSON: {exc}") from None
    except zipfile.BadZipFile as exc:
        raise StageError(f"annotations archive for {year} is not a zip file: {exc}") from None
    finally:
        archive.unlink(missing_ok=True)
    return instances


def _fetch_images(source: Source, split: str, year: int, images: list[dict],
                  folder: Path, workers: int) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)

    def fetch_one(image: dict) -> dict:
        dest = folder / image["file_name"]
        source.fetch(image_relpath(split, year, image["file_name"]), dest)
        _check_jpeg(dest, source.describe(image_relpath(split, year, image["file_name"])))
        return {"id": image["id"], **_file_record(dest, folder.parent.parent)}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        records = list(tqdm(pool.map(fetch_one, images), total=len(images),
                            desc=f"download {split}", unit="img", disable=None))
    return records


def _check_jpeg(path: Path, origin: str) -> None:
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises many types for a broken file
        path.unlink(missing_ok=True)
        raise StageError(f"{origin}: not a decodable image: {exc}") from None


def _file_record(path: Path, root: Path) -> dict:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": digest}


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("download", __doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="raw data folder to create")
    args = parser.parse_args(argv)
    return run_main("download", lambda: run(load_params(args.params), args.out))


if __name__ == "__main__":
    raise SystemExit(main())
