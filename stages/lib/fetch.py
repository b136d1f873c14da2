"""Resumable, verified file transfers from a COCO-server-like tree (http(s)://, file:// or a
local folder).

Written by hand rather than with a download library because the guarantees are the point
and no well-kept library gives all of them together: HTTP Range resume that notices a
server ignoring Range, Retry-After, a size and checksum check before a file gets its final
name, and a caller's own content check (a JPEG must decode) that triggers a fresh fetch.
A file lives under `<dest>.part` until it is complete and verified; then it is fsynced and
renamed. A rerun resumes `.part` files and skips files under their final name.
"""
from __future__ import annotations

import email.utils
import hashlib
import http.client
import logging
import os
import random
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

log = logging.getLogger("fetch")

# SHA-1s of the official 2017 archives, as published beside them (and used by GluonCV's
# and PyTorch-Encoding's COCO scripts). No digests are published for 2014.
OFFICIAL_HOST = "images.cocodataset.org"
OFFICIAL_CHECKSUMS = {
    "zips/train2017.zip": "sha1:10ad623668ab00c62c096f0ed636d6aff41faca5",
    "zips/val2017.zip": "sha1:4950dc9d00dbe1c933ee0170f5797584351d2a41",
    "annotations/annotations_trainval2017.zip": "sha1:8551ee4bb5860311e79dace7e79cb91e432e78b3",
}
_PERMANENT = {400, 401, 403, 404, 405, 410, 451}
_MAX_RETRY_AFTER_S = 600.0
_CHUNK = 1 << 16


class FetchError(Exception):
    """A file that could not be fetched after every attempt (message names its URL)."""


class CorruptFile(ValueError):
    """Complete by size, but its content is wrong: fetched again from scratch."""


class _RetryAfter(Exception):
    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


class _Permanent(Exception):
    """Retrying cannot help (404, a missing local file...)."""


@dataclass
class Counters:
    """What a run did, for the end-of-stage summary (thread-safe)."""

    fetched: int = 0
    extracted: int = 0
    skipped: int = 0
    retried: int = 0
    received_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)


def backoff_seconds(attempt: int, base: float, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter, so parallel retries do not stampede."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP-date) in seconds, capped; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = now or datetime.now(timezone.utc)
    return min(max((when - now).total_seconds(), 0.0), _MAX_RETRY_AFTER_S)


def parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, total or None) of 'bytes a-b/total'; None if unreadable."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    first, _, _ = span.partition("-")
    if not first.isdigit():
        return None
    return int(first), int(total) if total.isdigit() else None


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: Path, expected: str) -> None:
    algorithm, _, want = expected.partition(":")
    got = file_digest(path, algorithm)
    if got != want:
        raise CorruptFile(f"{algorithm} {got} differs from the expected {want}")


class Fetcher:
    """Fetch files by their path under `base` into destinations on disk."""

    def __init__(self, base: str, *, timeout_s: float = 60.0, retries: int = 4,
                 backoff_s: float = 0.5, checksums: dict[str, str] | None = None,
                 on_bytes: Callable[[int], None] | None = None):
        self.base = base
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        parts = urllib.parse.urlsplit(base)
        self.remote = parts.scheme in ("http", "https")
        official = OFFICIAL_CHECKSUMS if parts.hostname == OFFICIAL_HOST else {}
        self.checksums = {**official, **(checksums or {})}
        self.on_bytes = on_bytes or (lambda n: None)
        self.counters = Counters()

    def url(self, relpath: str) -> str:
        return f"{self.base.rstrip('/')}/{relpath}"

    def local_path(self, relpath: str) -> Path | None:
        """The file itself when the base is a folder or file:// URL (no copy needed)."""
        if self.remote:
            return None
        parts = urllib.parse.urlsplit(self.base)
        root = Path(urllib.parse.unquote(parts.path)) if parts.scheme == "file" else Path(self.base)
        return root / relpath

    def fetch(self, relpath: str, dest: Path, check: Callable[[Path], None] | None = None) -> bool:
        """Make `dest` a complete, verified copy of base/relpath. False if it already was."""
        if dest.exists():
            self.counters.add(skipped=1)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        problem: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.counters.add(retried=1)
                delay = problem.seconds if isinstance(problem, _RetryAfter) else \
                    backoff_seconds(attempt - 1, self.backoff_s)
                log.warning("retry %d/%d of %s in %.2fs: %s", attempt, self.retries,
                            self.url(relpath), delay, problem)
                time.sleep(delay)
            try:
                self._transfer(relpath, part)
                self._verify(relpath, part, check)
            except _Permanent as exc:
                raise FetchError(f"{self.url(relpath)}: {exc}") from None
            except CorruptFile as exc:
                part.unlink(missing_ok=True)   # bad content: the next attempt starts over
                if not self.remote:            # a local file will not change by retrying
                    raise FetchError(f"{self.url(relpath)}: {exc}") from None
                problem = exc
            except (_RetryAfter, OSError, http.client.HTTPException) as exc:
                problem = exc
            else:
                _fsync(part)
                os.replace(part, dest)
                self.counters.add(fetched=1)
                return True
        raise FetchError(f"{self.url(relpath)}: {problem} (gave up after {self.retries + 1} attempts)")

    # ------------------------------------------------------------ one attempt

    def _transfer(self, relpath: str, part: Path) -> None:
        if not self.remote:
            self._copy_local(relpath, part)
            return
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "segflow", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.url(relpath), headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and _complete_already(exc, offset):
                return   # every byte arrived before an interruption: only verification left
            self._raise_for_status(exc, part)
        with response:
            offset, total = self._resume_point(response, offset)
            self._write_body(response, part, offset)
        size = part.stat().st_size
        if total is not None and size != total:
            raise ConnectionError(f"truncated body: {size} of {total} bytes")

    def _raise_for_status(self, exc: urllib.error.HTTPError, part: Path):
        exc.close()
        if exc.code == 416:       # our partial file is no prefix of theirs: start over
            part.unlink(missing_ok=True)
            raise ConnectionError("HTTP 416 (range not satisfiable): restarting") from None
        if exc.code in _PERMANENT:
            raise _Permanent(f"HTTP {exc.code} {exc.reason}") from None
        wait = retry_after_seconds(exc.headers.get("Retry-After"))
        if wait is not None:
            raise _RetryAfter(f"HTTP {exc.code} {exc.reason}, Retry-After {wait:g}s", wait) from None
        raise ConnectionError(f"HTTP {exc.code} {exc.reason}") from None

    def _resume_point(self, response, offset: int) -> tuple[int, int | None]:
        """Where the body starts in the file, and the file's full size when known."""
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if response.status == 206:
            span = parse_content_range(response.headers.get("Content-Range"))
            if span is None or span[0] != offset:
                raise ConnectionError(f"unusable Content-Range {response.headers.get('Content-Range')!r}")
            total = span[1] if span[1] is not None else (offset + length if length is not None else None)
            return offset, total
        if offset:
            log.info("%s ignored the Range request: fetching the whole file again", response.url)
        return 0, length

    def _write_body(self, response, part: Path, offset: int) -> None:
        with open(part, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                self.counters.add(received_bytes=len(chunk))
                self.on_bytes(len(chunk))

    def _copy_local(self, relpath: str, part: Path) -> None:
        source = self.local_path(relpath)
        try:
            shutil.copyfile(source, part)
        except FileNotFoundError:
            raise _Permanent(f"no such file {source}") from None
        self.counters.add(received_bytes=part.stat().st_size)
        self.on_bytes(part.stat().st_size)

    def _verify(self, relpath: str, part: Path, check: Callable[[Path], None] | None) -> None:
        expected = self.checksums.get(relpath)
        if expected:
            verify_checksum(part, expected)
        if check is not None:
            check(part)


def _complete_already(exc: urllib.error.HTTPError, offset: int) -> bool:
    """A 416 whose Content-Range (bytes */total) says our partial file is the whole file."""
    value = exc.headers.get("Content-Range") or ""
    total = value.rpartition("/")[2]
    return value.startswith("bytes */") and total.isdigit() and int(total) == offset


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
