"""The ComfyUI stage: a prepared job's prompt queued in its turn and followed until it ends.

ComfyUI runs one prompt at a time, from its own queue. With ``JOB_CONCURRENCY`` above 1 several jobs are in
this stage at once: each queues its prompt as soon as its inputs are up and its turn has come (``Lineup``:
the order the jobs arrived in), so ComfyUI starts the next prompt the moment one ends, while the jobs around
it prepare and deliver. What a prompt's end can bring, per job:

- its own timeout: the prompt is interrupted and dropped (only it: ``/interrupt`` names it), in the
  background, and the job's result does not wait (``Recovery.settle``);
- a cancelled job: the same, from ``job``;
- ComfyUI dying: one restart however many jobs saw it; the job whose prompt ran fails with
  ``comfyui_crashed``, and a job whose prompt had not started yet queues it again, once, on the new ComfyUI
  (it never ran, so it runs once).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.errors import suggest_input_files
from comfy_worker.comfy.events import EventStream
from comfy_worker.comfy.recovery import Recovery
from comfy_worker.errors import ComfyCrashedError, JobTimeoutError, WorkflowError
from comfy_worker.runtime import diagnostics
from comfy_worker.runtime.attempt import Attempt, through_restart
from comfy_worker.runtime.follow import Follower, Progress, ProgressSink
from comfy_worker.runtime.schema import JobInput
from comfy_worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """A prompt that ran to its end: ``/prompt``'s answer (its warnings), and its outputs by node when every
    frame arrived (None: ask ``/history``, ``Follower.follow``)."""

    queued: dict[str, Any]
    outputs: dict[str, Any] | None


class Lineup:
    """The order jobs arrived in, which is the order their prompts are queued in: a job whose inputs are slow
    holds back the jobs behind it, never the other way round.

    A place is taken when the job arrives and left once its prompt is queued (or the job ends). The waiters'
    events are made in the running event loop, when they wait: the warm-up runs on a loop of its own.
    """

    def __init__(self) -> None:
        self._next = 0
        self._places: list[int] = []
        self._moved: list[asyncio.Event] = []

    def join(self) -> int:
        place = self._next
        self._next += 1
        self._places.append(place)
        return place

    def rejoin(self, place: int) -> None:
        """Take ``place`` again (a prompt queued again after a restart), ahead of the jobs that came later."""
        if place not in self._places:
            bisect.insort(self._places, place)

    async def turn(self, place: int) -> None:
        """Return once every job that arrived before this one has queued its prompt or ended."""
        while self._places[0] != place:
            moved = asyncio.Event()
            self._moved.append(moved)
            await moved.wait()

    def leave(self, place: int) -> None:
        if place in self._places:
            self._places.remove(place)
            for moved in self._moved:
                moved.set()
            self._moved.clear()


class Execution:
    """Runs prepared jobs' prompts on one ComfyUI."""

    def __init__(
        self,
        settings: Settings,
        client: ComfyClient,
        events: EventStream,
        follower: Follower,
        recovery: Recovery,
        input_folder: Path | None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.events = events
        self.follower = follower
        self.recovery = recovery
        self.input_folder = input_folder  # for a refused prompt's file suggestions, when ComfyUI is local
        self.lineup = Lineup()

    async def run(
        self, attempt: Attempt, place: int, job: JobInput, graph: dict[str, Any], progress: ProgressSink
    ) -> Finished:
        """Queue the prompt in the job's turn and follow it to its end.

        The job's clock stops from its turn's wait until ComfyUI starts the prompt (``Attempt``); the
        result's ``timings`` get that wait as ``queued_s`` and ComfyUI's own run as ``comfyui_s``.
        """
        attempt.wait_behind_others()
        try:
            finished = await self._queue_and_follow(attempt, place, job, graph, progress)
        except ComfyCrashedError as exc:
            if not attempt.waiting:
                raise  # it ran: running it again might do twice what it does (a paid API node, say)
            log.warning("job %s: ComfyUI went away before it ran prompt %s: queueing it again", attempt.job_id, exc)
            if exc.process is not None:  # it died (not: restarted already, when the prompt was lost)
                self.recovery.restart_crashed(exc.process)
            await self.recovery.wait(attempt.deadline, attempt.timeout_s)
            self.lineup.rejoin(place)
            finished = await self._queue_and_follow(attempt, place, job, graph, progress)
        attempt.runs_again()  # a prompt whose frames were all lost
        attempt.timings["queued_s"] = attempt.queued_s
        attempt.lap("comfyui_s")
        return finished

    async def _queue_and_follow(
        self, attempt: Attempt, place: int, job: JobInput, graph: dict[str, Any], progress: ProgressSink
    ) -> Finished:
        prompt_id = attempt.prompt_id = str(uuid.uuid4())
        tracker = Progress(graph, progress, self.settings.progress_interval_s)
        with self.events.subscription(prompt_id) as frames:
            try:
                try:
                    await self.lineup.turn(place)
                    extra = self._extra_data(job)
                    queued = await through_restart(
                        self.recovery, attempt, "queueing the prompt", self.client.queue_prompt, graph, prompt_id, extra
                    )
                finally:
                    self.lineup.leave(place)
                log.info("job %s: queued prompt %s (%d nodes)", attempt.job_id, prompt_id, len(graph))
                outputs = await self.follower.follow(prompt_id, frames, tracker, attempt)
            except WorkflowError as exc:
                if self.input_folder is not None:
                    files = await asyncio.to_thread(diagnostics.input_files, self.input_folder)
                    suggest_input_files(exc, files)
                raise
            except JobTimeoutError as exc:
                exc.details["comfyui_restarting"] = await self._drop_timed_out(prompt_id)
                raise
        return Finished(queued, outputs)

    def _extra_data(self, job: JobInput) -> dict[str, Any]:
        """What ComfyUI hands the nodes' hidden inputs: the Comfy.org key that partner API nodes bill to."""
        key = job.comfy_org_api_key or self.settings.comfy_org_api_key
        return {"api_key_comfy_org": key} if key else {}

    async def _drop_timed_out(self, prompt_id: str) -> bool:
        """Interrupt a timed-out prompt and drop it from the queue, without holding up the job's result: a
        ComfyUI that does not answer is restarted now, one that does gets INTERRUPT_GRACE to let go (an
        interrupt lands only between nodes or at sampler steps), in the background. Whether it restarts now."""
        if not await asyncio.to_thread(self.follower.abandon, prompt_id):
            log.warning("ComfyUI does not answer; it will be restarted")
            return self.recovery.start()
        self.recovery.settle(lambda: self.follower.still_running(prompt_id), self.settings.interrupt_grace_s)
        return False

    def abandon(self, prompt_id: str) -> None:
        """A cancelled job's prompt: dropped from the queue or interrupted, in a thread (no awaiting while the
        job is being cancelled); the jobs that come next wait for it to end (``Recovery.settle``)."""
        threading.Thread(target=self.follower.abandon, args=(prompt_id,), daemon=True).start()
        self.recovery.settle(lambda: self.follower.still_running(prompt_id), self.settings.interrupt_grace_s)
