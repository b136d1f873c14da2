"""hostile: what a hostile mirror, server or params file costs before segflow refuses it.

Each row builds one hostile input of issue 13's kinds (an endless or lying HTTP body, a
trickle, a redirect to another host, a zip bomb, a foreign archive member, a long JSON
string, duplicate images, an alias bomb, a damaged model, an unwritable output) and runs the
stage that meets it in a fresh process (`python -m benchmarks.bench_hostile child ...`), so
its peak RSS (the kernel's VmHWM) is its own. Measured per row: the exit code, the number
of error lines on stderr and whether a traceback appeared; the seconds from the stage's
main() to its refusal, and the whole process's (imports included: torch's import is most
of train's and infer's); the peak RSS; the bytes the process wrote to files
(/proc/self/io write_bytes, counted when pages are dirtied, so a file written and then
deleted still counts); and the bytes left on disk under the stage's output and work
folders (download keeps the complete files of a failed run for the rerun to resume).
The hostile servers (tests/hostile_server.py) run in this process, bounded far above the
stage's own bounds (8 GiB and 120 s a response), so what stops a transfer is the stage.

The sizes follow the issue's probes at scale 1 (a 3 GiB zip member, a 64 MiB JSON string);
a smoke run (scale < 1) shrinks them.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

from benchmarks.common import default_params, peak_mib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from coco_mirror import build_mirror, instances_for, rewrite_zip, write_annotation_zip  # noqa: E402
from hostile_server import HostileServer  # noqa: E402

YEAR = 2017
ANNOTATIONS = f"annotations/annotations_trainval{YEAR}.zip"
SERVER_BOUNDS = {"max_bytes": 8 << 30, "max_s": 120.0}


# ---------------------------------------------------------------- the child: one stage run

def io_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def child(stage: str, argv: list[str]) -> None:
    """Run `stages.<stage>.main(argv)` here and print what it cost as JSON on stdout."""
    import importlib

    module = importlib.import_module(f"stages.{stage}")
    written, started = io_write_bytes(), time.perf_counter()
    code = module.main(argv)
    seconds = time.perf_counter() - started
    print(json.dumps({"exit": code, "seconds": seconds, "peak_mib": peak_mib(),
                      "write_bytes": io_write_bytes() - written}))


def run_stage(stage: str, argv: list[str], cwd: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_hostile", "child", stage,
                           json.dumps(argv)], cwd=ROOT, capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = done.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"hostile child {stage} {argv} died ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["process_seconds"] = time.perf_counter() - started
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if " ERROR " in line]
    result["error_lines"] = len(errors)
    result["traceback"] = any(line.startswith("Traceback") for line in lines)
    result["message"] = errors[-1] if errors else (lines[-1] if lines else "")
    return result


def disk_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for folder in folders if folder.exists()
               for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------- inputs

def write_params(work: Path, params: dict) -> Path:
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def download_params(base: str, **data) -> dict:
    params = default_params()
    params["data"].update({"base_url": base, "max_images": {"train": 4, "val": 4}, **data})
    return params


def mirror_files(work: Path) -> dict[str, bytes]:
    """The sample laid out like the COCO server, as path -> bytes, for an honest route."""
    mirror = work / "mirror"
    build_mirror(mirror, YEAR, image_zips=False)
    return {"/" + p.relative_to(mirror).as_posix(): p.read_bytes()
            for p in mirror.rglob("*") if p.is_file()}


def first_image_path(split: str = "train") -> str:
    image = min(instances_for(YEAR)[split]["images"], key=lambda im: im["id"])
    return f"/{split}{YEAR}/{image['file_name']}"


def zip_bomb(path: Path, member: str, size: int) -> None:
    """An archive whose one member unpacks to `size` zero bytes (a few MB packed)."""
    block = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf, \
            zf.open(member, "w", force_zip64=True) as out:
        for _ in range(size // len(block)):
            out.write(block)


# ---------------------------------------------------------------- cases

class Case:
    """One hostile input: set up under `work`, run, describe."""
    name = ""
    stage = "download"
    defence = ""

    def __init__(self, scale: float):
        self.scale = scale

    def run(self, work: Path) -> dict:
        raise NotImplementedError

    def download(self, work: Path, params: dict) -> dict:
        out, checkpoints = work / "raw", work / "ck"
        result = run_stage("download", ["--params", str(write_params(work, params)),
                                        "--out", str(out), "--checkpoints", str(checkpoints)],
                           work)
        result["disk_bytes"] = disk_bytes(out, checkpoints)
        return result


class ServedCase(Case):
    """download in subset mode from a hostile server that serves the sample honestly except
    on one route."""
    host = "127.0.0.1"

    def hostile_route(self, server: HostileServer, work: Path) -> None:
        raise NotImplementedError

    def params(self, base: str) -> dict:
        # every image, so the hostile one is among those fetched
        return download_params(base, retries=1, backoff_s=0.1,
                               max_images={"train": None, "val": None})

    def run(self, work: Path) -> dict:
        with HostileServer(host=self.host, **SERVER_BOUNDS) as server:
            for path, body in mirror_files(work).items():
                server.serve(path, body)
            self.hostile_route(server, work)
            return self.download(work, self.params(server.base))


class EndlessImage(ServedCase):
    name = "image: endless body, no Content-Length"
    defence = "data.limits.image_bytes (32 MiB) cuts it off"

    def hostile_route(self, server, work):
        server.endless(first_image_path())


class HugeContentLength(ServedCase):
    name = "image: endless body announcing 1 PB"
    defence = "Content-Length over data.limits.image_bytes: refused before writing"

    def hostile_route(self, server, work):
        server.endless(first_image_path(), content_length=10 ** 15)


class Trickle(ServedCase):
    name = "annotations zip: 1 byte/s trickle"
    defence = "data.limits.min_rate_bytes_s over timeout_s (2 s here), 1 retry"

    def hostile_route(self, server, work):
        body = (work / "mirror" / ANNOTATIONS).read_bytes()
        server.trickle("/" + ANNOTATIONS, body, interval_s=1.0)

    def params(self, base):
        params = super().params(base)
        params["data"]["timeout_s"] = 2
        return params


class RedirectAway(ServedCase):
    name = "annotations zip: redirect to another host"
    defence = "data.allow_redirect_hosts (empty): refused"

    def hostile_route(self, server, work):
        server.endless("/" + ANNOTATIONS, status=302, content_length=0,
                       headers={"Location": "http://127.0.0.2:9/" + ANNOTATIONS})


class ArchiveCase(Case):
    """download in archive mode from a local mirror whose val archive is hostile."""

    def hostile_archive(self, archive: Path) -> None:
        raise NotImplementedError

    def run(self, work):
        mirror = work / "mirror"
        build_mirror(mirror, YEAR)
        self.hostile_archive(mirror / "zips" / f"val{YEAR}.zip")
        return self.download(work, download_params(str(mirror), mode="archives"))


class ZipBomb(ArchiveCase):
    name = "val archive: a member unpacking to 3 GiB of zeros"
    defence = "ZipInfo size and ratio (data.limits) checked before extracting"

    def hostile_archive(self, archive):
        image = min(instances_for(YEAR)["val"]["images"], key=lambda im: im["id"])
        size = (3 << 30) if self.scale >= 1 else (64 << 20)
        archive.unlink()
        zip_bomb(archive, f"val{YEAR}/{image['file_name']}", size)


class ForeignMember(ArchiveCase):
    name = "val archive: a member that is no image of the split"
    defence = "every entry must be the split's folder or one of its images"

    def hostile_archive(self, archive):
        rewrite_zip(archive, {f"val{YEAR}/run_me.sh": b"#!/bin/sh\necho owned\n"})


class AnnotationCase(Case):
    """download in subset mode from a local mirror whose annotations are hostile."""

    def hostile_annotations(self, instances: dict) -> dict:
        raise NotImplementedError

    def run(self, work):
        mirror = work / "mirror"
        build_mirror(mirror, YEAR, image_zips=False)
        docs = self.hostile_annotations(copy.deepcopy(instances_for(YEAR)))
        write_annotation_zip(mirror / ANNOTATIONS, YEAR, docs)
        return self.download(work, download_params(str(mirror)))


class LongString(AnnotationCase):
    name = "annotations: a 64 MiB `info` string"
    defence = "a linear scan stops at data.limits.json_string_bytes (1 MiB)"

    def hostile_annotations(self, instances):
        size = (64 << 20) if self.scale >= 1 else (4 << 20)
        # random letters: a string of one letter would be refused by the zip ratio check first
        text = os.urandom(size // 2).hex()
        instances["train"]["info"] = {"description": text}
        return instances


class DuplicateImages(AnnotationCase):
    name = "annotations: one image listed in both splits"
    defence = "duplicate ids and file names refused, naming both entries"

    def hostile_annotations(self, instances):
        instances["val"]["images"].append(dict(instances["train"]["images"][0]))
        return instances


class AliasBomb(Case):
    name = "params.yaml: a YAML alias bomb (10^9 values from 600 bytes)"
    stage = "compare"
    defence = "alias expansion bounded while composing (10,000 values)"

    def run(self, work):
        text = (ROOT / "params.yaml").read_text()
        bomb = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
        bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
        params = work / "params.yaml"
        params.write_text(text.replace("report:\n", "report:\n  bomb:\n" + "".join(
            f"    {line}\n" for line in bomb), 1))
        out = work / "compare"
        result = run_stage("compare", ["--params", str(params), "--analysis", str(work),
                                       "--out", str(out)], work)
        result["disk_bytes"] = disk_bytes(out)
        return result


class SampleCase(Case):
    """A stage after download and masks of a few sample images (built in this process)."""

    def prepare(self, work: Path) -> tuple[Path, Path, Path]:
        from benchmarks.common import prepare_sample

        raw, masks, params = prepare_sample(work, per_split=4)
        return raw, masks, write_params(work, params)


class DamagedModel(SampleCase):
    name = "model.pt: a pickle that runs os.system when loaded"
    stage = "infer"
    defence = "weights-only loading, one error naming the file"

    def run(self, work):
        import pickle

        raw, masks, params = self.prepare(work)

        class Exploit:
            def __reduce__(self):
                return (os.system, ("touch owned",))

        model = work / "model"
        model.mkdir()
        (model / "model.pt").write_bytes(pickle.dumps({"model": Exploit()}))
        out = work / "predictions"
        result = run_stage("infer", ["--params", str(params), "--model", str(model), "--raw",
                                     str(raw), "--masks", str(masks), "--out", str(out)], work)
        result["disk_bytes"] = disk_bytes(out) + (ROOT / "owned").exists()
        return result


class UnwritableModel(SampleCase):
    name = "train: its model folder cannot be created (a file stands there)"
    stage = "train"
    defence = "every output's folder proved writable before any work"

    def run(self, work):
        from unwritable import blocked_folder

        raw, masks, params = self.prepare(work)
        out = blocked_folder(work)
        live, checkpoints = work / "live", work / "ck_train"
        result = run_stage("train", ["--params", str(params), "--scheme", "person_car",
                                     "--seed", "0", "--raw", str(raw), "--masks", str(masks),
                                     "--out", str(out), "--live", str(live),
                                     "--checkpoints", str(checkpoints)],
                           work)
        result["disk_bytes"] = disk_bytes(live, checkpoints)
        return result


CASES = [EndlessImage, HugeContentLength, Trickle, RedirectAway, ZipBomb, ForeignMember,
         LongString, DuplicateImages, AliasBomb, DamagedModel, UnwritableModel]


# ---------------------------------------------------------------- harness entry

def row(case: Case, result: dict) -> dict:
    return {"hostile input": case.name, "stage": case.stage, "defence": case.defence,
            "exit": result["exit"], "error lines": result["error_lines"],
            "traceback": "yes" if result["traceback"] else "no",
            "s to refusal": round(result["seconds"], 2),
            "s with imports": round(result["process_seconds"], 1),
            "peak RSS MiB": round(result["peak_mib"]),
            "written to files MiB": round(result["write_bytes"] / 2 ** 20, 1),
            "left on disk MiB": round(result["disk_bytes"] / 2 ** 20, 1)}


def run(scale: float) -> dict:
    rows, messages = [], []
    for kind in CASES:
        case = kind(scale)
        with tempfile.TemporaryDirectory(prefix="segflow-hostile-") as tmp:
            result = case.run(Path(tmp))
        rows.append(row(case, result))
        messages.append(f"{case.name}: `{result['message'].split(' ERROR ', 1)[-1][-400:]}`")
    refused = sum(r["exit"] == 2 and r["error lines"] == 1 and r["traceback"] == "no"
                  for r in rows)
    notes = [f"{refused} of {len(rows)} hostile inputs refused with exit code 2, one error line "
             "and no traceback.",
             "Before issue 13 (b61e485, as the issue measured them): the endless bodies filled "
             "a .part file at 20 MB/s until killed, the trickle never timed out, a 3 GiB member "
             "wrote 3.2 GB to staging before the JPEG check, a 64 MiB string took 117 s to parse "
             "(then succeeded), duplicate images crashed or lost labels, and an alias bomb's "
             "error message ran to hundreds of MB.",
             "The last line each stage printed:", *messages]
    return {"title": "hostile inputs: cost to refusal", "table": rows, "notes": notes}


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2], json.loads(sys.argv[3]))
