"""The production path: ``python handler.py`` under ``runpod.serverless.start`` against a loopback RunPod
job API. Job take, progress posts, the result post, cancellation through the job-stop channel, SIGTERM.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import REPO
from .runpod_platform import RunpodPlatform, SpawnedWorker
from .worker_process import ComfyBackend, backend_params, free_port, worker_env


@dataclass
class Deployment:
    platform: RunpodPlatform
    worker: SpawnedWorker
    backend: ComfyBackend
    comfy_url: str
    root: Path

    @property
    def patience_s(self) -> float:
        """How long any one step may take on a loaded machine, a ComfyUI boot included."""
        return self.backend.boot_timeout_s + 60


def deploy(platform: RunpodPlatform, backend: ComfyBackend, root: Path, pod_id: str, **extra_env: str) -> Deployment:
    root.mkdir(parents=True, exist_ok=True)
    env = worker_env(backend, root, free_port(), **extra_env)
    worker = platform.spawn(
        [sys.executable, str(REPO / "handler.py")], pod_id=pod_id, extra_env=env, cwd=root, log_path=root / "worker.log"
    )
    return Deployment(platform, worker, backend, env["COMFY_API_URL"], root)


@pytest.fixture(scope="module", params=backend_params())
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    backend: ComfyBackend = request.param
    with RunpodPlatform() as platform:
        yield deploy(platform, backend, tmp_path_factory.mktemp(f"prod-{backend.name}"), pod_id=f"pod-{backend.name}")


def model_free(color: int, prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def long_running(backend: ComfyBackend, steps: int) -> dict[str, Any] | None:
    """A workflow with one long node that sends progress: StandinSleep, or KSampler on a real checkpoint."""
    if backend.name == "standin":
        graph = model_free(0, "long")
        graph["3"] = {
            "class_type": "StandinSleep",
            "inputs": {"image": ["1", 0], "seconds": steps * 0.2, "steps": steps},
        }
        graph["2"]["inputs"]["images"] = ["3", 0]
        return graph
    checkpoint = os.environ.get("SD15_CHECKPOINT")
    if not checkpoint:
        return None
    graph = json.loads((REPO / "examples" / "workflows" / "sd15_txt2img.json").read_text())
    graph["4"]["inputs"]["ckpt_name"] = checkpoint
    graph["3"]["inputs"]["steps"] = steps
    graph["5"]["inputs"] |= {"width": 64, "height": 64}
    return dict(graph)


def comfy_queue(deployment: Deployment) -> dict[str, Any]:
    body: dict[str, Any] = requests.get(f"{deployment.comfy_url}/queue", timeout=5).json()
    return body


def comfy_queue_when_idle(deployment: Deployment, timeout_s: float) -> dict[str, Any]:
    """ComfyUI's queue once nothing runs: interrupted, or restarted by the worker when the interrupt was not
    taken within INTERRUPT_GRACE (a slow sampler step on a loaded machine); the last answer at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            queue = comfy_queue(deployment)
        except requests.ConnectionError:  # restarting
            queue = {"queue_running": ["restarting"]}
        if not queue["queue_running"] or time.monotonic() > deadline:
            return queue
        time.sleep(0.1)


def test_job_result_is_posted(deployment: Deployment) -> None:
    job = deployment.platform.submit({"workflow": model_free(0x00FF00, "prod")})
    body = deployment.platform.wait_result(job, timeout=deployment.backend.boot_timeout_s + 60)
    assert "error" not in body, body
    output = body["output"]
    assert output["status"] == "success"
    assert output["images"][0]["filename"].startswith("prod_")
    assert output["images"][0]["mime_type"] == "image/png"
    # at the default LOG_LEVEL the SDK's DEBUG lines (the job's whole output) stay out of the log
    assert output["images"][0]["data"][:60] not in deployment.worker.log()


def test_error_result_is_a_json_string(deployment: Deployment) -> None:
    job = deployment.platform.submit({"workflow": {"1": {"class_type": "NoSuchNodeXYZ", "inputs": {}}}})
    body = deployment.platform.wait_result(job, timeout=60)
    error = json.loads(body["error"])
    assert error["error_type"] == "workflow_validation"
    assert "stopPod" not in body


def test_progress_updates_are_posted(deployment: Deployment) -> None:
    graph = long_running(deployment.backend, steps=5)
    if graph is None:
        pytest.skip("set SD15_CHECKPOINT to run a sampler with progress on the real ComfyUI")
    job = deployment.platform.submit({"workflow": graph, "timeout": 300})
    body = deployment.platform.wait_result(job, timeout=300)
    assert body["output"]["status"] == "success", body
    sampler = "StandinSleep" if deployment.backend.name == "standin" else "KSampler"

    def steps_posted() -> list[dict[str, Any]]:
        return [p for p in deployment.platform.progress(job) if p.get("class_type") == sampler and "step" in p]

    # progress posts are sent from threads of their own and can trail the result
    deadline = time.monotonic() + 60
    while {p["step"] for p in steps_posted()} != {1, 2, 3, 4, 5} and time.monotonic() < deadline:
        time.sleep(0.05)
    progress = deployment.platform.progress(job)
    steps = steps_posted()
    assert {p["step"] for p in steps} == {1, 2, 3, 4, 5}, progress
    assert all(p["steps"] == 5 for p in steps)
    assert all(0 <= p["percent"] <= 100 for p in progress)


def test_cancel_through_the_stop_channel_stops_comfyui(deployment: Deployment) -> None:
    graph = long_running(deployment.backend, steps=200)
    if graph is None:
        pytest.skip("set SD15_CHECKPOINT to run a long sampler on the real ComfyUI")
    job = deployment.platform.submit({"workflow": graph, "timeout": 600})
    deployment.platform.wait_progress(job, count=1, timeout=120)
    cancelled_at = time.monotonic()
    deployment.platform.cancel(job)
    deployment.platform.wait_stop_delivered(job, timeout=10)
    queue = comfy_queue_when_idle(deployment, timeout_s=20 + deployment.backend.boot_timeout_s)
    assert queue == {"queue_running": [], "queue_pending": []}, f"{time.monotonic() - cancelled_at:.1f} s after"
    assert "cancelled; stopping prompt" in deployment.worker.log()
    assert deployment.platform.results(job) == []
    follow_up = deployment.platform.submit({"workflow": model_free(7, "after_cancel")})
    assert deployment.platform.wait_result(follow_up, timeout=60)["output"]["status"] == "success"


def test_sigterm_stops_the_worker_and_its_comfyui(tmp_path: Path) -> None:
    with RunpodPlatform() as platform:
        deployment = deploy(platform, ComfyBackend.standin(), tmp_path, pod_id="pod-term")
        job = platform.submit({"workflow": model_free(1, "term")})
        assert platform.wait_result(job, timeout=60)["output"]["status"] == "success"
        assert requests.get(f"{deployment.comfy_url}/system_stats", timeout=5).status_code == 200
        assert deployment.worker.terminate(grace_s=20) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{deployment.comfy_url}/system_stats", timeout=5)
