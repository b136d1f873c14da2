"""Atomic writes: a killed stage never leaves a half-written file under its final name.

Temporaries live beside their final path as `.<name>.<pid>-<start>-<random>.tmp` (and
`.<name>.<pid>-<start>.old` for the moment of a folder swap): they name the process that
owns them, with its start time so that a reused pid is not mistaken for it, and
prepare_output() removes those whose owner is gone when a stage starts."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

# mkstemp/mkdtemp create private (0600/0700) files; final outputs get the usual mode.
_UMASK = os.umask(0)
os.umask(_UMASK)
# Temporaries of an older segflow name no owner: removed only once surely abandoned (no
# stage writes a file or folder for a day without touching it).
UNOWNED_STALE_S = 24 * 3600


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(final), suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if not _inside_atomic_dir(final):
            fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; swap it in only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final), suffix=".tmp", dir=final.parent))
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
        old = final.with_name(f".{final.name}.{_owner_tag()}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(folder, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, final)


# ---------------------------------------------------------------- a stage's start

def prepare_output(final: str | Path, log: logging.Logger) -> None:
    """Before any work: the folder of `final` exists and takes a new file (else StageError
    naming it), and the temporaries of `final` that dead runs left are gone."""
    final = Path(final)
    _check_writable(final)
    for stale, why in stale_temporaries(final):
        _clear(stale, final, why, log)


def _check_writable(final: Path) -> None:
    # os.access() says yes for root and on a read-only mount: only creating a file tells.
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_temporary_prefix(final), suffix=".tmp",
                                     dir=final.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        from stages.lib.cli import StageError  # cli imports this module
        reason = ("a file, not a folder" if final.parent.is_file() else exc.strerror or exc)
        raise StageError(f"{final.parent}: output folder not writable, {final.name} cannot "
                         f"be written there ({reason})") from None


def stale_temporaries(final: Path) -> list[tuple[Path, str]]:
    """The temporaries of `final` beside it whose owner is gone, with why they are stale."""
    owned = re.compile(rf"\.{re.escape(final.name)}\.(?:(\d+)-(\d+)(?:-[a-z0-9_]+\.tmp|\.old)"
                       r"|[a-z0-9_]+\.tmp|old)")
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return []
    stale = []
    for path in sorted(entries):
        match = owned.fullmatch(path.name)
        if not match:
            continue
        pid, start = match.groups()
        if pid is not None and not _owner_alive(int(pid), int(start)):
            stale.append((path, f"its owner, pid {pid}, is gone"))
        elif pid is None and time.time() - path.lstat().st_mtime > UNOWNED_STALE_S:
            stale.append((path, "it names no owner and is over a day old"))
    return stale


def _clear(stale: Path, final: Path, why: str, log: logging.Logger) -> None:
    try:
        if stale.name.endswith(".old") and not final.exists():
            # Killed between _swap_in's two renames: this is the previous output, whole.
            os.replace(stale, final)
            log.warning("%s: restored from %s (%s)", final, stale.name, why)
            return
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink()
        log.info("removed %s, a temporary of %s (%s)", stale, final.name, why)
    except OSError as exc:
        log.warning("could not remove %s, a temporary of %s: %s", stale, final.name, exc)


def _temporary_prefix(final: Path) -> str:
    return f".{final.name}.{_owner_tag()}-"


def _owner_tag() -> str:
    return _tag_of(os.getpid())   # per call: a forked worker is another owner


@functools.lru_cache(maxsize=None)
def _tag_of(pid: int) -> str:
    return f"{pid}-{_start_ticks(pid) or 0}"


def _start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks after boot, /proc/<pid>/stat field 22); None
    without such a process or without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Field 2, the command, is in parentheses and may hold spaces and parentheses itself.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _owner_alive(pid: int, start: int) -> bool:
    ticks = _start_ticks(pid)
    if ticks is not None:
        return ticks == start       # another start time: the pid was reused
    if os.path.isdir("/proc"):
        return False
    try:                            # no /proc (macOS): whether the pid is taken at all
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    rename, so an fsync per file (most of a mask's write time) would buy nothing."""
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


def fsync_file(path: Path) -> None:
    """Flush `path`'s bytes to the disk before it is renamed into place: a crash after the
    rename must not leave the final name holding an empty or partial file."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
