"""A ComfyUI that dies or hangs: the job explains it at once, ComfyUI is restarted, the next job succeeds;
when ComfyUI cannot come back, every job says so and asks RunPod to replace the worker.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfy_worker.runtime.app import build_worker
from comfy_worker.runtime.job import Worker
from comfy_worker.settings import Settings

from .worker_process import (
    STANDIN_DIR,
    TIMEOUT_MARGIN_S,
    ComfyBackend,
    backend_params,
    close_worker,
    free_port,
    worker_settings,
)


def make_worker(root: Path, backend: ComfyBackend, comfyui_dir: Path | None = None, **extra: str) -> Worker:
    if comfyui_dir is not None:
        extra["COMFYUI_DIR"] = str(comfyui_dir)
    worker = build_worker(worker_settings(backend, root, free_port(), INTERRUPT_GRACE="1", **extra))
    assert worker.startup_error is None, worker.startup_error.to_dict()
    return worker


@pytest.fixture(params=backend_params())
def worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Worker]:
    built = make_worker(tmp_path, request.param)
    yield built
    close_worker(built)


def is_standin(worker: Worker) -> bool:
    return worker.settings.comfyui_dir == STANDIN_DIR


def sleep_graph(seconds: float, steps: int = 0, prefix: str = "crash") -> dict[str, Any]:
    """Node 2 keeps the stand-in busy; ``seconds=0`` gives a quick job on any ComfyUI."""
    graph: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }
    if seconds == 0:
        graph["3"]["inputs"]["images"] = ["1", 0]
        del graph["2"]
    return graph


def long_graph(worker: Worker) -> tuple[dict[str, Any], str]:
    """A job whose node 2 runs for many seconds and ignores interrupts until it ends, and that node's class.

    The stand-in sleeps in one tick; a real ComfyUI blurs a 4096x4096 image (about 15 s on 2 CPU cores).
    """
    if is_standin(worker):
        return sleep_graph(30, steps=1), "StandinSleep"
    graph = sleep_graph(0)
    graph["1"]["inputs"] |= {"width": 4096, "height": 4096}
    graph["2"] = {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}}
    graph["3"]["inputs"]["images"] = ["2", 0]
    return graph, "ImageBlur"


def run(worker: Worker, job_input: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(worker.run("job", job_input, lambda _message: None))


def error_of(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" in result, result
    error: dict[str, Any] = json.loads(result["error"])
    return error


def kill_mid_job(worker: Worker) -> tuple[dict[str, Any], float]:
    """Run a long job, SIGKILL ComfyUI while node 2 runs; return the result and seconds from kill to result."""

    async def scenario() -> tuple[dict[str, Any], float]:
        progress: list[dict[str, Any]] = []
        task = asyncio.create_task(worker.run("job", {"workflow": long_graph(worker)[0]}, progress.append))
        deadline = time.monotonic() + 30
        while not any(message["node_id"] == "2" for message in progress):
            assert time.monotonic() < deadline, f"node 2 never started: {progress}"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert worker.supervisor is not None and worker.supervisor.process is not None
        worker.supervisor.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        result = await task
        return result, time.monotonic() - killed

    return asyncio.run(scenario())


def test_killed_mid_job_again_and_again(worker: Worker) -> None:
    """Ten kills in a row on the stand-in; three on the real ComfyUI, whose every restart is a 10-20 s boot."""
    node_class = long_graph(worker)[1]
    rounds = 10 if is_standin(worker) else 3
    for round_ in range(rounds):
        result, seconds = kill_mid_job(worker)
        error = error_of(result)
        assert error["error_type"] == "comfyui_crashed", error
        assert seconds <= 2.0, f"round {round_}: the error took {seconds:.2f}s"
        assert error["details"]["node_id"] == "2"
        assert error["details"]["exit_code"] == -signal.SIGKILL
        assert f"node 2 ({node_class})" in error["message"]
        assert error["details"]["comfyui_restarting"] is True
        assert error["diagnostics"]["comfyui"]["state"] == "restarting"
        assert isinstance(error["details"]["log_tail"], list) and error["details"]["log_tail"]
        assert "refresh_worker" not in result
        after = run(worker, {"workflow": sleep_graph(0, prefix=f"after_{round_}")})
        assert after.get("status") == "success", after
    assert worker.supervisor is not None and worker.supervisor.restarts == rounds


def test_comfyui_dead_between_jobs_is_restarted(worker: Worker) -> None:
    assert worker.supervisor is not None and worker.supervisor.process is not None
    worker.supervisor.process.kill()
    worker.supervisor.process.wait(5)
    result = run(worker, {"workflow": sleep_graph(0, prefix="revived")})
    assert result.get("status") == "success", result
    assert worker.supervisor.restarts == 1


def test_timeout_inside_a_node_that_ignores_interrupts_restarts_comfyui(worker: Worker) -> None:
    started = time.monotonic()
    result = run(worker, {"workflow": long_graph(worker)[0], "timeout": 1})
    error = error_of(result)
    assert error["error_type"] == "timeout"
    # The real ComfyUI's node 1 (a 4096x4096 EmptyImage) can still be running at 1 s on a loaded machine; it
    # ignores interrupts too. The stand-in's node 1 is instant.
    assert error["details"]["node_id"] in (("2",) if is_standin(worker) else ("1", "2")), error
    assert error["details"]["comfyui_restarting"] is False, "ComfyUI took the interrupt: it gets INTERRUPT_GRACE"
    assert time.monotonic() - started < 1 + TIMEOUT_MARGIN_S, "the result does not wait for INTERRUPT_GRACE"
    after = run(worker, {"workflow": sleep_graph(0, prefix="clean")})  # waits for the grace, then the restart
    assert after.get("status") == "success", after
    assert worker.supervisor is not None and worker.supervisor.restarts == 1
    assert worker.client.queue() == {"queue_running": [], "queue_pending": []}


def test_comfyui_that_cannot_come_back_asks_for_a_new_worker(tmp_path: Path) -> None:
    comfy_copy = tmp_path / "comfyui"
    shutil.copytree(STANDIN_DIR, comfy_copy, ignore=shutil.ignore_patterns("__pycache__", "input", "output", "temp"))
    broken = make_worker(tmp_path / "root", ComfyBackend.standin(), comfyui_dir=comfy_copy, COMFY_RESTART_ATTEMPTS="2")
    try:
        (comfy_copy / "main.py").write_text("import sys\nprint('CUDA error: device lost')\nsys.exit(1)\n")
        crashed, _ = kill_mid_job(broken)
        assert error_of(crashed)["error_type"] == "comfyui_crashed"
        for _ in range(2):
            result = run(broken, {"workflow": sleep_graph(0)})
            error = error_of(result)
            assert error["error_type"] == "comfyui_unavailable"
            assert "could not be restarted (2 attempts)" in error["message"]
            assert "CUDA error: device lost" in error["details"]["log_tail"]
            assert result["refresh_worker"] is True
        assert broken.supervisor is not None
        assert broken.supervisor.restarts == 2, "once the attempts are spent, later jobs do not restart again"
    finally:
        close_worker(broken)


def test_comfyui_that_stops_answering_is_restarted(worker: Worker) -> None:
    async def scenario() -> dict[str, Any]:
        long_job = {"workflow": long_graph(worker)[0], "timeout": 2}
        task = asyncio.create_task(worker.run("job", long_job, lambda _m: None))
        deadline = time.monotonic() + 10
        while not (await asyncio.to_thread(worker.client.queue))["queue_running"]:
            assert time.monotonic() < deadline, "the job never started running"
            await asyncio.sleep(0.05)
        assert worker.supervisor is not None and worker.supervisor.process is not None
        worker.supervisor.process.send_signal(signal.SIGSTOP)
        return await task

    started = time.monotonic()
    result = asyncio.run(scenario())
    error = error_of(result)
    assert error["error_type"] == "timeout"
    assert error["details"]["comfyui_restarting"] is True
    # 2 s timeout, then one control call that gets no answer: ComfyUI is restarted in the background
    assert time.monotonic() - started < 2 + TIMEOUT_MARGIN_S
    after = run(worker, {"workflow": sleep_graph(0, prefix="unfrozen")})
    assert after.get("status") == "success", after
    assert worker.supervisor is not None and worker.supervisor.restarts == 1


def test_readiness_has_its_own_timeout(tmp_path: Path) -> None:
    hanging = tmp_path / "hanging_comfyui"
    hanging.mkdir()
    (hanging / "main.py").write_text("import time\nprint('loading 300 custom nodes...', flush=True)\ntime.sleep(600)\n")
    settings = Settings.from_env(
        {
            "COMFYUI_DIR": str(hanging),
            "COMFY_API_URL": f"http://127.0.0.1:{free_port()}",
            "COMFY_STARTUP_TIMEOUT": "2",
        }
    )
    started = time.monotonic()
    failing = build_worker(settings)
    try:
        assert time.monotonic() - started < 8
        assert failing.startup_error is not None
        result = run(failing, {"workflow": sleep_graph(0)})
        error = error_of(result)
        assert error["error_type"] == "comfyui_unavailable"
        assert "within 2s (COMFY_STARTUP_TIMEOUT)" in error["message"]
        assert "loading 300 custom nodes..." in error["details"]["log_tail"]
        assert result["refresh_worker"] is True
    finally:
        close_worker(failing)
