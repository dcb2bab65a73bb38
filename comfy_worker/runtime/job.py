"""One job, from ``event["input"]`` to the result: the only place errors become job results.

A job goes through four stages, each a module: ``intake`` (its input read and checked, its prompt made),
``preparation`` (its models and input images), ``execution`` (its prompt queued in its turn and followed on
ComfyUI) and ``results`` (its outputs delivered). With ``JOB_CONCURRENCY`` above 1 several jobs are in flight,
each in its own stage: ComfyUI runs one prompt while the next job prepares and the last one delivers, and
ComfyUI's own queue is the queue between preparation and execution.

The handler is async because the runpod SDK runs handlers in its event-loop thread: a blocking handler would
stall progress posts and could never be cancelled. Every blocking call goes through ``attempt.in_time``
(a thread); ComfyUI's frames arrive on an ``asyncio.Queue`` from ``events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.events import EventStream
from comfy_worker.comfy.recovery import Recovery
from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.errors import ComfyCrashedError, WorkerError, json_text
from comfy_worker.redact import Redactor
from comfy_worker.runtime import cleanup, diagnostics
from comfy_worker.runtime.attempt import Attempt
from comfy_worker.runtime.execution import Execution
from comfy_worker.runtime.fetch import Fetcher
from comfy_worker.runtime.follow import Follower, ProgressSink
from comfy_worker.runtime.intake import Intake
from comfy_worker.runtime.preparation import Preparation
from comfy_worker.runtime.results import Results
from comfy_worker.settings import FREE_MODES, Settings
from comfy_worker.storage import S3Storage

if TYPE_CHECKING:  # the cache brings the provisioning downloader: loaded only by workers that use it (app)
    from comfy_worker.runtime.models import ModelCache

log = logging.getLogger(__name__)


class Worker:
    """Runs jobs against one ComfyUI: each job through its stages, and hygiene between jobs.

    Created once per process by ``app``, which builds what it depends on. Restarting ComfyUI is
    ``Recovery``'s job, following a prompt ``Follower``'s.
    """

    def __init__(
        self,
        settings: Settings,
        client: ComfyClient,
        events: EventStream,
        supervisor: ComfySupervisor | None = None,
        startup_error: WorkerError | None = None,
        *,
        fetcher: Fetcher,
        storage: S3Storage | None = None,
        models: ModelCache | None = None,
        redact: Redactor | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.events = events
        self.supervisor = supervisor
        self.startup_error = startup_error
        self.fetcher = fetcher
        self.storage = storage
        self.models = models
        self.provisioning = diagnostics.provisioning_problems(settings.provision_status)
        if startup_error is not None and self.provisioning and self.provisioning.get("failed"):
            first = self.provisioning["failed"][0]
            startup_error.message += f" Provisioning failed first: {first['kind']} {first['name']}: {first['error']}"
        self.redact = redact or Redactor(settings.secrets)  # the log's too (app): a job's secrets are held in it
        self.folders: dict[str, Path] = {}
        if settings.comfy_is_local:
            for name, folder in (
                ("input", settings.comfyui_input_dir),
                ("output", settings.comfyui_output_dir),
                ("temp", settings.comfyui_temp_dir),
            ):
                if folder is not None:
                    self.folders[name] = folder
        self.intake = Intake(settings, client, storage is not None, "output" in self.folders)
        self.recovery = Recovery(supervisor, client, events, settings.restart_attempts, self.intake.forget_node_types)
        self.follower = Follower(client, events, supervisor)
        self.preparation = Preparation(client, self.recovery, fetcher, models)
        self.execution = Execution(settings, client, events, self.follower, self.recovery, self.folders.get("input"))
        self.results = Results(settings, client, self.folders, storage)
        self._in_flight: set[Attempt] = set()  # jobs whose result is not decided yet
        self.draining = False  # memory ran low: take no more jobs; the last one in flight asks for a new worker

    def concurrency(self, _current: int) -> int:
        """RunPod's ``concurrency_modifier``: JOB_CONCURRENCY jobs at once, none once the worker drains."""
        return 0 if self.draining else self.settings.job_concurrency

    async def run(self, job_id: str, raw_input: Any, progress: ProgressSink) -> dict[str, Any]:
        """Run one job and return the handler's result: outputs, or ``{"error": <JSON text>}``."""
        attempt = Attempt(job_id, started=time.monotonic(), folder=cleanup.job_folder(str(uuid.uuid4())))
        place: int | None = None  # its turn to queue its prompt, taken once it may go on (below)
        self._in_flight.add(attempt)
        release_secrets = self.redact.hold(attempt.secrets)  # masked in every log line until the job ends
        started = False
        try:
            job = await self.intake.read(attempt, raw_input)
            if self.startup_error is not None:
                raise self.startup_error  # ComfyUI never came up: the worker waits to be replaced
            await self.recovery.wait(attempt.deadline, attempt.timeout_s, new_job=True)
            self.recovery.job_started()
            started = True
            place = self.execution.lineup.join()
            job, graph = await self.intake.prompt(attempt, job)
            attempt.lap("prepare_s")
            await self.preparation.run(job, attempt, progress)
            finished = await self.execution.run(attempt, place, job, graph, progress)
            result = await self.results.build(
                job, attempt, finished, self.provisioning, self.redact.adding(attempt.secrets)
            )
            return result | await self._after_job(attempt)
        except asyncio.CancelledError:
            log.warning("job %s: cancelled; stopping prompt %s", job_id, attempt.prompt_id)
            if attempt.prompt_id is not None:  # no awaiting here: the next job waits for the prompt to stop
                self.execution.abandon(attempt.prompt_id)
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
            if place is not None:
                self.execution.lineup.leave(place)
            attempt.stop.set()
            release_secrets()
            self._leave(attempt)
            if started:
                self.recovery.job_finished()
            if self.settings.cleanup_job_files and not attempt.files_removed:
                await asyncio.to_thread(cleanup.remove_job_files, self.folders, attempt.folder, attempt.temp_files)

    def request_restart(self) -> None:
        """Restart ComfyUI once the jobs in flight are done (SIGHUP from apply_config.sh)."""
        self.recovery.request_restart()

    async def _error_result(self, error: WorkerError, attempt: Attempt) -> dict[str, Any]:
        """The failed job's result: the error as JSON text with diagnostics, secrets masked."""
        if isinstance(error, ComfyCrashedError):
            # A lost prompt (no process: ComfyUI answered that it does not know it) was lost to a restart that
            # is done already, or to a cleared queue: ComfyUI runs, and restarting it would crash the others.
            error.details["comfyui_restarting"] = (
                self.recovery.restart_crashed(error.process) if error.process is not None else self.recovery.restarting
            )
        report = await asyncio.to_thread(
            diagnostics.collect,
            error,
            self.client,
            self.supervisor,
            self.folders,
            self.recovery.restarting,
            self.provisioning,
        )
        redact = self.redact.adding(attempt.secrets)
        payload = error.to_dict() | {"prompt_id": attempt.prompt_id, "diagnostics": report}
        payload = redact.deep(payload | diagnostics.provisioning_field(self.provisioning), urls=True)
        result = {"error": json_text(payload)}
        if error is self.startup_error or error is self.recovery.failed:
            return result | {"refresh_worker": True}
        return result | await self._after_job(attempt)

    async def _after_job(self, attempt: Attempt) -> dict[str, Any]:
        """Hygiene between jobs: COMFY_FREE_AFTER_JOB, and ask for a new worker when memory runs low.

        Returns what to add to the result: ``refresh_worker`` makes RunPod replace this worker after the job,
        which beats the next job failing with out-of-memory on a worker whose memory leaked or fragmented.
        RunPod stops the worker when it gets that result, so with other jobs in flight the worker drains
        first: it takes no more jobs (``concurrency``), and only the last job in flight asks. The decision is
        made on the event loop's thread, so two jobs ending at once cannot both think the other is last.
        """
        s = self.settings
        measures = FREE_MODES[s.free_after_job] or s.refresh_min_free_ram_gb > 0 or s.refresh_min_free_vram_gb > 0
        low = await asyncio.to_thread(self._free_and_measure) if measures and not self.draining else []
        self._in_flight.discard(attempt)
        if low and not self.draining:
            log.warning("memory is low (%s): taking no more jobs; asking RunPod for a fresh worker", "; ".join(low))
            self.draining = True
        if self.draining and not self._in_flight:
            return {"refresh_worker": True}
        return {}

    def _leave(self, attempt: Attempt) -> None:
        """A job ends without a result to carry ``refresh_worker`` (cancelled): if it was the last one of a
        draining worker, nobody can ask, so the worker takes jobs again and the next one measures anew."""
        if attempt in self._in_flight:
            self._in_flight.discard(attempt)
            if self.draining and not self._in_flight:
                log.warning("the last job in flight ended without a result: taking jobs again")
                self.draining = False

    def _free_and_measure(self) -> list[str]:
        """COMFY_FREE_AFTER_JOB, then what memory is below its REFRESH_MIN_FREE_* floor (empty: none)."""
        s = self.settings
        if self.recovery.restarting:
            return []  # a ComfyUI being restarted has nothing to free, and cannot tell its VRAM
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
        return low
