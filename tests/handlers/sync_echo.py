"""A synchronous handler: echoes its input, or blocks the SDK's event loop in ``time.sleep`` (mode sleep).

In mode sleep it writes ``<marker>.started`` and ``<marker>.finished`` (wall-clock times), so a test can
see whether a stop signal interrupted it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import runpod


def handler(job: dict[str, Any]) -> dict[str, Any]:
    job_input: dict[str, Any] = job["input"]
    if job_input.get("mode") == "sleep":
        marker = Path(job_input["marker"])
        marker.with_suffix(".started").write_text(repr(time.time()))
        time.sleep(float(job_input["seconds"]))
        marker.with_suffix(".finished").write_text(repr(time.time()))
        return {"slept": job_input["seconds"]}
    return {"echo": job_input, "pid": os.getpid()}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
