"""ComfyUI's partner API nodes: the Comfy.org API key (COMFY_ORG_API_KEY, or a job's ``comfy_org_api_key``)
reaches the nodes through the prompt's ``extra_data``, and never a job result or the worker's log.

``StandinApiKey`` reads the key the way the real server hands it to API nodes (hidden ``API_KEY_COMFY_ORG``
from ``extra_data.api_key_comfy_org``) and reports only its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import pytest

from comfy_worker.redact import Redactor

from .worker_process import ComfyBackend, WorkerProcess, serve_api

WORKER_KEY = "comfyui-" + "0123456789abcdef" * 4
JOB_KEY = "comfyui-" + "fedcba9876543210" * 4


def graph(label: str) -> dict[str, object]:
    """A label per test: ComfyUI caches a node's output by its inputs, and the key is not one of them."""
    return {"1": {"class_type": "StandinApiKey", "inputs": {"label": label}}}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    os.environ.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    root = tmp_path_factory.mktemp("api-key")
    with serve_api(ComfyBackend.standin(), root, COMFY_ORG_API_KEY=WORKER_KEY, LOG_LEVEL="DEBUG") as process:
        yield process


def reported(body: dict[str, object]) -> str:
    assert body["status"] == "COMPLETED", body
    [entry] = body["output"]["text"]  # type: ignore[index]
    return str(entry["text"])


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_the_workers_key_reaches_the_api_node(worker: WorkerProcess) -> None:
    body = worker.runsync({"workflow": graph("worker")})
    assert reported(body) == f"worker: {digest(WORKER_KEY)}"
    assert WORKER_KEY not in json.dumps(body)


def test_a_jobs_own_key_wins_and_stays_out_of_the_result_and_the_log(worker: WorkerProcess) -> None:
    body = worker.runsync({"workflow": graph("job"), "comfy_org_api_key": JOB_KEY})
    assert reported(body) == f"job: {digest(JOB_KEY)}"
    assert JOB_KEY not in json.dumps(body)
    log = worker.log()
    assert "StandinApiKey" in log, "the worker's debug lines show the prompt"
    assert JOB_KEY not in log and WORKER_KEY not in log


def test_keys_shaped_like_comfy_org_keys_are_masked_without_being_configured() -> None:
    # how a job's key stays out of the runpod SDK's own debug line with the job input, logged before the
    # worker sees the job (the worker's log streams pass through the same Redactor)
    line = f"job input: {{'workflow': {{}}, 'comfy_org_api_key': '{JOB_KEY}'}}"
    assert Redactor([])(line) == "job input: {'workflow': {}, 'comfy_org_api_key': '***'}"
    assert Redactor([]).adding(["short"]).secrets == ()  # too short to mask without blanking words


def test_a_jobs_key_in_an_error_is_masked(worker: WorkerProcess) -> None:
    other_key = "per-job-Zq81kLmN0pQr"  # not shaped like a Comfy.org key: masked as the job's secret
    graph = {"1": {"class_type": "StandinFail", "inputs": {"message": f"the API said no to {other_key}"}}}
    body = worker.runsync({"workflow": graph, "comfy_org_api_key": other_key})
    assert body["status"] == "FAILED", body
    assert other_key not in json.dumps(body)
    assert "the API said no to ***" in json.loads(str(body["error"]))["message"]
