"""download: from the embedded sample as a local folder, a file:// URL and a loopback HTTP
server; reproducible selection, exact annotation subsets, manifest checksums, errors."""
from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import json
import random
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


def _selected_ids(split: str, n: int | None, seed: int) -> list[int]:
    return [im["id"] for im in download.select_images(SOURCE[split]["images"], n, seed)]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


class _FlakyHandler(_QuietHandler):
    """The first request for each path in `flaky` fails once: 503, or a truncated body."""

    flaky: dict[str, str] = {}
    seen: list[str] = []

    def do_GET(self):
        type(self).seen.append(self.path)
        mode = type(self).flaky.pop(self.path, None)
        if mode == "503":
            self.send_error(503, "busy")
        elif mode == "truncate":
            body = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        else:
            super().do_GET()


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
        assert written["annotations"] == [a for a in source["annotations"]
                                          if a["image_id"] in chosen]
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


def test_http_retries_after_503_and_truncated_body(serve, tmp_path, params):
    train_ids = _selected_ids("train", MAX["train"], SEED)
    by_id = {im["id"]: im for im in SOURCE["train"]["images"]}
    busy = f"/train2017/{by_id[train_ids[0]]['file_name']}"
    cut = f"/train2017/{by_id[train_ids[1]]['file_name']}"
    _FlakyHandler.flaky = {busy: "503", cut: "truncate",
                           "/annotations/annotations_trainval2017.zip": "truncate"}
    _FlakyHandler.seen = []
    base = serve(SAMPLE, _FlakyHandler)
    out = tmp_path / "raw"
    p = _params(params, base)
    p["data"]["retries"] = 2
    manifest = download.run(p, out)
    _check_output(out, manifest, base)
    assert _FlakyHandler.flaky == {}  # every failure was served
    assert _FlakyHandler.seen.count(busy) == 2 and _FlakyHandler.seen.count(cut) == 2
    assert _FlakyHandler.seen.count("/annotations/annotations_trainval2017.zip") == 2


def test_http_truncated_body_without_retries_is_an_error(serve, tmp_path, params):
    by_id = {im["id"]: im for im in SOURCE["val"]["images"]}
    cut = f"/val2017/{by_id[_selected_ids('val', MAX['val'], SEED)[0]]['file_name']}"
    _FlakyHandler.flaky = {cut: "truncate"}
    base = serve(SAMPLE, _FlakyHandler)
    target = tmp_path / "target"
    with pytest.raises(StageError, match=rf"cannot fetch {base}{cut}: truncated body"):
        download.run(_params(params, base), target / "raw")   # retries = 0
    assert not target.exists() or list(target.iterdir()) == []


def test_null_max_images_takes_every_image(tmp_path, params):
    out = tmp_path / "raw"
    limits = {"train": None, "val": 2}
    manifest = download.run(_params(params, str(SAMPLE), max_images=limits), out)
    assert len(manifest["splits"]["train"]["images"]) == 80
    assert len(list((out / "images" / "train").iterdir())) == 80
    _check_output(out, manifest, str(SAMPLE), max_images=limits)


def test_404_names_the_url_and_leaves_no_output(serve, tmp_path, params):
    served = tmp_path / "served"
    (served / "annotations").mkdir(parents=True)
    shutil.copy(SAMPLE / "annotations" / "annotations_trainval2017.zip", served / "annotations")
    by_id = {split: {im["id"]: im for im in SOURCE[split]["images"]} for split in SOURCE}
    for split in ("train", "val"):
        (served / f"{split}2017").mkdir()
        for image_id in _selected_ids(split, MAX[split], SEED):
            name = by_id[split][image_id]["file_name"]
            shutil.copy(SAMPLE / f"{split}2017" / name, served / f"{split}2017" / name)
    missing = by_id["val"][_selected_ids("val", MAX["val"], SEED)[1]]["file_name"]
    (served / "val2017" / missing).unlink()
    base = serve(served)
    target = tmp_path / "out"
    out = target / "raw"
    with pytest.raises(StageError) as info:
        download.run(_params(params, base), out)
    message = str(info.value)
    assert f"{base}/val2017/{missing}" in message
    assert "404" in message
    assert not out.exists()
    assert list(target.iterdir()) == []   # no temporary folder left beside it either


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


def test_existing_output_is_replaced(tmp_path, params):
    out = tmp_path / "raw"
    (out / "images").mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    download.run(_params(params, str(SAMPLE), max_images={"train": 1, "val": 1}), out)
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "images", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


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


def test_subset_instances_keeps_other_keys():
    data = {"info": {"year": 2017}, "images": [{"id": 1}, {"id": 2}], "categories": [1],
            "annotations": [{"id": 10, "image_id": 1}, {"id": 11, "image_id": 2},
                            {"id": 12, "image_id": 1}]}
    subset = download.subset_instances(data, [{"id": 1}])
    assert subset == {"info": {"year": 2017}, "images": [{"id": 1}], "categories": [1],
                      "annotations": [{"id": 10, "image_id": 1}, {"id": 12, "image_id": 1}]}


def test_image_relpath():
    assert download.image_relpath("val", 2017, "000000000139.jpg") == "val2017/000000000139.jpg"
    assert download.image_relpath("train", 2014, "COCO_train2014_000000000009.jpg") == \
        "train2014/COCO_train2014_000000000009.jpg"


@pytest.mark.parametrize("name", ["../x.jpg", "../../etc/passwd", "a/b.jpg", "/etc/passwd",
                                  "..", ".", "", "x.jpg/"])
def test_image_relpath_refuses_escapes(name):
    with pytest.raises(StageError, match="is not a plain file name"):
        download.image_relpath("val", 2017, name)


def test_backoff_is_bounded():
    assert all(0 <= download.backoff_seconds(a) <= min(30.0, 0.5 * 2 ** a) for a in range(12))
