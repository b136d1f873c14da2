"""download: loopback throughput of the download stage against curl fetching the same files
from the same server, in both modes (one file per image; whole archives).

The server (tests/fault_server.py without faults) and every client run in their own
processes, so no client shares the server's interpreter. The mirror is the embedded sample
laid out like images.cocodataset.org, its images repeated `factor` times under new ids so
the transfer is long enough to measure. curl gets the same concurrency as the stage
(`--parallel-max` = data.workers) and, like the stage, writes every file to disk; the
stage also verifies (JPEG decode, checksums), hashes and writes the manifest, which is
what the ratio prices.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from coco_mirror import build_mirror, instances_for  # noqa: E402

YEAR = 2017
ID_STRIDE = 1_000_000


def replicate_mirror(root: Path, factor: int) -> int:
    """Add factor-1 copies of every image (hard links, new ids) to the mirror's annotation
    zip, per-image folders and archives. Returns the number of images per mirror."""
    instances = instances_for(YEAR)
    for split, data in instances.items():
        originals = list(data["images"])
        folder = root / f"{split}{YEAR}"
        for k in range(1, factor):
            for image in originals:
                copy = {**image, "id": image["id"] + k * ID_STRIDE}
                copy["file_name"] = f"{copy['id']:012d}.jpg"
                copy["coco_url"] = f"http://images.cocodataset.org/{split}{YEAR}/{copy['file_name']}"
                (folder / copy["file_name"]).hardlink_to(folder / image["file_name"])
                data["images"].append(copy)
        with zipfile.ZipFile(root / "zips" / f"{split}{YEAR}.zip", "w", zipfile.ZIP_STORED) as zf:
            for image in data["images"]:
                zf.write(folder / image["file_name"], f"{split}{YEAR}/{image['file_name']}")
    with zipfile.ZipFile(root / "annotations" / f"annotations_trainval{YEAR}.zip", "w",
                         zipfile.ZIP_DEFLATED) as zf:
        for split, data in instances.items():
            zf.writestr(f"annotations/instances_{split}{YEAR}.json", json.dumps(data))
    return sum(len(d["images"]) for d in instances.values())


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_server.py"), str(root)],
                              stdout=subprocess.PIPE, text=True)
    return server, server.stdout.readline().strip()


def curl(base: str, relpaths: list[str], dest: Path, parallel: int) -> float:
    config = dest / "curl.cfg"
    dest.mkdir(parents=True)
    lines = []
    for i, rel in enumerate(relpaths):
        lines += [f'url = "{base}/{rel}"', f'output = "{dest / f"{i}.bin"}"']
    config.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    subprocess.run(["curl", "--silent", "--show-error", "--no-progress-meter", "--fail",
                    "--parallel", "--parallel-max", str(parallel), "--noproxy", "*",
                    "-K", str(config)],
                   check=True)
    return time.perf_counter() - started


def stage(params: dict, base: str, mode: str, work: Path) -> float:
    params = json.loads(json.dumps(params))
    params["data"].update(base_url=base, year=YEAR, mode=mode,
                          max_images={"train": None, "val": None})
    params_file = work / f"params_{mode}.yaml"
    params_file.write_text(yaml.safe_dump(params))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.download", "--params", str(params_file),
                    "--out", str(work / f"raw_{mode}"), "--checkpoints", str(work / f"ck_{mode}")],
                   cwd=ROOT, check=True, capture_output=True,
                   env={**_env(), "TQDM_DISABLE": "1"})
    return time.perf_counter() - started


def _env() -> dict:
    import os

    return {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def run(scale: float) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    workers = params["data"]["workers"]
    factor = max(1, round(10 * scale))
    with tempfile.TemporaryDirectory(prefix="bench_download.") as tmp:
        tmp = Path(tmp)
        build_mirror(tmp / "mirror", YEAR)
        n_images = replicate_mirror(tmp / "mirror", factor)
        ann = f"annotations/annotations_trainval{YEAR}.zip"
        images = sorted(p.relative_to(tmp / "mirror").as_posix()
                        for split in ("train", "val")
                        for p in (tmp / "mirror" / f"{split}{YEAR}").iterdir())
        archives = [f"zips/train{YEAR}.zip", f"zips/val{YEAR}.zip"]
        size = lambda rels: sum((tmp / "mirror" / r).stat().st_size for r in rels)  # noqa: E731
        server, base = start_server(tmp / "mirror")
        try:
            rows = []
            for mode, files in (("subset", [ann, *images]), ("archives", [ann, *archives])):
                curl_s = curl(base, files, tmp / f"curl_{mode}", workers)
                stage_s = stage(params, base, mode, tmp)
                megabytes = size(files) / 1e6
                for who, seconds in (("curl", curl_s), ("download stage", stage_s)):
                    rows.append({"mode": mode, "client": who, "files fetched": len(files),
                                 "images": n_images, "MB": round(megabytes, 1),
                                 "seconds": round(seconds, 2), "MB/s": megabytes / seconds,
                                 "images/s": n_images / seconds,
                                 "stage / curl time": round(seconds / curl_s, 2)})
                shutil.rmtree(tmp / f"curl_{mode}")
        finally:
            server.terminate()
            server.wait()
    notes = [
        f"{n_images} images ({factor}x the embedded sample, hard links under new ids), served "
        f"from loopback by a Python ThreadingHTTPServer in its own process; "
        f"{workers} parallel transfers (data.workers) for both clients.",
        "The stage's time includes its Python start-up, reading the annotation JSON, choosing "
        "the images, decoding every JPEG to verify it, sha256 of every file for the "
        "manifest, writing the annotation subsets and the final rename; curl only writes "
        "bytes. Over a real network both are bound by the link; the ratio is the stage's "
        "own cost.",
    ]
    return {"title": "download: stage vs curl on loopback", "table": rows, "notes": notes}
