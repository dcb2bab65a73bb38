"""A loopback stand-in for RunPod's job API, so tests can drive the real SDK's production loop.

``runpod.serverless.start`` only runs its production loop (job take, result and progress posts, streaming,
the per-job stop channel) when ``RUNPOD_WEBHOOK_GET_JOB`` is set. ``RunpodPlatform`` serves those URLs on
127.0.0.1 from a background thread, records every request, and lets a test queue jobs, read what the worker
posted and stop a running job, without anything leaving the machine.

The protocol, as runpod 1.12 speaks it (``runpod/serverless/modules/rp_job.py``, ``rp_http.py``,
``rp_scale.py``, ``rp_progress.py``):

* take: ``GET <GET_JOB with $ID=pod>&job_in_progress=0|1`` answers one job object ``{"id", "input"}``, or
  204; with a ``concurrency_modifier`` above 1 the path is ``job-take-batch`` plus ``&batch_size=N`` and the
  answer a JSON list. The SDK polls again at once after a 204, so both are long-polls here.
* stop: ``GET`` the take URL with ``/job-take/`` replaced by ``/job-stop/`` (same query, nothing appended),
  answered ``{"jobsToStop": [ids]}`` (``application/json``) or 204. The SDK waits 1 s after an empty answer
  and bounds each poll at 90 s, so it is a long-poll too.
* done: ``POST <POST_OUTPUT with $RUNPOD_POD_ID=pod, $ID=job>&isStream=false|true``, the JSON text sent as
  ``application/x-www-form-urlencoded``: ``{"status": "IN_PROGRESS", "output": msg}`` for
  ``progress_update``, otherwise the final ``{"output"?, "error"?, "stopPod"?}``.
* stream: ``POST <POST_STREAM ...>&isStream=false`` with ``{"output": partial}`` per generator item.

The user's side, as RunPod documents it for queue-based endpoints: ``POST /run`` with ``{"input", "webhook"?,
"policy"?}`` answers ``{"id", "status": "IN_QUEUE"}``; ``/status/<id>`` (GET or POST) answers ``{"id",
"status", "delayTime", "executionTime", "output" | "error"}``; ``POST /cancel/<id>``. When a job with a
``webhook`` finishes, the platform POSTs that same status body to it and tries twice more, ``webhook_retry_s``
apart (10 s on RunPod), unless it answers 200. ``policy`` (``executionTimeout``, ``ttl``, ``lowPriority``) is
recorded; an ``executionTimeout`` (milliseconds) stops a running job that outlives it, as ``TIMED_OUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from aiohttp import web

from .processes import stop_group

log = logging.getLogger(__name__)

T = TypeVar("T")

_POLL_PATH = re.compile(r"^/v2/(?P<endpoint>[^/]+)/(?P<kind>job-take|job-take-batch|job-stop)/(?P<pod>[^/]+)$")
_POST_PATH = re.compile(r"^/v2/(?P<endpoint>[^/]+)/(?P<kind>job-done|job-stream)/(?P<pod>[^/]+)/(?P<job>[^/]+)$")
_USER_PATH = re.compile(r"^/v2/(?P<endpoint>[^/]+)/(?P<kind>run|status|cancel)(?:/(?P<job>[^/]+))?$")
# Result posts carry whole outputs (base64 images); aiohttp's default 1 MiB request cap would reject them.
_MAX_BODY = 256 * 1024 * 1024
_LOG_TAIL = 3000


@dataclass
class PlatformRequest:
    """One request the platform received, kept for assertions (``status``/``response`` once answered)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    text: str
    body: Any  # the body parsed as JSON, None when empty or not JSON
    kind: str  # job-take, job-take-batch, job-stop, job-done, job-stream or unknown
    pod_id: str | None
    job_id: str | None
    at: float = field(default_factory=time.monotonic)
    status: int | None = None
    response: Any = None

    def summary(self) -> str:
        """One line for error messages."""
        tail = self.text if len(self.text) <= 160 else self.text[:157] + "..."
        query = "&".join(f"{k}={v}" for k, v in self.query.items())
        return f"{self.method} {self.path}?{query} -> {self.status} {tail}"


@dataclass
class SpawnedWorker:
    """A worker subprocess started by ``RunpodPlatform.spawn``; it is stopped when the platform closes."""

    process: subprocess.Popen[bytes]
    log_path: Path
    pod_id: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the worker wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, grace_s: float = 10.0, *, signalled: bool = False) -> int:
        """SIGTERM (what the platform sends on scale-down; not again when ``signalled``), then SIGKILL after
        ``grace_s`` for its whole process group (the ComfyUI it started too); the exit code."""
        return stop_group(self.process, None if signalled else signal.SIGTERM, grace_s)


class RunpodPlatform:
    """RunPod's job API on 127.0.0.1: queue jobs, watch what the worker posts, stop running jobs.

    ``take_hold_s``/``stop_hold_s`` are how long an empty take/stop poll is held open before its 204: the SDK
    re-polls a take at once (a short hold keeps it from spinning) and waits 1 s after an empty stop poll
    (a hold lets a ``cancel`` reach the worker at once). A SIGTERMed worker exits only after its polls
    return, so long holds slow shutdown down.
    """

    def __init__(
        self,
        *,
        endpoint: str = "test-endpoint",
        take_hold_s: float = 1.0,
        stop_hold_s: float = 1.0,
        webhook_retry_s: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.webhook_retry_s = webhook_retry_s
        self.policies: dict[str, dict[str, Any]] = {}  # job id -> the policy its /run asked for
        self.webhook_calls: list[tuple[str, int | None]] = []  # (job id, HTTP status or None) per attempt
        self._webhooks: dict[str, str] = {}
        self._submitted_at: dict[str, float] = {}
        self._taken_at: dict[str, float] = {}
        self._timed_out: set[str] = set()
        self.take_hold_s = take_hold_s
        self.stop_hold_s = stop_hold_s
        self.port = 0
        self._cond = threading.Condition()
        self._queue: deque[dict[str, Any]] = deque()
        self._submitted: set[str] = set()
        self._withdrawn: set[str] = set()
        self._taken: dict[str, str] = {}  # job id -> pod id
        self._stops: dict[str | None, list[str]] = {}  # pod id (None: whichever pod polls first) -> ids
        self._progress: dict[str, list[Any]] = {}
        self._stream: dict[str, list[Any]] = {}
        self._results: dict[str, list[dict[str, Any]]] = {}
        self._requests: list[PlatformRequest] = []
        self._workers: list[SpawnedWorker] = []
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._wake: asyncio.Event | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> Self:
        """Serve on a free loopback port from a daemon thread; returns once it accepts connections."""
        if self._loop is not None:
            raise RuntimeError("the platform is already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="runpod-platform", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        log.debug("runpod platform on %s", self.base_url)
        return self

    def close(self, grace_s: float = 5.0) -> None:
        """SIGTERM spawned workers (held polls answer at once so they can exit), then stop serving."""
        if self._loop is None or self._thread is None:
            return
        with self._cond:
            self._closing = True
        self._loop.call_soon_threadsafe(self._wake_pollers)
        for worker in self._workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self._workers:
            worker.terminate(grace_s, signalled=True)
        try:
            asyncio.run_coroutine_threadsafe(self._unserve(), self._loop).result(timeout=15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None
            self._thread = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v2/<endpoint>``, the prefix of every URL the worker is given."""
        return f"http://127.0.0.1:{self.port}/v2/{self.endpoint}"

    # ------------------------------------------------------------------ worker side

    def env(self, pod_id: str = "test-pod") -> dict[str, str]:
        """The variables that put a worker into the production loop against this platform.

        No ``RUNPOD_AI_API_KEY``: without it the SDK starts no heartbeat process and sends an empty
        ``Authorization`` header; no ``RUNPOD_WEBHOOK_PING`` either. The start-up checks are skipped (they
        would otherwise connect to a public DNS server). The SDK reads all of these at import time.
        """
        if not self.port:
            raise RuntimeError("start the platform first")
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base_url}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base_url}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.base_url}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_POD_ID": pod_id,
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    def process_env(self, pod_id: str = "test-pod", extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A whole subprocess environment: ours minus every ``RUNPOD_*`` variable, plus ``env()`` and ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
        env |= {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
        return env | self.env(pod_id) | dict(extra or {})

    def spawn(
        self,
        command: Sequence[str],
        *,
        pod_id: str = "test-pod",
        extra_env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_path: Path | None = None,
    ) -> SpawnedWorker:
        """Start ``command`` (e.g. ``[sys.executable, "handler.py"]``) with ``process_env``, output to a log file.

        The platform SIGTERMs it on close, and timeouts in ``wait_*`` fail fast with its log once every
        spawned worker has exited.
        """
        if log_path is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="runpod-platform-")
            log_path = Path(self._tmp.name) / f"worker-{len(self._workers)}-{pod_id}.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=self.process_env(pod_id, extra_env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        worker = SpawnedWorker(process, log_path, pod_id)
        self._workers.append(worker)
        return worker

    # ------------------------------------------------------------------ test side

    def submit(self, input: dict[str, Any], job_id: str | None = None) -> str:
        """Queue a job ``{"id", "input"}`` for the next take; returns its id."""
        job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
        with self._cond:
            if job_id in self._submitted:
                raise ValueError(f"job id {job_id!r} was already submitted")
            self._submitted.add(job_id)
            self._submitted_at[job_id] = time.monotonic()
            self._queue.append({"id": job_id, "input": input})
            self._cond.notify_all()
        self._poke()
        return job_id

    def submit_many(self, inputs: Sequence[dict[str, Any]]) -> list[str]:
        """Queue several jobs at once, so a single batch take (``concurrency_modifier``) can carry them all."""
        jobs: list[dict[str, Any]] = [{"id": f"job-{uuid.uuid4().hex[:12]}", "input": item} for item in inputs]
        with self._cond:
            self._submitted.update(job["id"] for job in jobs)
            self._queue.extend(jobs)
            self._cond.notify_all()
        self._poke()
        return [job["id"] for job in jobs]

    def cancel(self, job_id: str) -> None:
        """Stop a job as the platform does on ``/cancel`` or a timeout.

        A job already taken is named in the next answer of its pod's job-stop poll (at once if one is held
        open); the SDK then cancels the job's asyncio task and posts no result. A job still queued is
        withdrawn and never handed out.
        """
        with self._cond:
            if job_id not in self._submitted:
                raise KeyError(f"job {job_id!r} was never submitted")
            queued = [job for job in self._queue if job["id"] == job_id]
            if queued:
                self._queue.remove(queued[0])
                self._withdrawn.add(job_id)
                log.debug("job %s withdrawn from the queue", job_id)
            else:
                self._stops.setdefault(self._taken[job_id], []).append(job_id)
            self._cond.notify_all()
        self._poke()

    def send_stop(self, *job_ids: str, pod_id: str | None = None) -> None:
        """Name any ids on the stop channel (of ``pod_id``, or of whichever pod polls first), known or not."""
        with self._cond:
            self._stops.setdefault(pod_id, []).extend(job_ids)
        self._poke()

    def wait_result(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first final (non-progress) body posted to job-done for ``job_id``, as the SDK sent it."""

        def ready() -> dict[str, Any] | None:
            posted = self._results.get(job_id)
            return posted[0] if posted else None

        return self._wait(f"a result for job {job_id}", ready, timeout, job_id)

    def wait_taken(self, job_id: str, timeout: float = 30.0) -> str:
        """Block until a worker took ``job_id``; returns the pod id that took it."""
        return self._wait(f"job {job_id} to be taken", lambda: self._taken.get(job_id), timeout, job_id)

    def wait_progress(self, job_id: str, count: int = 1, timeout: float = 30.0) -> list[Any]:
        """Block until ``count`` progress posts arrived for ``job_id``; returns them all."""

        def ready() -> list[Any] | None:
            got = self._progress.get(job_id, [])
            return list(got) if len(got) >= count else None

        return self._wait(f"{count} progress post(s) for job {job_id}", ready, timeout, job_id)

    def wait_stop_delivered(self, job_id: str, timeout: float = 30.0) -> PlatformRequest:
        """Block until a job-stop poll was answered naming ``job_id``; returns that request."""

        def ready() -> PlatformRequest | None:
            for record in self._requests:
                if record.kind == "job-stop" and record.status == 200 and job_id in record.response["jobsToStop"]:
                    return record
            return None

        return self._wait(f"a stop signal for job {job_id} to be delivered", ready, timeout, job_id)

    def results(self, job_id: str) -> list[dict[str, Any]]:
        """Every final body posted for ``job_id`` (normally one; none for a stopped job)."""
        with self._cond:
            return list(self._results.get(job_id, []))

    def progress(self, job_id: str) -> list[Any]:
        """The ``output`` of every IN_PROGRESS post for ``job_id`` (what ``progress_update`` got), in order."""
        with self._cond:
            return list(self._progress.get(job_id, []))

    def stream(self, job_id: str) -> list[Any]:
        """The ``output`` of every job-stream post for ``job_id`` (one per generator item), in arrival order."""
        with self._cond:
            return list(self._stream.get(job_id, []))

    def taken_by(self, job_id: str) -> str | None:
        """The pod that took ``job_id``, or None while it is queued (or was withdrawn)."""
        with self._cond:
            return self._taken.get(job_id)

    def queued(self) -> list[str]:
        """Ids of the jobs not yet handed out."""
        with self._cond:
            return [job["id"] for job in self._queue]

    def requests(self, kind: str | None = None, job_id: str | None = None) -> list[PlatformRequest]:
        """Every request received, in arrival order, optionally only of one ``kind`` / for one job."""
        with self._cond:
            return [
                r for r in self._requests if (kind is None or r.kind == kind) and (job_id is None or r.job_id == job_id)
            ]

    def workers(self) -> list[SpawnedWorker]:
        """The workers started by ``spawn``."""
        return list(self._workers)

    # ------------------------------------------------------------------ internals (test thread)

    def _poke(self) -> None:
        """Wake the long-polls held in the server thread so they look at the state again."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_pollers)

    def _wait(self, what: str, ready: Callable[[], T | None], timeout: float, job_id: str | None) -> T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = ready()
                if value is not None:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} within {timeout} s\n{self._describe(job_id)}")
                if self._workers and all(w.process.poll() is not None for w in self._workers):
                    raise AssertionError(f"no {what}: every worker has exited\n{self._describe(job_id)}")
                self._cond.wait(min(remaining, 0.25))

    def _describe(self, job_id: str | None) -> str:
        """Where a job stands, the last requests and the workers' log tails, for a failure message."""
        lines = []
        if job_id is not None:
            if job_id not in self._submitted:
                state = "never submitted"
            elif job_id in self._withdrawn:
                state = "withdrawn by cancel() before it was taken"
            elif job_id in self._taken:
                state = f"taken by pod {self._taken[job_id]}"
            else:
                state = "still queued (no worker took it)"
            lines.append(
                f"job {job_id}: {state}; {len(self._progress.get(job_id, []))} progress, "
                f"{len(self._stream.get(job_id, []))} stream, {len(self._results.get(job_id, []))} result posts"
            )
        lines.append(f"last requests (of {len(self._requests)}):")
        lines.extend(f"  {r.summary()}" for r in self._requests[-12:])
        for worker in self._workers:
            lines.append(f"worker pid {worker.pid} (pod {worker.pod_id}) rc={worker.process.poll()}, log tail:")
            lines.append(worker.log()[-_LOG_TAIL:])
        return "\n".join(lines)

    # ------------------------------------------------------------------ internals (server thread)

    async def _serve(self) -> None:
        self._wake = asyncio.Event()
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def _unserve(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _wake_pollers(self) -> None:
        """Runs in the server thread: release every poll waiting on the current event."""
        if self._wake is not None:
            self._wake.set()
            self._wake = asyncio.Event()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        text = await request.text()
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = None
        poll, post = _POLL_PATH.match(request.path), _POST_PATH.match(request.path)
        match = poll or post
        record = PlatformRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query.items()),
            headers=dict(request.headers.items()),
            text=text,
            body=body,
            kind=match["kind"] if match else "unknown",
            pod_id=match["pod"] if match else None,
            job_id=post["job"] if post else None,
        )
        with self._cond:
            self._requests.append(record)
            self._cond.notify_all()
        response = await self._answer(request, record)
        with self._cond:
            record.status = response.status
            self._cond.notify_all()
        log.debug("platform: %s", record.summary())
        return response

    async def _answer(self, request: web.Request, record: PlatformRequest) -> web.StreamResponse:
        user = _USER_PATH.match(request.path)
        if user and record.kind == "unknown":
            return self._answer_user(request.method, user["kind"], user["job"], record.body)
        expected = "POST" if record.kind in ("job-done", "job-stream") else "GET"
        if record.kind == "unknown":
            return web.Response(status=404, text="not a RunPod job API path")
        if request.method != expected:
            return web.Response(status=405)
        if record.kind in ("job-take", "job-take-batch"):
            size = int(record.query.get("batch_size", "1")) if record.kind == "job-take-batch" else 1
            jobs = await self._long_poll(lambda: self._take(request, record, size), self.take_hold_s)
            if not jobs:
                return web.Response(status=204)
            record.response = jobs[0] if record.kind == "job-take" else jobs
            return web.json_response(record.response)
        if record.kind == "job-stop":
            ids = await self._long_poll(lambda: self._take_stops(request, record), self.stop_hold_s)
            if not ids:
                return web.Response(status=204)
            record.response = {"jobsToStop": ids}
            return web.json_response(record.response)
        if not isinstance(record.body, dict):
            return web.Response(status=400, text="the body is not a JSON object")
        job_id = record.job_id or ""
        webhook: str | None = None
        with self._cond:
            if record.kind == "job-stream":
                self._stream.setdefault(job_id, []).append(record.body.get("output"))
            elif record.body.get("status") == "IN_PROGRESS":
                self._progress.setdefault(job_id, []).append(record.body.get("output"))
            else:
                self._results.setdefault(job_id, []).append(record.body)
                webhook = self._webhooks.get(job_id) if len(self._results[job_id]) == 1 else None
            self._cond.notify_all()
        if webhook:
            threading.Thread(target=self._deliver, args=(job_id, webhook), daemon=True).start()
        return web.json_response({})

    # ------------------------------------------------------------------ the user's side

    def _answer_user(self, method: str, kind: str, job_id: str | None, body: Any) -> web.Response:
        if kind == "run":
            if method != "POST" or not isinstance(body, dict) or not isinstance(body.get("input"), dict):
                return web.json_response({"error": "POST a JSON object with an 'input' object"}, status=400)
            new_id = f"job-{uuid.uuid4().hex[:12]}"
            with self._cond:
                if isinstance(body.get("webhook"), str):
                    self._webhooks[new_id] = body["webhook"]
                if isinstance(body.get("policy"), dict):
                    self.policies[new_id] = dict(body["policy"])
            self.submit(body["input"], new_id)
            return web.json_response({"id": new_id, "status": "IN_QUEUE"})
        if job_id is None or job_id not in self._submitted:
            return web.json_response({"error": "job not found"}, status=404)
        if kind == "cancel":
            self.cancel(job_id)
            return web.json_response({"id": job_id, "status": "CANCELLED"})
        return web.json_response(self.status_of(job_id))

    def status_of(self, job_id: str) -> dict[str, Any]:
        """What ``/status/<id>`` answers (and a webhook receives) for a job."""
        with self._cond:
            results = self._results.get(job_id)
            status: dict[str, Any] = {"id": job_id}
            submitted, taken = self._submitted_at.get(job_id), self._taken_at.get(job_id)
            if taken is not None and submitted is not None:
                status["delayTime"] = round((taken - submitted) * 1000)
            if job_id in self._timed_out:
                return status | {"status": "TIMED_OUT"}
            if job_id in self._withdrawn:
                return status | {"status": "CANCELLED"}
            if not results:
                return status | {"status": "IN_PROGRESS" if job_id in self._taken else "IN_QUEUE"}
            final = results[0]
            if taken is not None:
                status["executionTime"] = round((time.monotonic() - taken) * 1000)
            if "error" in final:
                return status | {"status": "FAILED", "error": final["error"]}
            return status | {"status": "COMPLETED", "output": final.get("output")}

    def _expire(self, job_id: str) -> None:
        """Runs in the server thread: the job outlived its policy's executionTimeout."""
        with self._cond:
            if self._results.get(job_id):
                return
            self._timed_out.add(job_id)
            self._stops.setdefault(self._taken[job_id], []).append(job_id)
            self._cond.notify_all()
        self._wake_pollers()

    def _deliver(self, job_id: str, url: str) -> None:
        """POST the finished job's status to its webhook: three tries, ``webhook_retry_s`` apart."""
        data = json.dumps(self.status_of(job_id)).encode()
        for attempt in range(3):
            if attempt:
                time.sleep(self.webhook_retry_s)
            request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            code: int | None = None
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    code = response.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            except OSError:
                code = None
            with self._cond:
                self.webhook_calls.append((job_id, code))
                self._cond.notify_all()
            if code == 200:
                return

    def wait_webhook_calls(self, job_id: str, count: int, timeout: float = 30.0) -> list[int | None]:
        """Block until ``count`` webhook attempts were made for ``job_id``; their HTTP statuses."""

        def ready() -> list[int | None] | None:
            codes = [code for call_id, code in self.webhook_calls if call_id == job_id]
            return codes if len(codes) >= count else None

        return self._wait(f"{count} webhook call(s) for job {job_id}", ready, timeout, job_id)

    def _take(self, request: web.Request, record: PlatformRequest, size: int) -> list[dict[str, Any]]:
        """Called with the lock held: hand out up to ``size`` queued jobs, unless the poller hung up."""
        if not self._queue or _hung_up(request):
            return []
        jobs = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
        for job in jobs:
            self._taken[job["id"]] = record.pod_id or ""
            self._taken_at[job["id"]] = time.monotonic()
            timeout_ms = self.policies.get(job["id"], {}).get("executionTimeout")
            if isinstance(timeout_ms, int | float) and self._loop is not None:
                self._loop.call_later(timeout_ms / 1000, self._expire, job["id"])
        self._cond.notify_all()
        return jobs

    def _take_stops(self, request: web.Request, record: PlatformRequest) -> list[str]:
        """Called with the lock held: the ids waiting for this pod's stop channel, unless the poller hung up."""
        if _hung_up(request):
            return []
        return self._stops.pop(record.pod_id, []) + self._stops.pop(None, [])

    async def _long_poll(self, grab: Callable[[], list[T]], hold_s: float) -> list[T]:
        """``grab()`` now, or again on every wake-up until ``hold_s`` passes (or the platform closes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold_s
        while True:
            with self._cond:
                got = grab()
                closing = self._closing
            remaining = deadline - loop.time()
            if got or closing or remaining <= 0 or self._wake is None:
                return got
            # No await between grab() and here, so a wake-up scheduled meanwhile still sets this event.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)


def _hung_up(request: web.Request) -> bool:
    """Whether the poller is gone (a killed worker): a job handed to it would be lost."""
    transport = request.transport
    return transport is None or transport.is_closing()
