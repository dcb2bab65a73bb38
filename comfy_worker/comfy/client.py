"""ComfyUI's HTTP API, as the worker uses it.

Synchronous on purpose: the async job calls it through ``asyncio.to_thread`` so the runpod SDK's event loop
never blocks. Transport failures become ``ComfyUnavailableError``; a refused prompt becomes a
``WorkflowError`` with ComfyUI's ``node_errors`` kept readable.

The transport is ``urllib3``'s connection pool (thread-safe, kept-alive connections, a dropped one noticed
before reuse), not ``requests``: every job makes a few small requests to a server on the same machine, and
``requests`` spent about 0.7 ms on each (reading the proxy settings from the environment every time, among
others) against 0.4 ms here, most of a trivial job's overhead. ComfyUI is reached directly:
``HTTP_PROXY``/``HTTPS_PROXY`` do not apply to it (a proxy in front of a ComfyUI on loopback only breaks it),
and credentials come only from ``COMFY_API_URL`` itself (``user:password@``, sent as Basic auth).
"""

from __future__ import annotations

import json
import logging
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

import urllib3
from urllib3.exceptions import HTTPError

from comfy_worker.comfy.errors import workflow_error
from comfy_worker.errors import ComfyUnavailableError, InputError, WorkerError
from comfy_worker.redact import redact_url, redact_urls

log = logging.getLogger(__name__)


VIEW_CHUNK = 1024 * 1024  # /view is streamed to disk in pieces of this size
CONTROL_TIMEOUT_S = 2.0  # interrupt and queue edits: a ComfyUI that cannot answer these in 2 s is hung
POOL_SIZE = 16  # connections kept alive: output downloads run 8 at once, beside jobs' and control calls
TRANSPORT_ERRORS = (HTTPError, OSError)  # refused, reset, timed out, not HTTP at all


class Answer:
    """A whole HTTP answer, read: ComfyUI's JSON routes answer a few KB (``/object_info`` a few MB)."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self.status = response.status
        self.content_type = response.headers.get("Content-Type")
        self.body = response.data

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


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
        parts = urlsplit(self.base_url)
        headers = {}
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers = urllib3.make_headers(basic_auth=credentials)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"  # an IPv6 address
        if parts.port is not None:
            netloc += f":{parts.port}"
        self._url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))  # without the credentials
        self._pool = urllib3.PoolManager(num_pools=1, maxsize=POOL_SIZE, retries=False, headers=headers)

    def close(self) -> None:
        self._pool.clear()

    def _unavailable(self, method: str, path: str, exc: BaseException) -> ComfyUnavailableError:
        reason = redact_urls(str(exc)) or type(exc).__name__  # a timeout or a reset can have no message
        return ComfyUnavailableError(
            f"ComfyUI at {self.display_url} did not answer {method} {path}: {reason}",
            {"url": f"{self.display_url}{path}"},
        )

    def _send(self, method: str, path: str, timeout_s: float | None, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool.request(method, f"{self._url}{path}", timeout=timeout_s or self.timeout_s, **kwargs)
        except TRANSPORT_ERRORS as exc:
            raise self._unavailable(method, path, exc) from exc

    def _request(self, method: str, path: str, timeout_s: float | None = None, **kwargs: Any) -> Answer:
        """One request, its answer read whole (so its connection goes back to the pool)."""
        return Answer(self._send(method, path, timeout_s, **kwargs))

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status != 200:
            raise WorkerError(
                f"ComfyUI answered {method} {path} with HTTP {response.status}: {response.text[:500]}",
                {"status": response.status},
            )
        return self._body(response, method, path)

    def _body(self, response: Answer, method: str, path: str) -> Any:
        """The JSON of a 200 answer; anything else (a proxy's HTML page) means this is not a working ComfyUI."""
        try:
            return json.loads(response.body)
        except ValueError:
            raise ComfyUnavailableError(
                f"{self.display_url} answered {method} {path} with HTTP 200 but not JSON "
                f"({response.content_type or 'no Content-Type'}: {response.text[:200]!r}): "
                "is COMFY_API_URL a ComfyUI, and is it up?",
                {"url": f"{self.display_url}{path}", "status": response.status},
            ) from None

    def is_ready(self, timeout_s: float = 2.0) -> bool:
        """Whether ComfyUI answers ``/system_stats`` now."""
        try:
            return self._request("GET", "/system_stats", timeout_s=timeout_s).status == 200
        except ComfyUnavailableError:
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
        if response.status == 400:
            try:
                payload: Any = json.loads(response.body)
            except ValueError:
                payload = response.text
            raise workflow_error(payload, response.status)
        if response.status != 200:
            raise WorkerError(
                f"ComfyUI answered POST /prompt with HTTP {response.status}: {response.text[:500]}",
                {"status": response.status},
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
        timeout_s = max(self.timeout_s, 120.0)
        answer = self._send("GET", "/view", timeout_s, fields=params, preload_content=False)
        try:
            if answer.status != 200:
                answer.drain_conn()
                raise WorkerError(
                    f"ComfyUI answered GET /view for {subfolder + '/' if subfolder else ''}{filename} "
                    f"with HTTP {answer.status}",
                    {"status": answer.status, "filename": filename, "subfolder": subfolder},
                )
            size = 0
            try:
                for chunk in answer.stream(VIEW_CHUNK):
                    target.write(chunk)
                    size += len(chunk)
            except HTTPError as exc:  # urllib3 wraps the socket's errors; the target's own (disk full) pass
                raise ComfyUnavailableError(
                    f"ComfyUI at {self.display_url} broke off GET /view for {filename}: {redact_urls(str(exc))}",
                    {"url": f"{self.display_url}/view"},
                ) from exc
            return size
        finally:
            answer.release_conn()

    def upload_image(self, filename: str, data: bytes, subfolder: str) -> dict[str, Any]:
        """Upload into ComfyUI's input folder (the job's own subfolder: overwrite=true replaces nobody's file)."""
        fields = {
            "image": (filename, data, "application/octet-stream"),
            "subfolder": subfolder,
            "type": "input",
            "overwrite": "true",
        }
        response = self._request("POST", "/upload/image", fields=fields, timeout_s=max(self.timeout_s, 120.0))
        name = f"{subfolder}/{filename}" if subfolder else filename
        if response.status == 413:
            raise InputError(
                f"ComfyUI refused the upload of {name} ({len(data) / 1024 / 1024:.1f} MB): it is larger than "
                "ComfyUI's --max-upload-size (100 MB unless COMFYUI_ARGS sets it).",
                {"status": 413, "name": filename, "subfolder": subfolder, "bytes": len(data)},
            )
        if response.status != 200:
            raise WorkerError(
                f"ComfyUI refused the upload of {name} (HTTP {response.status}): {response.text[:300]}",
                {"status": response.status, "name": filename, "subfolder": subfolder},
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
