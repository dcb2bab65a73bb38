"""One run of a job as the stages see it: its ids, its files, its secrets and its clock.

The clock is the job's timeout. It counts from the job's start, but stops while the job waits behind other
jobs (for its turn to queue its prompt, and in ComfyUI's queue until ComfyUI starts the prompt): with
``JOB_CONCURRENCY`` above 1 a job must not time out because its neighbours ran long. That wait is the
result's ``timings.queued_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from comfy_worker.comfy.recovery import Recovery
from comfy_worker.errors import ComfyUnavailableError, JobTimeoutError, WorkerError
from comfy_worker.runtime.fetch import Stop

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(eq=False)  # one per job run, told apart by identity
class Attempt:
    """One run of a job: its prompt id once queued (for errors and cancellation), where the time went, and
    the files it made (for cleanup)."""

    job_id: str
    started: float
    folder: str  # the job's own subfolder of ComfyUI's input and output folders (see ``cleanup``)
    timeout_s: float = float("inf")  # known once the input is parsed
    prompt_id: str | None = None
    workflow_format: str = "api"  # "ui" when the workflow came as ComfyUI's UI format and was converted
    secrets: list[str] = field(default_factory=list)  # the job's own (its API key), masked in its result
    stop: Stop = field(default_factory=Stop)  # set at its end: ends its fetches and downloads, unpins its models
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    temp_files: list[tuple[str, str]] = field(default_factory=list)
    files_removed: bool = False  # its files were removed with its delivery (``results``): no cleanup left
    queued_s: float = 0.0  # time spent behind other jobs, which the timeout does not count
    _queued_since: float | None = None

    def lap(self, name: str) -> None:
        """Record the time since the last lap as ``name`` (``queued_s`` is one of the laps: see ``execution``)."""
        self.timings[name] = time.monotonic() - self.started - sum(self.timings.values())

    def wait_behind_others(self) -> None:
        """The job waits for other jobs from now on: its clock stops (no-op while it already waits)."""
        if self._queued_since is None:
            self._queued_since = time.monotonic()

    def runs_again(self) -> None:
        """The job's own work goes on (ComfyUI started its prompt): its clock runs again."""
        if self._queued_since is not None:
            self.queued_s += time.monotonic() - self._queued_since
            self._queued_since = None

    @property
    def waiting(self) -> bool:
        return self._queued_since is not None

    @property
    def deadline(self) -> float:
        """When the job's own time runs out; while it waits behind other jobs, always its whole rest away."""
        queued = self.queued_s
        if self._queued_since is not None:
            queued += time.monotonic() - self._queued_since
        return self.started + self.timeout_s + queued

    def timed_out(self, doing: str) -> JobTimeoutError:
        return JobTimeoutError(
            f"The job ran past its timeout of {self.timeout_s:g}s while {doing}.",
            {"timeout_s": self.timeout_s, "node_id": None, "node": None, "phase": doing},
        )


async def in_time(attempt: Attempt, doing: str, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` in a thread, given up at the job's deadline (the call's own timeouts end the thread).

    Every blocking call of a job (HTTP, disk, base64 of big files) goes through here: the handler runs in the
    runpod SDK's event-loop thread, which must stay free for progress posts, cancellation and other jobs.
    The deadline's own timer firing is the job's timeout by construction, told by where the TimeoutError came
    from, never by reading the clock: an event loop's timers may fire a little early (uvloop's count whole
    milliseconds). A call that fails once the deadline has passed (a fetch cut off by it) is the job's
    timeout too.
    """
    deadline = asyncio.timeout(attempt.deadline - time.monotonic())
    try:
        async with deadline:
            return await asyncio.to_thread(call, *args)
    except (TimeoutError, WorkerError) as exc:
        if not deadline.expired() and time.monotonic() < attempt.deadline:
            raise  # the call's own failure, not the job's time running out
        raise attempt.timed_out(doing) from exc


async def through_restart(recovery: Recovery, attempt: Attempt, doing: str, call: Callable[..., T], *args: Any) -> T:
    """``in_time``, and once more after ComfyUI is back when the call failed because it was down: a job
    preparing while ComfyUI died (under another job's prompt) waits for the restart instead of failing."""
    try:
        return await in_time(attempt, doing, call, *args)
    except ComfyUnavailableError:
        if not recovery.comfy_down():
            raise
        log.warning("job %s: ComfyUI is down while %s: waiting for its restart", attempt.job_id, doing)
        await recovery.wait(attempt.deadline, attempt.timeout_s)
        return await in_time(attempt, doing, call, *args)
