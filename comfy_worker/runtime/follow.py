"""Following one queued prompt until it ends, and dropping it when its job gives up.

ComfyUI tells how a prompt goes over the WebSocket (``executing``, ``progress``, ``execution_error``...), but
frames are lost while the socket is down, so ``/history`` (asked when the socket reconnects or stays silent)
is the source of truth. A ComfyUI process that died is noticed at once through the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from comfy_worker.comfy.client import CONTROL_TIMEOUT_S, ComfyClient
from comfy_worker.comfy.errors import execution_error, interrupted_error
from comfy_worker.comfy.events import DISCONNECTED, RECONNECTED, EventStream, Frame
from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.errors import ComfyCrashedError, ComfyUnavailableError, JobTimeoutError, WorkerError
from comfy_worker.runtime.attempt import Attempt

log = logging.getLogger(__name__)

ProgressSink = Callable[[dict[str, Any]], None]

HISTORY_POLL_S = 0.5  # how often /history is asked while the WebSocket is down
IDLE_CHECK_S = 15.0  # with the socket up but silent this long, ask /history anyway


@dataclass
class Progress:
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


class Follower:
    """Follows prompts on one ComfyUI: until they end, or until their job's deadline."""

    def __init__(self, client: ComfyClient, events: EventStream, supervisor: ComfySupervisor | None) -> None:
        self.client = client
        self.events = events
        self.supervisor = supervisor

    async def follow(
        self, prompt_id: str, frames: asyncio.Queue[Frame], tracker: Progress, clock: Attempt
    ) -> dict[str, Any] | None:
        """Wait until the prompt ends: ``executing`` with ``node: null``, an error frame, or /history says so.

        Returns the outputs by node, as ``/history`` lists them, when every frame arrived (its end came by
        the socket, which never dropped meanwhile); None when some may be lost: ask ``/history``.

        The first frame of the prompt's own tells that ComfyUI started it: the job's clock runs again
        (``Attempt``), so the time it waited behind other jobs' prompts does not count against its timeout.
        """
        outputs: dict[str, Any] | None = {}  # None from the first gap on
        restarts = self.supervisor.restarts if self.supervisor is not None else 0
        while True:
            remaining = clock.deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeoutError(
                    f"The job ran past its timeout of {clock.timeout_s:g}s"
                    + (
                        f" while node {tracker.node_label(tracker.current_node)} was running."
                        if tracker.current_node
                        else "."
                    ),
                    {
                        "timeout_s": clock.timeout_s,
                        "node_id": tracker.current_node,
                        "node": tracker.node_label(tracker.current_node),
                    },
                )
            wait = min(remaining, IDLE_CHECK_S if self.events.connected else HISTORY_POLL_S)
            try:
                async with asyncio.timeout(wait):  # not wait_for: on 3.11 it can swallow the job's cancellation
                    frame = await frames.get()
            except TimeoutError:
                if time.monotonic() >= clock.deadline:
                    continue  # the time limit, not silence: report the timeout without asking ComfyUI
                # nothing heard for a while: ask /history, the source of truth
                self._raise_if_crashed(tracker)
                if await self._finished_before(prompt_id, clock, restarts):
                    return None
                continue
            kind, data = frame.get("type"), frame.get("data") or {}
            if kind not in (DISCONNECTED, RECONNECTED):
                clock.runs_again()  # a frame of its own: ComfyUI runs the prompt
            if kind == "executing" and data.get("node") is None:
                return outputs
            if kind == "executed":
                if outputs is not None and isinstance(data.get("output"), dict):
                    outputs[str(data.get("node"))] = data["output"]
            elif kind == "execution_error":
                raise execution_error(data)
            elif kind == "execution_interrupted":
                raise interrupted_error(data)
            elif kind == DISCONNECTED:
                outputs = None
                self._raise_if_crashed(tracker)
            elif kind == RECONNECTED:
                outputs = None
                self._raise_if_crashed(tracker)
                if await self._finished_before(prompt_id, clock, restarts):
                    return None
            else:
                tracker.update(frame)

    def _raise_if_crashed(self, tracker: Progress) -> None:
        supervisor = self.supervisor
        if supervisor is None or supervisor.alive():
            return
        code = supervisor.process.returncode if supervisor.process else None
        running = f"while node {tracker.node_label(tracker.current_node)} was running" if tracker.current_node else ""
        crash = ComfyCrashedError(
            f"ComfyUI exited (code {code}) {running or 'before it started the prompt'}.",
            {"exit_code": code, "node_id": tracker.current_node, "log_tail": supervisor.log_tail(50)},
        )
        crash.process = supervisor.process
        raise crash

    async def _finished_before(self, prompt_id: str, clock: Attempt, restarts: int) -> bool:
        """``_finished_in_history``, but False at the job's deadline: a hung ComfyUI must not hold up its end."""
        try:
            async with asyncio.timeout(max(clock.deadline - time.monotonic(), 0)):
                return await self._finished_in_history(prompt_id, clock, restarts)
        except TimeoutError:
            return False

    async def _finished_in_history(self, prompt_id: str, clock: Attempt, restarts: int) -> bool:
        """Whether the prompt ended, by /queue and /history; raise its error if it ended in one.

        The queue is asked first: a prompt moves from the queue to the history at once, so one that is in
        neither was lost: to a restart of ComfyUI (ours, when its count is past ``restarts``, the count when
        the prompt was queued: its socket can drop before the dead process can be told dead), or to someone
        clearing its queue. One that runs starts the job's clock again, in case its frames were lost.
        """
        try:
            queue = await asyncio.to_thread(self.client.queue)
            entry = await asyncio.to_thread(self.client.history, prompt_id)
        except ComfyUnavailableError:
            return False  # still down: keep waiting for the socket or the deadline
        if entry is None:
            if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
                clock.runs_again()
                return False
            if any(item[1] == prompt_id for item in queue.get("queue_pending", [])):
                return False
            raise self._lost(prompt_id, restarts)
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        for name, data in messages:
            if name == "execution_error":
                raise execution_error(data)
            if name == "execution_interrupted":
                raise interrupted_error(data)
        return bool(status.get("completed")) or status.get("status_str") in ("success", "error")

    def _lost(self, prompt_id: str, restarts: int) -> ComfyCrashedError:
        supervisor = self.supervisor
        if supervisor is None or supervisor.restarts == restarts:
            return ComfyCrashedError(
                f"ComfyUI no longer knows prompt {prompt_id}: it was restarted or its queue was cleared "
                "while the job ran, and the prompt's results are lost.",
                {"prompt_id": prompt_id},
            )
        code = supervisor.last_exit_code
        return ComfyCrashedError(
            f"ComfyUI exited (code {code}) while the job ran and was restarted: prompt {prompt_id}'s results are lost.",
            {"prompt_id": prompt_id, "exit_code": code, "node_id": None, "log_tail": supervisor.log_tail(50)},
        )

    def still_running(self, prompt_id: str) -> bool:
        """Whether ComfyUI still runs or queues ``prompt_id`` (after its interrupt); a silent ComfyUI counts as
        running, so it is restarted once INTERRUPT_GRACE is over (``Recovery.settle``)."""
        try:
            queue = self.client.queue(timeout_s=CONTROL_TIMEOUT_S)
        except WorkerError:
            return True
        return any(item[1] == prompt_id for key in ("queue_running", "queue_pending") for item in queue.get(key, []))

    def abandon(self, prompt_id: str) -> bool:
        """Drop the prompt from the queue and interrupt it if it runs; whether ComfyUI answered at all.

        A ComfyUI that does not answer the first call is not asked the second: each waits CONTROL_TIMEOUT_S,
        and a timed-out job's result must not wait for a hung server twice.
        """
        answered = False
        for action in (self.client.delete_queued, self.client.interrupt):
            try:
                action(prompt_id)
                answered = True
            except ComfyUnavailableError as exc:
                log.warning("could not stop prompt %s: %s", prompt_id, exc.message)
                return answered
            except WorkerError as exc:
                log.warning("could not stop prompt %s: %s", prompt_id, exc.message)
        return answered
