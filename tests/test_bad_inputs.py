"""The bad-input catalogue: malformed and hostile job inputs, each answered with a clear structured error,
each followed by a valid job to show the worker goes on serving. Run through the runpod local API.
"""

from __future__ import annotations

import base64
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .worker_process import ComfyBackend, WorkerProcess, backend_params, serve_api

PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
        "53de0000000c4944415408d763f8cfc0000003010100c9fe92ef0000000049454e44ae426082"
    )
).decode()
GOOD: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "catalogue"}},
}


def good(**changes: Any) -> dict[str, Any]:
    """A valid job input with some fields changed."""
    return {"workflow": copy.deepcopy(GOOD)} | changes


def graph_with(node_id: str, field: str, value: Any) -> dict[str, Any]:
    graph = copy.deepcopy(GOOD)
    graph[node_id]["inputs"][field] = value
    return graph


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


LOAD = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "catalogue"}},
}

# (case id, job input, expected error_type or "success", a fragment the message must contain)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no-workflow", {}, "validation", "workflow: Field required"),
    ("workflow-null", {"workflow": None}, "validation", "workflow: Input should be a valid dictionary"),
    ("workflow-number", {"workflow": 42}, "validation", "workflow: Input should be a valid dictionary"),
    ("workflow-list", {"workflow": [GOOD]}, "validation", "workflow: Input should be a valid dictionary"),
    ("workflow-empty", {"workflow": {}}, "validation", "workflow is empty"),
    ("workflow-bad-json-string", {"workflow": '{"1": '}, "validation", "is a string but not valid JSON"),
    ("workflow-json-array-string", {"workflow": "[1, 2]"}, "validation", "Input should be a valid dictionary"),
    (
        "workflow-ui-format-node-without-type",
        {"workflow": {"nodes": [{"id": 1}], "links": [], "version": 0.4}},
        "validation",
        "UI-format node 1 has no 'type'",
    ),
    ("workflow-ui-format-empty", {"workflow": {"nodes": [], "links": [], "version": 0.4}}, "validation", "is empty"),
    ("node-not-object", {"workflow": {"1": "EmptyImage"}}, "validation", "node '1' is a str"),
    ("node-without-class-type", {"workflow": {"1": {"inputs": {}}}}, "validation", "has no 'class_type'"),
    ("class-type-number", {"workflow": {"1": {"class_type": 7, "inputs": {}}}}, "validation", "has no 'class_type'"),
    (
        "inputs-not-object",
        {"workflow": {"1": {"class_type": "SaveImage", "inputs": []}}},
        "validation",
        "'inputs' must",
    ),
    ("link-to-missing-node", good(workflow=graph_with("2", "images", ["99", 0])), "workflow_validation", "'99'"),
    ("link-index-out-of-range", good(workflow=graph_with("2", "images", ["1", 5])), "workflow_validation", "index"),
    ("no-output-node", {"workflow": {"1": GOOD["1"]}}, "workflow_validation", "Prompt has no outputs"),
    ("unknown-node-type", {"workflow": {"1": {"class_type": "Nope", "inputs": {}}}}, "workflow_validation", "Nope"),
    ("huge-size", good(workflow=graph_with("1", "width", 10**9)), "workflow_validation", "bigger than max"),
    ("negative-size", good(workflow=graph_with("1", "height", -8)), "workflow_validation", "smaller than min"),
    ("string-size", good(workflow=graph_with("1", "width", "wide")), "workflow_validation", "Failed to convert"),
    ("size-field-out-of-range", good(width=-1, height=8), "validation", "width: Input should be greater than"),
    ("width-without-height", good(width=64), "validation", "width and height must be given together"),
    ("images-not-list", good(images={"name": "a.png"}), "validation", "images: Input should be a valid list"),
    ("image-without-data", good(images=[{"name": "a.png"}]), "validation", "exactly one of 'image' (base64) and 'url'"),
    ("image-traversal", good(images=[{"name": "../../etc/x.png", "image": PNG}]), "validation", "'..' path"),
    ("image-absolute", good(images=[{"name": "/etc/passwd", "image": PNG}]), "validation", "absolute path"),
    ("image-null-byte", good(images=[{"name": "a\x00.png", "image": PNG}]), "validation", "null byte"),
    ("image-backslash", good(images=[{"name": "..\\a.png", "image": PNG}]), "validation", "backslash"),
    ("image-long-name", good(images=[{"name": "a" * 5000, "image": PNG}]), "validation", "longer than 255"),
    (
        "image-not-base64",
        good(images=[{"name": "a.png", "image": "%%%not base64%%%"}]),
        "validation",
        "not valid base64",
    ),
    ("image-empty", good(images=[{"name": "a.png", "image": ""}]), "validation", "'image' is empty"),
    (
        "image-duplicate-names",
        good(images=[{"name": "a.png", "image": PNG}, {"name": "a.png", "image": PNG}]),
        "validation",
        "appears more than once",
    ),
    (
        "image-not-an-image",
        {"workflow": LOAD, "images": [{"name": "cat.png", "image": base64.b64encode(b"MZ\x90\x00 exe").decode()}]},
        "comfyui_execution",
        "LoadImage",
    ),
    ("image-missing", {"workflow": LOAD}, "workflow_validation", "cat.png"),
    ("overrides-not-list", good(overrides={"node_id": "1"}), "validation", "overrides: Input should be a valid list"),
    ("override-missing-node", good(overrides=[{"node_id": "9", "field": "inputs.x", "value": 1}]), "validation", "'9'"),
    (
        "override-unknown-field",
        good(overrides=[{"node_id": "1", "field": "inputs.hue", "value": 1}]),
        "validation",
        "hue",
    ),
    (
        "override-through-scalar",
        good(overrides=[{"node_id": "1", "field": "inputs.width.px", "value": 1}]),
        "validation",
        "is a int",
    ),
    (
        "override-extra-key",
        good(overrides=[{"node_id": "1", "field": "inputs.width", "value": 8, "op": "add"}]),
        "validation",
        "unknown field",
    ),
    ("timeout-zero", good(timeout=0), "validation", "timeout: Input should be greater than 0"),
    ("timeout-negative", good(timeout=-5), "validation", "timeout: Input should be greater than 0"),
    ("timeout-too-large", good(timeout=10**9), "validation", "JOB_TIMEOUT_MAX"),
    ("timeout-string", good(timeout="60"), "validation", "timeout: Input should be a valid number"),
    ("seed-string", good(seed="42"), "validation", "seed: Input should be a valid integer"),
    ("seed-negative", good(seed=-1), "validation", "seed: Input should be greater than or equal to 0"),
    ("seed-too-large", good(seed=2**70), "validation", "seed: Input should be less than or equal to"),
    ("seed-without-seed-node", good(seed=1), "validation", "no node has a 'seed'"),
    ("prompt-number", good(prompt=5), "validation", "prompt: Input should be a valid string"),
    ("prompt-without-encoder", good(prompt="a cat"), "validation", "no text encoder node"),
    ("include-temp-string", good(output={"include_temp": "yes"}), "validation", "include_temp"),
    ("unknown-top-level-field", good(webhook_url="http://x"), "validation", "webhook_url: unknown field"),
    ("long-string-value", good(workflow=graph_with("2", "filename_prefix", "x" * 5000)), "comfyui_execution", "2"),
    (
        "unicode-everywhere",
        {
            "workflow": {
                "ノード": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
                },
                "2": {
                    "class_type": "SaveImage",
                    "inputs": {"images": ["ノード", 0], "filename_prefix": "ünïcødé_画像"},
                },
            }
        },
        "success",
        "",
    ),
    ("workflow-nan", good(workflow=graph_with("1", "width", float("nan"))), "validation", "1.inputs.width is nan"),
    (
        "workflow-string-infinity",
        {"workflow": json.dumps(graph_with("1", "width", float("inf")))},
        "validation",
        "not a JSON number",
    ),
    (
        "override-infinity",
        good(overrides=[{"node_id": "1", "field": "inputs.width", "value": float("-inf")}]),
        "validation",
        "not a JSON number",
    ),
    (
        "override-superscript-index",
        good(overrides=[{"node_id": "2", "field": "inputs.images.\u00b2", "value": 0}]),
        "validation",
        "is not an index",
    ),
    ("meta-nested-500-levels", good(workflow=GOOD | {"1": GOOD["1"] | {"_meta": nested(500)}}), "validation", "64"),
    ("image-double-quote", good(images=[{"name": 'say "hi".png', "image": PNG}]), "validation", "double quote"),
    ("image-newline", good(images=[{"name": "a\nb.png", "image": PNG}]), "validation", "control character"),
    ("prefix-traversal", good(workflow=graph_with("2", "filename_prefix", "../../victim")), "validation", "'..'"),
    ("prefix-link", good(workflow=graph_with("2", "filename_prefix", ["1", 0])), "validation", "not a string"),
    (
        "a-hundred-thousand-unknown-node-types",
        {"workflow": {str(i): {"class_type": f"Missing{i}", "inputs": {}} for i in range(100_000)}},
        "workflow_validation",
        "and 99980 more",
    ),
    (
        "fifty-megabyte-input",
        good(images=[{"name": "big/blob.bin", "image": base64.b64encode(os.urandom(50 * 1024 * 1024)).decode()}]),
        "success",
        "",
    ),
]


@pytest.fixture(scope="module", params=backend_params())
def worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    backend: ComfyBackend = request.param
    with serve_api(backend, tmp_path_factory.mktemp(f"catalogue-{backend.name}")) as process:
        yield process


def test_the_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("job_input", "expected", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_then_a_good_job(
    worker: WorkerProcess, job_input: dict[str, Any], expected: str, fragment: str
) -> None:
    body = worker.runsync(job_input, timeout_s=300)
    if expected == "success":
        assert body["status"] == "COMPLETED", str(body)[:2000]
        assert body["output"]["status"] == "success"
    else:
        assert body["status"] == "FAILED", str(body)[:2000]
        error = json.loads(body["error"])
        assert error["error_type"] == expected, error
        assert fragment in error["message"], error["message"]
        assert error["details"] is not None and "diagnostics" in error
    after = worker.runsync({"workflow": GOOD})
    assert after["status"] == "COMPLETED", after


def test_an_upload_comfyui_finds_too_large_is_a_clear_error(tmp_path: Path) -> None:
    big = base64.b64encode(os.urandom(64 * 1024)).decode()
    with serve_api(ComfyBackend.standin(), tmp_path, COMFYUI_ARGS="--max-upload-size 0.01") as worker:
        body = worker.runsync({"workflow": LOAD, "images": [{"name": "cat.png", "image": big}]})
        error = json.loads(body["error"])
        assert error["error_type"] == "validation", error
        assert "larger than ComfyUI's --max-upload-size" in error["message"]
        assert worker.runsync({"workflow": GOOD})["status"] == "COMPLETED"
