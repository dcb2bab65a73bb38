"""The per-job model cache under attack: one name for two URLs (in one job, in two jobs at once, after a lost
index), downloads that outlive their job (a trickling server, a job's timeout), partial files beyond the cap,
and a redirect to an internal address. The cache is the real ``ModelCache`` over loopback file servers; the
jobs run in an in-process worker (``app.build_worker``) with the stand-in ComfyUI.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from comfy_worker.errors import InputError
from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.download_options import DownloadOptions
from comfy_worker.runtime.app import build_worker
from comfy_worker.runtime.fetch import Stop, guarded_session
from comfy_worker.runtime.job import Worker
from comfy_worker.runtime.models import ModelCache

from .file_server import FileServer, Redirect, make_data
from .worker_process import TIMEOUT_MARGIN_S, ComfyBackend, close_worker, free_port, worker_settings

KB = 1024
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
WAIT_S = 30.0  # the generous deadline of every wait for an event


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    server = FileServer(tmp_path_factory.mktemp("served"))
    yield server
    server.close()


class _TrickleHandler(BaseHTTPRequestHandler):
    """Answers the downloader's probe at once, then sends the file's bytes one every 50 ms, for ever."""

    protocol_version = "HTTP/1.1"
    server: Trickle

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.server.closed.is_set():
            self.send_response(410)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.headers.get("Range") == "bytes=0-0":
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-0/{Trickle.SIZE}")
            self.send_header("Content-Length", "1")
            self.end_headers()
            self.wfile.write(b"x")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(Trickle.SIZE))
        self.end_headers()
        self.server.streaming.set()
        try:
            while not self.server.closed.is_set():
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            self.server.hung_up.set()  # the client closed the connection: its download stopped
        self.close_connection = True


class Trickle(ThreadingHTTPServer):
    """A model server that does not finish a file: a download from it ends when its client stops it, or when
    the server closes (``close``, or after ``LIFETIME_S``, so that a download nobody stops ends some day)."""

    SIZE = 30 * KB
    LIFETIME_S = 45.0
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TrickleHandler)
        self.streaming, self.hung_up, self.closed = threading.Event(), threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        self.lifetime = threading.Timer(self.LIFETIME_S, self.closed.set)
        self.lifetime.daemon = True
        self.lifetime.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def close(self) -> None:
        self.lifetime.cancel()
        self.closed.set()  # streams end, later requests fail: a download that did not stop ends now
        self.shutdown()
        self.server_close()


@pytest.fixture
def trickle() -> Iterator[Trickle]:
    server = Trickle()
    yield server
    server.close()


def options(**changes: Any) -> DownloadOptions:
    return DownloadOptions(progress_bar=False, progress_interval_s=0.1, **changes)


def new_cache(root: Path, max_bytes: int = 10**9, **changes: Any) -> ModelCache:
    return ModelCache(root / "cache", max_bytes, 10**9, options(**changes), 30.0, LOOPBACK)


def lora(url: str, filename: str = "dd.safetensors") -> ModelConfig:
    return ModelConfig(url=url, destination="loras", filename=filename)


def index_of(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "cache" / ".index.json").read_text())
    return data


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting {WAIT_S:g}s for {what}"
        time.sleep(0.02)


def test_one_name_for_two_urls_in_one_call_is_refused(tmp_path: Path, files: FileServer) -> None:
    files.add("/file/10", make_data(10 * KB, 10))
    files.add("/file/20", make_data(20 * KB, 3))
    first, second = lora(files.url("/file/10")), lora(files.url("/file/20") + "?seed=3")
    cache = new_cache(tmp_path)
    with pytest.raises(InputError, match=r"loras/dd.safetensors .* for another URL"):
        cache.prepare([first, second], lambda *_: None).release()
    before = len(files.gets("/file/20"))
    cache.prepare([second], lambda *_: None).release()
    assert (tmp_path / "cache" / "loras" / "dd.safetensors").read_bytes() == make_data(20 * KB, 3)
    assert index_of(tmp_path)["loras/dd.safetensors"]["url"] == second.url
    assert len(files.gets("/file/20")) > before, "the second URL's file is downloaded, not the first one's reused"


def test_a_download_in_flight_for_another_url_is_refused(tmp_path: Path, files: FileServer) -> None:
    files.add("/race/slow", make_data(256 * KB, 51), rate=256 * KB)  # about a second
    files.add("/race/other", make_data(8 * KB, 52))
    slow, other = lora(files.url("/race/slow"), "t.safetensors"), lora(files.url("/race/other"), "t.safetensors")
    worker_a, worker_b = new_cache(tmp_path), new_cache(tmp_path)  # two workers on one volume
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(worker_a.prepare, [slow], lambda *_: None)
        wait_for(lambda: files.bytes_sent["/race/slow"] > 1, "the first download to start")
        with pytest.raises(InputError) as refused:
            worker_b.prepare([other], lambda *_: None)
        pins = first.result(timeout=WAIT_S)
    assert "loras/t.safetensors" in refused.value.message and "being downloaded or used" in refused.value.message
    target = tmp_path / "cache" / "loras" / "t.safetensors"
    assert target.read_bytes() == make_data(256 * KB, 51)
    with pytest.raises(InputError, match="being downloaded or used"):  # still in use by the first job
        worker_b.prepare([other], lambda *_: None)
    pins.release()
    worker_b.prepare([other], lambda *_: None).release()
    assert target.read_bytes() == make_data(8 * KB, 52)
    assert index_of(tmp_path)["loras/t.safetensors"]["url"] == other.url


def test_a_file_the_index_does_not_know_is_not_served_for_a_url(tmp_path: Path, files: FileServer) -> None:
    files.add("/lost/model", make_data(12 * KB, 61))
    stray = tmp_path / "cache" / "loras" / "lost.safetensors"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"someone else's bytes")  # an index lost or reset, a killed worker's leftover
    new_cache(tmp_path).prepare([lora(files.url("/lost/model"), "lost.safetensors")], lambda *_: None).release()
    assert stray.read_bytes() == make_data(12 * KB, 61)


def test_partial_files_count_against_the_cap(tmp_path: Path, files: FileServer) -> None:
    cap = 60 * KB
    cache = new_cache(tmp_path, max_bytes=cap, retries=0, retry_backoff_s=0.01)
    for number in range(3):  # each server cuts off halfway: a 50 KiB partial file each time
        files.add(f"/cut/{number}", make_data(100 * KB, 70 + number), cut_at=50 * KB, cuts=100)
        with pytest.raises(InputError, match="could not be downloaded"):
            cache.prepare([lora(files.url(f"/cut/{number}"), f"cut{number}.safetensors")], lambda *_: None)
    loras = tmp_path / "cache" / "loras"
    on_disk = sum(path.stat().st_blocks * 512 for path in loras.iterdir())
    assert any(path.name.endswith(".part") for path in loras.iterdir())  # the control: partial files are there
    assert on_disk <= cap, sorted((path.name, path.stat().st_size) for path in loras.iterdir())


def test_a_partial_file_in_use_is_not_evicted(tmp_path: Path, files: FileServer) -> None:
    files.add("/held/slow", make_data(256 * KB, 81), rate=256 * KB)
    files.add("/held/big", make_data(40 * KB, 82))
    cache = new_cache(tmp_path, max_bytes=30 * KB)
    part = tmp_path / "cache" / "loras" / "held.safetensors.part"
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(cache.prepare, [lora(files.url("/held/slow"), "held.safetensors")], lambda *_: None)
        wait_for(lambda: part.exists() and part.stat().st_size > 0, "the partial file")
        cache.prepare([lora(files.url("/held/big"), "big.safetensors")], lambda *_: None).release()  # over the cap
        first.result(timeout=WAIT_S).release()  # a partial file removed under it would fail this download
    assert (tmp_path / "cache" / "loras" / "held.safetensors").read_bytes() == make_data(256 * KB, 81)


def test_a_redirect_to_an_internal_address_is_refused_and_not_retried(tmp_path: Path, files: FileServer) -> None:
    files.routes["/to/internal"] = Redirect(f"http://127.0.0.2:{files.port}/file/10")
    cache = new_cache(tmp_path, retries=3, retry_backoff_s=0.01)
    with pytest.raises(InputError) as refused:
        cache.prepare([lora(files.url("/to/internal"), "r.safetensors")], lambda *_: None)
    message = refused.value.message
    assert "refused" in message and "127.0.0.2" in message and "INPUT_URL_ALLOWLIST" in message, message
    assert "gave up after" not in message, message
    assert len(files.gets("/to/internal")) == 1, "a refusal is not retried"


# --- through the worker: a job's timeout ends its downloads ---------------------------------------------------
MODEL_FREE = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "races"}},
}


@contextlib.contextmanager
def in_process_worker(root: Path) -> Iterator[Worker]:
    cache = root / "model-cache"
    settings = worker_settings(
        ComfyBackend.standin(),
        root,
        free_port(),
        MODEL_CACHE_DIR=str(cache),
        INPUT_URL_ALLOWLIST="127.0.0.1/32",
    )
    worker = build_worker(settings)
    try:
        yield worker
    finally:
        close_worker(worker)


def job(url: str, filename: str = "t.safetensors", timeout: float = 2) -> dict[str, Any]:
    return {
        "workflow": MODEL_FREE,
        "models": [{"url": url, "destination": "loras", "filename": filename}],
        "timeout": timeout,
    }


def error_of(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" in result, result
    error: dict[str, Any] = json.loads(result["error"])
    return error


def test_a_timed_out_download_stops_and_lets_go_of_its_file(
    tmp_path: Path, files: FileServer, trickle: Trickle
) -> None:
    files.add("/after/t", make_data(6 * KB, 91))

    async def scenario(worker: Worker) -> None:
        started = time.monotonic()
        timed_out = error_of(await worker.run("trickled", job(trickle.url("/t")), lambda _m: None))
        assert timed_out["error_type"] == "timeout", timed_out
        assert "while downloading the job's models" in timed_out["message"]
        assert time.monotonic() - started < 2 + TIMEOUT_MARGIN_S
        assert trickle.streaming.is_set()
        await asyncio.to_thread(trickle.hung_up.wait, WAIT_S)
        assert trickle.hung_up.is_set(), "the download went on after its job timed out"
        # the file is free for another URL once the download has let go of it (a moment after it hung up)
        deadline = time.monotonic() + WAIT_S
        while True:
            result = await worker.run("next", job(files.url("/after/t"), timeout=30), lambda _m: None)
            if "error" not in result or "being downloaded or used" not in result["error"]:
                break
            assert time.monotonic() < deadline, f"the timed-out job's pins were never released: {result}"
            await asyncio.sleep(0.1)
        assert "error" not in result, result
        assert (tmp_path / "model-cache" / "loras" / "t.safetensors").read_bytes() == make_data(6 * KB, 91)

    with in_process_worker(tmp_path) as worker:
        asyncio.run(scenario(worker))


def test_a_stuck_download_does_not_starve_the_next_job(tmp_path: Path, trickle: Trickle) -> None:
    async def scenario(worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))  # the event loop's shared pool, at its smallest
        try:
            for number in range(2):
                stuck = job(trickle.url(f"/s{number}"), f"s{number}.bin", timeout=1)
                result = await worker.run(f"stuck-{number}", stuck, lambda _m: None)
                assert error_of(result)["error_type"] == "timeout", result
            done = await asyncio.wait_for(worker.run("next", {"workflow": MODEL_FREE}, lambda _m: None), WAIT_S)
            assert done.get("status") == "success", done
        finally:
            trickle.close()  # before asyncio.run waits for the pool's threads: a download not stopped ends now

    with in_process_worker(tmp_path) as worker:
        asyncio.run(scenario(worker))


def test_a_job_cancelled_mid_download_stops_it(tmp_path: Path, trickle: Trickle) -> None:
    async def scenario(worker: Worker) -> None:
        running = asyncio.create_task(worker.run("cancelled", job(trickle.url("/c"), timeout=60), lambda _m: None))
        await asyncio.to_thread(trickle.streaming.wait, WAIT_S)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await asyncio.to_thread(trickle.hung_up.wait, WAIT_S)
        assert trickle.hung_up.is_set(), "the download went on after its job was cancelled"

    with in_process_worker(tmp_path) as worker:
        asyncio.run(scenario(worker))


def test_connections_opened_after_the_stop_are_refused() -> None:
    stop = Stop()
    stop.set()
    with socket.create_server(("127.0.0.1", 0)) as listener, guarded_session(LOOPBACK, stop) as session:
        port = listener.getsockname()[1]
        with pytest.raises(requests.ConnectionError, match="stopped"):
            session.get(f"http://127.0.0.1:{port}/", timeout=5)
