"""The preparation stage: what a job's prompt needs on ComfyUI's side before it is queued.

Its models (by URL, into the model cache) and its input images (fetched when given by URL, uploaded into the
job's own input folder). With ``JOB_CONCURRENCY`` above 1 this runs while another job's prompt runs, so
ComfyUI does not wait for the network.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.recovery import Recovery
from comfy_worker.errors import InputError
from comfy_worker.runtime import cleanup
from comfy_worker.runtime.attempt import Attempt, in_time, through_restart
from comfy_worker.runtime.fetch import Fetcher
from comfy_worker.runtime.follow import ProgressSink
from comfy_worker.runtime.schema import JobInput

if TYPE_CHECKING:  # the cache brings the provisioning downloader: loaded only by workers that use it (app)
    from comfy_worker.runtime.models import ModelCache

log = logging.getLogger(__name__)


class Preparation:
    """Gets a job's models and input images ready for one ComfyUI."""

    def __init__(self, client: ComfyClient, recovery: Recovery, fetcher: Fetcher, models: ModelCache | None) -> None:
        self.client = client
        self.recovery = recovery
        self.fetcher = fetcher
        self.models = models

    async def run(self, job: JobInput, attempt: Attempt, progress: ProgressSink) -> None:
        if job.models:
            await self._fetch_models(job, attempt, progress)
            attempt.lap("models_s")
        await self._upload_inputs(job, attempt)
        attempt.lap("upload_s")

    async def _upload_inputs(self, job: JobInput, attempt: Attempt) -> None:
        """Upload ``images`` (fetched first when given by URL) into the job's own input folder (``cleanup``)."""
        for index, image in enumerate(job.images):
            data = image.data
            if image.url is not None:
                data = await in_time(
                    attempt,
                    "fetching input images",
                    self.fetcher.fetch,
                    image.url,
                    f"images[{index}].url",
                    attempt.deadline,
                    attempt.stop,
                )
            subfolder = cleanup.input_subfolder(attempt.folder, image.subfolder)
            upload, name = self.client.upload_image, image.filename
            await through_restart(self.recovery, attempt, "uploading input images", upload, name, data, subfolder)

    async def _fetch_models(self, job: JobInput, attempt: Attempt, progress: ProgressSink) -> None:
        """The job's ``models``, downloaded into the model cache (or found there) before anything is queued."""
        if self.models is None:
            raise InputError("models: this worker has no model cache: set MODEL_CACHE_DIR (start.sh sets it).")

        def report(name: str, done: int, total: int | None) -> None:
            percent = round(100 * done / total, 1) if total else None
            progress({"status": "downloading models", "file": name, "bytes": done, "total": total, "percent": percent})

        pins = await in_time(
            attempt,
            "downloading the job's models",
            self.models.prepare,
            job.models,
            report,
            attempt.deadline,
            attempt.stop,
        )
        log.info("job %s: models ready: %s", attempt.job_id, ", ".join(pins.files))
