"""Resumable, verified file transfers from a COCO-server-like tree (http(s)://, file:// or a
local folder).

Written by hand rather than with a download library because the guarantees are the point
and no well-kept library gives all of them together: HTTP Range resume that notices a
server ignoring Range, Retry-After, a size and checksum check before a file gets its final
name, and a caller's own content check (a JPEG must decode) that triggers a fresh fetch.
A file lives under `<dest>.part` until it is complete and verified; then it is fsynced and
renamed. A rerun resumes `.part` files and skips files under their final name.

Bounds on what a server can make a fetch write or wait for (params.yaml, data.limits):
- bytes: a file is capped by its known size (the official archives') or the caller's
  limit; a larger announced size is refused before anything is written, and a body that
  runs past the cap or its announced size is cut off there (the .part never holds more)
  and refused, its .part removed. Over-size is permanent: not retried.
- time: every window of timeout_s must bring min_rate_bytes_s * timeout_s bytes, headers
  included, or the attempt is aborted and retried (resuming); a per-read timeout alone let
  a trickle of one byte per second hold a transfer open for ever.
- redirects: only to base_url's own scheme, host and port, or to a host listed in
  data.allow_redirect_hosts.
"""
from __future__ import annotations

import email.utils
import functools
import hashlib
import http.client
import io
import logging
import os
import random
import re
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from stages.lib.io import fsync_file

log = logging.getLogger("fetch")

# SHA-1s of the official 2017 archives, as published beside them (and used by GluonCV's
# and PyTorch-Encoding's COCO scripts). No digests are published for 2014.
OFFICIAL_HOST = "images.cocodataset.org"
OFFICIAL_CHECKSUMS = {
    "zips/train2017.zip": "sha1:10ad623668ab00c62c096f0ed636d6aff41faca5",
    "zips/val2017.zip": "sha1:4950dc9d00dbe1c933ee0170f5797584351d2a41",
    "annotations/annotations_trainval2017.zip": "sha1:8551ee4bb5860311e79dace7e79cb91e432e78b3",
}
# Sizes of the same files in bytes, as images.cocodataset.org announces them (Content-Length
# in published wget logs of each download; public scripts check the same counts).
OFFICIAL_SIZES = {
    "zips/train2014.zip": 13510573713,
    "zips/val2014.zip": 6645013297,
    "annotations/annotations_trainval2014.zip": 252872794,
    "zips/train2017.zip": 19336861798,
    "zips/val2017.zip": 815585330,
    "annotations/annotations_trainval2017.zip": 252907541,
}
_PERMANENT = {400, 401, 403, 404, 405, 410, 451}
_DEFAULT_PORTS = {"http": 80, "https": 443}
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


class _TooLarge(_Permanent):
    """Over a byte bound: refused whole (its .part removed), not retried."""


class _TooSlow(TimeoutError):
    """Fewer bytes in a window than the minimum rate asks: retried, resuming."""


@dataclass(frozen=True)
class Bound:
    """The most bytes one file may have, and what sets it (named in messages)."""

    bytes: int
    source: str


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


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


def parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, total or None) of 'bytes first-last/total' or 'bytes first-last/*'; None
    if unreadable or invalid: RFC 9110 section 14.4 forbids joining a body whose last byte is
    before its first, or not before the total, to a stored part."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        return None
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if last < first or (total is not None and total <= last):
        return None
    return first, total


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (hashlib.file_digest: read in blocks, not whole)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def verify_checksum(path: Path, expected: str) -> None:
    algorithm, _, want = expected.partition(":")
    got = file_digest(path, algorithm)
    if got != want:
        raise CorruptFile(f"{algorithm} {got} differs from the expected {want}")


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port filled in when it is the scheme's default."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


def redirect_allowed(base: str, target: str, allowed_hosts: Iterable[str]) -> bool:
    """A redirect may lead to base's own origin, or to a host (or host:port) listed."""
    try:
        scheme, host, port = origin(target)
    except ValueError:          # a port that is no number
        return False
    if scheme not in _DEFAULT_PORTS:
        return False
    if (scheme, host, port) == origin(base):
        return True
    spellings = {host, f"[{host}]"}
    spellings |= {f"{name}:{port}" for name in spellings}
    return any(entry.lower() in spellings for entry in allowed_hosts)


def body_end(total: int | None, bound: Bound | None) -> int | None:
    """The most bytes the file may reach: its announced size, and never past the bound."""
    ends = [end for end in (total, bound.bytes if bound else None) if end is not None]
    return min(ends) if ends else None


class Fetcher:
    """Fetch files by their path under `base` into destinations on disk.

    limits: byte caps by name (fetch's `cap` picks one) and min_rate_bytes_s, as in
    params.yaml's data.limits; allow_redirect_hosts as data.allow_redirect_hosts."""

    def __init__(self, base: str, *, timeout_s: float = 60.0, retries: int = 4,
                 backoff_s: float = 0.5, checksums: dict[str, str] | None = None,
                 on_bytes: Callable[[int], None] | None = None,
                 limits: dict[str, float] | None = None,
                 allow_redirect_hosts: Iterable[str] = ()):
        self.base = base
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        parts = urllib.parse.urlsplit(base)
        self.remote = parts.scheme in ("http", "https")
        official = parts.hostname == OFFICIAL_HOST
        self.checksums = {**(OFFICIAL_CHECKSUMS if official else {}), **(checksums or {})}
        self.sizes = OFFICIAL_SIZES if official else {}
        self.limits = dict(limits or {})
        self.on_bytes = on_bytes or (lambda n: None)
        self.counters = Counters()
        self._opener = _opener(base, list(allow_redirect_hosts), timeout_s,
                               self.limits.get("min_rate_bytes_s", 0))

    def url(self, relpath: str) -> str:
        return f"{self.base.rstrip('/')}/{relpath}"

    def local_path(self, relpath: str) -> Path | None:
        """The file itself when the base is a folder or file:// URL (no copy needed)."""
        if self.remote:
            return None
        parts = urllib.parse.urlsplit(self.base)
        root = Path(urllib.parse.unquote(parts.path)) if parts.scheme == "file" else Path(self.base)
        return root / relpath

    def bound(self, relpath: str, cap: str | None) -> Bound | None:
        """A file's known size when there is one, else the limit named `cap`."""
        if relpath in self.sizes:
            return Bound(self.sizes[relpath], f"the official size of {relpath}")
        if cap is None:
            return None
        return Bound(int(self.limits[cap]), f"data.limits.{cap}")

    def fetch(self, relpath: str, dest: Path, check: Callable[[Path], None] | None = None,
              cap: str | None = None) -> bool:
        """Make `dest` a complete, verified copy of base/relpath, of at most the bytes the
        limit named `cap` allows. False if it already was."""
        if dest.exists():
            self.counters.add(skipped=1)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        bound = self.bound(relpath, cap)
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
                self._transfer(relpath, part, bound)
                self._verify(relpath, part, check)
            except _Permanent as exc:
                if isinstance(exc, _TooLarge):
                    part.unlink(missing_ok=True)   # no use resuming what is refused
                raise FetchError(f"{self.url(relpath)}: {exc}") from None
            except CorruptFile as exc:
                part.unlink(missing_ok=True)   # bad content: the next attempt starts over
                if not self.remote:            # a local file will not change by retrying
                    raise FetchError(f"{self.url(relpath)}: {exc}") from None
                problem = exc
            except (_RetryAfter, OSError, http.client.HTTPException) as exc:
                problem = exc
            else:
                fsync_file(part)
                os.replace(part, dest)
                self.counters.add(fetched=1)
                return True
        raise FetchError(
            f"{self.url(relpath)}: {problem} (gave up after {self.retries + 1} attempts)")

    # ------------------------------------------------------------ one attempt

    def _transfer(self, relpath: str, part: Path, bound: Bound | None) -> None:
        if not self.remote:
            self._copy_local(relpath, part, bound)
            return
        offset = part.stat().st_size if part.exists() else 0
        if bound and offset > bound.bytes:
            log.info("%s holds more than %s (%d bytes): starting over", part, bound.source,
                     bound.bytes)
            part.unlink()
            offset = 0
        headers = {"User-Agent": "segflow", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.url(relpath), headers=headers)
        try:
            response = self._opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and _complete_already(exc, offset):
                return   # every byte arrived before an interruption: only verification left
            self._raise_for_status(exc, part)
        with response:
            offset, total = self._resume_point(response, offset)
            if bound and total is not None and total > bound.bytes:   # before writing
                raise _TooLarge(f"announces {total} bytes, over the {bound.bytes} bytes of "
                                f"{bound.source}")
            self._write_body(response, part, offset, total, bound)
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
            raise _RetryAfter(f"HTTP {exc.code} {exc.reason}, Retry-After {wait:g}s",
                              wait) from None
        raise ConnectionError(f"HTTP {exc.code} {exc.reason}") from None

    def _resume_point(self, response, offset: int) -> tuple[int, int | None]:
        """Where the body starts in the file, and the file's full size when known."""
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if response.status == 206:
            span = parse_content_range(response.headers.get("Content-Range"))
            if span is None or span[0] != offset:
                raise ConnectionError(
                    f"unusable Content-Range {response.headers.get('Content-Range')!r}")
            total = (span[1] if span[1] is not None
                     else offset + length if length is not None else None)
            return offset, total
        if offset:
            log.info("%s ignored the Range request: fetching the whole file again", response.url)
        return 0, length

    def _write_body(self, response, part: Path, offset: int, total: int | None,
                    bound: Bound | None) -> None:
        with open(part, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            self._copy_bounded(response, out, offset, body_end(total, bound), total, bound)

    def _copy_bounded(self, source, out, size: int, end: int | None, total: int | None,
                      bound: Bound | None) -> None:
        """Copy until the source ends, writing no byte past `end`; a source with more is
        refused. read1: what arrived is written at once, so a retry resumes from it."""
        while chunk := source.read1(_CHUNK):
            room = len(chunk) if end is None else end - size
            written = min(room, len(chunk))
            out.write(chunk[:written])
            size += written
            self.counters.add(received_bytes=written)
            self.on_bytes(written)
            if written < len(chunk):
                if end == total and (bound is None or total < bound.bytes):
                    raise _TooLarge(f"body runs past its announced {total} bytes: cut off")
                raise _TooLarge(f"body runs past the {bound.bytes} bytes of {bound.source}: "
                                "cut off")

    def _copy_local(self, relpath: str, part: Path, bound: Bound | None) -> None:
        source = self.local_path(relpath)
        try:
            with open(source, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):   # a device or pipe may never end
                    raise _Permanent(f"{source} is not a regular file")
                if bound and info.st_size > bound.bytes:
                    raise _TooLarge(f"{source} has {info.st_size} bytes, over the "
                                    f"{bound.bytes} bytes of {bound.source}")
                with open(part, "wb") as out:
                    self._copy_bounded(handle, out, 0, bound and bound.bytes, None, bound)
        except FileNotFoundError:
            raise _Permanent(f"no such file {source}") from None

    def _verify(self, relpath: str, part: Path, check: Callable[[Path], None] | None) -> None:
        known = self.sizes.get(relpath)
        if known is not None and part.stat().st_size != known:
            raise CorruptFile(f"{part.stat().st_size} bytes, not the official {known}")
        expected = self.checksums.get(relpath)
        if expected:
            verify_checksum(part, expected)
        if check is not None:
            check(part)


# ------------------------------------------------------------ the HTTP client's bounds

def _opener(base: str, allowed_hosts: list[str], window_s: float,
            min_rate: float) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_FlooredHTTP(window_s, min_rate),
                                       _FlooredHTTPS(window_s, min_rate),
                                       _BoundedRedirects(base, allowed_hosts))


class _BoundedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only within base's origin or to the allowed hosts, and drops a
    redirect's body unread (urllib reads it whole into memory, however long)."""

    def __init__(self, base: str, allowed_hosts: list[str]):
        self.base, self.allowed_hosts = base, allowed_hosts

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()
        if not redirect_allowed(self.base, newurl, self.allowed_hosts):
            host = urllib.parse.urlsplit(newurl).hostname
            raise _Permanent(f"redirected from {req.full_url} to {newurl}, away from "
                             f"{self.base}: refused (list {host} in data.allow_redirect_hosts "
                             "to allow it)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _RateFloor:
    """Builds responses whose socket reads enforce a minimum rate (see _FlooredReader)."""

    def __init__(self, window_s: float, min_rate: float):
        self.window_s, self.min_rate = window_s, min_rate

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(functools.partial(self._connection, http_class), req, **kwargs)

    def _connection(self, http_class, *args, **kwargs):
        connection = http_class(*args, **kwargs)
        connection.response_class = functools.partial(
            _FlooredResponse, window_s=self.window_s, min_rate=self.min_rate)
        return connection


class _FlooredHTTP(_RateFloor, urllib.request.HTTPHandler):
    def __init__(self, window_s: float, min_rate: float):
        urllib.request.HTTPHandler.__init__(self)
        _RateFloor.__init__(self, window_s, min_rate)


class _FlooredHTTPS(_RateFloor, urllib.request.HTTPSHandler):
    def __init__(self, window_s: float, min_rate: float):
        urllib.request.HTTPSHandler.__init__(self)
        _RateFloor.__init__(self, window_s, min_rate)


class _FlooredResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, window_s: float, min_rate: float, **kwargs):
        super().__init__(_FlooredSocket(sock, window_s, min_rate), *args, **kwargs)


class _FlooredSocket:
    """What HTTPResponse asks of its socket: a reader (makefile)."""

    def __init__(self, sock, window_s: float, min_rate: float):
        self.sock, self.window_s, self.min_rate = sock, window_s, min_rate

    def makefile(self, mode: str):
        return io.BufferedReader(_FlooredReader(self.sock, self.window_s, self.min_rate))


class _FlooredReader(io.RawIOBase):
    """A socket's reads, failing once a window of `window_s` brings fewer than
    min_rate * window_s bytes. The socket timeout is set to what is left of the window, so
    a trickle or a stall ends when the window does, without a watcher thread or polling."""

    def __init__(self, sock, window_s: float, min_rate: float):
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._window_s, self._min_rate = window_s, min_rate
        self._need = min_rate * window_s
        self._start_window()

    def _start_window(self) -> None:
        self._window_start, self._window_bytes = time.monotonic(), 0

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer) -> int | None:
        if not self._need:
            return self._raw.readinto(buffer)
        left = self._window_start + self._window_s - time.monotonic()
        if left <= 0:
            raise self._too_slow()
        self._sock.settimeout(left)
        try:
            n = self._raw.readinto(buffer)
        except TimeoutError:
            raise self._too_slow() from None
        self._window_bytes += n or 0
        if self._window_bytes >= self._need:
            self._start_window()
        return n

    def _too_slow(self) -> _TooSlow:
        elapsed = time.monotonic() - self._window_start
        return _TooSlow(f"{self._window_bytes} bytes in {elapsed:.2f} s, slower than "
                        f"{self._min_rate:g} B/s (data.limits.min_rate_bytes_s)")

    def close(self) -> None:
        self._raw.close()
        super().close()


def _complete_already(exc: urllib.error.HTTPError, offset: int) -> bool:
    """A 416 whose Content-Range (bytes */total) says our partial file is the whole file."""
    match = _UNSATISFIED_RANGE.fullmatch((exc.headers.get("Content-Range") or "").strip())
    return match is not None and int(match[1]) == offset

