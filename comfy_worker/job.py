"""One job, from ``event["input"]`` to the result: the only place errors become job results.

The handler is async because the runpod SDK runs handlers in its event-loop thread: a blocking handler would
stall progress posts and could never be cancelled. Every blocking call (HTTP, disk, base64 of big files)
goes through ``asyncio.to_thread``; ComfyUI's frames arrive on an ``asyncio.Queue`` from ``events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import outputs, workflow
from .comfy_client import ComfyClient
from .comfy_errors import execution_error, interrupted_error, prompt_warnings
from .errors import ComfyCrashedError, ComfyUnavailableError, JobTimeoutError, WorkerError
from .events import DISCONNECTED, RECONNECTED, EventStream, Frame
from .schema import JobInput, parse_job_input
from .settings import Settings
from .supervisor import ComfySupervisor

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
        started = time.monotonic()
        prompt_id: str | None = None
        try:
            job, graph = await asyncio.to_thread(self._prepare, raw_input)
            if self.startup_error is not None:
                raise self.startup_error
            timings = {"prepare_s": time.monotonic() - started}
            await self._upload_images(job)
            timings["upload_s"] = time.monotonic() - started - sum(timings.values())
            prompt_id = str(uuid.uuid4())
            timeout_s = job.timeout or self.settings.job_timeout_s
            deadline = started + timeout_s
            tracker = _Progress(graph, progress, self.settings.progress_interval_s)
            with self.events.subscription(prompt_id) as frames:
                queued = await asyncio.to_thread(self.client.queue_prompt, graph, prompt_id)
                log.info("job %s: queued prompt %s (%d nodes)", job_id, prompt_id, len(graph))
                try:
                    await self._follow(prompt_id, frames, tracker, deadline, timeout_s)
                except JobTimeoutError:
                    await self._stop_prompt(prompt_id, frames)
                    raise
            timings["comfyui_s"] = time.monotonic() - started - sum(timings.values())
            entry = await asyncio.to_thread(self.client.history, prompt_id)
            if entry is None:
                raise WorkerError(f"ComfyUI finished prompt {prompt_id} but has no history entry for it.")
            collected = outputs.collect(entry, include_temp=job.output.include_temp)
            result = await asyncio.to_thread(outputs.build, self.client, self.folders, collected)
            timings["outputs_s"] = time.monotonic() - started - sum(timings.values())
            warnings = prompt_warnings(queued.get("node_errors") or {})
            if collected.skipped_temp:
                warnings.append(
                    f"{collected.skipped_temp} temp output(s) (PreviewImage and the like) were left out; "
                    "set output.include_temp to true to get them."
                )
            if not collected.files and not collected.texts:
                warnings.append("The workflow finished but produced no outputs (is there a SaveImage node?).")
            result |= {
                "status": "success",
                "prompt_id": prompt_id,
                "execution_time_seconds": round(time.monotonic() - started, 3),
                "timings": {name: round(value, 4) for name, value in timings.items()},
                "warnings": warnings,
            }
            log.info(
                "job %s: done in %.2fs, %d file(s)", job_id, result["execution_time_seconds"], len(collected.files)
            )
            return result
        except asyncio.CancelledError:
            log.warning("job %s: cancelled; stopping prompt %s", job_id, prompt_id)
            if prompt_id is not None:
                threading.Thread(target=self._abandon, args=(prompt_id,), daemon=True).start()
            raise
        except WorkerError as exc:
            log.warning("job %s: %s: %s", job_id, exc.error_type, exc.message)
            refresh = exc is self.startup_error
            result = exc.to_result(prompt_id=prompt_id)
            return result | {"refresh_worker": True} if refresh else result
        except Exception as exc:
            log.exception("job %s: unexpected error", job_id)
            error = WorkerError(
                f"Unexpected worker error: {type(exc).__name__}: {exc}", {"exception_type": type(exc).__name__}
            )
            return error.to_result(prompt_id=prompt_id)

    def _prepare(self, raw_input: Any) -> tuple[JobInput, dict[str, Any]]:
        job = parse_job_input(raw_input, timeout_max=self.settings.job_timeout_max_s)
        return job, workflow.prepare(job)

    async def _upload_images(self, job: JobInput) -> None:
        for image in job.images:
            await asyncio.to_thread(self.client.upload_image, image.filename, image.data, image.subfolder)

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
            except TimeoutError:  # nothing heard for a while: ask /history, the source of truth
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
        """Whether /history shows the prompt ended; raise its error if it ended in one."""
        try:
            entry = await asyncio.to_thread(self.client.history, prompt_id)
        except ComfyUnavailableError:
            return False  # still down: keep waiting for the socket or the deadline
        if entry is None:
            return False
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        for name, data in messages:
            if name == "execution_error":
                raise execution_error(data)
            if name == "execution_interrupted":
                raise interrupted_error(data)
        return bool(status.get("completed")) or status.get("status_str") in ("success", "error")

    async def _stop_prompt(self, prompt_id: str, frames: asyncio.Queue[Frame]) -> None:
        """Interrupt a timed-out prompt and wait (INTERRUPT_GRACE) until ComfyUI lets go of it."""
        await asyncio.to_thread(self._abandon, prompt_id)
        deadline = time.monotonic() + self.settings.interrupt_grace_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                frame = await asyncio.wait_for(frames.get(), timeout=min(remaining, HISTORY_POLL_S))
            except TimeoutError:
                with contextlib.suppress(WorkerError):
                    if await self._finished_in_history(prompt_id):
                        return
                continue
            data = frame.get("data") or {}
            if frame.get("type") in ("execution_interrupted", "execution_error") or (
                frame.get("type") == "executing" and data.get("node") is None
            ):
                return
        log.warning("prompt %s still runs %gs after its interrupt", prompt_id, self.settings.interrupt_grace_s)

    def _abandon(self, prompt_id: str) -> None:
        """Drop the prompt from the queue and interrupt it if it runs: best effort, never raises."""
        for action in (self.client.delete_queued, self.client.interrupt):
            try:
                action(prompt_id)
            except WorkerError as exc:
                log.warning("could not stop prompt %s: %s", prompt_id, exc.message)
