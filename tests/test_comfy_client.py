"""ComfyClient against servers that are not quite ComfyUI: a proxy's HTML page is ``comfyui_unavailable`` with a
hint, never ``internal``; and no two requests at once share an HTTP session (``requests.Session`` is not
thread-safe), while threads that come and go leave no session behind."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from comfy_worker.comfy.client import ComfyClient
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


def test_no_two_requests_at_once_share_a_session(html_server: str) -> None:
    client = ComfyClient(html_server, client_id="c")
    together = threading.Barrier(4)  # four requests at once: each needs a session of its own

    def session_of_this_request(_index: int) -> int:
        with client._session() as session:
            together.wait(timeout=10)
            return id(session)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            sessions = list(pool.map(session_of_this_request, range(4)))
        assert len(set(sessions)) == 4, "requests.Session is not thread-safe: one per request running"
        later = [id(s) for s in threading_each(client, 8)]
        assert set(later) <= set(sessions), "a request in a new thread takes an idle session"
    finally:
        client.close()


def threading_each(client: ComfyClient, count: int) -> list[object]:
    """The session of one request in each of ``count`` short-lived threads, one after the other."""
    seen: list[object] = []

    def one() -> None:
        with client._session() as session:
            seen.append(session)

    for _ in range(count):
        thread = threading.Thread(target=one)
        thread.start()
        thread.join(timeout=10)
    return seen


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
