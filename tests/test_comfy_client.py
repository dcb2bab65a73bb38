"""ComfyClient against servers that are not quite ComfyUI: a proxy's HTML page is ``comfyui_unavailable`` with a
hint, never ``internal``; and each thread has its own HTTP session (``requests.Session`` is not thread-safe)."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.errors import ComfyUnavailableError


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


def test_each_thread_uses_its_own_session(html_server: str) -> None:
    client = ComfyClient(html_server, client_id="c")
    together = threading.Barrier(4)  # four threads at once, so the pool cannot reuse one

    def session_of_this_thread(_index: int) -> int:
        together.wait(timeout=10)
        return id(client._session)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            sessions = list(pool.map(session_of_this_thread, range(4)))
        assert len(set(sessions)) == 4, "requests.Session is not thread-safe: one per thread"
        assert client._session is client._session, "and a thread keeps its own"
    finally:
        client.close()
