"""ComfyClient against servers that are not quite ComfyUI: a proxy's HTML page is ``comfyui_unavailable`` with a
hint, never ``internal``; requests at once each get a connection, later ones reuse them (threads that come and
go leave no socket behind), a restarted server is reached again, and the URL's credentials are sent while the
environment's proxy is not used."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.events import EventStream
from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.errors import ComfyUnavailableError

from .worker_process import ComfyBackend, free_port, worker_settings


class HtmlPage(BaseHTTPRequestHandler):
    """A login page or a proxy's placeholder, answering every path with 200 and HTML."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_page()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_page()

    def send_page(self) -> None:
        body = b"<html><body>Please log in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def html_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HtmlPage)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_an_html_page_is_comfyui_unavailable(html_server: str) -> None:
    client = ComfyClient(html_server, client_id="c")
    try:
        for call in (client.queue, client.object_info, lambda: client.queue_prompt({}, "p")):
            with pytest.raises(ComfyUnavailableError, match=r"HTTP 200 but not JSON.*is COMFY_API_URL a ComfyUI"):
                call()
        with pytest.raises(ComfyUnavailableError, match="not JSON"):
            client.upload_image("a.png", b"x", "jobs/1")
    finally:
        client.close()


class Recorder(BaseHTTPRequestHandler):
    """A kept-alive HTTP/1.1 server answering JSON, recording each request's client port and headers; with
    ``hold`` set, each request waits until that many have arrived (they are then all in flight at once)."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[int, dict[str, str]]]
    hold: threading.Barrier | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append((self.client_address[1], {k.lower(): v for k, v in self.headers.items()}))
        self.server.open_connections.append(self.connection)  # type: ignore[attr-defined]
        if self.hold is not None:
            self.hold.wait(timeout=10)
        body = b'{"queue_running": [], "queue_pending": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def recording_server(
    port: int = 0, hold: int | None = None
) -> tuple[ThreadingHTTPServer, list[tuple[int, dict[str, str]]]]:
    seen: list[tuple[int, dict[str, str]]] = []
    handler = type("Handler", (Recorder,), {"seen": seen, "hold": threading.Barrier(hold) if hold else None})
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.daemon_threads = True
    httpd.open_connections = []  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, seen


def stop(httpd: ThreadingHTTPServer) -> None:
    """Like a server process exiting: its kept-alive connections are closed too."""
    httpd.shutdown()
    httpd.server_close()
    for connection in httpd.open_connections:  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)


def test_requests_at_once_each_get_a_connection_and_later_ones_reuse_them() -> None:
    httpd, seen = recording_server(hold=4)  # four requests in flight at once, or none is answered
    client = ComfyClient(f"http://127.0.0.1:{httpd.server_address[1]}", client_id="c")
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            assert (
                list(pool.map(lambda _i: client.queue(), range(4))) == [{"queue_running": [], "queue_pending": []}] * 4
            )
        first = {port for port, _ in seen}
        assert len(first) == 4
        Recorder.hold = None
        httpd.RequestHandlerClass.hold = None  # type: ignore[attr-defined]
        for _ in range(8):  # one after the other, from threads that come and go
            thread = threading.Thread(target=client.queue)
            thread.start()
            thread.join(timeout=10)
        later = {port for port, _ in seen[4:]}
        assert len(seen) == 12 and later <= first, "requests after the burst reuse its kept-alive connections"
    finally:
        client.close()
        stop(httpd)


def test_a_restarted_comfyui_is_reached_again_through_a_new_connection() -> None:
    httpd, _seen = recording_server()
    port = httpd.server_address[1]
    client = ComfyClient(f"http://127.0.0.1:{port}", client_id="c")
    try:
        client.queue()
        stop(httpd)  # ComfyUI restarts: the kept-alive connection is closed under the pool
        httpd, seen_again = recording_server(port)
        assert client.queue() == {"queue_running": [], "queue_pending": []}
        assert len(seen_again) == 1
        stop(httpd)
        with pytest.raises(ComfyUnavailableError, match="did not answer GET /queue"):
            client.queue()
    finally:
        client.close()
        stop(httpd)


def test_credentials_in_the_url_are_sent_as_basic_auth_and_no_proxy_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there: using it would fail
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    httpd, seen = recording_server()
    client = ComfyClient(f"http://user:p%40ss@127.0.0.1:{httpd.server_address[1]}/", client_id="c")
    try:
        client.queue()
        headers = seen[0][1]
        assert headers["authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
        assert "p@ss" not in client.display_url and "p%40ss" not in client.display_url
    finally:
        client.close()
        stop(httpd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_threads_made_per_job_leave_no_sockets_behind(tmp_path: Path) -> None:
    """A session per thread, kept forever: every job's output pool, cancel and restart threads left one with its
    keep-alive socket, and a long-lived worker's file descriptors grew without end."""
    settings = worker_settings(ComfyBackend.standin(), tmp_path, free_port())
    supervisor = ComfySupervisor(settings)  # a separate process: its sockets are not counted here
    client = ComfyClient(settings.comfy_api_url, client_id="fds")
    try:
        supervisor.start_or_attach(client)
        supervisor.wait_ready(client)
        client.queue()
        before = open_fds()
        for _job in range(25):  # like 25 jobs, each with an output pool of 4 threads
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda _file: client.system_stats(), range(4)))
        grown = open_fds() - before
    finally:
        client.close()
        supervisor.stop()
    assert grown <= 4, f"{grown} more file descriptors after 100 threads of 25 jobs"


def test_the_websocket_reaches_comfyui_directly_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there: using it would fail
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    settings = worker_settings(ComfyBackend.standin(), tmp_path, free_port())
    supervisor = ComfySupervisor(settings)
    client = ComfyClient(settings.comfy_api_url, client_id="ws")
    events = EventStream(settings.comfy_ws_url, "ws", connect_timeout_s=2.0)
    try:
        supervisor.start_or_attach(client)
        supervisor.wait_ready(client)
        events.start()
        assert events.wait_connected(20), "the WebSocket went to HTTP_PROXY"
    finally:
        events.close()
        client.close()
        supervisor.stop()
