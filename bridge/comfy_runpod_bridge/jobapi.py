"""RunPod's job API (``/run``, ``/runsync``, ``/status``, ``/cancel``) and the worker's outputs, from the user's
side, over the Python standard library only.

Two programs talk to an endpoint from a user's machine: ``comfy-worker-client`` and the ComfyUI bridge
(``bridge/comfy_runpod_bridge``), a custom node that runs inside the user's ComfyUI, whose Python has neither
``requests`` nor ``comfy_worker``. They used to carry a copy each, and the copies drifted (retries, the 401
hint, which URLs an output may be fetched from). This module is the one copy of that code:

* The source is ``comfy_worker/tools/jobapi.py``; ``bridge/comfy_runpod_bridge/jobapi.py`` is a byte-identical
  copy, and ``tests/test_jobapi.py`` fails (saying which command copies it) when they differ. Why a copy
  rather than one importing the other: the bridge folder is copied into ``ComfyUI/custom_nodes`` on its own,
  where ``comfy_worker`` is not installed; and the tools cannot import the bridge package, whose
  ``__init__`` registers itself with ComfyUI's ``server`` module (any module of that name on a laptop).
* So it imports nothing but the standard library, and nothing of ``comfy_worker`` or ComfyUI.

What it guards against, for both: outputs come from the endpoint, which may be compromised, so an output URL
is fetched only over http(s), never ``file://`` (local files copied into ComfyUI's output) or another scheme,
also not through a redirect; the API key is sent to the endpoint only, never to an output's host or a
redirect to another host; a worker-given file name is reduced to one safe name (``safe_output_name``).
Only GETs are retried (a retried ``/run`` could queue a job twice).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

log = logging.getLogger(__name__)

RUNPOD_API_BASE = "https://api.runpod.ai/v2"
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
OUTPUT_KINDS = ("images", "videos", "audio", "files")
RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_NAME_BYTES = 200  # most filesystems stop at 255 bytes; room left for a "_2" counter
CHUNK = 1 << 20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")  # base64 never has ':', a URL always does


class JobAPIError(Exception):
    """The endpoint did not answer as a RunPod job API does (network, HTTP status, not JSON), or an output
    could not be fetched; the message says which URL and why."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only, and without the API key when they leave the host."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise JobAPIError(f"{req.full_url} redirected to a {scheme}: URL; only http and https are followed")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _opener() -> urllib.request.OpenerDirector:
    """An opener with http and https handlers only: no ``file:``, ``ftp:`` or ``data:`` URL can be opened."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason if reason is not None else exc) or type(exc).__name__


class JobAPI:
    """One endpoint: RunPod's ``https://api.runpod.ai/v2/<id>`` or any base URL with the same routes.

    RunPod answers ``GET /status``; the runpod SDK's local API only ``POST`` (and runs the whole job inside that
    call), so a 405 switches to POST once, and says that no progress will show.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        request_timeout_s: float = 30.0,
        status_timeout_s: float = 3600.0,
        retries: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.request_timeout_s = request_timeout_s
        self.status_timeout_s = status_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._opener = _opener()
        self._status_method = "GET"

    @property
    def is_local_api(self) -> bool:
        """The runpod SDK's local API (it refused ``GET /status``)."""
        return self._status_method == "POST"

    def _send(self, method: str, url: str, body: Any, timeout_s: float) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 (http(s) only)
        try:
            with self._opener.open(request, timeout=timeout_s) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise JobAPIError(f"{method} {url} failed: {_reason(exc)}") from exc

    def _call(self, method: str, route: str, body: Any = None, timeout_s: float | None = None) -> tuple[int, bytes]:
        url = f"{self.base_url}/{route}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries or method != "GET"
            try:
                status, data = self._send(method, url, body, timeout_s or self.request_timeout_s)
            except JobAPIError:
                if last:
                    raise
            else:
                if last or status not in RETRY_STATUSES:
                    return status, data
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _json(self, route: str, status: int, data: bytes) -> dict[str, Any]:
        url = f"{self.base_url}/{route}"
        text = data.decode("utf-8", "replace")
        if status == 401:
            raise JobAPIError(f"{url} refused the API key (HTTP 401): check RUNPOD_API_KEY")
        if status >= 400:
            raise JobAPIError(f"{url} answered HTTP {status}: {text[:500]}")
        try:
            body = json.loads(text or "{}")
        except ValueError as exc:
            raise JobAPIError(f"{url} did not answer JSON: {text[:200]!r}") from exc
        if not isinstance(body, dict):
            raise JobAPIError(f"{url} answered {type(body).__name__}, not a job object")
        return body

    def submit(
        self, job: dict[str, Any], sync: bool = False, options: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Queue ``job`` (the worker's input); ``options`` are RunPod's own request fields (``webhook``,
        ``policy``), sent beside ``input``."""
        route = "runsync" if sync else "run"
        body = {"input": job, **(options or {})}
        status, data = self._call("POST", route, body, self.status_timeout_s if sync else None)
        return self._json(route, status, data)

    def status(self, job_id: str) -> dict[str, Any]:
        route = f"status/{job_id}"
        status, data = self._call(self._status_method, route, timeout_s=self.status_timeout_s)
        if status == 405 and self._status_method == "GET":
            self._status_method = "POST"
            log.info(
                "%s is the runpod SDK's local API: it runs the whole job inside this status call, so no progress "
                "shows until the job ends (RunPod's endpoints and the worker's logs show progress)",
                self.base_url,
            )
            status, data = self._call("POST", route, timeout_s=self.status_timeout_s)
        return self._json(route, status, data)

    def cancel(self, job_id: str) -> bool:
        """True when the endpoint took the cancellation (the local API has no ``/cancel``)."""
        try:
            status, data = self._call("POST", f"cancel/{job_id}", timeout_s=10)
        except JobAPIError as exc:
            log.warning("could not cancel job %s: %s", job_id, exc)
            return False
        if status >= 400:
            text = data[:200].decode("utf-8", "replace")
            log.warning("the endpoint did not cancel job %s: HTTP %s %s", job_id, status, text)
            return False
        return True

    def wait(
        self,
        first: dict[str, Any],
        *,
        poll_s: float = 1.0,
        max_wait_s: float | None = None,
        on_update: Callable[[dict[str, Any]], None] = lambda _body: None,
        interrupted: Callable[[], bool] = lambda: False,
    ) -> dict[str, Any]:
        """Poll ``/status`` until the job is final; ``on_update(body)`` sees every answer, the final one too.

        Raises ``TimeoutError`` after ``max_wait_s`` and ``InterruptedError`` when ``interrupted()``; the
        caller decides whether to cancel.
        """
        body = first
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        while True:
            on_update(body)
            if str(body.get("status")) in FINAL_STATES:
                return body
            if "id" not in body:
                raise JobAPIError(f"the endpoint answered status {body.get('status')!r} without a job id: {body}")
            if interrupted():
                raise InterruptedError(str(body["id"]))
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {body['id']} not finished after {max_wait_s:g} s")
            time.sleep(poll_s)
            body = self.status(str(body["id"])) | {"id": body["id"]}


def describe_progress(output: Any) -> str:
    """One line for a progress update: the worker's dict, or whatever another worker posts."""
    if not isinstance(output, dict):
        return str(output)
    parts = []
    if isinstance(output.get("percent"), int | float):
        parts.append(f"{output['percent']:5.1f}%")
    if output.get("node_id") is not None:
        parts.append(f"node {output['node_id']} ({output.get('class_type') or '?'})")
    if output.get("steps"):
        parts.append(f"step {output.get('step')}/{output['steps']}")
    if output.get("nodes_total"):
        parts.append(f"[{output.get('nodes_done', 0)}/{output['nodes_total']} nodes]")
    return " ".join(parts) or json.dumps(output, default=str)


def safe_output_name(name: Any, fallback: str) -> str:
    """A worker-given file name made safe to create in a local folder: its last path segment only (outputs
    never land outside the folder), without control characters (a NUL makes ``open`` raise), at most
    ``MAX_NAME_BYTES`` bytes with its extension kept (a 300-character name fails with ENAMETOOLONG)."""
    text = str(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(char for char in text if char.isprintable()).strip()
    if text in {"", ".", ".."}:
        return fallback
    if len(text.encode()) <= MAX_NAME_BYTES:
        return text
    stem, dot, suffix = text.rpartition(".")
    if not dot or not stem or len(suffix.encode()) > 16:
        stem, suffix = text, ""
    room = MAX_NAME_BYTES - len(suffix.encode()) - (1 if suffix else 0)
    short = stem.encode()[:room].decode("utf-8", "ignore")
    return f"{short}.{suffix}" if suffix else short


def output_chunks(entry: Mapping[str, Any], timeout_s: float = 300.0) -> Iterator[bytes]:
    """An output's bytes: base64 decoded, or its URL (an ``s3_url``) fetched over http(s) without the API key.

    Any other scheme (``file:``, ``ftp:``, ``data:``) is refused: a compromised endpoint must not make the user's
    machine read its own files into the output folder.
    """
    name = entry.get("filename")
    data = entry.get("data")
    if not isinstance(data, str):
        raise JobAPIError(f"output {name!r} has no data")
    scheme = _SCHEME.match(data)
    if scheme is None:
        try:
            yield base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise JobAPIError(f"output {name!r} is not valid base64: {exc}") from exc
        return
    if scheme.group(1).lower() not in ("http", "https"):
        raise JobAPIError(f"output {name!r}: refusing to fetch a {scheme.group(1)}: URL (only http and https)")
    try:
        request = urllib.request.Request(data)  # noqa: S310 (the scheme is checked above, the opener has http(s) only)
        with _opener().open(request, timeout=timeout_s) as response:
            while chunk := response.read(CHUNK):
                yield bytes(chunk)
    except urllib.error.HTTPError as exc:
        raise JobAPIError(f"downloading {name!r} failed: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise JobAPIError(f"downloading {name!r} failed: {_reason(exc)}") from exc
