"""One job, from ``event["input"]`` to the result: the only place errors become job results.

The handler is async because the runpod SDK runs handlers in its event-loop thread: a blocking handler would
stall progress posts and could never be cancelled. Every blocking call (HTTP, disk, base64 of big files)
goes through ``asyncio.to_thread``; ComfyUI's frames arrive on an ``asyncio.Queue`` from ``events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from comfy_worker import ui_format
from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.errors import missing_node_types_error, prompt_warnings, suggest_input_files
from comfy_worker.comfy.events import EventStream
from comfy_worker.comfy.recovery import Recovery
from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.errors import ComfyCrashedError, InputError, JobTimeoutError, WorkerError, WorkflowError, json_text
from comfy_worker.redact import Redactor
from comfy_worker.runtime import cleanup, delivery, diagnostics, outputs, workflow
from comfy_worker.runtime.fetch import Fetcher, Stop
from comfy_worker.runtime.follow import Follower, Progress, ProgressSink
from comfy_worker.runtime.schema import JobInput, parse_job_input
from comfy_worker.settings import FREE_MODES, Settings
from comfy_worker.storage import S3Storage
from comfy_worker.ui_format import is_ui_format

if TYPE_CHECKING:  # the cache brings the provisioning downloader: loaded only by workers that use it (app)
    from comfy_worker.runtime.models import ModelCache

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Attempt:
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

    def lap(self, name: str) -> None:
        self.timings[name] = time.monotonic() - self.started - sum(self.timings.values())

    @property
    def deadline(self) -> float:
        """The job's timeout counts from its start: inputs, ComfyUI and outputs all fall within it."""
        return self.started + self.timeout_s

    def timed_out(self, doing: str) -> JobTimeoutError:
        return JobTimeoutError(
            f"The job ran past its timeout of {self.timeout_s:g}s while {doing}.",
            {"timeout_s": self.timeout_s, "node_id": None, "node": None, "phase": doing},
        )


class Worker:
    """Runs jobs against one ComfyUI: each job's lifecycle, and hygiene between jobs.

    Created once per process by ``app``, which builds what it depends on. Following a prompt is ``Follower``'s
    job, restarting ComfyUI ``Recovery``'s.
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
        self._object_info: dict[str, Any] | None = None
        self.recovery = Recovery(supervisor, client, events, settings.restart_attempts, self._forget_node_types)
        self.follower = Follower(client, events, supervisor)
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

    def _forget_node_types(self) -> None:
        self._object_info = None  # custom nodes load only at start: a restarted ComfyUI may have others

    async def run(self, job_id: str, raw_input: Any, progress: ProgressSink) -> dict[str, Any]:
        """Run one job and return the handler's result: outputs, or ``{"error": <JSON text>}``."""
        attempt = _Attempt(job_id, started=time.monotonic(), folder=cleanup.job_folder(str(uuid.uuid4())))
        self.recovery.job_started()
        release_secrets = self.redact.hold(attempt.secrets)  # masked in every log line until the job ends
        try:
            result = await self._execute(attempt, raw_input, progress)
            return result | await asyncio.to_thread(self._after_job)
        except asyncio.CancelledError:
            log.warning("job %s: cancelled; stopping prompt %s", job_id, attempt.prompt_id)
            prompt_id = attempt.prompt_id
            if prompt_id is not None:  # no awaiting here: the abandon runs in a thread, the next job waits for it
                threading.Thread(target=self.follower.abandon, args=(prompt_id,), daemon=True).start()
                self.recovery.settle(lambda: self.follower.still_running(prompt_id), self.settings.interrupt_grace_s)
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
            attempt.stop.set()
            release_secrets()
            self.recovery.job_finished()
            if self.settings.cleanup_job_files:
                await asyncio.to_thread(cleanup.remove_job_files, self.folders, attempt.folder, attempt.temp_files)

    async def _in_time(self, attempt: _Attempt, doing: str, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in a thread, given up at the job's deadline (the call's own timeouts end the thread).

        The deadline's own timer firing is the job's timeout by construction, told by where the TimeoutError
        came from, never by reading the clock: an event loop's timers may fire a little early (uvloop's count
        whole milliseconds). A call that fails once the deadline has passed (a fetch cut off by it) is the job's
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

    async def _drop_timed_out(self, prompt_id: str) -> bool:
        """Interrupt a timed-out prompt and drop it from the queue, without holding up the job's result: a
        ComfyUI that does not answer is restarted now, one that does gets INTERRUPT_GRACE to let go (an
        interrupt lands only between nodes or at sampler steps), in the background. Whether it restarts now."""
        if not await asyncio.to_thread(self.follower.abandon, prompt_id):
            log.warning("ComfyUI does not answer; it will be restarted")
            return self.recovery.start()
        self.recovery.settle(lambda: self.follower.still_running(prompt_id), self.settings.interrupt_grace_s)
        return False

    def request_restart(self) -> None:
        """Restart ComfyUI once the running job is done (SIGHUP from apply_config.sh)."""
        self.recovery.request_restart()

    async def _error_result(self, error: WorkerError, attempt: _Attempt) -> dict[str, Any]:
        """The failed job's result: the error as JSON text with diagnostics, secrets masked."""
        if isinstance(error, ComfyCrashedError):
            error.details["comfyui_restarting"] = self.recovery.start()
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
        return result | await asyncio.to_thread(self._after_job)

    async def _execute(self, attempt: _Attempt, raw_input: Any, progress: ProgressSink) -> dict[str, Any]:
        job = await asyncio.to_thread(self._parse, raw_input)
        if job.comfy_org_api_key:
            attempt.secrets.append(job.comfy_org_api_key)
        if job.output.delivery == "s3" and self.storage is None:
            raise InputError(
                "output.delivery is 's3' but this worker has no bucket: set BUCKET_NAME (or BUCKET_ENDPOINT_URL), "
                "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY, or use delivery 'auto' or 'base64'."
            )
        attempt.timeout_s = timeout_s = job.timeout or self.settings.job_timeout_s
        if self.startup_error is not None:
            raise self.startup_error  # ComfyUI never came up: the worker waits to be replaced
        await self.recovery.wait(attempt.deadline, timeout_s)
        if is_ui_format(job.workflow):
            job = await self._from_ui_format(job, attempt)
        graph = await asyncio.to_thread(self._prepare, job, attempt.folder)
        await self._check_node_types(graph, attempt)
        attempt.lap("prepare_s")
        if job.models:
            await self._fetch_models(job, attempt, progress)
            attempt.lap("models_s")
        await self._upload_inputs(job, attempt)
        attempt.lap("upload_s")
        prompt_id = attempt.prompt_id = str(uuid.uuid4())
        tracker = Progress(graph, progress, self.settings.progress_interval_s)
        with self.events.subscription(prompt_id) as frames:
            try:
                queued = await self._in_time(
                    attempt, "queueing the prompt", self.client.queue_prompt, graph, prompt_id, self._extra_data(job)
                )
                log.info("job %s: queued prompt %s (%d nodes)", attempt.job_id, prompt_id, len(graph))
                await self.follower.follow(prompt_id, frames, tracker, attempt.deadline, timeout_s)
            except WorkflowError as exc:
                if "input" in self.folders:
                    files = await asyncio.to_thread(diagnostics.input_files, self.folders["input"])
                    suggest_input_files(exc, files)
                raise
            except JobTimeoutError as exc:
                exc.details["comfyui_restarting"] = await self._drop_timed_out(prompt_id)
                raise
        attempt.lap("comfyui_s")
        return await self._result(job, attempt, prompt_id, queued)

    async def _result(self, job: JobInput, attempt: _Attempt, prompt_id: str, queued: dict[str, Any]) -> dict[str, Any]:
        """The finished prompt's outputs from /history, read, converted and delivered, with the warnings."""
        entry = await self._in_time(attempt, "reading the prompt's history", self.client.history, prompt_id)
        if entry is None:
            raise WorkerError(f"ComfyUI finished prompt {prompt_id} but has no history entry for it.")
        collected = outputs.collect(entry, include_temp=job.output.include_temp)
        attempt.temp_files = [(f.subfolder, f.filename) for f in collected.files if f.folder_type == "temp"]
        options = job.output
        spool = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="comfy-worker-outputs-"))  # /view, conversions
        try:
            payloads, unread = await self._in_time(
                attempt,
                "reading the outputs",
                outputs.load,
                self.client,
                self.folders,
                collected,
                options.format,
                options.quality,
                int(self.settings.output_convert_max_megapixels * 1_000_000),
                spool,
            )
            delivered, warnings = await self._in_time(
                attempt,
                "delivering the outputs",
                delivery.deliver,
                payloads,
                options.delivery,
                self.storage,
                int(self.settings.max_result_mb * delivery.MB),
                {"job_id": attempt.job_id, "prompt_id": prompt_id},
                options.s3_prefix,
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, spool, True)
        attempt.lap("outputs_s")
        result = outputs.assemble(delivered, collected.texts)
        warnings = attempt.warnings + unread + warnings + prompt_warnings(queued.get("node_errors") or {})
        if collected.skipped_temp:
            warnings.append(
                f"{collected.skipped_temp} temp output(s) (PreviewImage and the like) were left out; "
                "set output.include_temp to true to get them."
            )
        if not collected.files and not collected.texts:
            warnings.append("The workflow finished but produced no outputs (is there a SaveImage node?).")
        warnings += diagnostics.provisioning_warnings(self.provisioning)
        result |= {
            "status": "success",
            "prompt_id": prompt_id,
            "workflow_format": attempt.workflow_format,
            "execution_time_seconds": round(time.monotonic() - attempt.started, 3),
            "timings": {name: round(value, 4) for name, value in attempt.timings.items()},
            "warnings": warnings,
        } | diagnostics.provisioning_field(self.provisioning)
        log.info(
            "job %s: done in %.2fs, %d file(s)", attempt.job_id, result["execution_time_seconds"], len(collected.files)
        )
        return self._masked(result, self.redact.adding(attempt.secrets))

    @staticmethod
    def _masked(result: dict[str, Any], redact: Redactor) -> dict[str, Any]:
        """The whole success result with secrets masked (texts, warnings, file names...), but each output's
        ``data`` as it is: base64 bytes are not text, and a presigned URL's signature is what makes it work."""
        masked = {key: redact.deep(value) for key, value in result.items() if key not in outputs.KINDS}
        masked["warnings"] = redact.deep(result["warnings"], urls=True)
        for kind in outputs.KINDS:
            masked[kind] = [Worker._masked_entry(entry, redact) for entry in result[kind]]
        return masked

    @staticmethod
    def _masked_entry(entry: dict[str, Any], redact: Redactor) -> dict[str, Any]:
        fields = {key: value for key, value in entry.items() if key != "data"}
        masked: dict[str, Any] = redact.deep(fields)
        return masked | {"data": entry["data"]}

    async def _upload_inputs(self, job: JobInput, attempt: _Attempt) -> None:
        """Upload ``images`` (fetched first when given by URL) into the job's own input folder (``cleanup``)."""
        for index, image in enumerate(job.images):
            data = image.data
            if image.url is not None:
                data = await self._in_time(
                    attempt,
                    "fetching input images",
                    self.fetcher.fetch,
                    image.url,
                    f"images[{index}].url",
                    attempt.deadline,
                    attempt.stop,
                )
            subfolder = cleanup.input_subfolder(attempt.folder, image.subfolder)
            await self._in_time(
                attempt, "uploading input images", self.client.upload_image, image.filename, data, subfolder
            )

    async def _fetch_models(self, job: JobInput, attempt: _Attempt, progress: ProgressSink) -> None:
        """The job's ``models``, downloaded into the model cache (or found there) before anything is queued."""
        if self.models is None:
            raise InputError("models: this worker has no model cache: set MODEL_CACHE_DIR (start.sh sets it).")

        def report(name: str, done: int, total: int | None) -> None:
            percent = round(100 * done / total, 1) if total else None
            progress({"status": "downloading models", "file": name, "bytes": done, "total": total, "percent": percent})

        pins = await self._in_time(
            attempt,
            "downloading the job's models",
            self.models.prepare,
            job.models,
            report,
            attempt.deadline,
            attempt.stop,
        )
        log.info("job %s: models ready: %s", attempt.job_id, ", ".join(pins.files))

    def _extra_data(self, job: JobInput) -> dict[str, Any]:
        """What ComfyUI hands the nodes' hidden inputs: the Comfy.org key that partner API nodes bill to."""
        key = job.comfy_org_api_key or self.settings.comfy_org_api_key
        return {"api_key_comfy_org": key} if key else {}

    async def _node_catalogue(self, attempt: _Attempt, wanted: set[str]) -> dict[str, Any]:
        """ComfyUI's ``/object_info``, cached per ComfyUI start (custom nodes load only at start) and asked
        again once when a wanted type seems missing, so a cache can never wrongly refuse a job."""
        if self._object_info is None or not wanted <= self._object_info.keys():
            self._object_info = await self._in_time(
                attempt, "asking ComfyUI for its node types", self.client.object_info
            )
        return self._object_info

    async def _check_node_types(self, graph: dict[str, Any], attempt: _Attempt) -> None:
        """Refuse every unknown node type in one error, before uploading anything."""
        wanted = {node["class_type"] for node in graph.values()}
        missing = wanted - (await self._node_catalogue(attempt, wanted)).keys()
        if missing:
            raise missing_node_types_error(graph, missing)

    async def _from_ui_format(self, job: JobInput, attempt: _Attempt) -> JobInput:
        """A workflow saved with ComfyUI's *Save* (UI format), converted as the frontend would queue it."""
        wanted = ui_format.node_types(job.workflow)  # frontend-only types are never in /object_info
        catalogue = await self._node_catalogue(attempt, wanted)
        conversion = await self._in_time(
            attempt, "converting the UI-format workflow", ui_format.convert, job.workflow, catalogue, attempt.deadline
        )
        attempt.workflow_format = "ui"
        attempt.warnings += [text for text in [conversion.warning()] if text]
        log.info("job %s: converted a UI-format workflow (%d nodes)", attempt.job_id, len(conversion.prompt))
        return job.model_copy(update={"workflow": conversion.prompt})

    def _after_job(self) -> dict[str, Any]:
        """Hygiene between jobs: COMFY_FREE_AFTER_JOB, and ask for a new worker when memory runs low.

        Returns what to add to the result: ``refresh_worker`` makes RunPod replace this worker after the job,
        which beats the next job failing with out-of-memory on a worker whose memory leaked or fragmented.
        """
        s = self.settings
        if self.recovery.restarting:
            return {}  # a ComfyUI being restarted has nothing to free, and cannot tell its VRAM
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

    def _parse(self, raw_input: Any) -> JobInput:
        return parse_job_input(
            raw_input,
            timeout_max=self.settings.job_timeout_max_s,
            image_max_bytes=int(self.settings.input_image_max_mb * 1024 * 1024),
        )

    def _prepare(self, job: JobInput, folder: str) -> dict[str, Any]:
        graph = workflow.prepare(job)
        cleanup.isolate_inputs(graph, [image.name for image in job.images], folder)
        if self.settings.cleanup_job_files and "output" in self.folders:
            cleanup.isolate_outputs(graph, folder)
        return graph
