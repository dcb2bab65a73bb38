"""The worker process: start ComfyUI, import the runpod SDK while it boots, wait, then take jobs.

Order matters: ComfyUI's boot (seconds) overlaps ``import runpod`` (about 1.7 s), and the SDK's job loop
starts only once ComfyUI serves, so no job is pulled before it can run. When ComfyUI cannot start, the
worker still starts the loop and answers every job with that error and ComfyUI's log tail, because nobody
can log in to a serverless worker to read it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.errors import ConfigurationError, WorkerError, json_text
from comfy_worker.redact import RedactingFilter, RedactingStream, Redactor, redact_url, secrets_from_env
from comfy_worker.settings import Settings, SettingsError

if TYPE_CHECKING:  # the job machinery is imported after ComfyUI was launched (see main)
    from comfy_worker.runtime.job import Worker
    from comfy_worker.runtime.models import ModelCache

log = logging.getLogger("comfy_worker")


def setup_logging(level: str, redact: Redactor | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if redact is not None:
        handler.addFilter(RedactingFilter(redact))
    logging.basicConfig(level=level, handlers=[handler])


def build_worker(
    settings: Settings, supervisor: ComfySupervisor | None = None, redact: Redactor | None = None
) -> Worker:
    """Start or attach to ComfyUI and connect to it; a failure is kept and reported by every job.

    ``redact`` is the log's (main's): the worker adds each running job's own secrets to it."""
    from comfy_worker.comfy.client import ComfyClient
    from comfy_worker.comfy.events import EventStream
    from comfy_worker.errors import ComfyUnavailableError, WorkerError
    from comfy_worker.runtime.fetch import Fetcher
    from comfy_worker.runtime.job import Worker
    from comfy_worker.storage import S3Storage

    client = ComfyClient(settings.comfy_api_url, client_id=f"worker-{uuid.uuid4().hex}")
    events = EventStream(settings.comfy_ws_url, client.client_id)
    storage = S3Storage(settings.s3) if settings.s3 is not None else None
    fetcher = Fetcher(
        settings.input_url_allowlist,
        int(settings.input_url_max_mb * 1024 * 1024),
        settings.input_url_timeout_s,
        storage,
    )
    models = model_cache(settings)
    redact = redact or Redactor(settings.secrets)
    supervisor = supervisor or ComfySupervisor(settings, redact)
    try:
        supervisor.start_or_attach(client)
        import runpod  # noqa: F401  - imported while ComfyUI boots: the two overlap

        waited = supervisor.wait_ready(client)
        log.info("ComfyUI is ready at %s (waited %.1fs)", client.display_url, waited)
        events.start()
        if not events.wait_connected(timeout_s=10):
            raise ComfyUnavailableError(
                f"ComfyUI's WebSocket at {redact_url(settings.comfy_ws_url)} did not accept a connection."
            )
    except WorkerError as exc:
        log.error("ComfyUI is unavailable; every job will fail with this error: %s", exc.message)
        return Worker(
            settings,
            client,
            events,
            supervisor,
            startup_error=exc,
            fetcher=fetcher,
            storage=storage,
            models=models,
            redact=redact,
        )
    return Worker(settings, client, events, supervisor, fetcher=fetcher, storage=storage, models=models, redact=redact)


def model_cache(settings: Settings) -> ModelCache | None:
    """The cache for models jobs bring by URL: the provisioning downloader behind the input URLs' SSRF guard."""
    if settings.model_cache_dir is None:
        return None
    from comfy_worker.provision.download_options import DownloadOptions
    from comfy_worker.runtime.models import GB, ModelCache

    options = DownloadOptions.of(
        settings.downloads,
        progress_interval_s=max(settings.progress_interval_s, 0.5),
        progress_bar=False,
    )
    return ModelCache(
        settings.model_cache_dir,
        int(settings.model_cache_max_gb * GB),
        int(settings.model_url_max_gb * GB),
        options,
        options.lock_timeout_s,
        settings.input_url_allowlist,
    )


def load_settings(env: Mapping[str, str]) -> Settings:
    """Every setting, read and checked once before anything starts; a SettingsError names the variable.

    Besides the values themselves: MODEL_CACHE_DIR must be a folder the worker can write (start.sh puts it on the
    volume), or every job that brings a model would fail with an unexplained OS error.
    """
    settings = Settings.from_env(env)
    cache = settings.model_cache_dir
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=cache):
                pass
        except OSError as exc:
            raise SettingsError(
                f"MODEL_CACHE_DIR={str(cache)!r} is not a folder the worker can write to: {exc.strerror or exc}"
            ) from None
    return settings


def warm_up(worker: Worker, path: Path) -> None:
    """Run WARMUP_WORKFLOW once before taking jobs, so the first real job does not pay for model loading.

    The file holds an API-format workflow, a job input (``{"workflow": ...}``) or a request body
    (``{"input": {...}}``). A failing warm-up is logged, not fatal: other workflows may still run.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.error("WARMUP_WORKFLOW %s cannot be read: %s", path, exc)
        return
    if isinstance(data, dict) and isinstance(data.get("input"), dict):
        data = data["input"]
    job_input = data if isinstance(data, dict) and "workflow" in data else {"workflow": data}
    started = time.monotonic()
    result = asyncio.run(worker.run("warmup", job_input, lambda _message: None))
    if "error" in result:
        log.error("Warm-up with %s failed: %s", path, result["error"])
    else:
        log.info("Warm-up with %s done in %.1fs", path, time.monotonic() - started)


def make_handler(worker: Worker) -> Any:
    """The runpod handler: an async function of the job dict.

    At most JOB_CONCURRENCY jobs run in it at once. The production loop takes no more than that anyway
    (``concurrency_modifier``); the local API runs every request at once, so there the others wait here,
    before their job (and its clock) starts.
    """
    import runpod

    send_progress = bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))
    slots = asyncio.Semaphore(worker.settings.job_concurrency)

    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        def progress(message: dict[str, Any]) -> None:
            if send_progress:  # the local API has nowhere to post progress; it would only log errors
                runpod.serverless.progress_update(job, message)
            else:
                log.debug("job %s progress: %s", job.get("id"), message)

        async with slots:
            return await worker.run(str(job.get("id")), job.get("input"), progress)

    return handler


def skip_slow_cpu_probe() -> None:
    """Give py-cpuinfo a fast ``get_cpu_info`` before ``import runpod``.

    The SDK's debugger module asks py-cpuinfo for the CPU's name at import time, which starts a second
    Python process: about 1.1 s of every cold start (measured in the image). The name in /proc/cpuinfo is
    all it uses.
    """
    try:
        import cpuinfo
    except ImportError:
        return

    def brand() -> dict[str, str]:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
                for line in file:
                    if line.startswith("model name"):
                        return {"brand_raw": line.partition(":")[2].strip()}
        except OSError:
            pass
        return {"brand_raw": platform.processor() or "unknown"}

    cpuinfo.get_cpu_info = brand


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def serve_error(error: WorkerError, redact: Redactor) -> None:
    """Take jobs and fail each with ``error`` (a worker that cannot run them must still say why)."""
    import runpod

    def handler(_job: dict[str, Any]) -> dict[str, Any]:
        return {"error": redact(json_text(error.to_dict()))}

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    runpod.serverless.start({"handler": handler})


def main() -> None:
    """``python handler.py [runpod SDK flags]``: run the worker (see docs/job-api.md)."""
    skip_slow_cpu_probe()
    redact = Redactor(secrets_from_env(os.environ))
    sys.stdout = RedactingStream(sys.stdout, redact)  # the runpod SDK prints its own log lines
    sys.stderr = RedactingStream(sys.stderr, redact)
    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        # Exiting would make RunPod restart the worker forever; answer every job with the reason instead.
        setup_logging("INFO", redact)
        os.environ["RUNPOD_LOG_LEVEL"] = "INFO"  # the SDK refuses a bad one at import, and logs inputs at DEBUG
        log.error("Invalid configuration: %s. Every job fails with this error until the variable is fixed.", exc)
        serve_error(ConfigurationError(f"Invalid configuration: {exc}"), redact)
        return
    setup_logging(settings.log_level, redact)
    # The runpod SDK logs at DEBUG by default, every job's input and whole output (base64) included; it reads
    # its level when imported (below, while ComfyUI boots), in its own names. --rp_log_level still wins.
    os.environ["RUNPOD_LOG_LEVEL"] = settings.runpod_log_level
    supervisor = ComfySupervisor(settings, redact)
    supervisor.launch_early()
    worker = build_worker(settings, supervisor, redact)
    if settings.warmup_workflow is not None and worker.startup_error is None:
        warm_up(worker, settings.warmup_workflow)
    from comfy_worker.runtime.diagnostics import provisioning_banner

    for line in provisioning_banner(worker.provisioning):  # the last lines before the SDK's: what is read first
        log.warning("%s", line)
    import runpod

    signal.signal(signal.SIGHUP, lambda _signum, _frame: worker.request_restart())
    # uvicorn (the local API) shuts down on SIGTERM, then re-raises it to the handler found before it: exit
    # through the finally below, so the ComfyUI we started goes too. The serverless loop has its own handler.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        runpod.serverless.start({"handler": make_handler(worker), "concurrency_modifier": worker.concurrency})
    finally:
        worker.events.close()
        if worker.supervisor is not None:
            worker.supervisor.stop()
