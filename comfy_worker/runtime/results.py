"""The delivery stage: a finished prompt's outputs found, converted, delivered, and the result.

With ``JOB_CONCURRENCY`` above 1 this runs while ComfyUI runs the next job's prompt. Files stay on disk on
their way (``outputs``, ``delivery``): memory holds one output's base64 at a time, never the lot.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.errors import prompt_warnings
from comfy_worker.errors import WorkerError
from comfy_worker.redact import Redactor
from comfy_worker.runtime import cleanup, delivery, diagnostics, outputs
from comfy_worker.runtime.attempt import Attempt, in_time
from comfy_worker.runtime.execution import Finished
from comfy_worker.runtime.schema import JobInput
from comfy_worker.settings import Settings
from comfy_worker.storage import S3Storage

log = logging.getLogger(__name__)


class Results:
    """Builds success results from one ComfyUI's history."""

    def __init__(
        self, settings: Settings, client: ComfyClient, folders: dict[str, Path], storage: S3Storage | None
    ) -> None:
        self.settings = settings
        self.client = client
        self.folders = folders
        self.storage = storage

    async def build(
        self,
        job: JobInput,
        attempt: Attempt,
        finished: Finished,
        provisioning: dict[str, Any] | None,
        redact: Redactor,
    ) -> dict[str, Any]:
        """The finished prompt's outputs, delivered, with the warnings; secrets masked."""
        prompt_id = attempt.prompt_id
        assert prompt_id is not None  # the ComfyUI stage queued it
        collected, delivered, warnings = await in_time(
            attempt, "delivering the outputs", self._deliver, job, attempt, prompt_id, finished.outputs
        )
        attempt.lap("outputs_s")
        result = outputs.assemble(delivered, collected.texts)
        warnings = attempt.warnings + warnings + prompt_warnings(finished.queued.get("node_errors") or {})
        if collected.skipped_temp:
            warnings.append(
                f"{collected.skipped_temp} temp output(s) (PreviewImage and the like) were left out; "
                "set output.include_temp to true to get them."
            )
        if not collected.files and not collected.texts:
            warnings.append("The workflow finished but produced no outputs (is there a SaveImage node?).")
        warnings += diagnostics.provisioning_warnings(provisioning)
        result |= {
            "status": "success",
            "prompt_id": prompt_id,
            "workflow_format": attempt.workflow_format,
            "execution_time_seconds": round(time.monotonic() - attempt.started, 3),
            "timings": {name: round(value, 4) for name, value in attempt.timings.items()},
            "warnings": warnings,
        } | diagnostics.provisioning_field(provisioning)
        log.info(
            "job %s: done in %.2fs, %d file(s)", attempt.job_id, result["execution_time_seconds"], len(collected.files)
        )
        return masked(result, redact)

    def _deliver(
        self, job: JobInput, attempt: Attempt, prompt_id: str, seen: dict[str, Any] | None
    ) -> tuple[outputs.CollectedOutputs, list[tuple[outputs.Payload, dict[str, Any]]], list[str]]:
        """The outputs found, converted and delivered, then the job's files removed, in one thread (each hop to a
        thread and back costs the event loop a wake-up): from the prompt's ``executed`` frames when none was
        lost, else ``/history``. Returns them, their entries and the warnings."""
        entry = {"outputs": seen} if seen is not None else self.client.history(prompt_id)
        if entry is None:
            raise WorkerError(f"ComfyUI finished prompt {prompt_id} but has no history entry for it.")
        collected = outputs.collect(entry, job.output.include_temp, list(job.workflow))
        attempt.temp_files = [(f.subfolder, f.filename) for f in collected.files if f.folder_type == "temp"]
        options = job.output
        # made only when /view or a conversion needs it: most jobs read ComfyUI's own files as they are
        spool = Path(tempfile.gettempdir(), f"comfy-worker-outputs-{uuid.uuid4().hex}")
        try:
            max_pixels = int(self.settings.output_convert_max_megapixels * 1_000_000)
            payloads, unread = outputs.load(
                self.client, self.folders, collected, options.format, options.quality, max_pixels, spool, attempt.stop
            )
            delivered, warnings = delivery.deliver(
                payloads,
                options.delivery,
                self.storage,
                int(self.settings.max_result_mb * delivery.MB),
                {"job_id": attempt.job_id, "prompt_id": prompt_id},
                options.s3_prefix,
            )
        finally:
            if spool.exists():
                shutil.rmtree(spool, ignore_errors=True)
        if self.settings.cleanup_job_files:  # delivered: the job's files go in this thread, not one more hop
            cleanup.remove_job_files(self.folders, attempt.folder, attempt.temp_files)
            attempt.files_removed = True
        return collected, delivered, unread + warnings


def masked(result: dict[str, Any], redact: Redactor) -> dict[str, Any]:
    """The whole success result with secrets masked (texts, warnings, file names...), but each output's
    ``data`` as it is: base64 bytes are not text, and a presigned URL's signature is what makes it work."""
    hidden = {key: redact.deep(value) for key, value in result.items() if key not in outputs.KINDS}
    hidden["warnings"] = redact.deep(result["warnings"], urls=True)
    for kind in outputs.KINDS:
        hidden[kind] = [_masked_entry(entry, redact) for entry in result[kind]]
    return hidden


def _masked_entry(entry: dict[str, Any], redact: Redactor) -> dict[str, Any]:
    fields = {key: value for key, value in entry.items() if key != "data"}
    hidden: dict[str, Any] = redact.deep(fields)
    return hidden | {"data": entry["data"]}
