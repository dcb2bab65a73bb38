"""An async handler with one behaviour per ``input["mode"]``, so one worker process can serve many tests.

``HANDLER_CONCURRENCY`` above 1 installs a ``concurrency_modifier`` (the SDK then takes jobs in batches).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import runpod


async def handler(job: dict[str, Any]) -> Any:
    job_input: dict[str, Any] = job["input"]
    mode = job_input.get("mode", "echo")
    if mode == "echo":
        return {"echo": job_input, "pid": os.getpid()}
    if mode == "progress":
        for step in range(int(job_input["steps"])):
            runpod.serverless.progress_update(job, {"step": step})
            # progress_update posts from a new thread each call; a pause keeps the posts in call order.
            await asyncio.sleep(float(job_input.get("gap_s", 0.05)))
        return {"steps": job_input["steps"]}
    if mode == "error":
        return {"error": job_input["message"]}
    if mode == "raise":
        raise RuntimeError(job_input["message"])
    if mode == "refresh":
        return {"refresh_worker": True, "done": True}
    if mode == "sleep":
        # The stop channel can only cancel a task that exists: say so before sleeping.
        runpod.serverless.progress_update(job, "started")
        marker = Path(job_input["marker"])
        try:
            await asyncio.sleep(float(job_input["seconds"]))
        except asyncio.CancelledError:
            marker.write_text(json.dumps({"cancelled_at": time.time()}))
            raise
        return {"slept": job_input["seconds"]}
    raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    config: dict[str, Any] = {"handler": handler}
    concurrency = int(os.environ.get("HANDLER_CONCURRENCY", "1"))
    if concurrency > 1:
        config["concurrency_modifier"] = lambda _current: concurrency
    runpod.serverless.start(config)
