"""Inputs by URL: a real HTTP server on loopback (allowed by INPUT_URL_ALLOWLIST in these tests), the SSRF
guard refusing every private, loopback, link-local and metadata address (before any connection is made),
redirects re-checked, size and type limits, s3:// through the worker's bucket, and the worker end to end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from comfy_worker.errors import InputError
from comfy_worker.runtime.app import build_worker
from comfy_worker.runtime.fetch import Fetcher, ForbiddenAddressError, Stop, check_address
from comfy_worker.settings import Settings
from comfy_worker.storage import S3Storage

from .s3_server import run_s3rver
from .worker_process import TIMEOUT_MARGIN_S, ComfyBackend, close_worker, free_port, serve_api, worker_settings

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


def png(color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path == "/cat.png":
            self.send(200, PNG, "image/png")
        elif self.path == "/page":
            self.send(200, b"<html>a viewer</html>", "text/html; charset=utf-8")
        elif self.path == "/big":
            self.send(200, b"x" * 3_000_000, "application/octet-stream")
        elif self.path == "/stream-big":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(4):
                chunk = b"y" * 1_000_000
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/trickle":  # one byte every 0.2 s: never idle long enough for a per-read timeout
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
        elif self.path == "/trickle-headers":  # headers that never end, one byte every 0.2 s
            with contextlib.suppress(OSError):
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(1000):
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(0.2)
        elif self.path == "/bad-length":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "abc")
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/redirect-ok":
            self.send(302, b"", "text/plain", Location="/cat.png")
        elif self.path == "/redirect-forbidden":
            self.send(302, b"", "text/plain", Location=f"http://127.0.0.2:{port}/cat.png")
        else:
            self.send(404, b"no", "text/plain")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def fetcher(allowlist: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = LOOPBACK) -> Fetcher:
    return Fetcher(allowlist, max_bytes=2_000_000, timeout_s=10, storage=None)


def refused(
    url: str, expected: str, allowlist: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = LOOPBACK
) -> None:
    with pytest.raises(InputError) as info:
        fetcher(allowlist).fetch(url, "images[0].url")
    assert info.value.message.startswith("images[0].url: ")
    assert expected in info.value.message, info.value.message


def test_fetches_a_file(server: str) -> None:
    assert fetcher().fetch(f"{server}/cat.png", "f") == PNG
    assert fetcher().fetch(f"{server}/redirect-ok", "f") == PNG


def test_a_trickling_server_is_cut_off_at_the_total_deadline(server: str) -> None:
    slow = Fetcher(LOOPBACK, max_bytes=2_000_000, timeout_s=1, storage=None)
    started = time.monotonic()
    with pytest.raises(InputError, match=r"did not arrive within INPUT_URL_TIMEOUT \(1s in all\)"):
        slow.fetch(f"{server}/trickle", "images[0].url")
    assert time.monotonic() - started < 5, "INPUT_URL_TIMEOUT is a deadline for the whole file, not per read"
    with pytest.raises(InputError, match="did not arrive"):  # the job's own deadline, when it comes first
        fetcher().fetch(f"{server}/trickle", "images[0].url", deadline=time.monotonic() + 0.5)


def test_trickling_headers_are_cut_off_at_the_deadline_too(server: str) -> None:
    slow = Fetcher(LOOPBACK, max_bytes=2_000_000, timeout_s=1, storage=None)
    started = time.monotonic()
    with pytest.raises(InputError, match="did not arrive within INPUT_URL_TIMEOUT"):
        slow.fetch(f"{server}/trickle-headers", "images[0].url")
    assert time.monotonic() - started < 1 + TIMEOUT_MARGIN_S, "a per-read timeout never ends headers that trickle"


def test_the_jobs_stop_ends_a_fetch_at_once(server: str) -> None:
    stop = Stop()
    failures: list[BaseException] = []

    def fetch() -> None:
        try:
            fetcher().fetch(f"{server}/trickle", "images[0].url", time.monotonic() + 60, stop)
        except InputError as exc:
            failures.append(exc)

    running = threading.Thread(target=fetch)
    running.start()
    time.sleep(0.3)  # mid-body (or before it: either way the stop must end it)
    stop.set()
    running.join(timeout=TIMEOUT_MARGIN_S)
    assert not running.is_alive(), "the fetch went on after the job's stop"
    assert len(failures) == 1


def test_limits_and_types(server: str) -> None:
    refused(f"{server}/page", "is a web page (text/html), not a file")
    refused(f"{server}/big", "larger than INPUT_URL_MAX_MB")
    refused(f"{server}/stream-big", "larger than INPUT_URL_MAX_MB")
    refused(f"{server}/missing.png", "answered HTTP 404")
    assert fetcher().fetch(f"{server}/bad-length", "f") == PNG, "a broken Content-Length is not an internal error"
    refused("ftp://127.0.0.1/x.png", "only http, https and s3 URLs")
    refused("file:///etc/passwd", "only http, https and s3 URLs")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.png",
        "http://localhost:9/x.png",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://172.16.0.1/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/x.png",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://0.0.0.0:9/x.png",
        "http://100.64.0.1/x.png",
        "http://[64:ff9b::7f00:1]/x.png",  # NAT64 of 127.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 of 169.254.169.254
        "http://[2002:7f00:1::]/x.png",  # 6to4 of 127.0.0.1
        "http://[2002:a00:1::1]/x.png",  # 6to4 of 10.0.0.1
        "http://[::7f00:1]/x.png",  # IPv4-compatible 127.0.0.1
        "http://[::ffff:169.254.169.254]/x.png",  # IPv4-mapped
    ],
)
def test_ssrf_guard_refuses_internal_addresses(url: str) -> None:
    refused(url, "refused", allowlist=())


def test_redirects_are_checked_again(server: str) -> None:
    refused(f"{server}/redirect-forbidden", "127.0.0.2, a private, loopback, link-local or reserved address")


def test_check_address_allows_public_and_listed() -> None:
    assert check_address("8.8.8.8", 443, ()) == "8.8.8.8"  # resolution of a literal sends nothing
    assert check_address("64:ff9b::808:808", 443, ()) == "64:ff9b::808:808"  # NAT64 of a public address
    assert check_address("127.0.0.1", 80, LOOPBACK) == "127.0.0.1"
    with pytest.raises(ForbiddenAddressError):
        check_address("127.0.0.1", 80, ())


def test_s3_urls_use_the_workers_bucket(tmp_path: Path) -> None:
    with run_s3rver(tmp_path / "s3", bucket="outputs") as s3:  # on loopback: the bucket is not SSRF-guarded
        settings = Settings.from_env(s3.env())
        assert settings.s3 is not None
        storage_fetcher = Fetcher((), 2_000_000, 10, storage=S3Storage(settings.s3))
        assert storage_fetcher.storage is not None
        storage_fetcher.storage.client.put_object(Bucket="outputs", Key="inputs/in/cat.png", Body=PNG)
        assert storage_fetcher.fetch("s3://outputs/inputs/in/cat.png", "f") == PNG
        with pytest.raises(InputError, match="cannot be read"):
            storage_fetcher.fetch("s3://outputs/inputs/in/nothing.png", "f")
    with pytest.raises(InputError, match="need the worker's bucket"):
        fetcher().fetch("s3://outputs/inputs/in/cat.png", "f")


GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "remote/cat.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fetched"}},
}


def test_worker_loads_an_image_by_url(server: str, tmp_path: Path) -> None:
    job = {"workflow": GRAPH, "images": [{"name": "remote/cat.png", "url": f"{server}/cat.png"}]}
    with serve_api(ComfyBackend.standin(), tmp_path / "allowed", INPUT_URL_ALLOWLIST="127.0.0.1/32") as worker:
        body = worker.runsync(job)
    assert body["status"] == "COMPLETED", body
    data = base64.b64decode(body["output"]["images"][0]["data"])
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (245, 235, 225)
    with serve_api(ComfyBackend.standin(), tmp_path / "guarded") as worker:
        failed = worker.runsync(job)
    error = json.loads(failed["error"])
    assert error["error_type"] == "validation"
    assert "images[0].url:" in error["message"] and "refused" in error["message"]


def test_the_jobs_timeout_covers_fetching_its_inputs(server: str, tmp_path: Path) -> None:
    settings = worker_settings(
        ComfyBackend.standin(), tmp_path, free_port(), INPUT_URL_ALLOWLIST="127.0.0.1/32", INPUT_URL_TIMEOUT="60"
    )
    worker = build_worker(settings)
    try:
        job = {"workflow": GRAPH, "images": [{"name": "remote/cat.png", "url": f"{server}/trickle"}], "timeout": 2}
        started = time.monotonic()
        result = asyncio.run(worker.run("slow-input", job, lambda _m: None))
        elapsed = time.monotonic() - started
        error = json.loads(result["error"])
        assert error["error_type"] == "timeout", error
        assert "timeout of 2s while fetching input images" in error["message"]
        assert elapsed < 2 + TIMEOUT_MARGIN_S, f"the result came {elapsed:.1f}s after the job started"
    finally:
        close_worker(worker)
