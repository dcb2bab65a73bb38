"""A job that runs out of time is a ``timeout``, whatever clock the event loop keeps.

The runpod SDK's local API runs handlers on uvloop, whose timers count whole milliseconds and may fire up to
1 ms before ``time.monotonic()`` reaches the deadline: the worker read that as "the deadline has not passed",
so its own deadline's TimeoutError came back raw, as ``internal`` ("Unexpected worker error: TimeoutError"),
in about one timeout in five. Here the loop's timers fire 200 ms early, every time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from comfy_worker.runtime.app import build_worker

from .file_server import FileServer, make_data
from .worker_process import ComfyBackend, close_worker, free_port, worker_settings

EARLY_S = 0.2
GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "remote/slow.png"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "slow"}},
}


class EarlyTimers(asyncio.SelectorEventLoop):
    """An event loop whose timers fire EARLY_S before their time (uvloop's do by up to 1 ms)."""

    def call_at(
        self, when: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        return super().call_at(when - EARLY_S, callback, *args, context=context)


def test_the_deadline_timer_is_the_jobs_timeout_even_when_it_fires_early(tmp_path: Path) -> None:
    files = FileServer(tmp_path / "files")
    files.add("/slow.png", make_data(100_000), rate=1000)  # 100 s to send: the job's 1.5 s run out first
    settings = worker_settings(
        ComfyBackend.standin(), tmp_path / "root", free_port(), INPUT_URL_ALLOWLIST="127.0.0.1/32"
    )
    worker = build_worker(settings)
    try:
        job = {
            "workflow": GRAPH,
            "images": [{"name": "remote/slow.png", "url": files.url("/slow.png")}],
            "timeout": 1.5,
        }
        with asyncio.Runner(loop_factory=EarlyTimers) as runner:
            result = runner.run(worker.run("early-timer", job, lambda _message: None))
        error = json.loads(result["error"])
        assert error["error_type"] == "timeout", error
        assert "timeout of 1.5s while fetching input images" in error["message"]
    finally:
        close_worker(worker)
        files.close()
