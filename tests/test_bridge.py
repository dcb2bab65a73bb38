"""The RunPod bridge (``bridge/comfy_runpod_bridge``): its pure parts, and the whole path inside a real
ComfyUI (``COMFYUI_DIR``): a prompt queued on the local ComfyUI runs on our worker (the runpod local API in
front of the stand-in ComfyUI), and the result lands in the local output folder and in ``/history``.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
from PIL import Image

from .comfy_servers import ComfyServer, run_real_comfyui
from .worker_process import REPO, ComfyBackend, WorkerProcess, serve_api

BRIDGE_DIR = REPO / "bridge" / "comfy_runpod_bridge"
REAL = ComfyBackend.real()  # read at import: the autouse fixture clears COMFY* variables for each test


def load_bridge() -> ModuleType:
    """Import the custom node package from its folder, as ComfyUI does (outside ComfyUI it only skips the
    handler registration)."""
    spec = importlib.util.spec_from_file_location(
        "comfy_runpod_bridge", BRIDGE_DIR / "__init__.py", submodule_search_locations=[str(BRIDGE_DIR)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bridge = load_bridge()
remote: Any = sys.modules["comfy_runpod_bridge.remote"]

GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "photos/src.png [input]"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bridged"}},
    "4": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "other"}},
}


def test_on_prompt_swaps_the_graph_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"prompt": json.loads(json.dumps(GRAPH)), "client_id": "c1", "prompt_id": "p1"}
    assert bridge.on_prompt(dict(body)) == body, "off by default: nothing changes"
    monkeypatch.setenv("RUNPOD_BRIDGE", "1")
    swapped = bridge.on_prompt(dict(body))
    assert (swapped["client_id"], swapped["prompt_id"]) == ("c1", "p1")
    [(node_id, node)] = swapped["prompt"].items()
    assert (node_id, node["class_type"]) == ("runpod", "RunPodBridge")
    assert json.loads(node["inputs"]["workflow"]) == GRAPH
    assert bridge.on_prompt(dict(swapped)) == swapped, "a bridge prompt is left alone"
    partial = bridge.on_prompt({"prompt": GRAPH, "partial_execution_targets": ["3"]})
    assert sorted(json.loads(partial["prompt"]["runpod"]["inputs"]["workflow"])) == ["1", "2", "3"]
    assert "partial_execution_targets" not in partial


def test_input_files_are_found_and_names_kept_inside(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "src.png").write_bytes(b"png bytes")
    (tmp_path / "secret.txt").write_bytes(b"not referenced")
    graph = GRAPH | {"9": {"class_type": "X", "inputs": {"a": "../etc/passwd", "b": "/etc/passwd", "c": "none.png"}}}
    files = remote.input_files(graph, tmp_path)
    assert files == [{"name": "photos/src.png", "image": base64.b64encode(b"png bytes").decode()}]


def test_input_files_of_a_ui_format_graph_come_from_widget_values(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "b.png").write_bytes(b"b")
    graph = {
        "nodes": [{"id": 1, "type": "LoadImage", "widgets_values": ["a.png", "image"]}],
        "links": [],
        "definitions": {
            "subgraphs": [{"id": "s", "nodes": [{"id": 2, "type": "LoadImage", "widgets_values": ["b.png"]}]}]
        },
    }
    assert [entry["name"] for entry in remote.input_files(graph, tmp_path)] == ["a.png", "b.png"]


def test_settings_and_messages() -> None:
    settings = remote.BridgeSettings.from_env({"RUNPOD_BRIDGE": "true", "RUNPOD_ENDPOINT_ID": "ep9"})
    assert settings.enabled and settings.base_url == "https://api.runpod.ai/v2/ep9"
    assert settings.problem() == "set RUNPOD_API_KEY for the RunPod bridge"
    assert "set RUNPOD_ENDPOINT_ID" in remote.BridgeSettings.from_env({"RUNPOD_BRIDGE": "1"}).problem()
    local = remote.BridgeSettings.from_env({"RUNPOD_BRIDGE_URL": "http://127.0.0.1:8000/"})
    assert not local.enabled and local.base_url == "http://127.0.0.1:8000" and local.problem() is None
    error = {"error_type": "workflow_validation", "message": "ComfyUI refused the workflow", "details": {}}
    text = remote.describe_failure("j1", {"status": "FAILED", "error": json.dumps(error)})
    assert text == "RunPod job j1 FAILED: workflow_validation: ComfyUI refused the workflow"
    update = {"status": "IN_PROGRESS", "output": {"class_type": "KSampler", "step": 3, "steps": 20, "percent": 40}}
    assert remote.describe_progress(update) == ("RunPod: IN_PROGRESS KSampler step 3/20", 40.0)


def test_outputs_from_a_hostile_endpoint_stay_outputs(tmp_path: Path) -> None:
    """A compromised endpoint must not make the bridge copy a local file into ComfyUI's output folder, nor
    write outside it, nor crash on a name the filesystem refuses."""
    secret = tmp_path / "secret.txt"
    secret.write_text("local file")
    with pytest.raises(remote.RemoteError, match="refusing to fetch a file: URL"):
        remote.output_bytes({"filename": "x.png", "type": "s3_url", "data": secret.as_uri()})
    data = base64.b64encode(b"img").decode()
    output = {
        "images": [
            {"filename": "../../escape\x00.png", "type": "base64", "data": data, "node_id": "3"},
            {"filename": "n" * 300 + ".png", "type": "base64", "data": data, "node_id": "3"},
        ]
    }
    ui = bridge.RunPodBridge._save(output, tmp_path / "output")
    names = [item["filename"] for item in ui["images"]]
    assert names[0] == "escape.png" and len(names[1].encode()) <= 200
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == sorted(names)


# --- inside a real ComfyUI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    with serve_api(ComfyBackend.standin(), tmp_path_factory.mktemp("bridge-worker")) as worker:
        yield worker


def test_remote_jobs_run_on_the_workers_local_api(endpoint: WorkerProcess) -> None:
    """The bridge's endpoint side without ComfyUI: submit, poll (the local API answers /status to POST only),
    the output's bytes; and a failing job as the UI's message."""
    settings = remote.BridgeSettings.from_env({"RUNPOD_BRIDGE_URL": endpoint.api_url, "RUNPOD_BRIDGE_POLL": "0.1"})
    updates: list[dict[str, Any]] = []
    graph = {k: v for k, v in GRAPH.items() if k in ("4", "5")}
    output = remote.RemoteJobs(settings).run({"workflow": graph}, updates.append, lambda: False)
    [image] = output["images"]
    assert remote.output_bytes(image).startswith(b"\x89PNG")
    assert updates and updates[-1]["status"] == "COMPLETED"
    bad = {"1": {"class_type": "EmptyImage", "inputs": {"width": 99999, "height": 8, "batch_size": 1, "color": 0}}}
    bad["2"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bad"}}
    with pytest.raises(remote.RemoteError, match="FAILED: workflow_validation"):
        remote.RemoteJobs(settings).run({"workflow": bad}, updates.append, lambda: False)


@pytest.fixture(scope="module")
def local_comfyui(endpoint: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    if REAL is None:
        pytest.skip("set COMFYUI_DIR (and COMFYUI_PYTHON) to a ComfyUI checkout to run the bridge inside it")
    base = tmp_path_factory.mktemp("local-comfyui")
    shutil.copytree(BRIDGE_DIR, base / "custom_nodes" / BRIDGE_DIR.name)
    (base / "input" / "photos").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(base / "input" / "photos" / "src.png")
    env = {"RUNPOD_BRIDGE": "1", "RUNPOD_BRIDGE_URL": endpoint.api_url, "RUNPOD_BRIDGE_POLL": "0.1"}
    with run_real_comfyui(base, comfyui_dir=REAL.comfyui_dir, python=REAL.python, env=env) as server:
        yield server


def queue_and_wait(server: ComfyServer, graph: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
    """What the UI does: ``POST /prompt``, then the finished entry from ``/history``."""
    response = requests.post(f"{server.url}/prompt", json={"prompt": graph, "client_id": "bridge-test"}, timeout=30)
    assert response.status_code == 200, response.text
    prompt_id = response.json()["prompt_id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        history = requests.get(f"{server.url}/history/{prompt_id}", timeout=10).json()
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            entry: dict[str, Any] = history[prompt_id]
            if entry["status"]["status_str"] in {"success", "error"}:
                return entry
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} did not finish:\n{server.log_tail()}")


@pytest.mark.comfyui
def test_a_queued_prompt_runs_on_the_endpoint(local_comfyui: ComfyServer, endpoint: WorkerProcess) -> None:
    entry = queue_and_wait(local_comfyui, GRAPH)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["runpod"]["images"]
    assert sorted(i["filename"].split("_")[0] for i in images) == ["bridged", "other"]
    bridged = next(i for i in images if i["filename"].startswith("bridged"))
    assert bridged["type"] == "output" and bridged["subfolder"] == ""
    local_file = local_comfyui.output_dir / bridged["filename"]
    with Image.open(local_file) as image:
        inverted = image.convert("RGB").getpixel((0, 0))  # the local input image, inverted on the endpoint
    assert all(abs(a - e) <= 1 for a, e in zip(inverted, (245, 55, 225), strict=True)), inverted  # type: ignore[arg-type]
    view = requests.get(f"{local_comfyui.url}/view", params={"filename": bridged["filename"]}, timeout=10)
    assert view.status_code == 200 and view.content == local_file.read_bytes()


@pytest.mark.comfyui
def test_a_failing_remote_job_is_an_error_in_the_ui(local_comfyui: ComfyServer) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 99999, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bad"}},
    }
    entry = queue_and_wait(local_comfyui, graph)
    assert entry["status"]["status_str"] == "error"
    [error] = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "RunPodBridge"
    assert "workflow_validation" in error["exception_message"]
    assert "bigger than max of 16384" in error["exception_message"]
