"""The loopback RunPod job API (``tests/runpod_platform.py``) against the real SDK's production loop.

Each worker is a real ``python tests/handlers/<script>.py`` subprocess running ``runpod.serverless.start``
with the platform's environment; workers are started together once per module because ``import runpod``
alone costs about 1.7 s.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .runpod_platform import RunpodPlatform, SpawnedWorker

HANDLERS = Path(__file__).resolve().parent / "handlers"


@dataclass
class Worker:
    """One platform and the single worker process that polls it."""

    platform: RunpodPlatform
    process: SpawnedWorker
    pod_id: str


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Worker]]:
    """All workers this module needs, started at once so their imports overlap; each has its own platform."""
    logs = tmp_path_factory.mktemp("runpod-platform-logs")
    specs = {
        "sync": ("sync_echo.py", {}),
        "async": ("async_modes.py", {}),
        "stream": ("stream_parts.py", {}),
        "batch": ("async_modes.py", {"HANDLER_CONCURRENCY": "2"}),
    }
    started: dict[str, Worker] = {}
    try:
        for name, (script, extra) in specs.items():
            platform = RunpodPlatform().start()
            pod_id = f"{name}-pod"
            process = platform.spawn(
                [sys.executable, str(HANDLERS / script)],
                pod_id=pod_id,
                extra_env=extra,
                log_path=logs / f"{name}.log",
            )
            started[name] = Worker(platform, process, pod_id)
        yield started
    finally:
        # Signal every worker first so their drains overlap, then close each platform.
        for worker in started.values():
            if worker.process.process.poll() is None:
                worker.process.process.send_signal(signal.SIGTERM)
        for worker in started.values():
            worker.platform.close()


def _echo_round_trip(worker: Worker) -> None:
    """The worker still takes and finishes jobs."""
    job_id = worker.platform.submit({"mode": "echo", "after": "previous job"})
    assert worker.platform.wait_result(job_id, 60)["output"]["echo"]["after"] == "previous job"


def test_sync_handler_round_trip(workers: dict[str, Worker]) -> None:
    worker = workers["sync"]
    job_input = {"prompt": "a cat", "n": 3, "nested": {"ok": True}}
    job_id = worker.platform.submit(job_input)

    assert worker.platform.wait_result(job_id, 120) == {
        "output": {"echo": job_input, "pid": worker.process.pid}
    }  # the import too
    assert worker.platform.taken_by(job_id) == worker.pod_id

    [take] = [r for r in worker.platform.requests("job-take") if (r.response or {}).get("id") == job_id]
    assert take.method == "GET"
    assert take.path == f"/v2/test-endpoint/job-take/{worker.pod_id}"
    assert take.query == {"gpu": "test", "job_in_progress": "0"}
    assert take.response == {"id": job_id, "input": job_input}
    # No RUNPOD_AI_API_KEY reached the worker: the SDK sends an empty Authorization header.
    assert take.headers["Authorization"] == ""

    [done] = worker.platform.requests("job-done", job_id=job_id)
    assert done.method == "POST"
    assert done.path == f"/v2/test-endpoint/job-done/{worker.pod_id}/{job_id}"
    assert done.query == {"gpu": "test", "isStream": "false"}
    assert done.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert done.headers["X-Request-ID"] == job_id
    assert json.loads(done.text) == done.body

    stop_polls = worker.platform.requests("job-stop")
    assert stop_polls, "the SDK never polled the stop channel"
    assert {(r.method, r.path, tuple(r.query.items())) for r in stop_polls} == {
        ("GET", f"/v2/test-endpoint/job-stop/{worker.pod_id}", (("gpu", "test"),))
    }


def test_sync_handler_is_not_interrupted_by_cancel(workers: dict[str, Worker], tmp_path: Path) -> None:
    """A synchronous handler blocks the event loop: the stop signal lands only after it returned."""
    worker = workers["sync"]
    marker = tmp_path / "sync-sleep"
    job_id = worker.platform.submit({"mode": "sleep", "seconds": 1.0, "marker": str(marker)})
    started = marker.with_suffix(".started")
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, "the sync handler never started"
        time.sleep(0.02)

    worker.platform.cancel(job_id)

    finished = marker.with_suffix(".finished")
    deadline = time.monotonic() + 60
    while not finished.exists():
        assert time.monotonic() < deadline, "the sync handler never finished"
        time.sleep(0.02)
    assert float(finished.read_text()) - float(started.read_text()) >= 1.0
    # The stop answer is read (or, if no poll was open, polled for) only once the loop is free again.
    assert worker.platform.wait_stop_delivered(job_id, 5).response == {"jobsToStop": [job_id]}
    # Whether the result still reaches the platform is a race (the cancel hits the result post); the worker
    # goes on either way.
    _echo_round_trip(worker)


def test_async_progress_posts_arrive_in_order(workers: dict[str, Worker]) -> None:
    worker = workers["async"]
    # Each progress_update posts from its own new thread, so calls made back to back can arrive out of
    # order (and after the result); the handler spaces them out.
    job_id = worker.platform.submit({"mode": "progress", "steps": 4, "gap_s": 0.15})

    assert worker.platform.wait_result(job_id, 30) == {"output": {"steps": 4}}
    expected = [{"step": step} for step in range(4)]
    assert worker.platform.wait_progress(job_id, 4, 60) == expected
    posts = [r for r in worker.platform.requests("job-done", job_id=job_id) if r.body.get("status") == "IN_PROGRESS"]
    assert [r.body for r in posts] == [{"status": "IN_PROGRESS", "output": step} for step in expected]
    assert {r.query["isStream"] for r in posts} == {"false"}
    assert worker.platform.progress(job_id) == expected


def test_async_error_gives_failed_body(workers: dict[str, Worker]) -> None:
    worker = workers["async"]
    returned = worker.platform.submit({"mode": "error", "message": "workflow invalid"})
    raised = worker.platform.submit({"mode": "raise", "message": "exploded"})

    assert worker.platform.wait_result(returned, 30) == {"error": "workflow invalid"}
    body = worker.platform.wait_result(raised, 30)
    assert set(body) == {"error"}
    error = json.loads(body["error"])
    assert error["error_type"] == "<class 'RuntimeError'>"
    assert error["error_message"] == "exploded"
    assert error["worker_id"] == worker.pod_id


def test_refresh_worker_gives_stop_pod(workers: dict[str, Worker]) -> None:
    worker = workers["async"]
    job_id = worker.platform.submit({"mode": "refresh"})

    assert worker.platform.wait_result(job_id, 30) == {"output": {"done": True}, "stopPod": True}
    # The SDK leaves stopping the pod to the platform: the process keeps taking jobs.
    _echo_round_trip(worker)
    assert worker.process.process.poll() is None


def test_generator_handler_streams(workers: dict[str, Worker]) -> None:
    worker = workers["stream"]
    job_id = worker.platform.submit({"parts": 3})

    parts = [{"part": index} for index in range(3)]
    assert worker.platform.wait_result(job_id, 30) == {"output": parts}
    assert worker.platform.stream(job_id) == parts
    [done] = worker.platform.requests("job-done", job_id=job_id)
    assert done.query == {"gpu": "test", "isStream": "true"}
    streamed = worker.platform.requests("job-stream", job_id=job_id)
    assert [r.path for r in streamed] == [f"/v2/test-endpoint/job-stream/{worker.pod_id}/{job_id}"] * 3
    assert {r.query["isStream"] for r in streamed} == {"false"}


def test_cancel_stops_an_async_job(workers: dict[str, Worker], tmp_path: Path) -> None:
    worker = workers["async"]
    marker = tmp_path / "cancelled.json"
    job_id = worker.platform.submit({"mode": "sleep", "seconds": 30, "marker": str(marker)})
    assert worker.platform.wait_progress(job_id, 1, 30) == ["started"]

    cancelled_at = time.time()
    worker.platform.cancel(job_id)

    deadline = time.monotonic() + 60
    while not (written := marker.read_text() if marker.exists() else ""):  # created, then written
        assert time.monotonic() < deadline, "the handler never saw CancelledError"
        time.sleep(0.02)
    assert json.loads(written)["cancelled_at"] - cancelled_at < 25  # cancelled, not done with its 30 s sleep
    assert worker.platform.wait_stop_delivered(job_id, 1).response == {"jobsToStop": [job_id]}

    _echo_round_trip(worker)
    # A stopped job gets no result post at all.
    assert worker.platform.results(job_id) == []
    assert worker.process.process.poll() is None


def test_batch_take_and_sigterm_drain(workers: dict[str, Worker], tmp_path: Path) -> None:
    """concurrency_modifier 2 takes both jobs in one batch; SIGTERM lets both finish, posts, and exits 0."""
    worker = workers["batch"]
    jobs = worker.platform.submit_many(
        [{"mode": "sleep", "seconds": 1.0, "marker": str(tmp_path / f"m{index}")} for index in range(2)]
    )
    for job_id in jobs:
        worker.platform.wait_progress(job_id, 1, 30)
    [batch] = [r for r in worker.platform.requests("job-take-batch") if r.status == 200]
    assert batch.query == {"gpu": "test", "batch_size": "2", "job_in_progress": "0"}
    assert [job["id"] for job in batch.response] == jobs

    signalled = time.monotonic()
    returncode = worker.process.terminate(grace_s=60)

    assert returncode == 0, worker.process.log()[-3000:]  # exited by itself (60 s later it is killed: -9)
    for job_id in jobs:
        assert worker.platform.wait_result(job_id, 1) == {"output": {"slept": 1.0}}
    assert not [r for r in worker.platform.requests() if r.kind.startswith("job-take") and r.at > signalled]


def _get(url: str) -> tuple[int, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
        return response.status, json.loads(text) if text else None


def test_platform_protocol_without_a_worker() -> None:
    """The fixture's own answers, checked over plain HTTP: take, batch take, stop, withdraw, 404."""
    with RunpodPlatform(take_hold_s=0.1, stop_hold_s=0.1) as platform:
        env = platform.env("p1")
        assert "RUNPOD_AI_API_KEY" not in env
        assert "RUNPOD_AI_API_KEY" not in platform.process_env("p1")
        take = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", "p1")
        assert take.startswith("http://127.0.0.1:")

        first = platform.submit({"n": 1}, job_id="fixed-id")
        assert _get(take + "&job_in_progress=0") == (200, {"id": first, "input": {"n": 1}})
        assert _get(take + "&job_in_progress=0") == (204, None)

        batch = platform.submit_many([{"n": 2}, {"n": 3}, {"n": 4}])
        batch_url = take.replace("/job-take/", "/job-take-batch/") + "&batch_size=2&job_in_progress=0"
        assert _get(batch_url) == (200, [{"id": batch[0], "input": {"n": 2}}, {"id": batch[1], "input": {"n": 3}}])

        platform.cancel(batch[2])  # still queued: withdrawn, never handed out
        assert platform.queued() == []
        with pytest.raises(TimeoutError, match="withdrawn"):
            platform.wait_result(batch[2], 0.1)

        stop = take.replace("/job-take/", "/job-stop/")
        assert _get(stop) == (204, None)
        platform.cancel(first)
        assert _get(stop) == (200, {"jobsToStop": [first]})
        assert _get(stop.replace("/p1?", "/other-pod?")) == (204, None)

        with pytest.raises(urllib.error.HTTPError) as not_found:
            _get(f"http://127.0.0.1:{platform.port}/v2/x/health")
        assert not_found.value.code == 404
        not_found.value.close()
        assert [r.kind for r in platform.requests()][-1] == "unknown"
