"""stages/lib/io.py: atomic outputs, and where durability is paid for."""
from __future__ import annotations

import os

import pytest

from stages.lib import io


@pytest.fixture
def synced(monkeypatch):
    calls = {"file": [], "fs": []}
    monkeypatch.setattr(io, "_fsync_file", lambda p: calls["file"].append(p.name))
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
    assert sorted(p.name for p in (tmp_path / "out" / "sub").iterdir()) == [f"{i}.png" for i in range(5)]


def test_failed_atomic_dir_leaves_nothing(tmp_path, synced):
    with pytest.raises(RuntimeError):
        with io.atomic_dir(tmp_path / "out") as folder:
            (folder / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [] and synced["fs"] == []


def test_sync_filesystem_really_runs(tmp_path):
    io._sync_filesystem(tmp_path)   # syncfs via libc, or os.sync: must not raise


def test_publish_dir_replaces_and_keeps_no_old_copy(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "old.txt").write_text("old")
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "new.txt").write_text("new")
    io.publish_dir(tmp_path / "staging", tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["new.txt"]
    assert oct(os.stat(tmp_path / "final").st_mode & 0o777) != "0o700"
