"""End to end through the runpod SDK's own local API (``handler.py --rp_serve_api``).

Each test runs against the stand-in ComfyUI and, when ``COMFYUI_DIR`` names a real checkout, against the
real ComfyUI too: the worker starts that ComfyUI itself, exactly as in production.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from .conftest import EXAMPLES
from .worker_process import ComfyBackend, WorkerProcess, backend_params, serve_api


@pytest.fixture(scope="module", params=backend_params())
def worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    os.environ.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    backend: ComfyBackend = request.param
    with serve_api(backend, tmp_path_factory.mktemp(f"worker-{backend.name}")) as process:
        yield process


def workflow(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / "workflows" / name).read_text())
    return data


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(entry: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry["data"])))


def close_to(actual: Any, expected: tuple[int, ...]) -> bool:
    """Pixel equality up to ComfyUI's float rounding (it inverts as 1.0 - x in float32)."""
    return all(abs(a - e) <= 1 for a, e in zip(actual, expected, strict=True))


def failed_error(body: dict[str, Any]) -> dict[str, Any]:
    assert body["status"] == "FAILED", body
    error: dict[str, Any] = json.loads(body["error"])
    return error


def save_chain(*nodes: tuple[str, dict[str, Any]], prefix: str) -> dict[str, Any]:
    """A linear workflow: each node's first image input is fed by the previous node."""
    graph: dict[str, Any] = {}
    for index, (class_type, inputs) in enumerate(nodes, start=1):
        graph[str(index)] = {"class_type": class_type, "inputs": dict(inputs)}
    graph[str(len(nodes) + 1)] = {
        "class_type": "SaveImage",
        "inputs": {"images": [str(len(nodes)), 0], "filename_prefix": prefix},
    }
    return graph


def test_model_free_workflow_returns_the_image(worker: WorkerProcess) -> None:
    body = worker.runsync({"workflow": workflow("model_free.json")})
    assert body["status"] == "COMPLETED", body
    output = body["output"]
    assert output["status"] == "success"
    assert output["warnings"] == []
    assert len(output["images"]) == 1
    image = output["images"][0]
    assert (image["node_id"], image["mime_type"], image["type"]) == ("3", "image/png", "base64")
    assert image["filename"].startswith("model_free_")
    picture = decode(image)
    assert picture.size == (512, 512)
    # EmptyImage's color 0x336699, inverted by ImageInvert
    assert close_to(picture.convert("RGB").getpixel((0, 0)), (255 - 0x33, 255 - 0x66, 255 - 0x99))
    assert output["prompt_id"] and output["execution_time_seconds"] >= 0


def test_run_then_status(worker: WorkerProcess) -> None:
    job = {
        "workflow": save_chain(("EmptyImage", {"width": 32, "height": 16, "batch_size": 2, "color": 0}), prefix="rs")
    }
    queued = requests.post(f"{worker.api_url}/run", json={"input": job}, timeout=10).json()
    assert queued["status"] == "IN_PROGRESS" and queued["id"]
    body = requests.post(f"{worker.api_url}/status/{queued['id']}", timeout=120).json()
    assert body["status"] == "COMPLETED", body
    assert [decode(i).size for i in body["output"]["images"]] == [(32, 16), (32, 16)]


def test_uploaded_image_in_a_subfolder(worker: WorkerProcess) -> None:
    source = Image.new("RGB", (8, 8), (10, 200, 30))
    job = {
        "workflow": save_chain(
            ("LoadImage", {"image": "jobs/abc/src.png"}), ("ImageInvert", {"image": ["1", 0]}), prefix="up"
        ),
        "images": [{"name": "jobs/abc/src.png", "image": "data:image/png;base64," + png_b64(source)}],
    }
    body = worker.runsync(job)
    assert body["status"] == "COMPLETED", body
    assert close_to(decode(body["output"]["images"][0]).convert("RGB").getpixel((3, 3)), (245, 55, 225))
    assert not (worker.input_dir / "jobs" / "abc").exists(), "the job's upload is removed after its result"


def test_overrides_and_convenience_fields(worker: WorkerProcess) -> None:
    body = worker.runsync(json.loads((EXAMPLES / "requests" / "overrides.json").read_text())["input"])
    assert body["status"] == "COMPLETED", body
    image = body["output"]["images"][0]
    assert image["filename"].startswith("red_")
    assert close_to(decode(image).convert("RGB").getpixel((0, 0)), (0, 255, 255))  # red, inverted


def test_invalid_input_is_refused_before_comfyui(worker: WorkerProcess) -> None:
    error = failed_error(worker.runsync({"workflow": {"nodes": [], "links": []}}))  # UI format, no nodes
    assert error["error_type"] == "validation"
    assert "workflow is empty" in error["message"]


def test_comfyui_validation_error_keeps_node_errors(worker: WorkerProcess) -> None:
    graph = save_chain(("EmptyImage", {"width": 99999, "height": 64, "batch_size": 1, "color": 0}), prefix="v")
    error = failed_error(worker.runsync({"workflow": graph}))
    assert error["error_type"] == "workflow_validation"
    assert "node 1 (EmptyImage) input 'width': Value 99999 bigger than max of 16384" in error["message"]
    assert error["details"]["node_errors"][0]["type"] == "value_bigger_than_max"


def test_unknown_node_types_are_listed_together(worker: WorkerProcess) -> None:
    graph = save_chain(("NoSuchNodeXYZ", {}), ("AlsoMissing", {"image": ["1", 0]}), prefix="u")
    error = failed_error(worker.runsync({"workflow": graph}))
    assert error["error_type"] == "workflow_validation"
    assert "no node type AlsoMissing (node 2); NoSuchNodeXYZ (node 1)" in error["message"]
    assert "config.yml" in error["message"]
    assert error["details"]["missing_node_types"] == ["AlsoMissing", "NoSuchNodeXYZ"]


def test_execution_error_names_the_node(worker: WorkerProcess) -> None:
    job = {
        "workflow": save_chain(("LoadImage", {"image": "corrupt.png"}), prefix="e"),
        "images": [{"name": "corrupt.png", "image": base64.b64encode(b"this is not an image").decode()}],
    }
    error = failed_error(worker.runsync(job))
    assert error["error_type"] == "comfyui_execution"
    assert error["details"]["node_id"] == "1" and error["details"]["node_type"] == "LoadImage"
    assert "UnidentifiedImageError" in error["details"]["exception_type"]
    assert error["prompt_id"]
    # and the worker goes on serving
    assert worker.runsync({"workflow": workflow("model_free.json")})["status"] == "COMPLETED"


def test_cached_resubmission_returns_the_same_output(worker: WorkerProcess) -> None:
    graph = save_chain(("EmptyImage", {"width": 24, "height": 24, "batch_size": 1, "color": 123456}), prefix="cache")
    first = worker.runsync({"workflow": graph})
    second = worker.runsync({"workflow": graph})
    assert first["status"] == second["status"] == "COMPLETED"
    assert first["output"]["prompt_id"] != second["output"]["prompt_id"]
    pixels = [decode(body["output"]["images"][0]).convert("RGB").tobytes() for body in (first, second)]
    assert pixels[0] == pixels[1]


def test_temp_outputs_only_on_request(worker: WorkerProcess) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    without = worker.runsync({"workflow": graph})["output"]
    assert without["images"] == []
    assert "temp output" in without["warnings"][0]
    with_temp = worker.runsync({"workflow": graph, "output": {"include_temp": True}})["output"]
    assert len(with_temp["images"]) == 1


def large_noisy_job() -> dict[str, Any]:
    """4 x 2048x2048 noise PNGs of about 12.6 MB each: 67 MB as base64."""
    noise = Image.frombytes("RGB", (2048, 2048), os.urandom(2048 * 2048 * 3))
    return {
        "workflow": save_chain(
            ("LoadImage", {"image": "noise2048.png"}),
            ("RepeatImageBatch", {"image": ["1", 0], "amount": 4}),
            prefix="big",
        ),
        "images": [{"name": "noise2048.png", "image": png_b64(noise)}],
        "timeout": 300,
    }


@pytest.mark.slow
def test_four_large_outputs_over_the_result_limit(worker: WorkerProcess) -> None:
    error = failed_error(worker.runsync(large_noisy_job(), timeout_s=300))
    assert error["error_type"] == "result_too_large"
    assert "over this worker's result limit of 10 MB" in error["message"]
    assert "Configure an S3 bucket" in error["message"] and "output.format" in error["message"]
    outputs = error["details"]["outputs"]
    assert len(outputs) == 4 and all(o["size_mb"] > 11 for o in outputs)
    assert worker.runsync({"workflow": workflow("model_free.json")})["status"] == "COMPLETED"


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_four_large_outputs_with_a_higher_limit(backend: ComfyBackend, tmp_path: Path) -> None:
    with serve_api(backend, tmp_path, MAX_RESULT_MB="100") as big:
        body = big.runsync(large_noisy_job(), timeout_s=300)
    assert body["status"] == "COMPLETED", str(body)[:2000]
    images = body["output"]["images"]
    assert len(images) == 4
    for entry in images:
        assert entry["size_bytes"] > 12_000_000
        assert decode(entry).size == (2048, 2048)


def real_checkpoint(worker: WorkerProcess) -> str:
    """SD15_CHECKPOINT, for the worker on the real ComfyUI; the stand-in loads no checkpoint."""
    if worker.env["COMFYUI_DIR"].endswith("standin_comfyui"):
        pytest.skip("optional: the stand-in ComfyUI loads no checkpoint (run on the real ComfyUI)")
    checkpoint = os.environ.get("SD15_CHECKPOINT", "")
    if not checkpoint:
        pytest.skip("set SD15_CHECKPOINT to a checkpoint name in the real ComfyUI's models/checkpoints")
    return checkpoint


def test_checkpoint_txt2img(worker: WorkerProcess) -> None:
    checkpoint = real_checkpoint(worker)
    job = {
        "workflow": workflow("sd15_txt2img.json"),
        "overrides": [
            {"node_id": "4", "field": "inputs.ckpt_name", "value": checkpoint},
            {"node_id": "3", "field": "inputs.steps", "value": 2},
        ],
        "prompt": "a photo of a cat",
        "seed": 3,
        "width": 64,
        "height": 64,
        "timeout": 600,
    }
    body = worker.runsync(job, timeout_s=600)
    assert body["status"] == "COMPLETED", body
    assert decode(body["output"]["images"][0]).size == (64, 64)


def test_worker_log_shows_comfyui_output(worker: WorkerProcess) -> None:
    assert "comfyui:" in worker.log()
    assert Path(worker.env["COMFYUI_OUTPUT_DIR"]).is_dir()


def test_example_client_saves_outputs(worker: WorkerProcess, tmp_path: Path) -> None:
    """examples/test_local.py, now a forwarder to ``comfy-worker-client`` (tests/test_client.py)."""
    source = tmp_path / "in.png"
    Image.new("RGB", (8, 8), (0, 0, 0)).save(source)
    graph = save_chain(("LoadImage", {"image": "client/in.png"}), ("ImageInvert", {"image": ["1", 0]}), prefix="cli")
    workflow_file = tmp_path / "wf.json"
    workflow_file.write_text(json.dumps(graph))
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(EXAMPLES / "test_local.py"),
        str(workflow_file),
        "--url",
        worker.api_url,
        "--image",
        f"client/in.png={source}",
        "--set",
        "3.inputs.filename_prefix=cli_set",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    saved = sorted(out.iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("cli_set_")
    assert close_to(Image.open(saved[0]).convert("RGB").getpixel((0, 0)), (255, 255, 255))
    missing = [*command[:3], "--url", worker.api_url, "--set", "1.inputs.image=client/missing.png", "--out", str(out)]
    failing = subprocess.run(missing, capture_output=True, text=True, timeout=120, check=False)
    assert failing.returncode == 1
    assert "FAILED: workflow_validation" in failing.stderr
    assert "missing.png" in failing.stderr


def test_warmup_workflow_runs_before_the_first_job(tmp_path: Path) -> None:
    warmup = tmp_path / "warmup.json"
    graph = save_chain(("EmptyImage", {"width": 8, "height": 8, "batch_size": 1, "color": 1}), prefix="warmup")
    warmup.write_text(json.dumps({"input": {"workflow": graph}}))
    with serve_api(ComfyBackend.standin(), tmp_path / "w", WARMUP_WORKFLOW=str(warmup)) as worker:
        log = worker.log()
        assert "Warm-up with" in log and "done in" in log
        assert log.index("Warm-up with") < log.index("Starting API server"), "jobs are taken only after it"
        assert worker.runsync({"workflow": workflow("model_free.json")})["status"] == "COMPLETED"


def test_missing_checkpoint_names_the_closest(worker: WorkerProcess) -> None:
    checkpoint = real_checkpoint(worker)
    misspelt = checkpoint.replace(".safetensors", "_v2.safetensors")
    job = {
        "workflow": workflow("sd15_txt2img.json"),
        "overrides": [{"node_id": "4", "field": "inputs.ckpt_name", "value": misspelt}],
    }
    error = failed_error(worker.runsync(job))
    assert error["error_type"] == "workflow_validation"
    assert f"'{misspelt}' is not in models/checkpoints; closest: {checkpoint}" in error["message"]
    assert checkpoint in error["diagnostics"]["model_folders"]["checkpoints"]


def test_a_bad_environment_value_is_reported_in_every_job_instead_of_a_crash_loop(tmp_path: Path) -> None:
    with serve_api(ComfyBackend.standin(), tmp_path, JOB_TIMEOUT="soon", MAX_RESULT_MB="-1") as worker:
        for _ in range(2):
            body = worker.runsync({"workflow": {}})
            assert body["status"] == "FAILED", body
            error = json.loads(str(body["error"]))
            assert error["error_type"] == "configuration"
            assert "JOB_TIMEOUT='soon' is not a number" in error["message"]
        assert worker.process.poll() is None


def test_importing_runpod_does_not_start_a_second_python_for_the_cpu_name() -> None:
    """py-cpuinfo's probe (about 1.1 s of every cold start) is replaced before the worker imports runpod."""
    code = (
        "import time\n"
        "from comfy_worker.runtime.app import skip_slow_cpu_probe\n"
        "skip_slow_cpu_probe()\n"
        "started = time.monotonic()\n"
        "from runpod.serverless.utils import rp_debugger\n"
        "assert rp_debugger.PROCESSOR, rp_debugger.PROCESSOR\n"
        "import multiprocessing\n"
        "assert not multiprocessing.active_children()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
