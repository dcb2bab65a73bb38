"""One job, from ``event["input"]`` to the result: the only place errors become job results.

The handler is async because the runpod SDK runs handlers in its event-loop thread: a blocking handler would
stall progress posts and could never be cancelled. Every blocking call (HTTP, disk, base64 of big files)
goes through ``asyncio.to_thread``; ComfyUI's frames arrive on an ``asyncio.Queue`` from ``events``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.errors import (
    execution_error,
    interrupted_error,
    missing_node_types_error,
    prompt_warnings,
    suggest_input_files,
)
from comfy_worker.comfy.events import DISCONNECTED, RECONNECTED, EventStream, Frame
from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.errors import (
    ComfyCrashedError,
    ComfyUnavailableError,
    InputError,
    JobTimeoutError,
    WorkerError,
    WorkflowError,
)
from comfy_worker.redact import Redactor
from comfy_worker.runtime import cleanup, delivery, diagnostics, outputs, workflow
from comfy_worker.runtime.fetch import Fetcher
from comfy_worker.runtime.schema import JobInput, parse_job_input
from comfy_worker.settings import FREE_MODES, Settings
from comfy_worker.storage import S3Storage

log = logging.getLogger(__name__)

ProgressSink = Callable[[dict[str, Any]], None]

HISTORY_POLL_S = 0.5  # how often /history is asked while the WebSocket is down
IDLE_CHECK_S = 15.0  # with the socket up but silent this long, ask /history anyway


@dataclass
class _Progress:
    """What the job has seen of its prompt, for progress updates and for error messages."""

    workflow: dict[str, Any]
    sink: ProgressSink
    interval_s: float
    current_node: str | None = None
    done: set[str] = field(default_factory=set)
    step: tuple[int, int] | None = None
    _last_sent: float = float("-inf")

    def node_label(self, node_id: str | None) -> str | None:
        if node_id is None:
            return None
        return f"{node_id} ({self.workflow.get(node_id, {}).get('class_type', '?')})"

    def update(self, frame: Frame) -> None:
        kind, data = frame.get("type"), frame.get("data") or {}
        if kind == "execution_cached":
            self.done.update(str(n) for n in data.get("nodes") or [])
        elif kind == "executing" and data.get("node") is not None:
            if self.current_node is not None:
                self.done.add(self.current_node)
            self.current_node, self.step = str(data["node"]), None
        elif kind == "progress":
            self.step = (int(data.get("value", 0)), int(data.get("max", 0)))
        else:
            return
        self._maybe_send()

    def _maybe_send(self) -> None:
        now = time.monotonic()
        if now - self._last_sent < self.interval_s:
            return
        self._last_sent = now
        total = len(self.workflow)
        message: dict[str, Any] = {
            "node_id": self.current_node,
            "class_type": self.workflow.get(self.current_node or "", {}).get("class_type"),
            "nodes_done": len(self.done),
            "nodes_total": total,
        }
        fraction = len(self.done) / total if total else 0.0
        if self.step and self.step[1]:
            message["step"], message["steps"] = self.step
            fraction += (self.step[0] / self.step[1]) / total if total else 0.0
        message["percent"] = round(min(fraction, 1.0) * 100, 1)
        try:
            self.sink(message)
        except Exception:  # a progress post must never fail the job
            log.exception("progress update failed")


@dataclass
class _Attempt:
    """One run of a job: its prompt id once queued (for errors and cancellation), where the time went, and
    the files it made (for cleanup)."""

    job_id: str
    started: float
    folder: str  # the job's own output subfolder (see ``cleanup``)
    prompt_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    uploaded: list[str] = field(default_factory=list)
    temp_files: list[tuple[str, str]] = field(default_factory=list)

    def lap(self, name: str) -> None:
        self.timings[name] = time.monotonic() - self.started - sum(self.timings.values())


class Worker:
    """Runs jobs against one ComfyUI; created once per process by ``app``."""

    def __init__(
        self,
        settings: Settings,
        client: ComfyClient,
        events: EventStream,
        supervisor: ComfySupervisor | None = None,
        startup_error: WorkerError | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.events = events
        self.supervisor = supervisor
        self.startup_error = startup_error
        self.provisioning = diagnostics.provisioning_problems(settings.provision_status)
        if startup_error is not None and self.provisioning and self.provisioning.get("failed"):
            first = self.provisioning["failed"][0]
            startup_error.message += f" Provisioning failed first: {first['kind']} {first['name']}: {first['error']}"
        self._recovery: concurrent.futures.Future[None] | None = None
        self._node_types: set[str] | None = None
        self._active_jobs = 0
        self._restart_pending = False
        self.redact = Redactor(settings.secrets)
        self.storage = S3Storage(settings.s3) if settings.s3 is not None else None
        self.fetcher = Fetcher(
            settings.input_url_allowlist,
            int(settings.input_url_max_mb * 1024 * 1024),
            settings.input_url_timeout_s,
            self.storage,
        )
        self.folders: dict[str, Path] = {}
        if settings.comfy_is_local:
            for name, folder in (
                ("input", settings.comfyui_input_dir),
                ("output", settings.comfyui_output_dir),
                ("temp", settings.comfyui_temp_dir),
            ):
                if folder is not None:
                    self.folders[name] = folder

    async def run(self, job_id: str, raw_input: Any, progress: ProgressSink) -> dict[str, Any]:
        """Run one job and return the handler's result: outputs, or ``{"error": <JSON text>}``."""
        attempt = _Attempt(job_id, started=time.monotonic(), folder=cleanup.job_folder(str(uuid.uuid4())))
        self._active_jobs += 1
        try:
            result = await self._execute(attempt, raw_input, progress)
            return result | await asyncio.to_thread(self._after_job)
        except asyncio.CancelledError:
            log.warning("job %s: cancelled; stopping prompt %s", job_id, attempt.prompt_id)
            if attempt.prompt_id is not None:
                threading.Thread(target=self._abandon, args=(attempt.prompt_id,), daemon=True).start()
            raise
        except WorkerError as exc:
            log.warning("job %s: %s: %s", job_id, exc.error_type, exc.message)
            return await self._error_result(exc, attempt)
        except Exception as exc:
            log.exception("job %s: unexpected error", job_id)
            error = WorkerError(
                f"Unexpected worker error: {type(exc).__name__}: {exc}", {"exception_type": type(exc).__name__}
            )
            return await self._error_result(error, attempt)
        finally:
            self._active_jobs -= 1
            if self._restart_pending and not self._active_jobs:
                self._restart_now()
            if self.settings.cleanup_job_files:
                await asyncio.to_thread(
                    cleanup.remove_job_files, self.folders, attempt.folder, attempt.uploaded, attempt.temp_files
                )

    def request_restart(self) -> None:
        """Restart ComfyUI so it loads changed custom nodes (apply_config.sh); a running job finishes first.

        Called from the SIGHUP handler, which runs on the same (main) thread as the job loop.
        """
        if self._active_jobs:
            log.info("ComfyUI restart requested: it happens once the running job is done")
            self._restart_pending = True
        else:
            self._restart_now()

    def _restart_now(self) -> None:
        self._restart_pending = False
        if self._recover_in_background():
            log.info("Restarting ComfyUI to load the changed custom nodes")
        else:
            log.warning("ComfyUI restart requested, but this worker did not start ComfyUI: restart it yourself")

    async def _error_result(self, error: WorkerError, attempt: _Attempt) -> dict[str, Any]:
        """The failed job's result: the error as JSON text with diagnostics, secrets masked."""
        if isinstance(error, ComfyCrashedError):
            error.details["comfyui_restarting"] = self._recover_in_background()
        report = await asyncio.to_thread(
            diagnostics.collect,
            error,
            self.client,
            self.supervisor,
            self.folders,
            self._recovering(),
            self.provisioning,
        )
        result = {"error": self.redact(error.to_json(prompt_id=attempt.prompt_id, diagnostics=report))}
        if error is self.startup_error:
            return result | {"refresh_worker": True}
        return result | await asyncio.to_thread(self._after_job)

    async def _execute(self, attempt: _Attempt, raw_input: Any, progress: ProgressSink) -> dict[str, Any]:
        job, graph = await asyncio.to_thread(self._prepare, raw_input, attempt.folder)
        if job.output.delivery == "s3" and self.storage is None:
            raise InputError(
                "output.delivery is 's3' but this worker has no bucket: set BUCKET_NAME (or BUCKET_ENDPOINT_URL), "
                "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY, or use delivery 'auto' or 'base64'."
            )
        await self._comfyui_back()
        if self.startup_error is not None:
            raise self.startup_error
        await self._check_node_types(graph)
        attempt.lap("prepare_s")
        await self._upload_inputs(job, attempt)
        attempt.lap("upload_s")
        prompt_id = attempt.prompt_id = str(uuid.uuid4())
        timeout_s = job.timeout or self.settings.job_timeout_s
        tracker = _Progress(graph, progress, self.settings.progress_interval_s)
        with self.events.subscription(prompt_id) as frames:
            try:
                queued = await asyncio.to_thread(self.client.queue_prompt, graph, prompt_id)
            except WorkflowError as exc:
                if "input" in self.folders:
                    files = await asyncio.to_thread(diagnostics.input_files, self.folders["input"])
                    suggest_input_files(exc, files)
                raise
            log.info("job %s: queued prompt %s (%d nodes)", attempt.job_id, prompt_id, len(graph))
            try:
                await self._follow(prompt_id, frames, tracker, attempt.started + timeout_s, timeout_s)
            except JobTimeoutError as exc:
                if not await self._stop_prompt(prompt_id, frames):
                    exc.details["comfyui_restarted"] = self._recover_in_background()
                raise
        attempt.lap("comfyui_s")
        entry = await asyncio.to_thread(self.client.history, prompt_id)
        if entry is None:
            raise WorkerError(f"ComfyUI finished prompt {prompt_id} but has no history entry for it.")
        collected = outputs.collect(entry, include_temp=job.output.include_temp)
        attempt.temp_files = [(f.subfolder, f.filename) for f in collected.files if f.folder_type == "temp"]
        options = job.output
        payloads = await asyncio.to_thread(
            outputs.load, self.client, self.folders, collected, options.format, options.quality
        )
        delivered, warnings = await asyncio.to_thread(
            delivery.deliver,
            payloads,
            options.delivery,
            self.storage,
            int(self.settings.max_result_mb * delivery.MB),
            {"job_id": attempt.job_id, "prompt_id": prompt_id},
            options.s3_prefix,
        )
        attempt.lap("outputs_s")
        texts = [text | {"text": self.redact(text["text"])} for text in collected.texts]
        result = outputs.assemble(delivered, texts)
        warnings += prompt_warnings(queued.get("node_errors") or {})
        if collected.skipped_temp:
            warnings.append(
                f"{collected.skipped_temp} temp output(s) (PreviewImage and the like) were left out; "
                "set output.include_temp to true to get them."
            )
        if not collected.files and not collected.texts:
            warnings.append("The workflow finished but produced no outputs (is there a SaveImage node?).")
        if self.provisioning is not None:
            failed = self.provisioning.get("failed", []) + self.provisioning.get("optional_failed", [])
            warnings += [f"Provisioning: {item['kind']} {item['name']} failed: {item['error']}" for item in failed]
        result |= {
            "status": "success",
            "prompt_id": prompt_id,
            "execution_time_seconds": round(time.monotonic() - attempt.started, 3),
            "timings": {name: round(value, 4) for name, value in attempt.timings.items()},
            "warnings": warnings,
        }
        log.info(
            "job %s: done in %.2fs, %d file(s)", attempt.job_id, result["execution_time_seconds"], len(collected.files)
        )
        return result

    async def _upload_inputs(self, job: JobInput, attempt: _Attempt) -> None:
        """Upload ``images`` (fetched first when given by URL) into ComfyUI's input folder."""
        for index, image in enumerate(job.images):
            data = image.data
            if image.url is not None:
                data = await asyncio.to_thread(self.fetcher.fetch, image.url, f"images[{index}].url")
            await asyncio.to_thread(self.client.upload_image, image.filename, data, image.subfolder)
            attempt.uploaded.append(image.name)

    async def _check_node_types(self, graph: dict[str, Any]) -> None:
        """Refuse every unknown node type in one error, before uploading anything.

        ``/object_info`` is cached per ComfyUI start (custom nodes load only at start) and asked again once
        when a type seems missing, so a cache can never wrongly refuse a job.
        """
        wanted = {node["class_type"] for node in graph.values()}
        if self._node_types is None or not wanted <= self._node_types:
            self._node_types = await asyncio.to_thread(self.client.node_types)
        missing = wanted - self._node_types
        if missing:
            raise missing_node_types_error(graph, missing)

    def _after_job(self) -> dict[str, Any]:
        """Hygiene between jobs: COMFY_FREE_AFTER_JOB, and ask for a new worker when memory runs low.

        Returns what to add to the result: ``refresh_worker`` makes RunPod replace this worker after the job,
        which beats the next job failing with out-of-memory on a worker whose memory leaked or fragmented.
        """
        s = self.settings
        if FREE_MODES[s.free_after_job]:
            try:
                self.client.free(FREE_MODES[s.free_after_job])
            except WorkerError as exc:
                log.warning("POST /free failed: %s", exc.message)
        low = []
        if s.refresh_min_free_ram_gb > 0:
            ram = diagnostics.memory_available()["ram_available_gb"]
            if ram is not None and ram < s.refresh_min_free_ram_gb:
                low.append(f"RAM {ram:g} GB < REFRESH_MIN_FREE_RAM_GB={s.refresh_min_free_ram_gb:g}")
        if s.refresh_min_free_vram_gb > 0:
            with contextlib.suppress(WorkerError, ValueError):
                devices = self.client.system_stats(timeout_s=2.0).get("devices") or []
                vram = min((d.get("vram_free", 0) / diagnostics.GIB for d in devices), default=None)
                if vram is not None and vram < s.refresh_min_free_vram_gb:
                    low.append(f"VRAM {vram:.2f} GB < REFRESH_MIN_FREE_VRAM_GB={s.refresh_min_free_vram_gb:g}")
        if not low:
            return {}
        log.warning("memory is low (%s): asking RunPod for a fresh worker", "; ".join(low))
        return {"refresh_worker": True}

    def _prepare(self, raw_input: Any, folder: str) -> tuple[JobInput, dict[str, Any]]:
        job = parse_job_input(raw_input, timeout_max=self.settings.job_timeout_max_s)
        graph = workflow.prepare(job)
        if self.settings.cleanup_job_files and "output" in self.folders:
            cleanup.isolate_outputs(graph, folder)
        return job, graph

    async def _follow(
        self,
        prompt_id: str,
        frames: asyncio.Queue[Frame],
        tracker: _Progress,
        deadline: float,
        timeout_s: float,
    ) -> None:
        """Wait until the prompt ends: ``executing`` with ``node: null``, an error frame, or /history says so."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeoutError(
                    f"The job ran past its timeout of {timeout_s:g}s"
                    + (
                        f" while node {tracker.node_label(tracker.current_node)} was running."
                        if tracker.current_node
                        else "."
                    ),
                    {
                        "timeout_s": timeout_s,
                        "node_id": tracker.current_node,
                        "node": tracker.node_label(tracker.current_node),
                    },
                )
            wait = min(remaining, IDLE_CHECK_S if self.events.connected else HISTORY_POLL_S)
            try:
                frame = await asyncio.wait_for(frames.get(), timeout=wait)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    continue  # the time limit, not silence: report the timeout without asking ComfyUI
                # nothing heard for a while: ask /history, the source of truth
                self._raise_if_crashed(tracker)
                if await self._finished_in_history(prompt_id):
                    return
                continue
            kind, data = frame.get("type"), frame.get("data") or {}
            if kind == "executing" and data.get("node") is None:
                return
            if kind == "execution_error":
                raise execution_error(data)
            if kind == "execution_interrupted":
                raise interrupted_error(data)
            if kind == DISCONNECTED:
                self._raise_if_crashed(tracker)
            elif kind == RECONNECTED:
                self._raise_if_crashed(tracker)
                if await self._finished_in_history(prompt_id):
                    return
            else:
                tracker.update(frame)

    def _raise_if_crashed(self, tracker: _Progress) -> None:
        supervisor = self.supervisor
        if supervisor is None or supervisor.alive():
            return
        code = supervisor.process.returncode if supervisor.process else None
        raise ComfyCrashedError(
            f"ComfyUI exited (code {code}) while node {tracker.node_label(tracker.current_node)} was running.",
            {"exit_code": code, "node_id": tracker.current_node, "log_tail": supervisor.log_tail(50)},
        )

    async def _finished_in_history(self, prompt_id: str) -> bool:
        """Whether the prompt ended, by /queue and /history; raise its error if it ended in one.

        The queue is asked first: a prompt moves from the queue to the history at once, so one that is in
        neither was lost (ComfyUI restarted behind the worker's back, or someone cleared its queue).
        """
        try:
            queue = await asyncio.to_thread(self.client.queue)
            entry = await asyncio.to_thread(self.client.history, prompt_id)
        except ComfyUnavailableError:
            return False  # still down: keep waiting for the socket or the deadline
        if entry is None:
            if any(item[1] == prompt_id for key in ("queue_running", "queue_pending") for item in queue.get(key, [])):
                return False
            raise ComfyCrashedError(
                f"ComfyUI no longer knows prompt {prompt_id}: it was restarted or its queue was cleared "
                "while the job ran, and the prompt's results are lost.",
                {"prompt_id": prompt_id},
            )
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        for name, data in messages:
            if name == "execution_error":
                raise execution_error(data)
            if name == "execution_interrupted":
                raise interrupted_error(data)
        return bool(status.get("completed")) or status.get("status_str") in ("success", "error")

    async def _stop_prompt(self, prompt_id: str, frames: asyncio.Queue[Frame]) -> bool:
        """Interrupt a timed-out prompt; whether ComfyUI let go of it within INTERRUPT_GRACE.

        ComfyUI honours an interrupt only between nodes or at progress ticks: one long node can hold it for
        minutes, and the caller then restarts ComfyUI so the next job starts on a clean one.
        """
        if not await asyncio.to_thread(self._abandon, prompt_id):
            log.warning("ComfyUI does not answer; it will be restarted")
            return False
        deadline = time.monotonic() + self.settings.interrupt_grace_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                frame = await asyncio.wait_for(frames.get(), timeout=min(remaining, HISTORY_POLL_S))
            except TimeoutError:
                with contextlib.suppress(WorkerError):
                    if await self._finished_in_history(prompt_id):
                        return True
                continue
            data = frame.get("data") or {}
            if frame.get("type") in ("execution_interrupted", "execution_error") or (
                frame.get("type") == "executing" and data.get("node") is None
            ):
                return True
        log.warning("prompt %s still runs %gs after its interrupt", prompt_id, self.settings.interrupt_grace_s)
        return False

    def _recovering(self) -> bool:
        return self._recovery is not None and not self._recovery.done()

    def _recover_in_background(self) -> bool:
        """Restart the ComfyUI we own, without holding up the failing job's result; False if we cannot."""
        supervisor = self.supervisor
        if supervisor is None or not supervisor.restartable:
            return False
        if self._recovery is None or self._recovery.done():
            recovery: concurrent.futures.Future[None] = concurrent.futures.Future()
            threading.Thread(
                target=self._recover, args=(supervisor, recovery), name="comfyui-restart", daemon=True
            ).start()
            self._recovery = recovery
        return True

    def _recover(self, supervisor: ComfySupervisor, recovery: concurrent.futures.Future[None]) -> None:
        attempts = self.settings.restart_attempts
        for attempt in range(1, attempts + 1):
            try:
                waited = supervisor.restart(self.client)
            except ComfyUnavailableError as exc:
                log.error("ComfyUI restart %d/%d failed: %s", attempt, attempts, exc.message)
                if attempt == attempts:
                    recovery.set_exception(exc)
                    return
            else:
                log.info("ComfyUI restarted and ready in %.1fs", waited)
                self._node_types = None
                self.events.retry_now()
                self.events.wait_connected(timeout_s=10)
                recovery.set_result(None)
                return

    async def _comfyui_back(self) -> None:
        """Before a job: restart a ComfyUI found dead, and wait for a restart under way.

        A restart that failed every attempt becomes the worker's standing error, so each later job reports it
        and asks RunPod to replace the worker (``refresh_worker``).
        """
        if self.startup_error is not None:
            return  # ComfyUI never came up, or every restart failed: the worker waits to be replaced
        if self.supervisor is not None and not self.supervisor.alive():
            self._recover_in_background()
        recovery = self._recovery
        if recovery is None:
            return
        try:
            await asyncio.wrap_future(recovery)
        except ComfyUnavailableError as exc:
            attempts = self.settings.restart_attempts
            self.startup_error = ComfyUnavailableError(
                f"ComfyUI stopped and could not be restarted ({attempts} attempts): {exc.message}", exc.details
            )

    def _abandon(self, prompt_id: str) -> bool:
        """Drop the prompt from the queue and interrupt it if it runs; whether ComfyUI answered at all."""
        answered = False
        for action in (self.client.delete_queued, self.client.interrupt):
            try:
                action(prompt_id)
                answered = True
            except WorkerError as exc:
                log.warning("could not stop prompt %s: %s", prompt_id, exc.message)
        return answered
