"""annotations: the download stage's streamed reading of an annotation file against reading
it whole with json.load (what the stage did before), side by side on the same file: wall
time, CPU time and peak memory.

The file is the sample's train annotations repeated under new image and annotation ids, at
scale 1 to about as many annotations as COCO 2014's instances_train2014.json (604,907 for
82,783 images): the sample's 80 images and 705 annotations x 850. Both readers do what the
stage must: read the file, then write the subset of every image in merge order (the worst
case: at the default max_images only the chosen images' annotations are kept). Each runs in
a fresh process (`python -m benchmarks.bench_annotations child ...`), so its peak RSS (the
kernel's VmHWM) is its own.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from benchmarks.common import peak_mib, resident_mib, run_child

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ZIP = ROOT / "data" / "sample" / "annotations" / "annotations_trainval2017.zip"
MEMBER = "annotations/instances_train2017.json"
COCO2014_TRAIN_COPIES = 850      # x 705 sample annotations = 599,250 (COCO 2014: 604,907)
ID_STRIDE = 10_000_000
READERS = {"whole": "json.load (read whole)", "streamed": "download stage (streamed)",
           "streamed80": "download stage (streamed), 80 images chosen"}
CHOSEN = 80     # params.yaml's max_images on the sample


def write_replica(path: Path, copies: int) -> dict:
    """An annotation zip whose train member is the sample's train file `copies` times over
    (new ids), written piece by piece so the harness never holds it."""
    with zipfile.ZipFile(SAMPLE_ZIP) as src:
        train = json.loads(src.read(MEMBER))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, \
            zf.open(MEMBER, "w", force_zip64=True) as raw:
        def write(text: str) -> None:
            raw.write(text.encode())

        write(json.dumps({"info": {"description": f"sample train x {copies}"}})[:-1])
        for key, shift in (("images", ("id",)), ("annotations", ("id", "image_id"))):
            write(f', "{key}": [')
            for k in range(copies):
                items = [{**item, **{f: item[f] + k * ID_STRIDE for f in shift}}
                         for item in train[key]]
                if key == "images":
                    for item in items:
                        item["file_name"] = f"{item['id']:012d}.jpg"
                write((", " if k else "") + ", ".join(map(json.dumps, items)))
            write("]")
        write(f', "categories": {json.dumps(train["categories"])}}}')
    with zipfile.ZipFile(path) as zf:
        mb = zf.getinfo(MEMBER).file_size / 1e6
    return {"MB": mb, "images": copies * len(train["images"]),
            "annotations": copies * len(train["annotations"])}


def read_whole(archive: Path, out: Path) -> int:
    """The stage before streaming: json.load, then the subset of every image as a dict."""
    with zipfile.ZipFile(archive) as zf, zf.open(MEMBER) as handle:
        data = json.load(handle)
    subset = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    subset["images"] = sorted(data["images"], key=lambda im: im["id"])
    subset["annotations"] = sorted(data["annotations"], key=lambda a: (a["image_id"], a["id"]))
    out.write_text(json.dumps(subset))
    return len(subset["images"])


def read_streamed(archive: Path, out: Path, chosen: int | None = None) -> int:
    """The stage now: its index of the file, then its writer of the subset (of every image,
    or of `chosen` of them as the stage chooses)."""
    from stages import download
    from stages.lib.params import load_params

    limits = load_params(ROOT / "params.yaml")["data"]["limits"]   # read as the stage reads
    index = download.index_annotations(archive, MEMBER, str(archive), limits)
    images = download.select_images(index.images, chosen, 0)
    with open(out, "w", encoding="utf-8") as handle:
        handle.writelines(download.subset_json(index.small, images, index.annotations()))
    return len(index.images)


def child(argv: list[str]) -> None:
    reader, archive, out = argv
    from stages import download  # noqa: F401 (imports are the baseline, not the reading)

    baseline = resident_mib()
    started, cpu = time.perf_counter(), time.process_time()
    if reader == "whole":
        images = read_whole(Path(archive), Path(out))
    else:
        images = read_streamed(Path(archive), Path(out), CHOSEN if reader == "streamed80" else None)
    print(json.dumps({"images": images, "wall_s": time.perf_counter() - started,
                      "cpu_s": time.process_time() - cpu, "peak_mib": peak_mib(),
                      "baseline_mib": baseline, "out_bytes": Path(out).stat().st_size}))


def run(scale: float) -> dict:
    sizes = (1, max(2, round(COCO2014_TRAIN_COPIES * scale)))
    rows, same = [], []
    with tempfile.TemporaryDirectory(prefix="bench_annotations.") as tmp:
        tmp = Path(tmp)
        for copies in sizes:
            archive = tmp / f"x{copies}.zip"
            made = write_replica(archive, copies)
            measured = {}
            for reader, name in READERS.items():
                out = tmp / f"{reader}{copies}.json"
                measured[reader] = run_child("benchmarks.bench_annotations",
                                             [reader, archive, out])
                rows.append(_row(name, copies, made, measured[reader], measured["whole"]))
            same.append(json.loads((tmp / f"whole{copies}.json").read_text())
                        == json.loads((tmp / f"streamed{copies}.json").read_text()))
            for reader in READERS:
                (tmp / f"{reader}{copies}.json").unlink()
    if not all(same):
        raise RuntimeError("the streamed subset differs from the one read whole")
    return {"title": "annotations: download's streamed reading vs json.load, same file",
            "table": rows, "notes": notes(rows)}


def _row(reader: str, copies: int, made: dict, result: dict, whole: dict) -> dict:
    return {"reader": reader, "train file": f"sample x {copies}",
            "MB of JSON": round(made["MB"], 1),
            "images": made["images"], "annotations": made["annotations"],
            "wall s": round(result["wall_s"], 2), "CPU s": round(result["cpu_s"], 2),
            "peak RSS MiB": round(result["peak_mib"]),
            "of which imports MiB": round(result["baseline_mib"]),
            "peak RSS vs json.load": f"{result['peak_mib'] / whole['peak_mib']:.2f}x",
            "time vs json.load": f"{result['wall_s'] / whole['wall_s']:.2f}x"}


def notes(rows: list[dict]) -> list[str]:
    whole, streamed, chosen = rows[-3:]
    return [
        f"The larger file ({whole['MB of JSON']:.0f} MB, {whole['annotations']:,} "
        "annotations) has about as many annotations as COCO 2014's instances_train2014.json "
        "(604,907) at scale 1. Both "
        "readers write the subset of every image (all annotations kept, in merge order), the "
        "stage's worst case; the two subsets are asserted equal. The third reader writes the "
        f"subset of {CHOSEN} images, as params.yaml's max_images does: {chosen['peak RSS MiB']} "
        f"MiB ({chosen['peak RSS vs json.load']} of json.load's).",
        f"Streamed: {streamed['peak RSS MiB']} vs {whole['peak RSS MiB']} MiB peak RSS "
        f"({streamed['peak RSS vs json.load']}) for {streamed['time vs json.load']} the "
        "time. Its passes: the small keys (categories are last in COCO's files, so one pass "
        "tokenises the whole file), the image entries, the annotations once for the "
        "categories each image shows and once more to write the subset; what it holds is the "
        "image entries, the categories per image and the chosen annotations as JSON text "
        "(all of them here). json.load holds every annotation as Python objects, for the "
        "whole download (hours at full COCO), and the snakemake rule's mem_mb is 2000.",
    ]


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child(sys.argv[2:])
