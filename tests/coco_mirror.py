"""Build a folder laid out like http://images.cocodataset.org from the embedded real sample,
in the 2017 or the 2014 naming (COCO_{split}2014_{id:012d}.jpg), with the annotation zip,
the per-split image zips and the per-image files. Tests and benchmarks serve it."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
OFFICIAL = "http://images.cocodataset.org"


def sample_instances() -> dict[str, dict]:
    with zipfile.ZipFile(SAMPLE / "annotations" / "annotations_trainval2017.zip") as zf:
        return {split: json.loads(zf.read(f"annotations/instances_{split}2017.json"))
                for split in ("train", "val")}


def file_name(image_id: int, split: str, year: int) -> str:
    return f"{image_id:012d}.jpg" if year == 2017 else f"COCO_{split}{year}_{image_id:012d}.jpg"


def instances_for(year: int) -> dict[str, dict]:
    """The sample's annotations as they would read in `year`'s naming."""
    instances = sample_instances()
    for split, data in instances.items():
        for image in data["images"]:
            image["file_name"] = file_name(image["id"], split, year)
            image["coco_url"] = f"{OFFICIAL}/{split}{year}/{image['file_name']}"
    return instances


def build_mirror(dest: Path, year: int = 2017, *, image_zips: bool = True) -> dict:
    """Write the mirror under dest; return {relpath: sha256} of every file in it."""
    instances = instances_for(year)
    ann_zip = dest / "annotations" / f"annotations_trainval{year}.zip"
    ann_zip.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(ann_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        for split, data in instances.items():
            zf.writestr(f"annotations/instances_{split}{year}.json", json.dumps(data))
    for split, data in instances.items():
        folder = dest / f"{split}{year}"
        folder.mkdir(parents=True, exist_ok=True)
        for image in data["images"]:
            source = SAMPLE / f"{split}2017" / f"{image['id']:012d}.jpg"
            (folder / image["file_name"]).write_bytes(source.read_bytes())
        if image_zips:
            archive = dest / "zips" / f"{split}{year}.zip"
            archive.parent.mkdir(exist_ok=True)
            # JPEGs are stored, as in the official archives
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
                zf.writestr(f"{split}{year}/", b"")
                for image in data["images"]:
                    zf.write(folder / image["file_name"], f"{split}{year}/{image['file_name']}")
    return {p.relative_to(dest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(dest.rglob("*")) if p.is_file()}


# ------------------------------------------------ hostile mirrors (issue 13)

def write_annotation_zip(path: Path, year: int, docs: dict[str, object],
                         compression: int = zipfile.ZIP_DEFLATED) -> None:
    """(Re)write an annotations_trainval{year}.zip with one instances_{split}{year}.json per
    split in `docs`: a dict or list is written as JSON, str or bytes as they are (for text
    no JSON writer would produce)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for split, doc in docs.items():
            text = doc if isinstance(doc, (str, bytes)) else json.dumps(doc)
            zf.writestr(f"annotations/instances_{split}{year}.json", text)


def rewrite_zip(path: Path, members: dict[str, bytes],
                compression: int = zipfile.ZIP_STORED) -> None:
    """`path` rewritten: its entries named in `members` dropped, then `members` (name ->
    bytes, packed with `compression`) added after the others."""
    with zipfile.ZipFile(path) as zf:
        kept = [(info, zf.read(info)) for info in zf.infolist() if info.filename not in members]
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in kept:
            zf.writestr(info, data)
        for name, data in members.items():
            zf.writestr(name, data, compress_type=compression)
