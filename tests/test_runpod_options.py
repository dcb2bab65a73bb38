"""RunPod's own request fields, ``webhook`` and ``policy``, end to end: the client CLI sends them to the loopback
RunPod job API (``tests/runpod_platform.py``), whose worker is the real ``handler.py`` in the SDK's production
loop with the stand-in ComfyUI; the platform POSTs the finished job to the webhook as RunPod does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from comfy_worker.tools.client import request_options

from .conftest import REPO
from .runpod_platform import RunpodPlatform
from .worker_process import ComfyBackend, free_port, worker_env


class Webhook:
    """A loopback receiver: records each POSTed JSON body, answers with the next scripted status (then 200)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.answers: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(receiver.answers.pop(0) if receiver.answers else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunpodPlatform]:
    root = tmp_path_factory.mktemp("options")
    env = worker_env(ComfyBackend.standin(), root, free_port())
    with RunpodPlatform(webhook_retry_s=0.2) as running:
        running.spawn([sys.executable, str(REPO / "handler.py")], extra_env=env, cwd=root, log_path=root / "worker.log")
        yield running


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    receiver = Webhook()
    yield receiver
    receiver.close()


def graph(prefix: str, sleep_s: float = 0.0) -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }
    if sleep_s:
        nodes["3"] = {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": sleep_s}}
        nodes["2"]["inputs"]["images"] = ["3", 0]
    return nodes


def wait_for(condition: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_client_sends_a_webhook_and_a_policy_the_timeout_needs(
    platform: RunpodPlatform, webhook: Webhook, tmp_path: Path
) -> None:
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(graph("hooked")), encoding="utf-8")
    command = [sys.executable, "-m", "comfy_worker.tools.client", str(workflow), "--url", platform.base_url]
    options = ["--webhook", webhook.url, "--timeout", "900", "--poll", "0.1", "--out", str(tmp_path / "out")]
    result = subprocess.run([*command, *options], capture_output=True, text=True, timeout=180, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    [job_id] = [job for job, policy in platform.policies.items() if policy == {"executionTimeout": 960_000}]
    wait_for(lambda: webhook.bodies, "the webhook call")
    [body] = webhook.bodies
    assert (body["id"], body["status"]) == (job_id, "COMPLETED")
    assert body["output"]["images"][0]["filename"].startswith("hooked")
    assert {"delayTime", "executionTime"} <= set(body)
    [saved] = list((tmp_path / "out").rglob("*.png"))
    with Image.open(saved) as image:
        assert image.size == (8, 8)


def test_a_webhook_that_fails_is_tried_twice_more(platform: RunpodPlatform, webhook: Webhook) -> None:
    webhook.answers = [500, 503]
    answer = requests.post(
        f"{platform.base_url}/run", json={"input": {"workflow": graph("retried")}, "webhook": webhook.url}, timeout=10
    ).json()
    assert platform.wait_webhook_calls(answer["id"], 3) == [500, 503, 200]
    assert [body["status"] for body in webhook.bodies] == ["COMPLETED"] * 3


def test_an_execution_timeout_shorter_than_the_job_stops_it(platform: RunpodPlatform) -> None:
    job = {"input": {"workflow": graph("too_long", sleep_s=8)}, "policy": {"executionTimeout": 1500}}
    answer = requests.post(f"{platform.base_url}/run", json=job, timeout=10).json()
    platform.wait_stop_delivered(answer["id"])
    status = requests.get(f"{platform.base_url}/status/{answer['id']}", timeout=10).json()
    assert status["status"] == "TIMED_OUT"
    # the worker cancelled the job (it posts no result for a stopped job) and takes the next one
    done = requests.post(f"{platform.base_url}/run", json={"input": {"workflow": graph("after")}}, timeout=10).json()
    assert platform.wait_result(done["id"], timeout=60)["output"]["status"] == "success"


@pytest.mark.parametrize(
    ("webhook", "timeout_s", "expected"),
    [
        (None, None, {}),
        (None, 500.0, {}),  # 500 s + the margin fits RunPod's default 600 s
        (None, 541.0, {"policy": {"executionTimeout": 601_000}}),
        (
            "https://example.test/hook",
            900.0,
            {"webhook": "https://example.test/hook", "policy": {"executionTimeout": 960_000}},
        ),
    ],
)
def test_request_options(webhook: str | None, timeout_s: float | None, expected: dict[str, Any]) -> None:
    assert request_options(webhook, timeout_s) == expected
