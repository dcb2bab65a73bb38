"""JOB_CONCURRENCY's guarantees, job by job, with several jobs in flight in the runpod SDK's production loop
(``python handler.py`` against the loopback job API) and in its local API.

ComfyUI runs one prompt at a time; the worker holds up to N jobs and queues their prompts in arrival order.
Each test puts a long prompt in front (a StandinSleep, or a large blur on the real ComfyUI) so that the jobs
behind it are in flight, waits until ComfyUI's own ``/queue`` shows them there, then does one thing to one
job: kills ComfyUI, cancels a queued job, lets the running one time out, feeds two the same input name,
makes one delivery fail, runs out of memory. Every job must end as the contract says, and the others go on.

Prompts are told apart in ComfyUI's queue and history by a tag in their SaveImage ``filename_prefix``.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from PIL import Image

from .runpod_platform import RunpodPlatform, SpawnedWorker
from .s3_server import S3Server, run_s3rver
from .test_production_loop import Deployment
from .test_production_loop import deploy as deploy_worker
from .worker_process import ComfyBackend, backend_params, serve_api

T = TypeVar("T")

POLL_S = 0.02  # how often ComfyUI's queue is looked at while waiting for a state
RESTARTED = "ComfyUI restarted and ready in"  # the worker's log line after each restart
LAUNCHED = "Starting ComfyUI:"  # the worker's log line at each launch of its ComfyUI


def deploy(platform: RunpodPlatform, backend: ComfyBackend, root: Path, **extra_env: str) -> Deployment:
    """``handler.py`` in the production loop against ``platform``, with JOB_CONCURRENCY=3 unless told."""
    return deploy_worker(platform, backend, root, "pod-conc", **({"JOB_CONCURRENCY": "3"} | extra_env))


# ---------------------------------------------------------------------------------------------- workflows


def tagged(prefix: str) -> str:
    """A SaveImage prefix no other prompt of the run contains."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def quick(tag: str, color: int = 0) -> dict[str, Any]:
    """A prompt of a few milliseconds on any ComfyUI."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": tag}},
    }


def sleeping(tag: str, seconds: float) -> dict[str, Any]:
    """A stand-in prompt that runs ``seconds`` in ticks of 0.1 s (an interrupt lands on a tick)."""
    graph = quick(tag)
    graph["3"] = {
        "class_type": "StandinSleep",
        "inputs": {"image": ["1", 0], "seconds": seconds, "steps": max(1, round(seconds * 10))},
    }
    graph["2"]["inputs"]["images"] = ["3", 0]
    return graph


def long_running(backend: ComfyBackend, tag: str, seconds: float = 60) -> dict[str, Any]:
    """A prompt that runs a long time: ``seconds`` on the stand-in; a 4096x4096 blur on a real ComfyUI (about
    15 s on 2 CPU cores)."""
    if backend.name == "standin":
        return sleeping(tag, seconds)
    graph = quick(tag)
    graph["1"]["inputs"] |= {"width": 4096, "height": 4096}
    graph["3"] = {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}}
    graph["2"]["inputs"]["images"] = ["3", 0]
    return graph


def load_and_save(tag: str, name: str, sleep_s: float = 0) -> dict[str, Any]:
    """LoadImage ``name`` -> (StandinSleep) -> SaveImage: the output holds the job's input pixels."""
    graph: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": tag}},
    }
    if sleep_s:
        graph["3"] = {
            "class_type": "StandinSleep",
            "inputs": {"image": ["1", 0], "seconds": sleep_s, "steps": max(1, round(sleep_s * 10))},
        }
        graph["2"]["inputs"]["images"] = ["3", 0]
    return graph


def noise_png(size: int, seed: int) -> tuple[bytes, bytes]:
    """A PNG of random pixels (it does not compress) and its RGB bytes."""
    rng = random.Random(seed)
    pixels = bytes(rng.randrange(256) for _ in range(size * size * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(out, format="PNG")
    return out.getvalue(), pixels


def rgb_of(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as picture:
        return picture.convert("RGB").tobytes()


def pixel_distance(a: bytes, b: bytes) -> int:
    """The largest difference of two images' channel values. LoadImage -> SaveImage goes through float32
    (x / 255 * 255), so a value may come back one lower: 1 is the same image."""
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------- observing


@dataclass(frozen=True)
class ComfyQueue:
    """ComfyUI's ``/queue``: the prompt id of each tagged prompt running or pending there."""

    running: dict[str, str]
    pending: dict[str, str]

    def holds(self, tag: str) -> bool:
        return tag in self.running or tag in self.pending


def comfy_queue(comfy_url: str, tags: Sequence[str]) -> ComfyQueue | None:
    """Which of ``tags`` ComfyUI runs and holds; None while it does not answer (dead, restarting)."""
    try:
        body = requests.get(f"{comfy_url}/queue", timeout=5).json()
    except requests.RequestException:
        return None

    def by_tag(entries: list[list[Any]]) -> dict[str, str]:
        found: dict[str, str] = {}
        for entry in entries:  # [number, prompt_id, prompt, extra_data, outputs_to_execute, ...]
            text = json.dumps(entry[2])
            found.update({tag: entry[1] for tag in tags if tag in text})
        return found

    return ComfyQueue(by_tag(body["queue_running"]), by_tag(body["queue_pending"]))


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, context: Callable[[], str]) -> T:
    """Poll ``check`` until it answers something other than None; fail with ``context()`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s\n{context()}")
        time.sleep(POLL_S)


def wait_queue(d: Deployment, what: str, tags: Sequence[str], ready: Callable[[ComfyQueue], bool]) -> ComfyQueue:
    """ComfyUI's queue once ``ready`` holds for it."""
    last: list[ComfyQueue | None] = [None]

    def check() -> ComfyQueue | None:
        last[0] = queue = comfy_queue(d.comfy_url, tags)
        return queue if queue is not None and ready(queue) else None

    return wait_for(what, check, d.patience_s, lambda: f"last queue: {last[0]}\n{d.worker.log()[-4000:]}")


def history_of(comfy_url: str, tag: str) -> list[dict[str, Any]]:
    """ComfyUI's history entries of the prompts tagged ``tag``."""
    history: dict[str, dict[str, Any]] = requests.get(f"{comfy_url}/history", timeout=10).json()
    return [entry for entry in history.values() if tag in json.dumps(entry["prompt"][2])]


def comfyui_pid(worker: SpawnedWorker, comfy_url: str) -> int | None:
    """The pid of the ComfyUI the worker runs: its child whose command line is main.py on the ComfyUI port."""
    port = comfy_url.rsplit(":", 1)[1]
    for child in _children(worker.pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"main.py") for arg in argv) and port.encode() in argv:
            return child
    return None


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # gone
        return []
    for task in tasks:
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def sigkill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants, as an OOM kill or a crash of its group takes them."""
    descendants = [pid]
    for parent in descendants:
        descendants += _children(parent)
    for member in reversed(descendants):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def error_of(body: dict[str, Any]) -> dict[str, Any]:
    assert "error" in body, body
    error: dict[str, Any] = json.loads(body["error"])
    return error


def succeeded(body: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in body, body
    output: dict[str, Any] = body["output"]
    assert output["status"] == "success", output
    return output


def stop_polls_answered(platform: RunpodPlatform, after: float) -> int:
    """How many job-stop polls the platform answered that arrived after ``after`` (time.monotonic)."""
    return sum(1 for r in platform.requests("job-stop") if r.at > after and r.status is not None)


# ---------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("backend", backend_params())
def test_comfyui_killed_with_three_jobs_in_flight(backend: ComfyBackend, tmp_path: Path) -> None:
    """The running job fails with comfyui_crashed, the two behind it run once on the restarted ComfyUI (one
    restart), and each job gets exactly one result."""
    with RunpodPlatform() as platform:
        d = deploy(platform, backend, tmp_path)
        tags = [tagged("crash_run"), tagged("crash_q1"), tagged("crash_q2")]
        running, first, second = platform.submit_many(
            [{"workflow": long_running(backend, tags[0])}, {"workflow": quick(tags[1])}, {"workflow": quick(tags[2])}]
        )
        wait_queue(d, "the long job running, the next queued behind it", tags, lambda q: tags[0] in q.running)
        wait_queue(d, "the next job's prompt pending", tags, lambda q: tags[0] in q.running and tags[1] in q.pending)
        platform.wait_taken(second, timeout=d.patience_s)
        killed = comfyui_pid(d.worker, d.comfy_url)
        assert killed is not None, d.worker.log()[-4000:]
        sigkill_tree(killed)

        error = error_of(platform.wait_result(running, timeout=d.patience_s))
        assert error["error_type"] == "comfyui_crashed", error
        for job in (first, second):
            output = succeeded(platform.wait_result(job, timeout=d.patience_s))
            assert len(output["images"]) == 1, output

        after = platform.submit({"workflow": quick(tagged("crash_after"))})
        succeeded(platform.wait_result(after, timeout=d.patience_s))
        restarted = comfyui_pid(d.worker, d.comfy_url)
        log = d.worker.log()
        assert restarted is not None and restarted != killed, log[-4000:]
        assert log.count(LAUNCHED) == 2, f"one launch, one restart:\n{log[-6000:]}"
        assert log.count(RESTARTED) == 1, log[-6000:]
        for tag in tags[1:]:  # they never ran on the killed ComfyUI: the new one ran each once
            assert len(history_of(d.comfy_url, tag)) == 1, (tag, log[-4000:])
        assert history_of(d.comfy_url, tags[0]) == [], "the crashed job is not run again"
        for job in (running, first, second, after):
            assert len(platform.results(job)) == 1, (job, platform.results(job))


def test_cancel_of_a_queued_job_takes_only_its_prompt_out(tmp_path: Path) -> None:
    """Cancelling the job whose prompt waits in ComfyUI's queue removes that prompt alone: the running prompt
    goes on to success, and the job behind the cancelled one runs too."""
    with RunpodPlatform() as platform:
        d = deploy(platform, ComfyBackend.standin(), tmp_path)
        tags = [tagged("cancel_run"), tagged("cancel_q1"), tagged("cancel_q2")]
        running, cancelled, behind = platform.submit_many(
            [{"workflow": sleeping(tags[0], 8)}, {"workflow": quick(tags[1])}, {"workflow": quick(tags[2])}]
        )
        before = wait_queue(
            d,
            "the long job running, the two others pending",
            tags,
            lambda q: tags[0] in q.running and tags[1] in q.pending and tags[2] in q.pending,
        )
        platform.cancel(cancelled)
        platform.wait_stop_delivered(cancelled, timeout=d.patience_s)
        left = wait_queue(d, "the cancelled job's prompt out of ComfyUI's queue", tags, lambda q: not q.holds(tags[1]))
        assert tags[0] in left.running, f"the running prompt must go on: {left}"
        assert left.pending.get(tags[2]) == before.pending[tags[2]], f"the prompt behind must stay queued: {left}"

        succeeded(platform.wait_result(running, timeout=d.patience_s))
        succeeded(platform.wait_result(behind, timeout=d.patience_s))
        [run_entry] = history_of(d.comfy_url, tags[0])
        assert run_entry["status"]["status_str"] == "success", run_entry["status"]
        assert history_of(d.comfy_url, tags[1]) == [], "the cancelled prompt never ran"
        [behind_entry] = history_of(d.comfy_url, tags[2])
        assert behind_entry["prompt"][1] == before.pending[tags[2]], "the prompt behind ran as it was first queued"
        assert platform.results(cancelled) == [], "a stopped job posts no result"


def test_time_queued_behind_a_timed_out_job_does_not_count(tmp_path: Path) -> None:
    """The running job times out; the next one, queued behind it, succeeds although more than its own timeout
    passed from its start, and its timings show the wait."""
    own_timeout = 3.0
    with RunpodPlatform() as platform:
        d = deploy(platform, ComfyBackend.standin(), tmp_path)
        tags = [tagged("timeout_run"), tagged("timeout_next")]
        first, second = platform.submit_many(
            [
                {"workflow": sleeping(tags[0], 60), "timeout": 3 * own_timeout},
                {"workflow": sleeping(tags[1], 0.3), "timeout": own_timeout},
            ]
        )
        platform.wait_taken(second, timeout=d.patience_s)
        taken = time.monotonic()
        assert platform.results(first) == [], "the second job must be taken while the first runs"
        error = error_of(platform.wait_result(first, timeout=d.patience_s))
        assert error["error_type"] == "timeout", error
        output = succeeded(platform.wait_result(second, timeout=d.patience_s))
        waited = time.monotonic() - taken
        assert waited > own_timeout, f"the second job's wall time ({waited:.1f} s) must exceed its timeout"
        assert output["timings"]["queued_s"] > 0, output["timings"]


@pytest.mark.parametrize("backend", backend_params())
def test_two_jobs_with_the_same_input_name_each_get_their_own_image(backend: ComfyBackend, tmp_path: Path) -> None:
    with RunpodPlatform() as platform:
        d = deploy(platform, backend, tmp_path)
        blocker = tagged("same_block")
        images = [noise_png(8, seed) for seed in (1, 2)]
        tags = [tagged("same_a"), tagged("same_b")]
        jobs = platform.submit_many(
            [{"workflow": long_running(backend, blocker, seconds=3)}]
            + [
                {
                    "workflow": load_and_save(tag, "same.png"),
                    "images": [{"name": "same.png", "image": base64.b64encode(png).decode()}],
                }
                for tag, (png, _) in zip(tags, images, strict=True)
            ]
        )
        succeeded(platform.wait_result(jobs[0], timeout=d.patience_s))
        for job, (_, pixels) in zip(jobs[1:], images, strict=True):
            [image] = succeeded(platform.wait_result(job, timeout=d.patience_s))["images"]
            distance = pixel_distance(rgb_of(base64.b64decode(image["data"])), pixels)
            assert distance <= 1, f"job {job} got another image (channel values differ by up to {distance})"
        assert pixel_distance(images[0][1], images[1][1]) > 1, "the two inputs must differ"


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with run_s3rver(tmp_path / "s3") as server:
        yield server


def test_a_failed_delivery_fails_its_job_alone(s3: S3Server, tmp_path: Path) -> None:
    """One job's upload fails (s3rver cannot store under its prefix: a file stands where the folder would be)
    and its outputs are too large for base64: it fails with storage; the job running meanwhile is delivered."""
    bucket_dir = tmp_path / "s3" / s3.bucket
    assert bucket_dir.is_dir(), list((tmp_path / "s3").iterdir())
    (bucket_dir / "blocked").write_text("s3rver keeps objects under blocked/ in this folder: none can go there")
    (png_a, _), (png_b, _) = noise_png(256, 3), noise_png(256, 4)  # each about 0.26 MB as base64
    with RunpodPlatform() as platform:
        d = deploy(platform, ComfyBackend.standin(), tmp_path / "w", **s3.env(MAX_RESULT_MB="0.1"))
        failing, delivered = platform.submit_many(
            [
                {
                    "workflow": load_and_save(tagged("s3_fail"), "a.png"),
                    "images": [{"name": "a.png", "image": base64.b64encode(png_a).decode()}],
                    "output": {"s3_prefix": "blocked"},
                },
                {
                    "workflow": load_and_save(tagged("s3_ok"), "b.png", sleep_s=3),
                    "images": [{"name": "b.png", "image": base64.b64encode(png_b).decode()}],
                    "output": {"s3_prefix": "tenant"},
                },
            ]
        )
        error = error_of(platform.wait_result(failing, timeout=d.patience_s))
        assert error["error_type"] == "storage", error
        failed_at = next(r.at for r in platform.requests("job-done", failing) if "error" in (r.body or {}))
        taken_at = next(
            r.at for r in platform.requests() if r.kind.startswith("job-take") and delivered in json.dumps(r.response)
        )
        assert taken_at < failed_at, "the second job must be in flight when the first one's delivery fails"
        [image] = succeeded(platform.wait_result(delivered, timeout=d.patience_s))["images"]
        assert image["type"] == "s3_url", image
        response = requests.get(image["data"], timeout=10)
        assert response.status_code == 200
        assert pixel_distance(rgb_of(response.content), rgb_of(png_b)) <= 1


def test_low_memory_drains_the_worker_and_only_the_last_result_stops_it(tmp_path: Path) -> None:
    with RunpodPlatform() as platform:
        d = deploy(platform, ComfyBackend.standin(), tmp_path, REFRESH_MIN_FREE_RAM_GB="100000")
        jobs = platform.submit_many(
            [{"workflow": sleeping(tagged("mem_run"), 4)}]
            + [{"workflow": sleeping(tagged(f"mem_q{i}"), 0.3)} for i in (1, 2)]
        )
        for job in jobs:
            platform.wait_taken(job, timeout=d.patience_s)
        fourth = platform.submit({"workflow": quick(tagged("mem_late"))})
        assert platform.results(jobs[0]) == [], "the fourth job must come while the first still runs"

        for job in jobs:
            succeeded(platform.wait_result(job, timeout=d.patience_s))
        finals = [
            r for r in platform.requests("job-done") if r.job_id in jobs and r.body.get("status") != "IN_PROGRESS"
        ]
        assert len(finals) == 3, [r.summary() for r in finals]
        assert [bool(r.body.get("stopPod")) for r in finals] == [False, False, True], [r.summary() for r in finals]
        # the SDK's take loop looks again every second; a stop poll is held a second, then one more passes
        last_post = finals[-1].at
        wait_for(
            "three stop polls after the last result",
            lambda: True if stop_polls_answered(platform, last_post) >= 3 else None,
            d.patience_s,
            lambda: d.worker.log()[-4000:],
        )
        taken_by = platform.taken_by(fourth)
        assert taken_by is None, f"a draining worker took the fourth job:\n{d.worker.log()[-4000:]}"
        assert fourth in platform.queued()


def test_local_api_runs_at_most_job_concurrency_jobs_at_once(tmp_path: Path) -> None:
    """Three /runsync requests at once with JOB_CONCURRENCY=2: ComfyUI holds two of their prompts at most
    (and two at some point: the local API runs jobs concurrently), and all three succeed."""
    tags = [tagged(f"api_{i}") for i in range(3)]
    with (
        serve_api(ComfyBackend.standin(), tmp_path, JOB_CONCURRENCY="2") as worker,
        concurrent.futures.ThreadPoolExecutor(3) as pool,
    ):
        futures = [pool.submit(worker.runsync, {"workflow": sleeping(tag, 2)}, 180) for tag in tags]
        seen: list[int] = []
        while not all(f.done() for f in futures):
            queue = comfy_queue(worker.comfy_url, tags)
            if queue is not None:
                seen.append(len(queue.running) + len(queue.pending))
            time.sleep(POLL_S)
        bodies = [f.result() for f in futures]
    for body in bodies:
        assert body["status"] == "COMPLETED", body
        assert isinstance(body["output"], dict) and body["output"]["status"] == "success", body
    assert max(seen) == 2, f"prompts held by ComfyUI, sampled: {seen}"
