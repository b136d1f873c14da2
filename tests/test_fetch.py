"""stages/lib/fetch.py against a real loopback HTTP server that injects faults: Range resume,
servers that ignore Range, Retry-After, truncation, resets, stalls, corrupt content."""
from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import pytest

from conftest import SAMPLE
from fault_server import FaultServer
from stages.lib import fetch
from stages.lib.fetch import CorruptFile, FetchError, Fetcher

NAME = "val2017/" + sorted(p.name for p in (SAMPLE / "val2017").iterdir())[0]
BODY = (SAMPLE / NAME).read_bytes()
URL_PATH = "/" + NAME


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with FaultServer(SAMPLE, stall_s=1.5) as srv:
        yield srv


@pytest.fixture
def sleeps(monkeypatch):
    """Record the client's waits instead of sleeping them."""
    waited: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", waited.append)
    return waited


def _fetcher(server, **kw) -> Fetcher:
    options = dict(timeout_s=0.5, retries=3, backoff_s=0.01)
    options.update(kw)
    return Fetcher(server.base, **options)


def test_clean_fetch_then_skip(server, tmp_path):
    dest = tmp_path / "x.jpg"
    fetcher = _fetcher(server)
    assert fetcher.fetch(NAME, dest) is True
    assert dest.read_bytes() == BODY
    assert fetcher.fetch(NAME, dest) is False          # complete: not fetched again
    assert len(server.gets(URL_PATH)) == 1
    assert (fetcher.counters.fetched, fetcher.counters.skipped) == (1, 1)


@pytest.mark.parametrize("fault", ["reset", "truncate", "stall"])
def test_interrupted_body_resumes_with_range(server, tmp_path, fault):
    server.inject(URL_PATH, fault)
    dest = tmp_path / "x.jpg"
    fetcher = _fetcher(server)
    fetcher.fetch(NAME, dest)
    assert dest.read_bytes() == BODY
    first, second = server.gets(URL_PATH)
    assert first.fault == fault and first.range is None
    # the second request continued where the first stopped, and was answered 206
    assert second.status == 206 and second.range.startswith("bytes=")
    assert 0 < int(second.range[6:-1]) < len(BODY)
    assert fetcher.counters.retried == 1
    assert not list(tmp_path.glob("*.part"))


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    dest = tmp_path / "x.jpg"
    (tmp_path / "x.jpg.part").write_bytes(BODY[:1000])
    server.inject(URL_PATH, "ignore_range")
    _fetcher(server).fetch(NAME, dest)
    assert dest.read_bytes() == BODY                   # not 1000 bytes + the whole body
    (request,) = server.gets(URL_PATH)
    assert request.range == "bytes=1000-" and request.status == 200


def test_fault_server_backlog_and_moot_ignore_range(server, tmp_path):
    """One CI run of the 100-fault download test ended with a fault still queued after six
    requests timed out at the start. The likely path: 8 connections at once against a
    backlog of 5, a 'reset' served to a request the client had given up on, and its retry,
    with no bytes to resume, carrying no Range for the queued 'ignore_range'. The server now
    has a deeper backlog and serves a moot 'ignore_range' as a plain 200."""
    assert server._server.request_queue_size >= 8      # the download tests' workers
    server.inject(URL_PATH, "ignore_range")
    _fetcher(server).fetch(NAME, tmp_path / "x.jpg")
    assert server.pending() == 0
    assert [(r.range, r.status, r.fault) for r in server.gets(URL_PATH)] == [
        (None, 200, "ignore_range")]


def test_partial_file_already_complete_is_verified_not_fetched_again(server, tmp_path):
    (tmp_path / "x.jpg.part").write_bytes(BODY)      # killed after the last byte, before rename
    fetcher = _fetcher(server)
    assert fetcher.fetch(NAME, tmp_path / "x.jpg") is True
    assert (tmp_path / "x.jpg").read_bytes() == BODY
    assert [(r.range, r.status) for r in server.gets(URL_PATH)] == [(f"bytes={len(BODY)}-", 416)]
    assert fetcher.counters.retried == 0


def test_partial_file_longer_than_the_source_restarts(server, tmp_path):
    (tmp_path / "x.jpg.part").write_bytes(BODY + b"extra")
    _fetcher(server).fetch(NAME, tmp_path / "x.jpg")
    assert (tmp_path / "x.jpg").read_bytes() == BODY
    assert [r.status for r in server.gets(URL_PATH)] == [416, 200]


@pytest.mark.parametrize("fault, header_wait", [("503:7", 7.0), ("500", 0.0)])
def test_retry_after_is_honoured(server, tmp_path, sleeps, fault, header_wait):
    server.inject(URL_PATH, fault)
    _fetcher(server).fetch(NAME, tmp_path / "x.jpg")
    assert sleeps == [header_wait]
    assert (tmp_path / "x.jpg").read_bytes() == BODY


def test_retry_after_as_http_date():
    now = datetime(2026, 11, 22, 12, 0, 0, tzinfo=timezone.utc)
    later = (now + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert fetch.retry_after_seconds(later, now) == 30.0
    assert fetch.retry_after_seconds("5") == 5.0
    assert fetch.retry_after_seconds("100000") == 600.0            # capped
    assert fetch.retry_after_seconds("soon") is None
    assert fetch.retry_after_seconds(None) is None


def test_without_retry_after_backoff_grows_with_jitter(server, tmp_path, sleeps):
    server.inject(URL_PATH, "429", "429", "429")
    _fetcher(server, backoff_s=1.0).fetch(NAME, tmp_path / "x.jpg")
    assert len(sleeps) == 3
    assert all(0 <= wait <= 2 ** i for i, wait in enumerate(sleeps))


def test_backoff_is_bounded():
    assert all(0 <= fetch.backoff_seconds(a, 0.5) <= min(60.0, 0.5 * 2 ** a) for a in range(20))


def test_corrupt_content_is_fetched_again_from_scratch(server, tmp_path):
    server.inject(URL_PATH, "corrupt")
    checksum = "sha256:" + hashlib.sha256(BODY).hexdigest()
    fetcher = _fetcher(server, checksums={NAME: checksum})
    fetcher.fetch(NAME, tmp_path / "x.jpg")
    assert (tmp_path / "x.jpg").read_bytes() == BODY
    assert [r.range for r in server.gets(URL_PATH)] == [None, None]   # no resume of bad bytes


def test_checksum_never_matching_is_reported(server, tmp_path):
    fetcher = _fetcher(server, retries=1, checksums={NAME: "md5:" + "0" * 32})
    with pytest.raises(FetchError, match=rf"{URL_PATH}: md5 \w+ differs from the expected 0+ "
                                         r"\(gave up after 2 attempts\)"):
        fetcher.fetch(NAME, tmp_path / "x.jpg")
    assert not list(tmp_path.iterdir())


def test_content_check_failing_twice_is_reported(server, tmp_path):
    calls = []

    def refuse(path):
        calls.append(path.read_bytes() == BODY)
        raise CorruptFile("not what we wanted")

    with pytest.raises(FetchError, match="not what we wanted"):
        _fetcher(server, retries=1).fetch(NAME, tmp_path / "x.jpg", refuse)
    assert calls == [True, True]
    assert not list(tmp_path.iterdir())


def test_404_is_not_retried(server, tmp_path, sleeps):
    with pytest.raises(FetchError, match=r"/val2017/nope.jpg: HTTP 404"):
        _fetcher(server).fetch("val2017/nope.jpg", tmp_path / "nope.jpg")
    assert sleeps == [] and len(server.gets("/val2017/nope.jpg")) == 1


def test_gives_up_after_retries(server, tmp_path, sleeps):
    server.inject(URL_PATH, "reset", "reset", "reset")
    with pytest.raises(FetchError, match=r"gave up after 3 attempts"):
        _fetcher(server, retries=2).fetch(NAME, tmp_path / "x.jpg")
    assert not (tmp_path / "x.jpg").exists()
    assert (tmp_path / "x.jpg.part").exists()          # kept: a rerun resumes it


def test_official_checksums_apply_only_to_the_official_host():
    assert Fetcher("http://images.cocodataset.org").checksums["zips/val2017.zip"].startswith("sha1:")
    assert Fetcher("http://mirror.example/coco").checksums == {}
    mine = {"zips/val2017.zip": "sha1:" + "1" * 40}
    assert Fetcher("http://images.cocodataset.org", checksums=mine).checksums["zips/val2017.zip"] == mine["zips/val2017.zip"]


def test_parse_content_range():
    assert fetch.parse_content_range("bytes 100-199/200") == (100, 200)
    assert fetch.parse_content_range("bytes 100-199/*") == (100, None)
    assert fetch.parse_content_range("items 1-2/3") is None
    assert fetch.parse_content_range(None) is None
