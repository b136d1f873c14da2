"""download: from the embedded sample as a local folder, a file:// URL and a loopback HTTP
server; reproducible selection, exact annotation subsets, manifest checksums, errors."""
from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import json
import random
import re
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import SAMPLE
from stages import download
from stages.lib.cli import StageError

MAX = {"train": 5, "val": 4}
SEED = 3


def _source_instances() -> dict[str, dict]:
    with zipfile.ZipFile(SAMPLE / "annotations" / "annotations_trainval2017.zip") as zf:
        return {split: json.loads(zf.read(f"annotations/instances_{split}2017.json"))
                for split in ("train", "val")}


SOURCE = _source_instances()


def _params(params: dict, base_url: str, max_images=MAX, seed=SEED) -> dict:
    params["data"].update(base_url=base_url, max_images=dict(max_images), seed=seed, retries=0,
                          workers=4, timeout_s=10)
    return params


# The documented rule (download.select_images): random.Random(seed).sample of the split's
# images in id order, then sorted by id; all of them when n is None or covers the split.
# Written down once for the sample (from the rule below, by hand in a Python prompt), so
# that a change of rule or of the sample shows here rather than in both at once.
EXPECTED_IDS = {
    ("train", 5, 3): [163840, 221184, 344065, 499716, 542720],
    ("val", 4, 3): [161799, 241668, 485895, 547336],
    ("train", 5, 4): [116740, 221184, 262148, 352259, 425989],
}


def _selected_ids(split: str, n: int | None, seed: int) -> list[int]:
    """The ids download must choose, derived without the code under test."""
    ids = sorted(im["id"] for im in SOURCE[split]["images"])
    chosen = ids if n is None or n >= len(ids) else sorted(random.Random(seed).sample(ids, n))
    assert chosen == EXPECTED_IDS.get((split, n, seed), chosen)
    return chosen


@pytest.mark.parametrize("split, n, seed", sorted(EXPECTED_IDS))
def test_select_images_chooses_the_written_down_ids(split, n, seed):
    chosen = download.select_images(SOURCE[split]["images"], n, seed)
    assert [im["id"] for im in chosen] == EXPECTED_IDS[(split, n, seed)]
    shuffled = random.Random(0).sample(SOURCE[split]["images"], len(SOURCE[split]["images"]))
    assert download.select_images(shuffled, n, seed) == chosen      # order-independent
    assert [im["id"] for im in download.select_images(SOURCE[split]["images"], None, seed)] \
        == sorted(im["id"] for im in SOURCE[split]["images"])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def serve():
    """serve(folder) -> base URL of a loopback HTTP server for that folder."""
    servers = []

    def start(folder: Path, handler_class=_QuietHandler) -> str:
        handler = functools.partial(handler_class, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, default_params):
    out = tmp_path_factory.mktemp("dl_local") / "raw"
    manifest = download.run(_params(copy.deepcopy(default_params), str(SAMPLE)), out)
    return out, manifest


def _check_output(out: Path, manifest: dict, base_url: str, max_images=MAX, seed=SEED) -> None:
    """Everything a download folder must satisfy, checked against the sample itself."""
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "images", "manifest.json"]
    assert sorted(p.name for p in (out / "annotations").iterdir()) == [
        "instances_train.json", "instances_val.json"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["base_url"] == base_url
    assert (manifest["year"], manifest["seed"]) == (2017, seed)
    assert set(manifest["splits"]) == {"train", "val"}
    for split in ("train", "val"):
        ids = _selected_ids(split, max_images[split], seed)
        assert len(ids) == (max_images[split] or 80)
        source = SOURCE[split]
        written = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        # exactly the selected images, sorted by id, and only their annotations
        assert [im["id"] for im in written["images"]] == ids
        by_id = {im["id"]: im for im in source["images"]}
        assert written["images"] == [by_id[i] for i in ids]
        chosen = set(ids)
        # merge order, which masks streams: by image id, then id
        assert written["annotations"] == sorted(
            (a for a in source["annotations"] if a["image_id"] in chosen),
            key=lambda a: (a["image_id"], a["id"]))
        assert written["categories"] == source["categories"]
        assert set(written) == set(source)
        record = manifest["splits"][split]
        ann_path = out / record["annotations"]["path"]
        assert record["annotations"]["path"] == f"annotations/instances_{split}.json"
        assert record["annotations"]["bytes"] == ann_path.stat().st_size
        assert record["annotations"]["sha256"] == hashlib.sha256(ann_path.read_bytes()).hexdigest()
        files = sorted(p.name for p in (out / "images" / split).iterdir())
        assert files == sorted(by_id[i]["file_name"] for i in ids)
        assert [r["id"] for r in record["images"]] == ids
        for rec in record["images"]:
            name = by_id[rec["id"]]["file_name"]
            assert rec["path"] == f"images/{split}/{name}"
            data = (out / rec["path"]).read_bytes()
            assert data == (SAMPLE / f"{split}2017" / name).read_bytes()
            assert rec["bytes"] == len(data)
            assert rec["sha256"] == hashlib.sha256(data).hexdigest()


def test_from_local_folder(local_run):
    out, manifest = local_run
    _check_output(out, manifest, str(SAMPLE))
    assert not [p for p in out.parent.iterdir() if p.name != "raw"]  # no temporaries left


def test_selection_is_reproducible_and_seeded(local_run, tmp_path, params):
    out, manifest = local_run
    again = download.run(_params(params, str(SAMPLE)), tmp_path / "again")
    assert again == manifest
    assert (tmp_path / "again" / "annotations" / "instances_val.json").read_bytes() == \
        (out / "annotations" / "instances_val.json").read_bytes()
    other = _selected_ids("train", 5, SEED + 1)
    assert other != _selected_ids("train", 5, SEED)
    assert len(set(_selected_ids("train", 5, SEED))) == 5


def test_from_file_url(local_run, tmp_path, params):
    url = SAMPLE.as_uri()
    assert url.startswith("file:///")
    out = tmp_path / "raw"
    manifest = download.run(_params(params, url), out)
    _check_output(out, manifest, url)
    assert manifest["splits"] == local_run[1]["splits"]


def test_from_loopback_http_server(local_run, serve, tmp_path, params):
    base = serve(SAMPLE)
    out = tmp_path / "raw"
    manifest = download.run(_params(params, base + "/"), out)   # trailing slash is fine
    _check_output(out, manifest, base + "/")
    assert manifest["splits"] == local_run[1]["splits"]


def test_file_url_with_percent_encoded_path(tmp_path, params):
    link = tmp_path / "my sample"
    link.symlink_to(SAMPLE, target_is_directory=True)
    url = link.as_uri()
    assert "my%20sample" in url
    out = tmp_path / "raw"
    manifest = download.run(_params(params, url, max_images={"train": 1, "val": 2}), out)
    _check_output(out, manifest, url, max_images={"train": 1, "val": 2})


def test_null_max_images_takes_every_image(tmp_path, params):
    out = tmp_path / "raw"
    limits = {"train": None, "val": 2}
    manifest = download.run(_params(params, str(SAMPLE), max_images=limits), out)
    assert len(manifest["splits"]["train"]["images"]) == 80
    assert len(list((out / "images" / "train").iterdir())) == 80
    _check_output(out, manifest, str(SAMPLE), max_images=limits)


def test_404_names_the_url_keeps_completed_files_and_leaves_no_output(serve, tmp_path, params,
                                                                    caplog):
    served = tmp_path / "served"
    shutil.copytree(SAMPLE, served)
    by_id = {split: {im["id"]: im for im in SOURCE[split]["images"]} for split in SOURCE}
    missing = [by_id["val"][_selected_ids("val", MAX["val"], SEED)[1]]["file_name"],
               by_id["train"][_selected_ids("train", MAX["train"], SEED)[0]]["file_name"]]
    (served / "val2017" / missing[0]).unlink()
    (served / "train2017" / missing[1]).unlink()
    base = serve(served)
    target = tmp_path / "out"
    out = target / "raw"
    with pytest.raises(StageError) as info:
        download.run(_params(params, base), out)
    message = str(info.value)
    assert message.startswith("could not fetch 2 file(s) (each logged above; first: ")
    assert "\n" not in message                                      # one line for the user
    failed = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
              and r.getMessage().startswith("could not fetch ")]
    assert len(failed) == 2                                          # every failure logged
    assert any(f"{base}/val2017/{missing[0]}: HTTP 404" in line for line in failed)
    assert any(f"{base}/train2017/{missing[1]}: HTTP 404" in line for line in failed)
    assert not out.exists()                                         # nothing under the final name
    staged = target / ".raw.partial"
    assert sorted(p.name for p in target.iterdir()) == [".raw.partial"]
    assert len(list((staged / "images").rglob("*.jpg"))) == sum(MAX.values()) - 2
    # the missing files appear; the rerun fetches only them and publishes
    shutil.copy(SAMPLE / "val2017" / missing[0], served / "val2017" / missing[0])
    shutil.copy(SAMPLE / "train2017" / missing[1], served / "train2017" / missing[1])
    manifest = download.run(_params(params, base), out)
    _check_output(out, manifest, base)
    assert sorted(p.name for p in target.iterdir()) == ["raw"]


def test_undecodable_image_is_an_error(tmp_path, params):
    served = tmp_path / "served"
    shutil.copytree(SAMPLE, served)
    ids = {im["id"]: im for im in SOURCE["train"]["images"]}
    victim = ids[_selected_ids("train", MAX["train"], SEED)[0]]["file_name"]
    (served / "train2017" / victim).write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "raw"
    with pytest.raises(StageError, match=rf"train2017/{victim}: not a decodable image"):
        download.run(_params(params, str(served)), out)
    assert not out.exists()
    assert not list((tmp_path / ".raw.partial").rglob(victim + "*"))


def test_existing_output_is_replaced(tmp_path, params):
    out = tmp_path / "raw"
    (out / "images").mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    download.run(_params(params, str(SAMPLE), max_images={"train": 1, "val": 1}), out)
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "images", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]   # staging became the output


def test_main_cli_and_missing_source(tmp_path, params, caplog):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params(params, str(SAMPLE),
                                                  max_images={"train": 1, "val": 1})))
    assert download.main(["--params", str(params_file), "--out", str(tmp_path / "raw")]) == 0
    assert len(list((tmp_path / "raw" / "images" / "val").iterdir())) == 1
    params["data"]["base_url"] = str(tmp_path / "nowhere")
    params_file.write_text(yaml.safe_dump(params))
    assert download.main(["--params", str(params_file), "--out", str(tmp_path / "raw2")]) == 2
    assert f"{tmp_path / 'nowhere'}/annotations/annotations_trainval2017.zip" in caplog.text
    assert not (tmp_path / "raw2").exists()
    params["data"]["workers"] = "eight"
    params_file.write_text(yaml.safe_dump(params))
    assert download.main(["--params", str(params_file), "--out", str(tmp_path / "raw3")]) == 2
    assert "data.workers: 'eight' is not of type 'integer'" in caplog.text
    assert not (tmp_path / "raw3").exists()


def test_select_images_is_order_independent():
    images = SOURCE["val"]["images"]
    shuffled = list(images)
    random.Random(1).shuffle(shuffled)
    assert shuffled != images
    first = download.select_images(images, 7, 42)
    assert download.select_images(shuffled, 7, 42) == first
    assert download.select_images(list(reversed(images)), 7, 42) == first
    assert [im["id"] for im in first] == sorted(im["id"] for im in first)
    assert len({im["id"] for im in first}) == 7
    assert download.select_images(images, 7, 43) != first


def test_select_images_all_when_limit_is_none_or_large():
    images = SOURCE["train"]["images"]
    ids = sorted(im["id"] for im in images)
    assert [im["id"] for im in download.select_images(images, None, 0)] == ids
    assert [im["id"] for im in download.select_images(images, 80, 0)] == ids
    assert [im["id"] for im in download.select_images(images, 500, 0)] == ids


def test_subset_instances_keeps_other_keys_and_writes_merge_order():
    data = {"info": {"year": 2017}, "images": [{"id": 3}, {"id": 1}, {"id": 2}],
            "annotations": [{"id": 12, "image_id": 3}, {"id": 10, "image_id": 1},
                            {"id": 11, "image_id": 2}, {"id": 9, "image_id": 3},
                            {"id": 13, "image_id": 1}], "categories": [1]}
    subset = download.subset_instances(data, [{"id": 3}, {"id": 1}])
    assert subset == {"info": {"year": 2017}, "images": [{"id": 1}, {"id": 3}], "categories": [1],
                      "annotations": [{"id": 10, "image_id": 1}, {"id": 13, "image_id": 1},
                                      {"id": 9, "image_id": 3}, {"id": 12, "image_id": 3}]}
    # the small keys first, so a streaming reader has the categories before the images
    assert list(subset) == ["info", "categories", "images", "annotations"]


def test_image_relpath():
    assert download.image_relpath("val", 2017, "000000000139.jpg") == "val2017/000000000139.jpg"
    assert download.image_relpath("train", 2014, "COCO_train2014_000000000009.jpg") == \
        "train2014/COCO_train2014_000000000009.jpg"


@pytest.mark.parametrize("name", ["../x.jpg", "../../etc/passwd", "a/b.jpg", "/etc/passwd",
                                  "..", ".", "", "x.jpg/"])
def test_image_relpath_refuses_escapes(name):
    with pytest.raises(StageError, match="is not a plain file name"):
        download.image_relpath("val", 2017, name)





# ------------------------------------------------ COCO-server mirrors, faults, kills

from coco_mirror import build_mirror, instances_for  # noqa: E402
from fault_server import FaultServer  # noqa: E402


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory) -> dict[int, tuple[Path, dict]]:
    """2014- and 2017-style copies of the server layout: {year: (root, {relpath: sha256})}."""
    root = tmp_path_factory.mktemp("mirrors")
    return {year: (root / str(year), build_mirror(root / str(year), year)) for year in (2014, 2017)}


@pytest.fixture
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _mirror_params(params: dict, base: str, year: int, **data) -> dict:
    params["data"].update(base_url=base, year=year, max_images={"train": None, "val": None},
                          seed=SEED, retries=4, backoff_s=0.01, timeout_s=0.5, workers=8)
    params["data"].update(data)
    return params


def _check_mirror_copy(out: Path, manifest: dict, mirror: tuple[Path, dict], year: int) -> None:
    """Every selected image is on disk, byte-identical to the mirror, and in the manifest;
    the annotation files hold exactly the selected images and their annotations."""
    root, hashes = mirror
    instances = instances_for(year)
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "images", "manifest.json"]
    for split in ("train", "val"):
        written = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        chosen = {im["id"] for im in written["images"]}
        assert written["annotations"] == sorted(
            (a for a in instances[split]["annotations"] if a["image_id"] in chosen),
            key=lambda a: (a["image_id"], a["id"]))
        on_disk = sorted(p.name for p in (out / "images" / split).iterdir())
        assert on_disk == sorted(im["file_name"] for im in written["images"])
        records = manifest["splits"][split]["images"]
        assert [r["id"] for r in records] == sorted(chosen)
        for image, record in zip(written["images"], records):
            relpath = f"{split}{year}/{image['file_name']}"
            data = (out / record["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == hashes[relpath] == record["sha256"]


def _plan_faults(server: FaultServer, paths: list[str], n_faults: int, seed: int) -> int:
    """Spread n_faults over paths, at most two per path, in combinations a flaky network
    produces (a break mid-body then a server that ignores the resume, and so on)."""
    rng = random.Random(seed)
    combos = [("reset",), ("truncate",), ("503",), ("500",), ("corrupt",), ("429",),
              ("reset", "ignore_range"), ("truncate", "503"), ("stall",), ("503:date",),
              ("reset", "reset"), ("truncate", "ignore_range")]
    injected = 0
    for path in rng.sample(paths, len(paths)):
        if injected >= n_faults:
            break
        combo = rng.choice(combos)
        if "stall" in combo and rng.random() < 0.7:   # stalls cost a timeout each: fewer
            combo = ("reset",)
        server.inject(path, *combo)
        injected += len(combo)
    return injected


@pytest.mark.parametrize("year", [2017, 2014])
def test_subset_download_survives_100_injected_faults(mirrors, no_proxy, tmp_path, params, year,
                                                     caplog):
    caplog.set_level("INFO")
    root, hashes = mirrors[year]
    with FaultServer(root, stall_s=1.5) as server:
        paths = ["/" + p for p in hashes if p.startswith(("train", "val"))]
        ann = f"/annotations/annotations_trainval{year}.zip"
        server.inject(ann, "reset", "ignore_range")
        injected = 2 + _plan_faults(server, paths, 110, seed=year)
        checksums = {ann[1:]: "sha256:" + hashes[ann[1:]]}
        p = _mirror_params(params, server.base, year, checksums=checksums)
        out = tmp_path / "raw"
        manifest = download.run(p, out)
        assert server.pending() == 0
        assert len(server.served_faults()) == injected >= 100
        gets_of_images = [r for r in server.requests if r.path in paths]
        assert {r.path for r in gets_of_images} == set(paths)     # nothing missing
        # every fault but an ignored Range (handled within its attempt) cost one retry
        retries = injected - sum(r.fault == "ignore_range" for r in server.served_faults())
    summary = re.search(r"fetched (\d+), extracted 0, skipped 0 \(already complete\), (\d+) "
                        r"retries, 0 failed", caplog.text)
    assert summary and int(summary[1]) == 161
    # (a request slowed past the timeout by a busy machine may add a retry of its own)
    assert retries <= int(summary[2]) <= retries + 5
    _check_mirror_copy(out, manifest, mirrors[year], year)
    assert sum(len(manifest["splits"][s]["images"]) for s in ("train", "val")) == 160
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


@pytest.mark.parametrize("year", [2017, 2014])
def test_archive_mode_with_faults_and_checksums(mirrors, no_proxy, tmp_path, params, year):
    root, hashes = mirrors[year]
    limits = {"train": 7, "val": None}
    with FaultServer(root, stall_s=1.5) as server:
        server.inject(f"/zips/train{year}.zip", "corrupt", "reset", "ignore_range")
        server.inject(f"/zips/val{year}.zip", "truncate", "503")
        checksums = {f"zips/{s}{year}.zip": "sha256:" + hashes[f"zips/{s}{year}.zip"]
                     for s in ("train", "val")}
        p = _mirror_params(params, server.base, year, mode="archives", max_images=limits,
                           checksums=checksums)
        manifest = download.run(p, tmp_path / "raw")
        assert server.pending() == 0
        image_gets = [r for r in server.requests
                      if not r.path.startswith(("/zips", "/annotations"))]
        assert image_gets == []                 # every image came out of the archives
    _check_mirror_copy(tmp_path / "raw", manifest, mirrors[year], year)
    assert [len(manifest["splits"][s]["images"]) for s in ("train", "val")] == [7, 80]
    assert manifest["mode"] == "archives"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]   # archives not kept


def test_archive_member_that_does_not_decode_is_fetched_on_its_own(mirrors, no_proxy, tmp_path,
                                                                   params):
    root, hashes = mirrors[2017]
    served = tmp_path / "served"
    shutil.copytree(root, served)
    instances = instances_for(2017)
    victim = sorted(im["file_name"] for im in instances["val"]["images"])[3]
    archive = served / "zips" / "val2017.zip"
    with zipfile.ZipFile(root / "zips" / "val2017.zip") as src, \
            zipfile.ZipFile(archive, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, b"\xff\xd8broken" if info.filename.endswith(victim) else data)
    with FaultServer(served) as server:
        p = _mirror_params(params, server.base, 2017, mode="archives")
        manifest = download.run(p, tmp_path / "raw")
        assert ([r.path for r in server.requests if r.path.startswith("/val2017")]
                == [f"/val2017/{victim}"])
    _check_mirror_copy(tmp_path / "raw", manifest, mirrors[2017], 2017)


def test_archive_with_escaping_entries_is_refused(mirrors, tmp_path, params):
    root, _ = mirrors[2017]
    served = tmp_path / "served"
    shutil.copytree(root, served)
    with zipfile.ZipFile(served / "zips" / "train2017.zip", "a") as zf:
        zf.writestr("train2017/../../evil.jpg", b"x")
    p = _mirror_params(params, str(served), 2017, mode="archives")
    with pytest.raises(StageError,
                       match=r"train2017.zip: refusing an archive whose entries would "
                             r"land outside the target folder: train2017/\.\./\.\./evil.jpg"):
        download.run(p, tmp_path / "out" / "raw")
    assert not list(tmp_path.rglob("evil.jpg"))
    assert not (tmp_path / "out" / "raw").exists()


def test_unsafe_entries():
    def info(name, mode=0o100644):
        entry = zipfile.ZipInfo(name)
        entry.external_attr = mode << 16
        return entry

    names = ["val2017/a.jpg", "val2017/", "/etc/passwd", "a/../../b", "C:/x.jpg", "..\\x.jpg"]
    bad = download.unsafe_entries([info(n) for n in names] + [info("val2017/link", 0o120777)])
    assert bad == ["/etc/passwd", "a/../../b", "C:/x.jpg", "..\\x.jpg", "val2017/link"]


def test_local_archive_checksum_mismatch_is_an_error(mirrors, tmp_path, params):
    root, _ = mirrors[2017]
    p = _mirror_params(params, str(root), 2017, mode="archives",
                       checksums={"zips/val2017.zip": "sha1:" + "0" * 40})
    with pytest.raises(StageError, match=r"val2017.zip: sha1 \w+ differs from the expected 0+"):
        download.run(p, tmp_path / "raw")


def test_killed_download_resumes_without_refetching_complete_files(mirrors, no_proxy, tmp_path,
                                                                   params):
    """SIGKILL midway, rerun: the same output, complete files not fetched again, partial
    files continued with Range."""
    import signal
    import subprocess
    import sys
    import time

    root, _ = mirrors[2017]
    limits = {"train": 10, "val": 10}
    staging, out = tmp_path / "ck", tmp_path / "raw"
    with FaultServer(root, bytes_per_s=300_000) as server:
        p = _mirror_params(params, server.base, 2017, max_images=limits, workers=3, timeout_s=10)
        params_file = tmp_path / "params.yaml"
        params_file.write_text(yaml.safe_dump(p))
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.download", "--params", str(params_file),
             "--out", str(out), "--checkpoints", str(staging)],
            cwd=Path(download.__file__).parents[1],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(list(staging.glob("images/*/*.jpg"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        complete = {f"/{p.parent.name}2017/{p.name}" for p in staging.glob("images/*/*.jpg")}
        partial = {f"/{p.parent.name}2017/{p.name[:-5]}": p.stat().st_size
                   for p in staging.glob("images/*/*.jpg.part") if p.stat().st_size}
        assert len(complete) >= 4 and not out.exists()
        assert (staging / "annotations_trainval2017.zip").exists()
        before = len(server.requests)

        server.bytes_per_s = None
        manifest = download.run(p, out, staging)
        rerun = server.requests[before:]
    assert not complete & {r.path for r in rerun}                    # nothing fetched twice
    assert "/annotations/annotations_trainval2017.zip" not in {r.path for r in rerun}
    for path, size in partial.items():
        (request,) = [r for r in rerun if r.path == path]
        # continued where it stopped (416 when every byte had arrived before the kill)
        assert request.range == f"bytes={size}-" and request.status in (206, 416)
    _check_mirror_copy(out, manifest, mirrors[2017], 2017)
    clean = download.run(_mirror_params(params, str(root), 2017, max_images=limits),
                         tmp_path / "clean")
    assert manifest["splits"] == clean["splits"]
    assert not staging.exists()


def _showing(instances: dict, category_ids: set[int]) -> set[int]:
    return download.images_showing(download.categories_by_image(instances["annotations"], "t"),
                                   category_ids)


def test_filter_keeps_scheme_images_plus_a_background_share(tmp_path, params):
    claimed = download.scheme_category_ids(params, SOURCE["val"]["categories"])
    names = {c["id"]: c["name"] for c in SOURCE["val"]["categories"]}
    assert {names[i] for i in claimed} == {"person", "car", "bicycle", "motorcycle", "airplane",
                                           "bus", "train", "truck", "boat"}
    positives = _showing(SOURCE["val"], claimed)
    supers = {c["id"]: c["supercategory"] for c in SOURCE["val"]["categories"]}
    assert positives == {a["image_id"] for a in SOURCE["val"]["annotations"]
                         if supers[a["category_id"]] in ("person", "vehicle")}
    assert 49 <= len(positives) < 80   # the sample's README: 49 val images show people
    params["data"]["filter"] = {"scheme_categories_only": True, "background_share": 0.25}
    manifest = download.run(_params(params, str(SAMPLE), max_images={"train": 12, "val": 20}),
                            tmp_path / "raw")
    for split, n in (("train", 12), ("val", 20)):
        ids = [r["id"] for r in manifest["splits"][split]["images"]]
        shown = _showing(SOURCE[split], claimed)
        assert len(ids) == n
        assert sum(i not in shown for i in ids) == round(n * 0.25)
        assert manifest["splits"][split]["with_scheme_categories"] == len(shown)


def test_select_images_with_filter_counts():
    images = [{"id": i} for i in range(100)]
    positives = set(range(0, 100, 4))                     # 25 positives, 75 others
    pick = lambda n, share: download.select_images(images, n, 0, positives, share)  # noqa: E731
    assert all(im["id"] in positives for im in pick(10, 0.0))
    assert sum(im["id"] in positives for im in pick(10, 0.3)) == 7
    assert len(pick(None, 0.0)) == 25                     # every positive, no others
    assert sum(im["id"] not in positives for im in pick(None, 0.5)) == 25
    assert len(pick(40, 0.0)) == 25                       # not enough positives: all of them
    assert all(im["id"] not in positives for im in pick(None, 1.0))
    assert pick(10, 0.3) == pick(10, 0.3) != download.select_images(images, 10, 1, positives, 0.3)


def test_image_source_path_prefers_coco_url_path():
    image = {"file_name": "COCO_val2014_000000000042.jpg",
             "coco_url": "http://images.cocodataset.org/val2014/COCO_val2014_000000000042.jpg"}
    assert download.image_source_path(image, "val", 2014) == "val2014/COCO_val2014_000000000042.jpg"
    odd = {"file_name": "x.jpg", "coco_url": "http://h/../../x.jpg"}
    assert download.image_source_path(odd, "train", 2017) == "train2017/x.jpg"
    assert download.image_source_path({"file_name": "x.jpg"}, "val", 2017) == "val2017/x.jpg"


def test_malformed_annotation_json_names_the_member(tmp_path, params):
    served = tmp_path / "served"
    shutil.copytree(SAMPLE, served)
    archive = served / "annotations" / "annotations_trainval2017.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("annotations/instances_train2017.json", '{"images": [')
    with pytest.raises(StageError, match=r"annotations_trainval2017.zip:annotations/"
                                         r"instances_train2017.json: not valid JSON"):
        download.run(_params(params, str(served)), tmp_path / "out" / "raw")
    assert not (tmp_path / "out" / "raw").exists()


def _served_with(tmp_path: Path, train_text: str) -> Path:
    """A copy of the sample whose train annotation file is `train_text`."""
    served = tmp_path / "served"
    shutil.copytree(SAMPLE, served)
    archive = served / "annotations" / "annotations_trainval2017.zip"
    with zipfile.ZipFile(SAMPLE / "annotations" / "annotations_trainval2017.zip") as src, \
            zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            train = info.filename.endswith("instances_train2017.json")
            dst.writestr(info.filename, train_text if train else src.read(info))
    return served


TOO_BIG_FOR_YAJL = 2 ** 70    # an integer beyond 64 bits: only the json module reads it


def test_annotations_the_streaming_parser_refuses_are_read_whole_alike(tmp_path, params, caplog):
    caplog.set_level("INFO")
    doc = {"info": {"note": TOO_BIG_FOR_YAJL}, "licenses": [{"id": 1}], **SOURCE["train"]}
    served = _served_with(tmp_path, json.dumps(doc))
    manifest = download.run(_params(params, str(served)), tmp_path / "raw")
    assert "instances_train2017.json: not JSON the streaming parser accepts" in caplog.text
    assert "instances_val2017.json: not JSON" not in caplog.text      # val was streamed
    whole = json.loads((tmp_path / "raw" / "annotations" / "instances_train.json").read_text())
    assert whole["info"] == {"note": TOO_BIG_FOR_YAJL} and whole["licenses"] == [{"id": 1}]
    streamed = download.run(_params(params, str(SAMPLE)), tmp_path / "streamed")
    assert manifest["splits"]["val"] == streamed["splits"]["val"]
    streamed_train = json.loads(
        (tmp_path / "streamed" / "annotations" / "instances_train.json").read_text())
    assert {k: whole[k] for k in streamed_train} == streamed_train


def test_json_the_streaming_parser_refuses_after_the_small_keys_is_read_whole(tmp_path, params,
                                                                                caplog):
    """In download's own order (the small keys first, all present) the passes over them stop
    before the annotations: a value yajl refuses there must still lead to reading the file whole."""
    caplog.set_level("INFO")
    doc = {"info": {"year": 2017}, "licenses": [], "categories": SOURCE["train"]["categories"],
           "images": SOURCE["train"]["images"],
           "annotations": copy.deepcopy(SOURCE["train"]["annotations"])}
    doc["annotations"][-1]["note"] = TOO_BIG_FOR_YAJL
    served = _served_with(tmp_path, json.dumps(doc))
    download.run(_params(params, str(served), max_images={"train": None, "val": 4}),
                 tmp_path / "raw")
    assert "instances_train2017.json: not JSON the streaming parser accepts" in caplog.text
    written = json.loads((tmp_path / "raw" / "annotations" / "instances_train.json").read_text())
    assert written["annotations"] == sorted(doc["annotations"],
                                            key=lambda a: (a["image_id"], a["id"]))


def _drop(key: str, at: int | None = None):
    def change(doc: dict) -> object:
        if at is None:
            del doc[key]
        else:
            del doc[key.split(".")[0]][at][key.split(".")[1]]
        return doc
    return change


@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "read whole"])
@pytest.mark.parametrize("change, message", [
    (_drop("annotations.category_id", 5),
     r"instances_train2017.json: annotations\[5\] is not an object with category_id, id, image_id"),
    (_drop("images.file_name", 2), r"instances_train2017.json: images\[2\] is not an object with "
                                    r"file_name, id"),
    (_drop("annotations"), r"instances_train2017.json: missing or non-list key\(s\): annotations"),
    (lambda doc: {**doc, "categories": {}}, r"missing or non-list key\(s\): categories"),
    (lambda doc: [doc], r"instances_train2017.json: expected a JSON object"),
], ids=["annotation without category", "image without file_name", "no annotations",
        "categories not a list", "a list"])
def test_bad_annotation_content_is_named_on_either_path(tmp_path, params, change, message, whole):
    doc = copy.deepcopy(SOURCE["train"])
    if whole:
        doc["info"] = {"note": TOO_BIG_FOR_YAJL}
    served = _served_with(tmp_path, json.dumps(change(doc)))
    with pytest.raises(StageError, match=message):
        download.run(_params(params, str(served)), tmp_path / "out" / "raw")
    assert not (tmp_path / "out" / "raw").exists()


def test_changed_source_discards_stale_staging(tmp_path, params):
    staging = tmp_path / "ck"
    (staging / "images" / "val").mkdir(parents=True)
    (staging / "source.json").write_text('{"base_url": "http://elsewhere", "year": 2017}')
    (staging / "images" / "val" / "000000000139.jpg").write_bytes(b"from another mirror")
    p = _params(params, str(SAMPLE), max_images={"train": 1, "val": None})
    manifest = download.run(p, tmp_path / "raw", staging)
    _check_output(tmp_path / "raw", manifest, str(SAMPLE), max_images={"train": 1, "val": None})


# ------------------------------------------------ issue 13: hostile input

import io  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from coco_mirror import rewrite_zip, write_annotation_zip  # noqa: E402
from stages.lib import coco  # noqa: E402

ANN_ZIP = Path("annotations") / "annotations_trainval2017.zip"


def _files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for p in root.rglob("*") if p.is_file()}


def _serve_docs(tmp_path: Path, docs: dict[str, object]) -> Path:
    """A copy of the sample whose annotation files are `docs` (by split)."""
    served = tmp_path / "served"
    shutil.copytree(SAMPLE, served)
    write_annotation_zip(served / ANN_ZIP, 2017, docs)
    return served


def _main_refuses(tmp_path: Path, params: dict, caplog, message: str) -> str:
    """download's main() exits 2 with one error line matching `message`, creates no output
    folder, and writes nothing but its work folder's source marker."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    before = _files(tmp_path)
    caplog.clear()
    code = download.main(["--params", str(params_file), "--out", str(tmp_path / "out" / "raw"),
                          "--checkpoints", str(tmp_path / "work")])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert (code, len(errors)) == (2, 1), f"exit code {code}, errors {errors}"
    assert "\n" not in errors[0] and re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "out" / "raw").exists()
    written = {k: v for k, v in _files(tmp_path).items() if before.get(k) != v}
    assert list(written) == ["work/source.json"]          # no image, no byte of a member
    return errors[0]


def _name(image: dict) -> str:
    return f"\\(id {image['id']}, '{re.escape(image['file_name'])}'\\)"



# Item 2: an image listed twice, by id or by file (file_name, or a stem masks would share).

def _listed_twice(split: str, index: int, change: dict) -> tuple[dict, dict, dict]:
    """The sample's annotations with images[index] of `split` listed again at the end,
    changed by `change` (a callable of the entry, or keys to set); also the two entries."""
    docs = copy.deepcopy(SOURCE)
    first = docs[split]["images"][index]
    again = change(first) if callable(change) else {**first, **change}
    docs[split]["images"].append(again)
    return docs, first, again


def _upper_stem_png(image: dict) -> dict:
    return {**image, "id": 999_999_999, "file_name": Path(image["file_name"]).stem.upper() + ".png"}


@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "read whole"])
@pytest.mark.parametrize("split, index, change, shared", [
    ("train", 3, {}, "id and file_name"),
    ("val", 5, {"file_name": "elsewhere.jpg"}, "id"),
    ("train", 2, {"id": 999_999_999}, "file_name"),
    ("val", 7, _upper_stem_png, "stem"),
], ids=["entry listed twice", "id twice", "file_name twice", "stem twice, case folded"])
def test_image_listed_twice_in_a_split_is_refused_naming_both(tmp_path, params, caplog, split,
                                                              index, change, shared, whole):
    docs, first, again = _listed_twice(split, index, change)
    if whole:   # JSON only the json module reads: the fallback path must refuse it too
        docs[split]["info"] = {"note": TOO_BIG_FOR_YAJL}
    p = _params(params, str(_serve_docs(tmp_path, docs)))
    _main_refuses(tmp_path, p, caplog,
                  rf"annotations_trainval2017.zip:annotations/instances_{split}2017.json: 1 image "
                  rf"entry repeats an earlier one's id or file \(each image must be listed "
                  rf"once\): images\[80\] {_name(again)} has the {shared} of "
                  rf"images\[{index}\] {_name(first)}$")


@pytest.mark.parametrize("change, shared", [
    ({"file_name": "elsewhere.jpg"}, "id"),
    ({"id": 999_999_999}, "file_name"),
], ids=["same id", "same file_name"])
def test_image_listed_in_both_splits_is_refused_naming_both(tmp_path, params, caplog, change,
                                                            shared):
    docs = copy.deepcopy(SOURCE)
    first = docs["train"]["images"][4]
    again = {**first, **change}
    docs["val"]["images"].insert(2, again)
    p = _params(params, str(_serve_docs(tmp_path, docs)))
    _main_refuses(tmp_path, p, caplog,
                  rf"annotations_trainval2017.zip: 1 image entry repeats an earlier one's id or "
                  rf"file \(each image must be listed once\): annotations/instances_val2017.json "
                  rf"images\[2\] {_name(again)} has the {shared} of "
                  rf"annotations/instances_train2017.json images\[4\] {_name(first)}$")


def test_many_duplicates_are_counted_and_the_first_named(tmp_path, params, caplog):
    docs = copy.deepcopy(SOURCE)
    docs["train"]["images"] += docs["train"]["images"][:7]
    p = _params(params, str(_serve_docs(tmp_path, docs)))
    message = _main_refuses(tmp_path, p, caplog, r"instances_train2017.json: 7 image entries "
                                                 r"repeat .*; and 2 more$")
    assert message.count(" has the id and file_name of ") == 5


def test_one_picture_under_two_ids_and_names_is_downloaded(tmp_path, params):
    """Not a duplicate: the same bytes under another id and file name (finding those is an
    analysis of leakage and near-duplicates, not download's)."""
    docs = copy.deepcopy(SOURCE)
    original = docs["val"]["images"][0]
    twin = {**original, "id": 999_999_999, "file_name": "000999999999.jpg"}
    twin.pop("coco_url")
    docs["val"]["images"].append(twin)
    docs["val"]["annotations"] += [{**a, "id": a["id"] + 10 ** 12, "image_id": twin["id"]}
                                   for a in docs["val"]["annotations"]
                                   if a["image_id"] == original["id"]]
    served = _serve_docs(tmp_path, docs)
    shutil.copy(served / "val2017" / original["file_name"], served / "val2017" / twin["file_name"])
    manifest = download.run(_params(params, str(served), max_images={"train": 1, "val": None}),
                            tmp_path / "raw")
    records = {r["id"]: r for r in manifest["splits"]["val"]["images"]}
    assert len(records) == 81
    assert records[twin["id"]]["sha256"] == records[original["id"]]["sha256"]
    written = json.loads((tmp_path / "raw" / "annotations" / "instances_val.json").read_text())
    assert sum(a["image_id"] == twin["id"] for a in written["annotations"]) == \
        sum(a["image_id"] == original["id"] for a in written["annotations"]) > 0


@pytest.mark.parametrize("split, key, index, field, value, message", [
    ("train", "images", 3, "id", "262145", r"images\[3\]: id '262145' is not an integer"),
    ("val", "images", 0, "id", True, r"images\[0\]: id True is not an integer"),
    ("train", "images", 1, "file_name", 7, r"images\[1\]: file_name 7 is not a string"),
    ("val", "annotations", 5, "image_id", [1],
     r"annotations\[5\]: image_id \[1\] is not an integer"),
], ids=["string id", "boolean id", "number file_name", "list image_id"])
def test_ids_that_are_not_integers_are_refused(tmp_path, params, caplog, split, key, index, field,
                                               value, message):
    """Ids are compared, sorted and matched across files (a string beside integers made
    the sort crash; True equals id 1)."""
    docs = copy.deepcopy(SOURCE)
    docs[split][key][index][field] = value
    p = _params(params, str(_serve_docs(tmp_path, docs)))
    _main_refuses(tmp_path, p, caplog, rf"instances_{split}2017.json: {message}$")


def test_masks_readers_refuse_an_image_listed_twice(tmp_path):
    """coco's readers, which masks uses on download's files or any handed to it, refuse
    them too, streamed and whole."""
    docs, first, again = _listed_twice("val", 9, {"file_name": "x.jpg"})
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(docs["val"]))
    message = (rf"instances_val.json: 1 image entry repeats .*: images\[80\] {_name(again)} has "
               rf"the id of images\[9\] {_name(first)}$")
    with pytest.raises(coco.AnnotationError, match=message):
        coco.read_instances(path)
    with pytest.raises(coco.AnnotationError, match=message):
        coco.stream_instances(lambda: open(path, "rb"), str(path), list, list)


# Item 4: archive members checked before extraction, then read with a byte cap.

@pytest.fixture
def served_archives(mirrors, tmp_path) -> Path:
    root, _ = mirrors[2017]
    served = tmp_path / "served"
    shutil.copytree(root, served)
    return served


def _train_member(index: int = 0) -> str:
    return f"train2017/{sorted(im['file_name'] for im in SOURCE['train']['images'])[index]}"


def _archive_params(params: dict, served: Path, **limits) -> dict:
    p = _mirror_params(params, str(served), 2017, mode="archives",
                       max_images={"train": 2, "val": 2})
    p["data"]["limits"].update(limits)
    return p


def test_archive_member_over_image_bytes_is_refused_before_extraction(served_archives, tmp_path,
                                                                      params, caplog):
    member = _train_member(5)
    rewrite_zip(served_archives / "zips" / "train2017.zip", {member: random.randbytes(400_001)})
    p = _archive_params(params, served_archives, image_bytes=400_000)
    _main_refuses(tmp_path, p, caplog,
                  rf"zips/train2017.zip: refusing an archive whose members unpack too far: "
                  rf"{member}: 400001 bytes unpacked, over limits.image_bytes \(400000\)$")


def test_archive_member_with_a_high_compression_ratio_is_refused(served_archives, tmp_path,
                                                                 params, caplog):
    member = _train_member(9)
    rewrite_zip(served_archives / "zips" / "train2017.zip", {member: bytes(300_000)},
                zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(served_archives / "zips" / "train2017.zip") as zf:
        packed = zf.getinfo(member).compress_size
    assert packed < 3000
    p = _archive_params(params, served_archives)
    _main_refuses(tmp_path, p, caplog,
                  rf"zips/train2017.zip: refusing an archive whose members unpack too far: "
                  rf"{member}: 300000 bytes unpacked from {packed}, over "
                  rf"limits.compression_ratio \(100x\)$")


@pytest.mark.parametrize("entry", [
    "train2017/notes.txt", "train2017/sub/", "train2017/sub/000000000009.jpg",
    f"train2017/{SOURCE['val']['images'][0]['file_name']}", "val2017/", "__MACOSX/._x.jpg",
    "evil.sh",
], ids=["unlisted file", "subfolder", "in a subfolder", "a val image", "val folder",
        "other folder", "top level"])
def test_archive_entry_that_is_not_an_image_of_the_split_is_refused(served_archives, tmp_path,
                                                                    params, caplog, entry):
    rewrite_zip(served_archives / "zips" / "train2017.zip", {entry: b"" if entry.endswith("/")
                                                            else b"\xff\xd8x"})
    p = _archive_params(params, served_archives)
    _main_refuses(tmp_path, p, caplog,
                  rf"zips/train2017.zip: refusing an archive with entries that are not images "
                  rf"of train2017 in its annotations \(1\): '{re.escape(entry)}'$")


def test_extraction_stops_at_the_cap_whatever_the_header_says(served_archives, tmp_path):
    """A header can lie: the member is read with a byte cap all the same, and nothing of it
    stays."""
    archive = served_archives / "zips" / "train2017.zip"
    names = {im["file_name"] for im in SOURCE["train"]["images"]}
    reader = download._ArchiveReader(archive, "train2017.zip", "train2017", names,
                                     download.UnpackBound("image_bytes", 10 ** 6, 100))
    member = _train_member(0)
    with zipfile.ZipFile(archive) as zf:
        size = zf.getinfo(member).file_size
    reader.bound = download.UnpackBound("image_bytes", size - 1, 100)   # what a lie would do
    dest = tmp_path / "out" / "x.jpg"
    with pytest.raises(StageError, match=rf"train2017.zip: refusing {member}: it unpacks past "
                                         rf"limits.image_bytes {size - 1}, or "
                                         rf"limits.compression_ratio 100 x {size} packed bytes$"):
        reader.extract(member, dest)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("size, whole", [(4999, True), (5000, False), (3 << 20, False)])
def test_copy_capped_never_writes_or_reads_far_past_the_cap(size, whole):
    source, out = io.BytesIO(b"x" * size), io.BytesIO()
    assert download.copy_capped(source, out, 4999) is whole
    if whole:
        assert out.getvalue() == b"x" * size
    else:
        assert len(out.getvalue()) <= 4999 and source.tell() <= 5000



# Item 5: every string and number, the nesting and the members' size bounded while reading
# (a 64 MiB string took 117 s, quadratic in yajl; see coco.JSONScan).

STRING_BYTES = 4096
LONG = "".join(random.Random(5).choice("abcdefghij") for _ in range(STRING_BYTES + 1))


def _set(path: str, value: object):
    """An edit of a document setting the value at a dotted path (list indices as numbers)."""
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]

    def edit(doc: dict) -> None:
        target = functools.reduce(lambda node, key: node[key], parents, doc)
        target[last] = value
    return edit


@pytest.mark.parametrize("edit, where, kind", [
    (_set("info", {"description": LONG}), "info.description", "string"),
    (_set("annotations.2.area", int("1" * (STRING_BYTES + 1))), r"annotations\[2\].area",
     "number"),
    (_set("categories.4.name", '"' * (STRING_BYTES // 2 + 1)), r"categories\[4\].name", "string"),
    (_set(f"images.1.{LONG}", 1), r"a key in images\[1\]", "string"),
], ids=["info string", "number", "escaped quotes", "key"])
def test_long_json_scalar_is_refused_naming_its_key_path(tmp_path, params, caplog, edit, where,
                                                         kind):
    doc = copy.deepcopy(SOURCE["train"])
    edit(doc)
    p = _params(params, str(_serve_docs(tmp_path, {"train": doc, "val": SOURCE["val"]})))
    p["data"]["limits"]["json_string_bytes"] = STRING_BYTES
    _main_refuses(tmp_path, p, caplog,
                  rf"annotations_trainval2017.zip:annotations/instances_train2017.json: {where} "
                  rf"is a {kind} of over {STRING_BYTES} bytes \(limits.json_string_bytes\), at "
                  rf"byte \d+$")


def test_long_string_after_json_only_the_json_module_reads_is_refused_too(tmp_path, params,
                                                                           caplog):
    doc = {"info": {"note": TOO_BIG_FOR_YAJL, "description": LONG}, **SOURCE["train"]}
    p = _params(params, str(_serve_docs(tmp_path, {"train": doc, "val": SOURCE["val"]})))
    p["data"]["limits"]["json_string_bytes"] = STRING_BYTES
    _main_refuses(tmp_path, p, caplog,
                  r"instances_train2017.json: the value is a string of over 4096 bytes "
                  r"\(limits.json_string_bytes\), at byte 57$")


def test_a_long_string_is_cut_off_at_the_bound(tmp_path):
    """The parser never sees more of a long value than the bound and a read: yajl re-reads
    a token from its start at each read, so a 16 MiB string cost seconds, 64 MiB minutes."""
    text = b'{"info": {"description": "' + b"x" * (16 << 20) + b'"}}'
    raw = io.BytesIO(text)
    reader = coco.BoundedReader(raw, "a.json", 1 << 20, len(text), lambda: io.BytesIO(text),
                                "limits.json_string_bytes", "limits.annotations_bytes")
    with pytest.raises(coco.LimitError, match=r"^a.json: info.description is a string of over "
                                              r"1048576 bytes \(limits.json_string_bytes\), at "
                                              r"byte 25$"):
        coco.top_level_value(reader, "info")
    assert raw.tell() <= (1 << 20) + 2 * coco.READ_BYTES


def test_annotation_member_over_annotations_bytes_is_refused_before_reading(tmp_path, params,
                                                                            caplog):
    served = _serve_docs(tmp_path, SOURCE)
    with zipfile.ZipFile(served / ANN_ZIP) as zf:
        size = zf.getinfo("annotations/instances_train2017.json").file_size
    p = _params(params, str(served))
    p["data"]["limits"]["annotations_bytes"] = size - 1
    _main_refuses(tmp_path, p, caplog,
                  rf"annotations_trainval2017.zip: refusing annotations/instances_train2017.json: "
                  rf"{size} bytes unpacked, over limits.annotations_bytes \({size - 1}\)$")


def test_annotation_member_with_a_high_compression_ratio_is_refused(tmp_path, params, caplog):
    """JSON padded with whitespace (valid, and it packs to almost nothing)."""
    served = _serve_docs(tmp_path, {"train": json.dumps(SOURCE["train"]) + " " * (4 << 20),
                                    "val": SOURCE["val"]})
    p = _params(params, str(served))
    p["data"]["limits"]["compression_ratio"] = 10       # the sample's JSON packs 8.7x
    _main_refuses(tmp_path, p, caplog,
                  r"annotations_trainval2017.zip: refusing annotations/instances_train2017.json: "
                  r"\d+ bytes unpacked from \d+, over limits.compression_ratio \(10x\)$")


def test_reading_stops_at_the_size_bound_whatever_the_header_says():
    raw = io.BytesIO(b"[" + b"1, " * 5000 + b"1]")
    reader = coco.BoundedReader(raw, "a.json", 1024, 4096, None, "limits.json_string_bytes",
                                "limits.annotations_bytes 4096")
    with pytest.raises(coco.LimitError, match=r"^a.json: unpacks to more than 4096 bytes "
                                              r"\(limits.annotations_bytes 4096\)$"):
        list(coco.array_items(reader, "x"))


def test_deep_nesting_is_refused_before_parsing(tmp_path, params, caplog):
    """ijson's prefixes grow with the depth (memory quadratic in it: 1 GB at 20,000 levels)
    and the json module recurses per level: 2000 levels made the subset's json.dumps raise
    RecursionError."""
    text = '{"info": {"a": ' + "[" * 2000 + "]" * 2000 + "}, " + json.dumps(SOURCE["train"])[1:]
    p = _params(params, str(_serve_docs(tmp_path, {"train": text, "val": SOURCE["val"]})))
    _main_refuses(tmp_path, p, caplog,
                  r"instances_train2017.json: arrays and objects nested over 500 deep \(the most "
                  r"the json module writes back\) in info.a\[0\]\[0\].*\.\.\., at byte 513$")


def test_integer_of_over_4300_digits_is_refused_without_a_crash(tmp_path, params):
    """int() refuses over 4300 digits; ijson handed it one from its first read and the
    interpreter died (SIGSEGV). Through the command line: exit code 2, one error line."""
    text = '{"info": {"version": ' + "9" * 5000 + "}, " + json.dumps(SOURCE["train"])[1:]
    served = _serve_docs(tmp_path, {"train": text, "val": SOURCE["val"]})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params(params, str(served))))
    done = subprocess.run(
        [sys.executable, "-m", "stages.download", "--params", str(params_file),
         "--out", str(tmp_path / "raw")], cwd=Path(download.__file__).parents[1],
        capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert (done.returncode, len(errors)) == (2, 1), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert errors[0].endswith("instances_train2017.json: not valid JSON: Exceeds the limit "
                              "(4300 digits) for integer string conversion: value has 5000 "
                              "digits; use sys.set_int_max_str_digits() to increase the limit")
    assert not (tmp_path / "raw").exists()


def test_download_refuses_an_unwritable_output_before_fetching(tmp_path, params, caplog):
    from unwritable import blocked_folder

    out = blocked_folder(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_params(params, str(SAMPLE))))
    code = download.main(["--params", str(path), "--out", str(out),
                          "--checkpoints", str(tmp_path / "ck")])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(f"{out.parent}: output folder not writable")
    assert not (tmp_path / "ck").exists()            # refused before any work: nothing staged
