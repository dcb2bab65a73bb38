"""Restarting ComfyUI under concurrency: a waiter that is cancelled harms nobody, and a restart that fails in
any way answers every waiter (issue #12, "Two concurrency bugs in ComfyUI recovery").
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.events import EventStream
from comfy_worker.comfy.recovery import Recovery
from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.runtime.app import build_worker
from comfy_worker.runtime.job import Worker

from .worker_process import STANDIN_DIR, TIMEOUT_MARGIN_S, ComfyBackend, close_worker, free_port, worker_settings


def quick_graph(prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def standin_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "comfyui"
    shutil.copytree(STANDIN_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "input", "output", "temp"))
    return copy


def make_worker(tmp_path: Path, comfyui_dir: Path, **extra: str) -> Worker:
    settings = worker_settings(
        ComfyBackend.standin(), tmp_path / "root", free_port(), COMFYUI_DIR=str(comfyui_dir), **extra
    )
    worker = build_worker(settings)
    assert worker.startup_error is None, worker.startup_error.to_dict()
    return worker


def kill_comfyui(worker: Worker) -> None:
    assert worker.supervisor is not None and worker.supervisor.process is not None
    worker.supervisor.process.kill()
    worker.supervisor.process.wait(5)


def test_cancelling_a_job_that_waits_for_a_restart_harms_no_other_job(tmp_path: Path) -> None:
    comfyui = standin_copy(tmp_path)
    worker = make_worker(tmp_path, comfyui, COMFY_STARTUP_TIMEOUT="60")
    try:
        # the restarted ComfyUI takes 2 s more to boot, so both jobs surely wait for it when one is cancelled
        (comfyui / "main.py").rename(comfyui / "standin_main.py")
        (comfyui / "main.py").write_text(
            "import runpy, time\ntime.sleep(2)\nrunpy.run_path('standin_main.py', run_name='__main__')\n"
        )
        kill_comfyui(worker)

        async def scenario() -> dict[str, Any]:
            cancelled = asyncio.create_task(worker.run("a", {"workflow": quick_graph("a")}, lambda _m: None))
            waiting = asyncio.create_task(worker.run("b", {"workflow": quick_graph("b")}, lambda _m: None))
            await asyncio.sleep(0.5)
            assert not cancelled.done() and not waiting.done(), "both jobs wait for the restart"
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            return await asyncio.wait_for(waiting, timeout=60)

        result = asyncio.run(scenario())
        assert result.get("status") == "success", result
        later = asyncio.run(worker.run("c", {"workflow": quick_graph("c")}, lambda _m: None))
        assert later.get("status") == "success", later
    finally:
        close_worker(worker)


def test_a_restart_that_fails_with_an_os_error_answers_every_job(tmp_path: Path) -> None:
    comfyui = standin_copy(tmp_path)
    worker = make_worker(tmp_path, comfyui, COMFY_RESTART_ATTEMPTS="2")
    try:
        kill_comfyui(worker)
        shutil.rmtree(comfyui)  # Popen's cwd is gone: the restart raises FileNotFoundError, an OSError

        async def two_jobs() -> list[dict[str, Any]]:
            jobs = [worker.run(name, {"workflow": quick_graph(name)}, lambda _m: None) for name in ("a", "b")]
            return list(await asyncio.wait_for(asyncio.gather(*jobs), timeout=30))

        for result in asyncio.run(two_jobs()):
            error = json.loads(result["error"])
            assert error["error_type"] == "comfyui_unavailable", error
            assert "could not be restarted (2 attempts)" in error["message"]
            assert "FileNotFoundError" in error["message"]
            assert result["refresh_worker"] is True
    finally:
        close_worker(worker)


def test_a_restart_asked_for_during_a_job_waits_for_it(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, standin_copy(tmp_path))
    graph = quick_graph("during") | {
        "3": {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": 1.5, "steps": 0}},
    }
    graph["2"]["inputs"]["images"] = ["3", 0]
    try:
        assert worker.supervisor is not None

        async def scenario() -> dict[str, Any]:
            task = asyncio.create_task(worker.run("running", {"workflow": graph}, lambda _m: None))
            while not (await asyncio.to_thread(worker.client.queue))["queue_running"]:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            worker.request_restart()  # what SIGHUP from apply_config.sh does
            assert not worker.recovery.restarting, "not while the job runs"
            return await task

        result = asyncio.run(scenario())
        assert result.get("status") == "success", result  # a restart under the job would have crashed it
        after = asyncio.run(worker.run("after", {"workflow": quick_graph("after")}, lambda _m: None))
        assert after.get("status") == "success", after
        assert worker.supervisor.restarts == 1, "the restart happened once the job was done"
    finally:
        close_worker(worker)


def test_a_timed_out_result_does_not_wait_for_the_interrupt_grace(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, standin_copy(tmp_path), INTERRUPT_GRACE="30")
    graph = quick_graph("held") | {
        # one tick of 8 s: the interrupt lands only when it ends, as in a long node of a real ComfyUI
        "3": {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": 8, "steps": 1}},
    }
    graph["2"]["inputs"]["images"] = ["3", 0]
    try:
        started = time.monotonic()
        result = asyncio.run(worker.run("held", {"workflow": graph, "timeout": 1}, lambda _m: None))
        elapsed = time.monotonic() - started
        error = json.loads(result["error"])
        assert error["error_type"] == "timeout" and error["details"]["comfyui_restarting"] is False, error
        assert elapsed < 1 + TIMEOUT_MARGIN_S, f"the result came {elapsed:.1f}s after the start"
        after = asyncio.run(worker.run("after", {"workflow": quick_graph("after")}, lambda _m: None))
        assert after.get("status") == "success", after
        assert worker.supervisor is not None and worker.supervisor.restarts == 0, "the prompt let go in time"
        assert worker.client.queue() == {"queue_running": [], "queue_pending": []}
    finally:
        close_worker(worker)


def test_a_prompt_lost_to_a_restart_done_already_restarts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ComfyUI's WebSocket can drop before its killed process is reaped: the running job then sees no death,
    the next job restarts ComfyUI, and the running job finds its prompt unknown to the new one. It fails with
    comfyui_crashed that tells how ComfyUI ended, and must not restart the ComfyUI that just answered (CI saw
    that second restart)."""
    worker = make_worker(tmp_path, standin_copy(tmp_path))
    graph = quick_graph("lost") | {
        "3": {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": 30, "steps": 0}},
    }
    graph["2"]["inputs"]["images"] = ["3", 0]
    try:
        supervisor = worker.supervisor
        assert supervisor is not None
        # the running job does not see the death, as in that race
        monkeypatch.setattr(worker.follower, "_raise_if_crashed", lambda _tracker: None)

        async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
            running = asyncio.create_task(worker.run("running", {"workflow": graph}, lambda _m: None))
            while not (await asyncio.to_thread(worker.client.queue))["queue_running"]:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await asyncio.to_thread(kill_comfyui, worker)
            after = await worker.run("after", {"workflow": quick_graph("after")}, lambda _m: None)
            return await asyncio.wait_for(running, timeout=30), after

        lost, after = asyncio.run(scenario())
        assert after.get("status") == "success", after
        error = json.loads(lost["error"])
        assert error["error_type"] == "comfyui_crashed", error
        assert error["message"].startswith("ComfyUI exited (code -9) while the job ran and was restarted"), error
        assert error["details"]["exit_code"] == -9, error
        assert any("restart #1" in line for line in error["details"]["log_tail"]), error
        # the next job waits for any restart under way: a second one would be done, and counted, by its end
        again = asyncio.run(worker.run("again", {"workflow": quick_graph("again")}, lambda _m: None))
        assert again.get("status") == "success", again
        assert supervisor.restarts == 1, "one death, one restart"
        assert not worker.recovery.restarting
    finally:
        close_worker(worker)


class HeldRestart:
    """A supervisor of a dead ComfyUI whose restart waits for ``release``, so a job can report the death while
    it runs. Only Recovery's bookkeeping is under test here: the restarts themselves are real above."""

    def __init__(self) -> None:
        self.process = object()
        self.restartable = True
        self.restarts = 0
        self.dead = True
        self.started = threading.Event()
        self.release = threading.Event()

    def alive(self) -> bool:
        return not self.dead

    def restart(self, _client: object) -> float:
        self.started.set()
        assert self.release.wait(10)
        self.restarts += 1
        self.process, self.dead = object(), False
        return 0.0


class QuietEvents:
    def retry_now(self) -> None:
        pass

    def wait_connected(self, timeout_s: float) -> bool:
        return True


def test_a_death_reported_while_its_restart_runs_asks_for_no_other() -> None:
    """Settling a timed-out prompt can find ComfyUI dead and restart it; a job that saw the same death during
    that restart must not queue a second one."""
    supervisor = HeldRestart()
    recovery = Recovery(
        cast(ComfySupervisor, supervisor), cast(ComfyClient, None), cast(EventStream, QuietEvents()), attempts=1
    )
    dead = supervisor.process
    assert recovery.start()  # what the settle watch does when the process died in the grace
    assert supervisor.started.wait(10)
    assert recovery.restart_crashed(dead), "a restart for it is under way"
    supervisor.release.set()
    asyncio.run(recovery.wait(time.monotonic() + 10, 10))
    assert supervisor.restarts == 1, "one death, one restart"
    assert not recovery.restarting and recovery.failed is None
