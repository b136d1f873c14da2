"""Atomic writes: a killed stage never leaves a half-written file under its final name."""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

# mkstemp/mkdtemp create private (0600/0700) files; final outputs get the usual mode.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if not _inside_atomic_dir(final):
            _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; swap it in only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _sync_filesystem(tmp)
        _swap_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(src: str | Path, final: str | Path) -> None:
    """Move a finished folder (e.g. a resumable staging folder) to `final` in one rename,
    replacing what was there; copies only when the two are on different file systems."""
    src, final = Path(src), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(src).st_dev == os.stat(final.parent).st_dev:
        _swap_in(src, final)
        return
    with atomic_dir(final) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    shutil.rmtree(src)


def _swap_in(folder: Path, final: Path) -> None:
    os.chmod(folder, 0o777 & ~_UMASK)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(folder, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, final)


def write_json(path: str | Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | Path, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def json_safe(obj: object) -> object:
    """NaN and inf become null, numpy scalars become Python numbers: DVC reads plain JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _inside_atomic_dir(path: Path) -> bool:
    """True for a file in a folder atomic_dir() is filling (named .<name>.<random>.tmp, also
    when a worker process writes it): that folder is synced once, as a whole, before its
    rename, so an fsync per file (~4 ms each, most of a mask's cost) would buy nothing."""
    return any(p.name.startswith(".") and p.name.endswith(".tmp") for p in path.parents)


def _sync_filesystem(path: Path) -> None:
    """Flush everything written to path's file system (Linux syncfs), else the whole system."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
