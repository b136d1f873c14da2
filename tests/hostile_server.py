"""A loopback HTTP server that misbehaves on purpose, beside fault_server.py (which breaks
honest transfers): bodies without end, sizes that lie, trickles. Each path gets one
behaviour, served to every request of it:

  endless(path, content_length=None, chunked=False, status=200, headers={})
                zeros without end: with no Content-Length, a given one (huge, or smaller
                than the body: with `chunked`, http.client ignores the Content-Length), or
                as the body of another status (a 302 whose body never ends)
  trickle(path, body, interval_s, headers_too=False)
                the body one byte per interval_s, Range honoured (206); with headers_too
                the status line and headers come one byte at a time as well
  serve(path, body)
                an honest 200 (the target of a redirect test)

Every loop is bounded in bytes and seconds and ends when the client goes away, so a client
without bounds fails its test (a file too big, an error too late) instead of hanging it or
filling the disk. Each request is logged with the body bytes the server managed to send.
"""
from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from fault_server import LoopbackServer

_BLOCK = bytes(1 << 16)


@dataclass
class Served:
    path: str
    range: str | None
    status: int
    sent: int = 0          # body bytes written to the socket before the end or a hang-up
    done: bool = False     # the server has finished with this request
    headers: dict = field(default_factory=dict)   # the request's


@dataclass
class _Endless:
    content_length: int | None
    chunked: bool
    status: int
    headers: dict = field(default_factory=dict)


@dataclass
class _Trickle:
    body: bytes
    interval_s: float
    headers_too: bool = False


class HostileServer(LoopbackServer):
    def __init__(self, *, host: str = "127.0.0.1", max_bytes: int = 16 << 20,
                 max_s: float = 5.0):
        self.host = host
        self.max_bytes = max_bytes     # what one response may send at most
        self.max_s = max_s             # how long one response may last at most
        self.requests: list[Served] = []
        self._routes: dict[str, object] = {}
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    def endless(self, path: str, *, content_length: int | None = None, chunked: bool = False,
                status: int = 200, headers: dict | None = None) -> None:
        self._routes[path] = _Endless(content_length, chunked, status, dict(headers or {}))

    def trickle(self, path: str, body: bytes, interval_s: float, headers_too: bool = False) -> None:
        self._routes[path] = _Trickle(body, interval_s, headers_too)

    def serve(self, path: str, body: bytes) -> None:
        self._routes[path] = _Trickle(body, 0.0)

    def gets(self, path: str) -> list[Served]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def handler(self) -> type:
        return _Handler

    def _log(self, served: Served) -> None:
        with self._lock:
            self.requests.append(served)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_owner: HostileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        owner = self.server_owner
        path = unquote(urlsplit(self.path).path)
        route = owner._routes.get(path)
        served = Served(path, self.headers.get("Range"), 404, headers=dict(self.headers))
        owner._log(served)
        self.close_connection = True
        try:
            if isinstance(route, _Endless):
                self._endless(route, served)
            elif isinstance(route, _Trickle):
                self._trickle(route, served)
            else:
                self._headers(404, {"Content-Length": "0"})
        except (BrokenPipeError, ConnectionResetError):
            pass   # the client hung up: what it refused to read is its bound working
        finally:
            served.done = True

    def _headers(self, status: int, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Connection", "close")
        self.end_headers()

    def _endless(self, route: _Endless, served: Served) -> None:
        headers = dict(route.headers)
        if route.content_length is not None:
            headers["Content-Length"] = route.content_length
        if route.chunked:
            headers["Transfer-Encoding"] = "chunked"
        served.status = route.status
        self._headers(route.status, headers)
        frame = (b"%x\r\n" % len(_BLOCK)) + _BLOCK + b"\r\n" if route.chunked else _BLOCK
        deadline = time.monotonic() + self.server_owner.max_s
        while served.sent < self.server_owner.max_bytes and time.monotonic() < deadline:
            self.wfile.write(frame)
            served.sent += len(_BLOCK)

    def _trickle(self, route: _Trickle, served: Served) -> None:
        start = _range_start(served.range) or 0
        payload = route.body[start:]
        headers = {"Content-Length": len(payload), "Accept-Ranges": "bytes"}
        served.status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(route.body) - 1}/{len(route.body)}"
        deadline = time.monotonic() + self.server_owner.max_s
        if not route.interval_s:
            self._headers(served.status, headers)
            self.wfile.write(payload)
            served.sent = len(payload)
            return
        if route.headers_too:
            head = [f"HTTP/1.1 {served.status} Slow\r\n".encode()]
            head += [f"{key}: {value}\r\n".encode() for key, value in headers.items()]
            self._drip(b"".join(head) + b"Connection: close\r\n\r\n", route, deadline)
        else:
            self._headers(served.status, headers)
        served.sent = self._drip(payload, route, deadline)

    def _drip(self, data: bytes, route: _Trickle, deadline: float) -> int:
        """Write data one byte per interval until the deadline; return the bytes written."""
        for sent, byte in enumerate(data):
            if time.monotonic() >= deadline:
                return sent
            self.wfile.write(bytes([byte]))
            time.sleep(route.interval_s)
        return len(data)


def _range_start(header: str | None) -> int | None:
    if not header or not header.startswith("bytes="):
        return None
    first = header[6:].split("-")[0]
    return int(first) if first.isdigit() else None
