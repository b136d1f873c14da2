"""A real HTTP server on loopback that serves a folder like a static file server (Content-
Length, single byte ranges) and injects faults on command, one per request, per path:

  reset         headers and half the body, then a TCP reset
  truncate      a correct Content-Length, half the body, then a clean close
  stall         headers and half the body, then silence longer than the client's timeout
  500, 503      an error status with Retry-After: 0 ("503:2" waits 2 s; "503:date" sends
                an HTTP-date one second ahead)
  429           too many requests, no Retry-After (the client must back off on its own)
  ignore_range  a full 200 response even when the request asked for a Range (on a request
                without one it is moot: served as a plain 200 and counted as served, so
                a client that had no bytes to resume from does not leave it queued)
  corrupt       a 200 response of the right length whose bytes are garbage
  404           not found

Besides faults, redirect(path, location) answers every request of a path with a 302 to
`location` (the redirect tests), and `host` picks the loopback address to listen on
(127.0.0.2 is another host than 127.0.0.1 to a client).

Every request is logged (path, Range header, status) so tests can check what was fetched.
"""
from __future__ import annotations

import email.utils
import http.server
import socket
import struct
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

FAULTS = ("reset", "truncate", "stall", "500", "503", "429", "ignore_range", "corrupt", "404")


@dataclass
class Request:
    path: str
    range: str | None
    status: int
    fault: str | None


class LoopbackServer:
    """Start/stop of a threaded HTTP server on a loopback address, for the test servers
    here and in hostile_server.py: a subclass sets self.host and self._server = None and
    returns its request handler class (whose `server_owner` becomes the instance)."""

    def handler(self) -> type:
        raise NotImplementedError

    def start(self) -> str:
        owner = self

        class Handler(self.handler()):
            server_owner = owner

        self._server = _Server((self.host, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://{self.host}:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        self.base = self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class FaultServer(LoopbackServer):
    def __init__(self, root: Path, *, stall_s: float = 3.0, bytes_per_s: float | None = None,
                 host: str = "127.0.0.1"):
        self.root = Path(root)
        self.host = host
        self.stall_s = stall_s
        self.bytes_per_s = bytes_per_s
        self.requests: list[Request] = []
        self._faults: dict[str, deque] = defaultdict(deque)
        self._redirects: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ control

    def handler(self) -> type:
        return _Handler

    def inject(self, path: str, *faults: str) -> None:
        """Queue faults for the next requests of `path` ('/val2017/x.jpg'), in order."""
        for fault in faults:
            if fault.split(":")[0] not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            self._faults[path].extend(faults)

    def redirect(self, path: str, location: str) -> None:
        """Answer every request of `path` with a 302 to `location`."""
        with self._lock:
            self._redirects[path] = location

    def pending(self) -> int:
        with self._lock:
            return sum(map(len, self._faults.values()))

    def served_faults(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.fault]

    def gets(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            queue = self._faults.get(path)
            if not queue:
                return None
            return queue.popleft()

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


class _Server(http.server.ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops the SYNs of a client opening 8 connections
    # at once on a busy machine; the client's retransmit comes after its own timeout
    request_queue_size = 128


class _Handler(http.server.BaseHTTPRequestHandler):
    server_owner: FaultServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        owner = self.server_owner
        path = unquote(urlsplit(self.path).path)
        range_header = self.headers.get("Range")
        with owner._lock:
            location = owner._redirects.get(path)
        if location is not None:
            return self._status(302, path, range_header, None, {"Location": location})
        fault = owner._next_fault(path)
        file = (owner.root / path.lstrip("/")).resolve()
        if fault == "404" or not file.is_file() or owner.root.resolve() not in file.parents:
            return self._status(404, path, range_header, fault)
        kind, _, arg = (fault or "").partition(":")
        if kind in ("500", "503"):
            retry_after = arg or "0"
            if retry_after == "date":
                retry_after = email.utils.formatdate(time.time() + 1, usegmt=True)
            return self._status(int(kind), path, range_header, fault, {"Retry-After": retry_after})
        if kind == "429":
            return self._status(429, path, range_header, fault)
        body = file.read_bytes()
        status, start = 200, 0
        if range_header and kind != "ignore_range":
            start = _range_start(range_header)
            if start is None or start >= len(body):
                return self._status(416, path, range_header, fault,
                                    {"Content-Range": f"bytes */{len(body)}"})
            status = 206
        payload = body[start:]
        if kind == "corrupt":
            payload = bytes((b + 97) % 256 for b in payload)
        owner._log(Request(path, range_header, status, fault))
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Connection", "close")
        self.end_headers()
        self._send_body(payload, kind)

    def _send_body(self, payload: bytes, kind: str) -> None:
        half = len(payload) // 2
        if kind in ("reset", "truncate", "stall"):
            self._write(payload[:half])
            if kind == "stall":
                time.sleep(self.server_owner.stall_s)
            elif kind == "reset":
                # SO_LINGER with a zero timeout makes close() send RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self._write(payload)

    def _write(self, data: bytes) -> None:
        rate = self.server_owner.bytes_per_s
        try:
            if not rate:
                self.wfile.write(data)
                return
            step = max(1, int(rate / 20))
            for i in range(0, len(data), step):
                self.wfile.write(data[i:i + step])
                self.wfile.flush()
                time.sleep(step / rate)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the client went away (killed, or timed out): nothing to do

    def _status(self, code: int, path: str, range_header, fault, headers: dict | None = None):
        self.server_owner._log(Request(path, range_header, code, fault))
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True


def _range_start(header: str) -> int | None:
    """First byte of a single 'bytes=a-' or 'bytes=a-b' range (only what clients send here)."""
    if not header.startswith("bytes="):
        return None
    first = header[6:].split(",")[0].split("-")[0]
    return int(first) if first.isdigit() else None


if __name__ == "__main__":   # serve a folder without faults: python tests/fault_server.py DIR
    import sys

    server = FaultServer(Path(sys.argv[1]))
    print(server.start(), flush=True)
    threading.Event().wait()
