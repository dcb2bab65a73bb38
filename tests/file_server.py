"""A loopback HTTP file server for the downloader's tests and benchmark: Range, If-Range, ETag, and faults.

Each path is a ``Served`` file on disk (sent with sendfile, so the server keeps up with the client) or a
``Redirect`` (the Hub's 302 to its CDN). A file can be told to ignore ranges, go slowly, cut the connection at
an offset, hold the rest of its body back from an offset until the test releases it, answer error statuses
before succeeding, require a token, or name itself in Content-Disposition.
The server records every request (method, path, headers, client port) and the body bytes sent per path.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CHUNK = 64 * 1024
HOLD_LIMIT_S = 600.0


@dataclass
class Served:
    file: Path
    etag: str
    ranges: bool = True
    rate: float | None = None  # bytes per second per connection
    cut_at: int | None = None  # file offset where the connection drops ...
    cuts: int = 1  # ... this many times
    failures: list[int] = field(default_factory=list)  # statuses answered (one per request) before serving
    status: int | None = None  # always answer this status
    token: str | None = None  # require "Authorization: Bearer <token>"
    disposition: str | None = None
    fail_range_at: int | None = None  # a Range request that starts at this offset is answered 404
    hold_at: int | None = None  # file offset where the body stops until ``release`` is set (a test's event) ...
    release: threading.Event = field(default_factory=threading.Event)
    headers: dict[str, str] = field(default_factory=dict)
    last_modified: str = field(default_factory=lambda: formatdate(usegmt=True))

    @property
    def size(self) -> int:
        return self.file.stat().st_size


@dataclass
class Redirect:
    location: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 302


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    port: int  # the client's port: one per connection


def make_data(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ per seed (and per position, so shifted data never matches)."""
    block = hashlib.sha256(f"seed {seed}".encode()).digest() * 2048  # 64 KiB
    out = bytearray()
    index = 0
    while len(out) < size:
        out += index.to_bytes(8, "big") + block[8:]
        index += 1
    return bytes(out[:size])


class FileServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 with a random port; files live under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.routes: dict[str, Served | Redirect] = {}
        self.requests: list[Request] = []
        self.bytes_sent: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, data: bytes, **behaviour: Any) -> Served:
        file = self.root / hashlib.sha256(path.encode()).hexdigest()[:16]
        file.write_bytes(data)
        return self.add_file(path, file, **behaviour)

    def add_file(self, path: str, file: Path, etag: str | None = None, **behaviour: Any) -> Served:
        served = Served(file, etag or f'"{file.stat().st_mtime_ns:x}-{file.stat().st_size:x}"', **behaviour)
        self.routes[path] = served
        return served

    def replace(self, path: str, data: bytes) -> None:
        """Serve other content at ``path``: a new ETag and Last-Modified, as after an upload."""
        served = self.routes[path]
        assert isinstance(served, Served)
        served.file.write_bytes(data)
        served.etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        served.last_modified = formatdate(time.time() + 5, usegmt=True)

    def gets(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path and r.method == "GET"]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (probes, cancelled downloads) are normal here, not tracebacks."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def owner(self) -> FileServer:
        owner: FileServer = self.server.owner  # type: ignore[attr-defined]
        return owner

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, head: bool) -> None:
        path = urlsplit(self.path).path
        owner = self.owner
        with owner.lock:
            headers = {name.lower(): value for name, value in self.headers.items()}
            owner.requests.append(Request(self.command, path, headers, self.client_address[1]))
        route = owner.routes.get(path)
        if route is None:
            self._empty(404)
        elif isinstance(route, Redirect):
            self._empty(route.status, {"Location": route.location, **route.headers})
        elif route.failures:
            self._empty(route.failures.pop(0))
        elif route.status is not None:
            self._empty(route.status)
        elif route.token and self.headers.get("Authorization") != f"Bearer {route.token}":
            self._empty(401)
        else:
            self._file(route, head)

    def _file(self, served: Served, head: bool) -> None:
        size = served.size
        start, end = 0, size
        wanted = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        fresh = if_range is None or if_range in (served.etag, served.last_modified)
        if served.ranges and wanted.startswith("bytes=") and fresh:
            first, _, last = wanted[6:].partition("-")
            start = int(first)
            if start == served.fail_range_at:
                self._empty(404)
                return
            end = min(int(last) + 1, size) if last else size
            if start >= size:
                self._empty(416, {"Content-Range": f"bytes */{size}"})
                return
        partial = (start, end) != (0, size)
        self.send_response(206 if partial else 200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", served.etag)
        self.send_header("Last-Modified", served.last_modified)
        if served.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if served.disposition:
            self.send_header("Content-Disposition", served.disposition)
        for name, value in served.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self._body(served, start, end)

    def _body(self, served: Served, start: int, end: int) -> None:
        path = urlsplit(self.path).path
        cut = served.cut_at is not None and served.cuts > 0 and start <= served.cut_at < end
        stop = served.cut_at if cut and served.cut_at is not None else end
        if cut:
            served.cuts -= 1
        try:
            with served.file.open("rb") as file:
                offset = start
                if served.hold_at is not None and start <= served.hold_at < stop:
                    self._send(served, file.fileno(), start, served.hold_at, path)
                    offset = self._hold(served, file.fileno(), served.hold_at, stop, path)
                self._send(served, file.fileno(), offset, stop, path)
        except OSError:
            self.close_connection = True
            return
        if cut:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, served: Served, fd: int, start: int, stop: int, path: str) -> None:
        if served.rate is None:
            self._sendfile(fd, start, stop, path)
        else:
            self._slowly(fd, start, stop, served.rate, path)

    def _hold(self, served: Served, fd: int, start: int, stop: int, path: str) -> int:
        """... while one byte goes every 50 ms, so the client's reads return and it writes what it has to
        disk. Returns the offset reached when released (or after HOLD_LIMIT_S, so a broken test cannot hang
        the server)."""
        offset = start
        deadline = time.monotonic() + HOLD_LIMIT_S
        while offset < stop and not served.release.wait(0.05) and time.monotonic() < deadline:
            self._slowly(fd, offset, offset + 1, 1e9, path)
            offset += 1
        return offset

    def _sendfile(self, fd: int, start: int, stop: int, path: str) -> None:
        offset = start
        while offset < stop:
            sent = os.sendfile(self.connection.fileno(), fd, offset, min(stop - offset, 16 * 1024 * 1024))
            if sent == 0:
                break
            offset += sent
            with self.owner.lock:
                self.owner.bytes_sent[path] += sent

    def _slowly(self, fd: int, start: int, stop: int, rate: float, path: str) -> None:
        offset = start
        while offset < stop:
            data = os.pread(fd, min(CHUNK, stop - offset), offset)
            self.connection.sendall(data)
            offset += len(data)
            with self.owner.lock:
                self.owner.bytes_sent[path] += len(data)
            time.sleep(len(data) / rate)


def hub_file(
    hub: FileServer, cdn: FileServer, repo: str, filename: str, data: bytes, commit: str, lfs: bool = True, **kw: Any
) -> str:
    """Serve ``data`` as the Hub does at ``/<repo>/resolve/{main,<commit>}/<filename>``; return its sha256.

    LFS files: the Hub answers 302 to its CDN with X-Repo-Commit, X-Linked-Etag (the sha256) and X-Linked-Size
    (what huggingface_hub's get_hf_file_metadata reads); other files are served by the Hub itself.
    """
    sha = hashlib.sha256(data).hexdigest()
    for revision in ("main", commit):
        path = f"/{repo}/resolve/{revision}/{filename}"
        if lfs:
            cdn_path = f"/repos/{sha}"
            cdn.add(cdn_path, data, **kw)
            headers = {
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            }
            hub.routes[path] = Redirect(cdn.url(cdn_path) + "?X-Amz-Signature=abc&Expires=1", headers)
        else:
            served = hub.add(path, data, **kw)
            served.headers["X-Repo-Commit"] = commit
    return sha
