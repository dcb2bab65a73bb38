"""ComfyUI's HTTP API, as the worker uses it.

Synchronous on purpose (``requests``): the async job calls it through ``asyncio.to_thread`` so the runpod
SDK's event loop never blocks. Transport failures become ``ComfyUnavailableError``; a refused prompt becomes
a ``WorkflowError`` with ComfyUI's ``node_errors`` kept readable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO

import requests

from comfy_worker.comfy.errors import workflow_error
from comfy_worker.errors import ComfyUnavailableError, InputError, WorkerError
from comfy_worker.redact import redact_url, redact_urls

log = logging.getLogger(__name__)


VIEW_CHUNK = 1024 * 1024  # /view is streamed to disk in pieces of this size
CONTROL_TIMEOUT_S = 2.0  # interrupt and queue edits: a ComfyUI that cannot answer these in 2 s is hung


class ComfyClient:
    """A thin client for one ComfyUI server.

    Timeouts are short on purpose (ComfyUI answers its JSON routes in milliseconds while it runs a prompt):
    a hung ComfyUI must turn into an error the worker can act on, not a job that waits for minutes.
    """

    def __init__(self, base_url: str, client_id: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.display_url = redact_url(self.base_url)  # COMFY_API_URL may carry credentials: never shown
        self.client_id = client_id
        self.timeout_s = timeout_s
        self._idle: list[requests.Session] = []  # sessions no request uses now
        self._sessions: set[requests.Session] = set()  # every open one, for close()
        self._sessions_lock = threading.Lock()

    @contextlib.contextmanager
    def _session(self) -> Iterator[requests.Session]:
        """A session no other thread uses meanwhile (``requests.Session`` is not thread-safe), kept for the next
        request: jobs call from threads that live for one job (output pools, the cancel and restart threads), and
        a session per thread kept each one's keep-alive sockets open for the worker's life. There are as many
        sessions as requests ever ran at once."""
        with self._sessions_lock:
            session = self._idle.pop() if self._idle else None
            if session is None:
                session = requests.Session()
                self._sessions.add(session)
        try:
            yield session
        finally:
            with self._sessions_lock:
                closed = session not in self._sessions  # close() ran meanwhile
                if not closed:
                    self._idle.append(session)
            if closed:
                session.close()

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions, self._idle = self._sessions, set(), []
        for session in sessions:
            session.close()

    def _request(self, method: str, path: str, timeout_s: float | None = None, **kwargs: Any) -> requests.Response:
        url = f"{self.base_url}{path}"
        try:
            with self._session() as session:
                return session.request(method, url, timeout=timeout_s or self.timeout_s, **kwargs)
        except requests.RequestException as exc:
            raise ComfyUnavailableError(
                f"ComfyUI at {self.display_url} did not answer {method} {path}: {redact_urls(str(exc))}",
                {"url": f"{self.display_url}{path}"},
            ) from exc

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code != 200:
            raise WorkerError(
                f"ComfyUI answered {method} {path} with HTTP {response.status_code}: {response.text[:500]}",
                {"status": response.status_code},
            )
        return self._body(response, method, path)

    def _body(self, response: requests.Response, method: str, path: str) -> Any:
        """The JSON of a 200 answer; anything else (a proxy's HTML page) means this is not a working ComfyUI."""
        try:
            return response.json()
        except ValueError:
            raise ComfyUnavailableError(
                f"{self.display_url} answered {method} {path} with HTTP 200 but not JSON "
                f"({response.headers.get('Content-Type') or 'no Content-Type'}: {response.text[:200]!r}): "
                "is COMFY_API_URL a ComfyUI, and is it up?",
                {"url": f"{self.display_url}{path}", "status": response.status_code},
            ) from None

    def is_ready(self, timeout_s: float = 2.0) -> bool:
        """Whether ComfyUI answers ``/system_stats`` now."""
        try:
            with self._session() as session:
                return session.get(f"{self.base_url}/system_stats", timeout=timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def system_stats(self, timeout_s: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/system_stats", timeout_s=timeout_s)
        return result

    def object_info(self) -> dict[str, Any]:
        """Every node class this ComfyUI can run, with its inputs (``/object_info``; a few MB, so cached by the
        caller per ComfyUI start)."""
        info = self._json("GET", "/object_info", timeout_s=max(self.timeout_s, 60.0))
        return info if isinstance(info, dict) else {}

    def model_folder_names(self) -> list[str]:
        names = self._json("GET", "/models", timeout_s=5.0)
        return [str(name) for name in names] if isinstance(names, list) else []

    def model_files(self, folder: str) -> list[str]:
        files = self._json("GET", f"/models/{folder}", timeout_s=5.0)
        return [str(name) for name in files] if isinstance(files, list) else []

    def queue_prompt(
        self, workflow: dict[str, Any], prompt_id: str, extra_data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Queue ``workflow`` under our own ``prompt_id`` so its frames can be routed before the reply.

        ``extra_data`` reaches the nodes' hidden inputs (``api_key_comfy_org`` for partner API nodes); ComfyUI
        keeps that key out of its queue and history."""
        body: dict[str, Any] = {"prompt": workflow, "client_id": self.client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = extra_data
        response = self._request("POST", "/prompt", json=body, timeout_s=max(self.timeout_s, 60.0))
        if response.status_code == 400:
            try:
                payload: Any = response.json()
            except ValueError:
                payload = response.text
            raise workflow_error(payload, response.status_code)
        if response.status_code != 200:
            raise WorkerError(
                f"ComfyUI answered POST /prompt with HTTP {response.status_code}: {response.text[:500]}",
                {"status": response.status_code},
            )
        result: dict[str, Any] = self._body(response, "POST", "/prompt")
        return result

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of ``prompt_id``, or None while ComfyUI has none (queued or running)."""
        entries = self._json("GET", f"/history/{prompt_id}")
        entry = entries.get(prompt_id) if isinstance(entries, dict) else None
        return entry if isinstance(entry, dict) else None

    def queue(self, timeout_s: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/queue", timeout_s=timeout_s)
        return result

    def view_into(self, filename: str, subfolder: str, folder_type: str, target: BinaryIO) -> int:
        """Stream ``/view`` into ``target`` (a file), so an output never sits in memory whole; its byte count."""
        params = {"filename": filename, "subfolder": subfolder, "type": folder_type}
        with self._request("GET", "/view", params=params, timeout_s=max(self.timeout_s, 120.0), stream=True) as answer:
            if answer.status_code != 200:
                raise WorkerError(
                    f"ComfyUI answered GET /view for {subfolder + '/' if subfolder else ''}{filename} "
                    f"with HTTP {answer.status_code}",
                    {"status": answer.status_code, "filename": filename, "subfolder": subfolder},
                )
            size = 0
            try:
                for chunk in answer.iter_content(VIEW_CHUNK):
                    target.write(chunk)
                    size += len(chunk)
            except requests.RequestException as exc:
                raise ComfyUnavailableError(
                    f"ComfyUI at {self.display_url} broke off GET /view for {filename}: {redact_urls(str(exc))}",
                    {"url": f"{self.display_url}/view"},
                ) from exc
            return size

    def upload_image(self, filename: str, data: bytes, subfolder: str) -> dict[str, Any]:
        """Upload into ComfyUI's input folder (the job's own subfolder: overwrite=true replaces nobody's file)."""
        response = self._request(
            "POST",
            "/upload/image",
            files={"image": (filename, data, "application/octet-stream")},
            data={"subfolder": subfolder, "type": "input", "overwrite": "true"},
            timeout_s=max(self.timeout_s, 120.0),
        )
        name = f"{subfolder}/{filename}" if subfolder else filename
        if response.status_code == 413:
            raise InputError(
                f"ComfyUI refused the upload of {name} ({len(data) / 1024 / 1024:.1f} MB): it is larger than "
                "ComfyUI's --max-upload-size (100 MB unless COMFYUI_ARGS sets it).",
                {"status": 413, "name": filename, "subfolder": subfolder, "bytes": len(data)},
            )
        if response.status_code != 200:
            raise WorkerError(
                f"ComfyUI refused the upload of {name} (HTTP {response.status_code}): {response.text[:300]}",
                {"status": response.status_code, "name": filename, "subfolder": subfolder},
            )
        result: dict[str, Any] = self._body(response, "POST", "/upload/image")
        return result

    def free(self, body: dict[str, bool]) -> None:
        """Ask ComfyUI to unload models and/or free cached memory (it does so between prompts)."""
        self._request("POST", "/free", json=body, timeout_s=CONTROL_TIMEOUT_S)

    def interrupt(self, prompt_id: str) -> None:
        """Interrupt ``prompt_id`` if it is running (ComfyUI ignores the call otherwise)."""
        self._request("POST", "/interrupt", json={"prompt_id": prompt_id}, timeout_s=CONTROL_TIMEOUT_S)

    def delete_queued(self, prompt_id: str) -> None:
        """Drop ``prompt_id`` from the pending queue (no effect once it runs)."""
        self._request("POST", "/queue", json={"delete": [prompt_id]}, timeout_s=CONTROL_TIMEOUT_S)
