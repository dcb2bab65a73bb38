"""The delivery stage: a finished prompt's outputs read from /history, converted, delivered, and the result.

With ``JOB_CONCURRENCY`` above 1 this runs while ComfyUI runs the next job's prompt. Files stay on disk on
their way (``outputs``, ``delivery``): memory holds one output's base64 at a time, never the lot.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.errors import prompt_warnings
from comfy_worker.errors import WorkerError
from comfy_worker.redact import Redactor
from comfy_worker.runtime import delivery, diagnostics, outputs
from comfy_worker.runtime.attempt import Attempt, in_time
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
        queued: dict[str, Any],
        provisioning: dict[str, Any] | None,
        redact: Redactor,
    ) -> dict[str, Any]:
        """The finished prompt's outputs, delivered, with the warnings; secrets masked."""
        prompt_id = attempt.prompt_id
        assert prompt_id is not None  # the ComfyUI stage queued it
        entry = await in_time(attempt, "reading the prompt's history", self.client.history, prompt_id)
        if entry is None:
            raise WorkerError(f"ComfyUI finished prompt {prompt_id} but has no history entry for it.")
        collected = outputs.collect(entry, include_temp=job.output.include_temp)
        attempt.temp_files = [(f.subfolder, f.filename) for f in collected.files if f.folder_type == "temp"]
        options = job.output
        spool = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="comfy-worker-outputs-"))  # /view, conversions
        try:
            payloads, unread = await in_time(
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
            delivered, warnings = await in_time(
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
