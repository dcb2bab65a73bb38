"""How fast does the worker notice a killed ComfyUI, and how fast does it serve again? Prints figures.

For each round: a long job runs, ComfyUI gets SIGKILL mid-node, and we time (a) SIGKILL -> the job's
``comfyui_crashed`` result and (b) SIGKILL -> the next job accepted and finished. The baseline for (b) is a
cold ComfyUI boot measured in the same run (start -> ``/system_stats`` answers).

    python bench/crash_recovery.py [--rounds 10]                     # the stand-in ComfyUI
    COMFYUI_DIR=... COMFYUI_PYTHON=... python bench/crash_recovery.py  # a real ComfyUI

Targets (issue "worker robustness"): (a) <= 2 s; (b) <= ComfyUI boot + 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from comfy_worker.runtime.app import build_worker
from comfy_worker.runtime.job import Worker
from comfy_worker.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def long_job() -> dict[str, Any]:
    """A job that keeps ComfyUI busy: StandinSleep on the stand-in, a big blur chain on a real ComfyUI."""
    blur: dict[str, Any] = {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}}
    sleep = {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": 60}}
    real = bool(os.environ.get("COMFYUI_DIR"))
    size = 4096 if real else 64
    return {
        "workflow": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 4, "color": 7}},
            "2": blur if real else sleep,
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench_crash"}},
        },
        "timeout": 600,
    }


def quick_job(i: int) -> dict[str, Any]:
    return {
        "workflow": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench_after"}},
        }
    }


async def one_round(worker: Worker, i: int) -> tuple[float, float]:
    task = asyncio.create_task(worker.run("crash", long_job(), lambda _m: None))
    while not (await asyncio.to_thread(worker.client.queue))["queue_running"]:  # noqa: ASYNC110 - polls ComfyUI
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    assert worker.supervisor is not None and worker.supervisor.process is not None
    worker.supervisor.process.send_signal(signal.SIGKILL)
    killed = time.perf_counter()
    result = await task
    to_error = time.perf_counter() - killed
    error = json.loads(result["error"])
    if error["error_type"] != "comfyui_crashed":
        raise RuntimeError(f"expected comfyui_crashed, got {error}")
    after = await worker.run("after", quick_job(i), lambda _m: None)
    if after.get("status") != "success":
        raise RuntimeError(f"the next job failed: {after}")
    return to_error, time.perf_counter() - killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    root = Path(tempfile.mkdtemp(prefix="bench-crash-"))
    env = {
        **os.environ,
        "COMFYUI_DIR": os.environ.get("COMFYUI_DIR") or str(REPO / "tests" / "standin_comfyui"),
        "COMFYUI_PYTHON": os.environ.get("COMFYUI_PYTHON") or sys.executable,
        "COMFY_API_URL": f"http://127.0.0.1:{free_port()}",
        "COMFYUI_INPUT_DIR": str(root / "input"),
        "COMFYUI_OUTPUT_DIR": str(root / "output"),
        "COMFYUI_TEMP_DIR": str(root / "temp"),
        "LOG_LEVEL": "WARNING",
    }
    settings = Settings.from_env(env)
    print(f"ComfyUI: {settings.comfyui_dir}")
    started = time.perf_counter()
    worker = build_worker(settings)
    if worker.startup_error or worker.supervisor is None:
        raise SystemExit(f"ComfyUI did not start: {worker.startup_error}")
    print(f"cold start of the worker (ComfyUI boot overlapping `import runpod`): {time.perf_counter() - started:.2f} s")
    boots = []
    try:
        for _ in range(3):  # the baseline: ComfyUI boot alone, same machine, same run
            boots.append(worker.supervisor.restart(worker.client))
        boot = statistics.median(boots)
        to_error, to_next = [], []
        for i in range(args.rounds):
            error_s, next_s = asyncio.run(one_round(worker, i))
            to_error.append(error_s)
            to_next.append(next_s)
        print(f"ComfyUI boot alone (median of {len(boots)}): {boot:.2f} s")
        print(
            f"{args.rounds} kills: {args.rounds}/{args.rounds} clear comfyui_crashed errors, {args.rounds} recoveries"
        )
        error_median, error_max = statistics.median(to_error), max(to_error)
        print(f"SIGKILL -> job error:        median {error_median:.2f} s, max {error_max:.2f} s (target <= 2 s)")
        print(
            f"SIGKILL -> next job done:    median {statistics.median(to_next):.2f} s, max {max(to_next):.2f} s "
            f"(target <= boot + 1 s = {boot + 1:.2f} s)"
        )
    finally:
        worker.events.close()
        worker.supervisor.stop()


if __name__ == "__main__":
    main()
