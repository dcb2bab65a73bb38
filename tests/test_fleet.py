"""An endpoint as RunPod runs it, with worker processes: several workers on one workspace and one ComfyUI
checkout, while another worker boots and stops again and again (the autoscaler scaling up and down).

Every worker of an endpoint mounts the same network volume, so they all start ComfyUI from the same checkout.
ComfyUI deletes its temp folder when it starts and when it exits cleanly: a worker booting or stopping beside
a running job must not take that job's PreviewImage file (nor its uploads, outputs or ComfyUI's database)
with it. Each worker runs the runpod SDK's production loop against the loopback job API; the one that comes
and goes polls a second, empty job API, so it never takes a job that its SIGKILL would then lose.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .conftest import REPO
from .runpod_platform import RunpodPlatform
from .worker_process import STANDIN_DIR, free_port

WORKERS = 3
JOBS = 9
SLEEP_S = 3.0  # each job holds its PreviewImage file this long before its result is built
BOOT_S = 90.0  # a generous deadline for a worker to come up on a loaded machine
STOPS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT)  # scale-down, a killed container, Ctrl-C


@dataclass
class Proc:
    """One ``handler.py`` in a process group of its own (with the ComfyUI it starts)."""

    process: subprocess.Popen[bytes]
    pod_id: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def end(self, how: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM the worker alone (RunPod's scale-down), or SIGKILL/SIGINT its whole group (a killed
        container; Ctrl-C, after which ComfyUI deletes its temp folder); whatever is left is killed."""
        with contextlib.suppress(ProcessLookupError):
            if how == signal.SIGTERM:
                self.process.send_signal(how)
            else:
                os.killpg(self.process.pid, how)
        try:
            self.process.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def spawn(platform: RunpodPlatform, workspace: Path, local: Path, pod_id: str, logs: Path) -> Proc:
    """A serverless worker as start.sh runs it on an endpoint: the workspace's ComfyUI, its own port."""
    env = {
        "WORKSPACE": str(workspace),
        "COMFYUI_DIR": str(workspace / "ComfyUI"),
        "COMFYUI_PYTHON": sys.executable,
        "COMFY_API_URL": f"http://127.0.0.1:{free_port()}",
        "COMFYUI_LOCAL_DIR": str(local),
        "COMFY_STARTUP_TIMEOUT": str(BOOT_S),
        "PROGRESS_INTERVAL": "0",
        "LOG_LEVEL": "INFO",
    }
    log_path = logs / f"{pod_id}.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "handler.py")],
            cwd=logs,
            env=platform.process_env(pod_id, env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Proc(process, pod_id, log_path)


def color_of(index: int) -> tuple[int, int, int]:
    return (20 * index + 10, 200 - 15 * index, 77)


def fleet_job(index: int) -> dict[str, Any]:
    """Its own input image under a name every job uses; a PreviewImage early, a SaveImage at the end."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color_of(index)).save(buffer, "PNG")
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "input.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": SLEEP_S, "steps": 0}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "fleet"}},
    }
    image = base64.b64encode(buffer.getvalue()).decode()
    return {"workflow": workflow, "images": [{"name": "input.png", "image": image}], "output": {"include_temp": True}}


def pixel(entry: dict[str, Any]) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(base64.b64decode(entry["data"]))) as image:
        value: tuple[int, int, int] = image.convert("RGB").getpixel((0, 0))  # type: ignore[assignment]
        return value


def assert_own_outputs(output: dict[str, Any], index: int) -> None:
    """A fleet job's result: no warning, its preview (node 2) and its save (node 5), with its own pixels."""
    assert output["warnings"] == [], output["warnings"]
    by_node = {entry["node_id"]: entry for entry in output["images"]}
    assert sorted(by_node) == ["2", "5"], output["images"]
    red, green, blue = color_of(index)
    assert pixel(by_node["2"]) == (red, green, blue)  # its own input, not another job's input.png
    inverted = (255 - red, 255 - green, 255 - blue)  # within ComfyUI's float32 rounding
    assert all(abs(a - b) <= 1 for a, b in zip(pixel(by_node["5"]), inverted, strict=True)), pixel(by_node["5"])


def files_of(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts}


def wait_for(what: str, ready: Any, deadline_s: float, procs: list[Proc]) -> None:
    deadline = time.monotonic() + deadline_s
    while not ready():
        for proc in procs:
            assert proc.process.poll() is None, f"{proc.pod_id} exited while waiting for {what}:\n{proc.log()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} within {deadline_s} s"
        time.sleep(0.05)


def polled(platform: RunpodPlatform, pod_id: str) -> bool:
    takes = platform.requests("job-take") + platform.requests("job-take-batch")  # JOB_CONCURRENCY 1, or more
    return any(request.pod_id == pod_id for request in takes)


@contextlib.contextmanager
def ending(procs: list[Proc]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            proc.end()


def test_a_worker_booting_and_stopping_beside_running_jobs_takes_nothing_from_them(tmp_path: Path) -> None:
    workspace, local, logs = tmp_path / "runpod-volume", tmp_path / "local", tmp_path / "logs"
    logs.mkdir()
    checkout = workspace / "ComfyUI"
    shutil.copytree(STANDIN_DIR, checkout, ignore=shutil.ignore_patterns("__pycache__", "input", "output", "temp"))
    (checkout / "input").mkdir()
    (checkout / "input" / "on-the-volume.txt").write_text("a file a workflow may read by name\n")
    before = files_of(checkout)
    workers: list[Proc] = []
    with RunpodPlatform() as platform, RunpodPlatform(endpoint="idle") as idle, ending(workers):
        workers += [spawn(platform, workspace, local, f"fleet-{n}", logs) for n in range(WORKERS)]
        jobs = {platform.submit(fleet_job(index)): index for index in range(JOBS)}

        def sleeping() -> bool:  # some job is in its StandinSleep: its PreviewImage file is on disk
            return any(
                not platform.results(job) and (platform.progress(job) or [{}])[-1].get("node_id") == "3" for job in jobs
            )

        def finished() -> bool:
            return all(platform.results(job) for job in jobs)

        cycles = 0
        while not finished():
            wait_for("job in its sleep", lambda: sleeping() or finished(), BOOT_S + 60, workers)
            if finished():
                break
            churn = spawn(idle, workspace, local, f"churn-{cycles}", logs)
            try:  # ready: it polls for a job, so its ComfyUI has booted (and emptied its temp folder)
                wait_for(f"{churn.pod_id} ready", lambda pod=churn.pod_id: polled(idle, pod), BOOT_S, [churn])
            finally:
                churn.end(STOPS[cycles % len(STOPS)])
            cycles += 1
        results = {job: platform.wait_result(job, timeout=60) for job in jobs}
        own_folders = [local / f"comfy-worker-{w.pod_id}-{w.process.pid}" for w in workers]
        assert cycles >= 2, "the churning worker never came up while a job ran"
        failed = {job: body["error"][:300] for job, body in results.items() if "error" in body}
        assert failed == {}, f"{len(failed)} of {JOBS} jobs failed in {cycles} boots and stops beside them"
        for job, body in results.items():
            assert_own_outputs(body["output"], jobs[job])
        for folder in own_folders:
            assert (folder / "user" / "comfyui.db").is_file(), sorted(p.name for p in local.iterdir())
            assert (folder / "input" / "on-the-volume.txt").is_file()  # the volume's inputs are still there
            assert list((folder / "input" / "jobs").iterdir()) == []  # every job's files were removed
            assert list((folder / "output" / "jobs").iterdir()) == []
    assert files_of(checkout) == before  # nothing written into the shared checkout (no temp, no database)
