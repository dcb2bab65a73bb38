"""The intake stage: a job's raw input read and checked, its workflow made into the prompt ComfyUI will run.

Everything that can refuse a job without touching ComfyUI's queue happens here, first: a malformed input,
S3 delivery asked of a worker without a bucket, node types ComfyUI lacks (all of them in one error). A
UI-format workflow is converted as ComfyUI's frontend would queue it.

A small job is read and prepared on the event loop (``light``): for it a hop to a thread and back costs more
than the work itself. Base64 images and large inputs go to a thread, so the loop never stalls on them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from comfy_worker import ui_format
from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.errors import missing_node_types_error
from comfy_worker.errors import InputError
from comfy_worker.runtime import cleanup, workflow
from comfy_worker.runtime.attempt import Attempt, in_time
from comfy_worker.runtime.schema import JobInput, parse_job_input
from comfy_worker.settings import Settings
from comfy_worker.ui_format import is_ui_format

log = logging.getLogger(__name__)

# Reading and preparing a job costs about 0.7 us per value it holds (pydantic, the checks, the workflow's copy),
# so within this budget the event loop is busy for at most about 0.35 ms: a hop to a thread and back costs
# 0.1-0.2 ms of wake-ups, and a trivial job makes two of them here.
LIGHT_BUDGET = 500
TEXT_UNIT = 16  # text costs one value per 16 characters: a workflow given as a JSON string holds about as many


def light(value: Any, budget: int = LIGHT_BUDGET) -> bool:
    """Whether ``value`` holds at most ``budget`` values (text by its length, ``TEXT_UNIT``): small enough to
    read and prepare on the event loop. Stops as soon as it is over, so a large input costs the walk little."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            budget -= len(item) // TEXT_UNIT
        elif isinstance(item, dict | list):
            budget -= len(item)
            if budget < 0:
                return False
            stack.extend(item.values() if isinstance(item, dict) else item)
    return budget >= 0


class Intake:
    """Reads jobs for one ComfyUI, whose node types it caches per ComfyUI start."""

    def __init__(self, settings: Settings, client: ComfyClient, has_bucket: bool, local_outputs: bool) -> None:
        self.settings = settings
        self.client = client
        self.has_bucket = has_bucket
        self.local_outputs = local_outputs  # outputs are read from disk, so each job's go to its own folder
        self._object_info: dict[str, Any] | None = None

    def forget_node_types(self) -> None:
        """Custom nodes load only at start: a restarted ComfyUI may have others."""
        self._object_info = None

    async def read(self, attempt: Attempt, raw_input: Any) -> JobInput:
        """The job's input, parsed and checked; the attempt learns its timeout and secrets.

        In a thread when it brings images (their base64 is decoded here) or is not ``light``."""
        parse = functools.partial(
            parse_job_input,
            raw_input,
            timeout_max=self.settings.job_timeout_max_s,
            image_max_bytes=int(self.settings.input_image_max_mb * 1024 * 1024),
        )
        images = isinstance(raw_input, dict) and raw_input.get("images")
        job = parse() if not images and light(raw_input) else await asyncio.to_thread(parse)
        if job.comfy_org_api_key:
            attempt.secrets.append(job.comfy_org_api_key)
        if job.output.delivery == "s3" and not self.has_bucket:
            raise InputError(
                "output.delivery is 's3' but this worker has no bucket: set BUCKET_NAME (or BUCKET_ENDPOINT_URL), "
                "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY, or use delivery 'auto' or 'base64'."
            )
        attempt.timeout_s = job.timeout or self.settings.job_timeout_s
        return job

    async def prompt(self, attempt: Attempt, job: JobInput) -> tuple[JobInput, dict[str, Any]]:
        """The job (its workflow in API format) and the prompt to queue: overrides applied, inputs and
        outputs in the job's own folders, every node type known to ComfyUI."""
        if is_ui_format(job.workflow):
            job = await self._from_ui_format(job, attempt)
        if not job.images and light(job.workflow):
            graph = self._prepare(job, attempt.folder)
        else:
            graph = await asyncio.to_thread(self._prepare, job, attempt.folder)
        wanted = {node["class_type"] for node in graph.values()}
        missing = wanted - (await self._node_catalogue(attempt, wanted)).keys()
        if missing:
            raise missing_node_types_error(graph, missing)
        return job, graph

    def _prepare(self, job: JobInput, folder: str) -> dict[str, Any]:
        graph = workflow.prepare(job)
        cleanup.isolate_inputs(graph, [image.name for image in job.images], folder)
        if self.settings.cleanup_job_files and self.local_outputs:
            cleanup.isolate_outputs(graph, folder)
        return graph

    async def _node_catalogue(self, attempt: Attempt, wanted: set[str]) -> dict[str, Any]:
        """ComfyUI's ``/object_info``, cached per ComfyUI start (custom nodes load only at start) and asked
        again once when a wanted type seems missing, so a cache can never wrongly refuse a job."""
        if self._object_info is None or not wanted <= self._object_info.keys():
            self._object_info = await in_time(attempt, "asking ComfyUI for its node types", self.client.object_info)
        return self._object_info

    async def _from_ui_format(self, job: JobInput, attempt: Attempt) -> JobInput:
        """A workflow saved with ComfyUI's *Save* (UI format), converted as the frontend would queue it."""
        wanted = ui_format.node_types(job.workflow)  # frontend-only types are never in /object_info
        catalogue = await self._node_catalogue(attempt, wanted)
        conversion = await in_time(
            attempt, "converting the UI-format workflow", ui_format.convert, job.workflow, catalogue, attempt.deadline
        )
        attempt.workflow_format = "ui"
        attempt.warnings += [text for text in [conversion.warning()] if text]
        log.info("job %s: converted a UI-format workflow (%d nodes)", attempt.job_id, len(conversion.prompt))
        return job.model_copy(update={"workflow": conversion.prompt})
