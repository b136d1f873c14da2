"""stages/lib/io.py: atomic outputs, and where durability is paid for."""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import ROOT, SAMPLE, small_params
from stages.lib import io
from unwritable import blocked_folder, can_mount_read_only, read_only_command


@pytest.fixture
def synced(monkeypatch):
    calls = {"file": [], "fs": []}
    monkeypatch.setattr(io, "fsync_file", lambda p: calls["file"].append(p.name))
    monkeypatch.setattr(io, "_sync_filesystem", lambda p: calls["fs"].append(p))
    return calls


def test_a_lone_file_is_fsynced_before_its_rename(tmp_path, synced):
    with io.atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "a.txt").read_text() == "x"
    assert len(synced["file"]) == 1 and synced["file"][0].startswith(".a.txt.")


def test_files_of_an_atomic_dir_are_synced_once_with_the_folder(tmp_path, synced):
    with io.atomic_dir(tmp_path / "out") as folder:
        for i in range(5):
            with io.atomic_path(folder / "sub" / f"{i}.png") as tmp:
                tmp.write_bytes(b"png")
        assert not (tmp_path / "out").exists()
    assert synced["file"] == []                       # no fsync per file...
    assert len(synced["fs"]) == 1                     # ...one sync of the file system
    assert (sorted(p.name for p in (tmp_path / "out" / "sub").iterdir())
            == [f"{i}.png" for i in range(5)])


def test_failed_atomic_dir_leaves_nothing(tmp_path, synced):
    with pytest.raises(RuntimeError):
        with io.atomic_dir(tmp_path / "out") as folder:
            (folder / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [] and synced["fs"] == []


def test_sync_filesystem_really_runs(tmp_path):
    io._sync_filesystem(tmp_path)   # syncfs via libc, or os.sync: must not raise


class _SpyLibc:
    """Stands in for ctypes.CDLL(None): records which file each syncfs call was given (the
    fd is closed right after, so it is identified by (st_dev, st_ino) while still open)."""

    def __init__(self, result: int):
        self.result, self.calls = result, []

    def syncfs(self, fd):
        st = os.fstat(fd)
        self.calls.append((st.st_dev, st.st_ino))
        return self.result


def test_sync_filesystem_calls_syncfs_on_the_path(tmp_path, monkeypatch):
    libc, synced_all = _SpyLibc(0), []
    monkeypatch.setattr(io.ctypes, "CDLL", lambda *a, **kw: libc)
    monkeypatch.setattr(io.os, "sync", lambda: synced_all.append(True))
    io._sync_filesystem(tmp_path)
    st = os.stat(tmp_path)
    assert libc.calls == [(st.st_dev, st.st_ino)]
    assert synced_all == []                           # syncfs worked: no whole-system sync


def test_sync_filesystem_falls_back_to_os_sync(tmp_path, monkeypatch):
    libc, synced_all = _SpyLibc(-1), []               # syncfs fails: sync everything
    monkeypatch.setattr(io.ctypes, "CDLL", lambda *a, **kw: libc)
    monkeypatch.setattr(io.os, "sync", lambda: synced_all.append(True))
    io._sync_filesystem(tmp_path)
    assert len(libc.calls) == 1 and synced_all == [True]


def test_publish_dir_replaces_and_keeps_no_old_copy(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "old.txt").write_text("old")
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "new.txt").write_text("new")
    io.publish_dir(tmp_path / "staging", tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["new.txt"]
    assert oct(os.stat(tmp_path / "final").st_mode & 0o777) != "0o700"


# ---------------------------------------------------------------- stale temporaries (item 8)
# A stage killed with SIGKILL leaves its temporaries beside its outputs; the next run of a
# stage writing those outputs removes them when it starts, unless their owner still runs.

HALF_WRITER = """
import sys, time
from pathlib import Path
from stages.lib import io
out = Path(sys.argv[1])
with io.atomic_dir(out) as folder:
    with io.atomic_path(folder / "train" / "a.png") as tmp:
        tmp.write_bytes(b"half a mask")
        print("ready", flush=True)
        time.sleep(120)
"""


def half_writer(out: Path) -> subprocess.Popen:
    """A process in the middle of writing `out`, as a stage is when it gets killed."""
    child = subprocess.Popen([sys.executable, "-c", HALF_WRITER, str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    return child


def hidden(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(".")}


def tiny_raw(root: Path) -> Path:
    """Two plain 12x8 JPEGs per split, no annotation: enough for a masks run."""
    categories = [{"id": 1, "name": "person", "supercategory": "person"},
                  {"id": 3, "name": "car", "supercategory": "vehicle"}]
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        images = []
        for image_id in (1, 2):
            Image.new("RGB", (12, 8), (40 * image_id, 90, 30)).save(
                root / "images" / split / f"{split}{image_id}.jpg")
            images.append({"id": image_id, "file_name": f"{split}{image_id}.jpg",
                           "width": 12, "height": 8})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": [], "categories": categories}))
    return root


def masks_main(tmp_path: Path, params: dict, raw: Path, out: Path) -> int:
    from stages import masks

    params = copy.deepcopy(params)
    params["masks"]["workers"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return masks.main(["--params", str(tmp_path / "params.yaml"), "--scheme", "person_car",
                       "--raw", str(raw), "--out", str(out)])


def age(path: Path, days: float) -> None:
    when = time.time() - days * 24 * 3600
    os.utime(path, (when, when))


def test_a_stage_removes_the_temporaries_dead_runs_left_and_only_those(tmp_path, params,
                                                                        caplog):
    caplog.set_level(logging.INFO)
    raw = tiny_raw(tmp_path / "raw")
    folder = tmp_path / "data" / "masks"
    out = folder / "person_car"
    killed = half_writer(out)
    killed.kill()                                       # kill -9, mid-write
    killed.wait()
    dead = hidden(folder)
    alive = half_writer(out)                            # a run still writing
    try:
        running = hidden(folder) - dead
        assert len(dead) == len(running) == 1
        [name] = running
        pid = alive.pid
        reused = f".person_car.{pid}-{start_ticks(pid) + 1}-reused.tmp"   # pid reused since
        (folder / reused).mkdir()
        (folder / ".person_car.abandon1.tmp").mkdir()   # older segflow: no owner recorded,
        age(folder / ".person_car.abandon1.tmp", days=2)   # untouched for two days
        (folder / ".person_car.recent12.tmp").write_text("")   # ...or only just written
        (folder / ".person_vehicle.1-1-other.tmp").mkdir()   # another output's
        assert masks_main(tmp_path, params, raw, out) == 0
        assert hidden(folder) == {name, ".person_car.recent12.tmp",
                                  ".person_vehicle.1-1-other.tmp"}
        assert (folder / name / "train").is_dir()       # the live run's work is intact
    finally:
        alive.kill()
        alive.wait()
    removed = sorted(r.getMessage() for r in caplog.records
                     if r.getMessage().startswith("removed"))
    assert removed == sorted([
        f"removed {folder / dead.pop()}, a temporary of person_car (its owner, pid "
        f"{killed.pid}, is gone)",
        f"removed {folder / reused}, a temporary of person_car (its owner, pid {pid}, is gone)",
        f"removed {folder / '.person_car.abandon1.tmp'}, a temporary of person_car (it names "
        "no owner and is over a day old)"])
    assert sorted(p.name for p in (out / "train").iterdir()) == ["train1.png", "train2.png"]


@pytest.mark.parametrize("old", [".person_car.1-1.old", ".person_car.old"])
def test_an_output_a_killed_swap_had_set_aside_is_restored(tmp_path, params, caplog, old):
    """Killed between atomic_dir's two renames: the previous output waits as .<name>...old
    and nothing holds the final name; the next run puts it back before anything else (here
    that run then fails, and the previous output is still there)."""
    folder = tmp_path / "data" / "masks"
    (folder / old).mkdir(parents=True)
    (folder / old / "metadata.csv").write_text("previous output\n")
    age(folder / old, days=2)
    assert masks_main(tmp_path, params, tmp_path / "no_raw", folder / "person_car") == 2
    assert (folder / "person_car" / "metadata.csv").read_text() == "previous output\n"
    assert hidden(folder) == set()
    assert f"{folder / 'person_car'}: restored from {old}" in caplog.text


def test_temporaries_name_their_owner_and_its_start(tmp_path):
    with io.atomic_path(tmp_path / "a.txt") as tmp:
        pid, start = re.fullmatch(r"\.a\.txt\.(\d+)-(\d+)-\w+\.tmp", tmp.name).groups()
    assert int(pid) == os.getpid() and int(start) == start_ticks(os.getpid())


def start_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])   # field 22: starttime


# ---------------------------------------------------------------- unwritable outputs (item 9)
# Checked when the stage starts, before any work: one line naming the folder, exit 2.

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, default_params):
    """4 train / 2 val real sample images with person_car masks, for a 1-epoch train."""
    from stages import download, masks

    root = tmp_path_factory.mktemp("unwritable")
    params = small_params(default_params, train=4, val=2, size=64, epochs=1)
    params["data"]["base_url"] = str(SAMPLE)
    params["train"]["device"] = "cpu"
    download.run(params, root / "raw")
    masks.run(params, "person_car", root / "raw", root / "masks")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def train_argv(data: Path, out: Path, live: Path, checkpoints: Path) -> list[str]:
    return ["--params", str(data / "params.yaml"), "--scheme", "person_car", "--seed", "0",
            "--raw", str(data / "raw"), "--masks", str(data / "masks"), "--out", str(out),
            "--live", str(live), "--checkpoints", str(checkpoints)]


@pytest.mark.parametrize("blocked", ["out", "live", "checkpoints"])
def test_train_refuses_an_unwritable_output_before_training(tmp_path, tiny_data, monkeypatch,
                                                            caplog, blocked):
    from stages import train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("training started"))
    paths = {"out": tmp_path / "model", "live": tmp_path / "live",
             "checkpoints": tmp_path / "checkpoints"}
    paths[blocked] = blocked_folder(tmp_path)
    assert train.main(train_argv(tiny_data, paths["out"], paths["live"],
                                 paths["checkpoints"])) == 2
    folder = tmp_path / "blocker" if blocked != "checkpoints" else paths["checkpoints"]
    name = {"out": "out", "live": "out", "checkpoints": "last.pt"}[blocked]
    reason = "a file, not a folder" if blocked != "checkpoints" else "Not a directory"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"{folder}: output folder not writable, {name} cannot be written there ({reason})"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.skipif(not can_mount_read_only(), reason="needs unshare and mount (root)")
def test_train_on_a_read_only_file_system_stops_before_training(tmp_path, tiny_data):
    """As a user meets it: the model folder on a read-only mount, the stage run as a
    command. It must stop before reading any data (no training log line, no checkpoint)."""
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    argv = [sys.executable, "-m", "stages.train",
            *train_argv(tiny_data, read_only / "model", tmp_path / "live",
                        tmp_path / "checkpoints")]
    started = time.perf_counter()
    done = subprocess.run(read_only_command(read_only, argv), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    print(f"train stopped after {time.perf_counter() - started:.1f} s")   # measured, not timed
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].endswith(
        f"train ERROR {read_only}: output folder not writable, model cannot be written there "
        "(Read-only file system)"), done.stderr[-2000:]
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["read_only"]
