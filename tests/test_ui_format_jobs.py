"""UI-format workflows through the whole worker: the runpod SDK's local API, the worker's ComfyUI (the stand-in,
and a real one with COMFYUI_DIR), and the client CLI sending a workflow saved with ComfyUI's *Save*.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from comfy_worker import ui_format
from comfy_worker.runtime.app import build_worker

from .conftest import REPO
from .worker_process import (
    ComfyBackend,
    WorkerProcess,
    backend_params,
    close_worker,
    free_port,
    serve_api,
    worker_settings,
)

CASES = Path(__file__).parent / "ui_format" / "cases"


@pytest.fixture(scope="module", params=backend_params())
def worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    os.environ.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    backend: ComfyBackend = request.param
    with serve_api(backend, tmp_path_factory.mktemp(f"ui-{backend.name}")) as process:
        yield process


def case(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CASES / f"{name}.json").read_text(encoding="utf-8"))
    return data


def test_a_ui_workflow_runs_as_the_frontend_would_queue_it(worker: WorkerProcess) -> None:
    # EmptyImage's width comes from a PrimitiveNode (40, not its own 99), through a Reroute to SaveImage; a Note,
    # a MarkdownNote and a muted SaveImage are dropped.
    body = worker.runsync({"workflow": case("primitive_reroute_note_muted")})
    assert body["status"] == "COMPLETED", body
    output: dict[str, Any] = body["output"]  # type: ignore[assignment]
    assert output["workflow_format"] == "ui"
    [image] = output["images"]
    assert Image.open(io.BytesIO(base64.b64decode(image["data"]))).size == (40, 24)
    [warning] = [text for text in output["warnings"] if "UI format" in text]
    assert "muted node 5 (SaveImage)" in warning and "node 6 (Note)" in warning


def test_an_api_workflow_says_so(worker: WorkerProcess) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "api"}},
    }
    body = worker.runsync({"workflow": graph})
    assert body["status"] == "COMPLETED", body
    assert body["output"]["workflow_format"] == "api"  # type: ignore[index]


def test_overrides_and_convenience_fields_apply_to_the_converted_prompt(worker: WorkerProcess) -> None:
    job = {
        "workflow": json.dumps(case("bypass_chain")),  # a JSON string is accepted too
        "overrides": [{"node_id": "1", "field": "inputs.width", "value": 12}],
        "width": 10,
        "height": 6,
        "size_node_id": "1",
    }
    body = worker.runsync(job)
    assert body["status"] == "COMPLETED", body
    [image] = body["output"]["images"]  # type: ignore[index]
    # two bypassed ImageInvert nodes are wired through: the black EmptyImage reaches SaveImage as it is
    decoded = Image.open(io.BytesIO(base64.b64decode(image["data"]))).convert("RGB")
    assert decoded.size == (12, 6)  # the override wins over the convenience field, as for API workflows
    assert decoded.getpixel((0, 0)) == (0, 0, 0)


def test_unknown_custom_nodes_in_a_ui_workflow_are_listed(worker: WorkerProcess) -> None:
    workflow = case("bypass_chain")
    workflow["nodes"][5]["type"] = "SomePackNode"
    body = worker.runsync({"workflow": workflow})
    assert body["status"] == "FAILED", body
    error = json.loads(str(body["error"]))
    assert error["error_type"] == "workflow_validation"
    assert error["details"]["missing_node_types"] == ["SomePackNode"]
    assert error["details"]["format"] == "ui"


def test_a_broken_link_in_a_ui_workflow_is_a_validation_error(worker: WorkerProcess) -> None:
    body = worker.runsync({"workflow": case("links_to_missing_nodes")})
    assert body["status"] == "FAILED", body
    error = json.loads(str(body["error"]))
    assert error["error_type"] == "validation"
    assert "linked to node 42, which is not in the workflow" in error["message"]


def test_the_client_sends_a_ui_workflow(worker: WorkerProcess, tmp_path: Path) -> None:
    source = tmp_path / "saved_with_save.json"
    source.write_text(json.dumps(case("primitive_reroute_note_muted")), encoding="utf-8")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "comfy_worker.tools.client", str(source), "--url", worker.api_url]
    result = subprocess.run(
        [*command, "--sync", "--out", str(out)], capture_output=True, text=True, timeout=180, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "UI format" in result.stderr
    [saved] = list(out.rglob("*.png"))
    with Image.open(saved) as image:
        assert image.size == (40, 24)


def test_ui_jobs_ask_comfyui_for_its_node_types_once(tmp_path: Path) -> None:
    # Notes, Reroutes and group-node instances are never in /object_info: they must not make every job ask again
    worker = build_worker(worker_settings(ComfyBackend.standin(), tmp_path, free_port()))
    asked: list[int] = []
    fetch = worker.client.object_info

    def counted() -> dict[str, Any]:
        asked.append(1)
        return fetch()

    worker.client.object_info = counted  # type: ignore[method-assign]
    try:
        for name in ("primitive_reroute_note_muted", "group_node", "primitive_reroute_note_muted"):
            result = asyncio.run(worker.run("ui-job", {"workflow": case(name)}, lambda _message: None))
            assert result["workflow_format"] == "ui", result
    finally:
        close_worker(worker)
    assert len(asked) == 1


def test_the_ui_format_example_runs(worker: WorkerProcess) -> None:
    # examples/workflows/model_free_ui.json is model_free.json as *Save* writes it (tests/test_ui_format.py
    # checks that it converts to exactly that prompt): the two make the same image
    pixels = []
    for name in ("model_free_ui.json", "model_free.json"):
        workflow = json.loads((REPO / "examples" / "workflows" / name).read_text(encoding="utf-8"))
        body = worker.runsync({"workflow": workflow})
        assert body["status"] == "COMPLETED", body
        output: dict[str, Any] = body["output"]  # type: ignore[assignment]
        assert output["workflow_format"] == ("ui" if name.endswith("_ui.json") else "api")
        [image] = output["images"]
        decoded = Image.open(io.BytesIO(base64.b64decode(image["data"]))).convert("RGB")
        assert decoded.size == (512, 512)
        pixels.append(decoded.getpixel((0, 0)))
    assert pixels[0] == pixels[1] == (204, 153, 101)  # EmptyImage's 0x336699, inverted (in float32)


def ui_node(node_id: Any, node_type: str, links: list[tuple[str, str, int]], widgets: list[Any]) -> dict[str, Any]:
    inputs = [{"name": name, "type": kind, "link": link} for name, kind, link in links]
    return {"id": node_id, "type": node_type, "mode": 0, "inputs": inputs, "widgets_values": widgets}


def test_colliding_node_ids_are_a_validation_error(worker: WorkerProcess) -> None:
    # three SaveImage nodes, two with id 3: the frontend's prompt (keyed by id) would have two outputs
    nodes = [ui_node(1, "EmptyImage", [], [8, 8, 1, 0])]
    nodes += [
        ui_node(node_id, "SaveImage", [("images", "IMAGE", 1)], [f"s{index}"])
        for index, node_id in enumerate((2, 3, 3))
    ]
    body = worker.runsync({"workflow": {"nodes": nodes, "links": [[1, 1, 0, 2, 0, "IMAGE"]]}})
    assert body["status"] == "FAILED", body
    error = json.loads(str(body["error"]))
    assert error["error_type"] == "validation"
    assert error["details"]["duplicate_node_ids"] == {"3": ["SaveImage", "SaveImage"]}


def test_a_subgraph_bomb_is_refused_by_the_node_limit(worker: WorkerProcess) -> None:
    # subgraphs that each hold two instances of the next: depth 21 took 32.7 s and 2.1 GB, past `timeout: 3`
    definitions = [{"id": "sg-21", "nodes": [ui_node(1, "EmptyImage", [], [8, 8, 1, 0])], "links": []}]
    for level in range(20, -1, -1):
        inner = [ui_node(1, f"sg-{level + 1}", [], []), ui_node(2, f"sg-{level + 1}", [], [])]
        definitions.append({"id": f"sg-{level}", "nodes": inner, "links": []})
    workflow = {"nodes": [ui_node(1, "sg-0", [], [])], "links": [], "definitions": {"subgraphs": definitions}}
    body = worker.runsync({"workflow": workflow, "timeout": 60})
    assert body["status"] == "FAILED", body
    error = json.loads(str(body["error"]))
    assert error["error_type"] == "validation", error
    assert "MAX_EXPANDED_NODES" in error["message"]
    assert error["details"]["max_expanded_nodes"] == 100_000


def test_a_deeply_nested_dynamic_prompt_converts_within_the_job(worker: WorkerProcess) -> None:
    # 30,000 '{' then 30,000 '}' in a CLIPTextEncode took 10.75 s (quadratic) and outlived `timeout: 3`: the
    # conversion is linear now, so this one, ten times the work of that one for the old code, reaches ComfyUI
    # (which refuses the checkpoint the stand-in does not have) well within its minute
    text = "a {" + "{" * 100_000 + "}" * 100_000 + "fox}"
    nodes = [
        ui_node(1, "CheckpointLoaderSimple", [], ["model.safetensors"]),
        ui_node(2, "CLIPTextEncode", [("clip", "CLIP", 1)], [text]),
        ui_node(3, "PreviewAny", [("source", "*", 2)], []),
    ]
    links = [[1, 1, 1, 2, 0, "CLIP"], [2, 2, 0, 3, 0, "CONDITIONING"]]
    body = worker.runsync({"workflow": {"nodes": nodes, "links": links}, "timeout": 60})
    assert body["status"] == "FAILED", body
    error = json.loads(str(body["error"]))
    assert error["error_type"] == "workflow_validation", error
    assert "ckpt_name" in error["message"]


def test_a_conversion_that_outlives_the_job_ends_it_with_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pure-Python conversion in a thread cannot be killed: the job passes it its deadline, gives up on it at
    # that deadline (the job's timeout error names the conversion) and the conversion stops there by itself.
    worker = build_worker(worker_settings(ComfyBackend.standin(), tmp_path, free_port()))
    convert = ui_format.convert
    stopped = threading.Event()

    def slow(workflow: dict[str, Any], catalogue: dict[str, Any], deadline: float | None = None) -> Any:
        """A conversion that would take longer than the job: it works until the deadline it is given."""
        end = deadline if deadline is not None else time.monotonic() + 20
        while time.monotonic() < end and not stopped.wait(0.05):
            pass
        try:
            return convert(workflow, catalogue, deadline)
        finally:
            stopped.set()

    try:
        warm = asyncio.run(worker.run("warm", {"workflow": case("bypass_chain")}, lambda _message: None))
        assert warm["workflow_format"] == "ui", warm  # ComfyUI is up and its node types are known
        monkeypatch.setattr(ui_format, "convert", slow)
        job = {"workflow": case("bypass_chain"), "timeout": 2}
        result = asyncio.run(worker.run("slow-conversion", job, lambda _message: None))
    finally:
        close_worker(worker)
    error = json.loads(result["error"])
    assert error["error_type"] == "timeout", error
    assert error["details"]["phase"] == "converting the UI-format workflow"
    assert stopped.is_set()  # the conversion ended too (asyncio.run waited for its thread)
