"""The client (``comfy-worker-client``) against the real worker behind the runpod SDK's local API,
against a loopback server that replays RunPod's job API (queue, progress, completion, cancellation), and
with outputs delivered through S3 (s3rver).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from PIL import Image

from comfy_worker.tools import client
from comfy_worker.tools.client import (
    ClientError,
    endpoint_from,
    format_error,
    parse_image,
    parse_set,
    parse_size,
    save_outputs,
)
from comfy_worker.tools.jobapi import describe_progress

from .conftest import EXAMPLES
from .processes import stopped_on_exit
from .s3_server import ACCESS_KEY, SECRET_KEY, run_s3rver
from .worker_process import REPO, ComfyBackend, WorkerProcess, backend_params, serve_api


@pytest.fixture(scope="module", params=backend_params())
def worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    backend: ComfyBackend = request.param
    with serve_api(backend, tmp_path_factory.mktemp(f"client-{backend.name}")) as process:
        yield process


def run_client(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The client as users run it: its own process, its exit code, its stdout and stderr."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_API_KEY")}
    return subprocess.run(
        [sys.executable, "-m", "comfy_worker.tools.client", *args],
        cwd=REPO,
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def chain(*nodes: tuple[str, dict[str, Any]], prefix: str) -> dict[str, Any]:
    graph = {str(i): {"class_type": c, "inputs": dict(inputs)} for i, (c, inputs) in enumerate(nodes, start=1)}
    graph[str(len(nodes) + 1)] = {
        "class_type": "SaveImage",
        "inputs": {"images": [str(len(nodes)), 0], "filename_prefix": prefix},
    }
    return graph


def pixel(path: Path) -> tuple[int, ...]:
    with Image.open(path) as image:
        value: tuple[int, ...] = image.convert("RGB").getpixel((0, 0))  # type: ignore[assignment]
        return value


def close_to(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return all(abs(a - e) <= 1 for a, e in zip(actual, expected, strict=True))


# --- against the real worker (runpod local API) --------------------------------------------------------------


def test_sync_job_saves_the_image(worker: WorkerProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_client(
        str(EXAMPLES / "workflows" / "model_free.json"),
        *("--url", worker.api_url, "--sync", "--out", str(out)),
        *("--set", "1.inputs.color=16711680", "--set", "3.inputs.filename_prefix=red", "--size", "64x32"),
    )
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    saved = Path(line)
    assert saved.parent == out and saved.name.startswith("red_") and saved.suffix == ".png"
    with Image.open(saved) as image:
        assert image.size == (64, 32)
    assert close_to(pixel(saved), (0, 255, 255))  # red, inverted
    assert "done in" in result.stderr


def test_run_and_status_with_an_input_image(worker: WorkerProcess, tmp_path: Path) -> None:
    source = tmp_path / "src.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(source)
    workflow = chain(("LoadImage", {"image": "cli/src.png"}), ("ImageInvert", {"image": ["1", 0]}), prefix="img")
    out = tmp_path / "out"
    code = client.main(
        [
            str(write_json(tmp_path / "wf.json", workflow)),
            "--url",
            worker.api_url,
            "--out",
            str(out),
            "--image",
            f"cli/src.png={source}",
            "--format",
            "webp",
            "--quality",
            "100",
        ],
        env={},
    )
    assert code == 0
    [saved] = out.iterdir()
    assert saved.suffix == ".webp"
    assert all(abs(a - e) <= 4 for a, e in zip(pixel(saved), (245, 55, 225), strict=True))  # WebP's YUV rounding


def test_default_out_folder_is_outputs_job_id(worker: WorkerProcess, tmp_path: Path) -> None:
    workflow = chain(("EmptyImage", {"width": 8, "height": 8, "batch_size": 2, "color": 0}), prefix="two")
    wf = write_json(tmp_path / "wf.json", workflow)
    result = subprocess.run(
        [sys.executable, "-m", "comfy_worker.tools.client", str(wf), "--url", worker.api_url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    paths = [tmp_path / line for line in result.stdout.splitlines()]
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    job_folder = paths[0].parent
    assert job_folder.parent == tmp_path / "outputs" and f"job {job_folder.name}" in result.stderr
    assert "runs the whole job inside this status call, so no progress shows" in result.stderr


def test_worker_error_is_readable_and_fails(worker: WorkerProcess, tmp_path: Path) -> None:
    workflow = chain(("EmptyImage", {"width": 99999, "height": 64, "batch_size": 1, "color": 0}), prefix="v")
    result = run_client(str(write_json(tmp_path / "wf.json", workflow)), "--url", worker.api_url, "--sync")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "FAILED: workflow_validation" in result.stderr
    assert "node 1 (EmptyImage) input 'width': Value 99999 bigger than max of 16384" in result.stderr
    assert '"error_type"' not in result.stderr, "the error is shown readably, not as a JSON dump"


def test_missing_node_types_are_listed(worker: WorkerProcess, tmp_path: Path) -> None:
    workflow = chain(("NoSuchNodeXYZ", {}), prefix="u")
    result = run_client(str(write_json(tmp_path / "wf.json", workflow)), "--url", worker.api_url)
    assert result.returncode == 1
    assert 'missing_node_types: ["NoSuchNodeXYZ"]' in result.stderr


# --- bad input, refused before anything is sent ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "512"], "--size needs WIDTHxHEIGHT"),
        (["--set", "6=text"], "--set needs NODE.FIELD=VALUE"),
        (["--image", "nothere.png"], "no file at nothere.png"),
        (["--timeout", "0"], "needs a number > 0"),
    ],
)
def test_bad_arguments_are_explained(tmp_path: Path, args: list[str], message: str) -> None:
    wf = write_json(tmp_path / "wf.json", {"1": {"class_type": "X", "inputs": {}}})
    result = run_client(str(wf), "--url", "http://127.0.0.1:9", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_files_that_are_not_workflows(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ClientError, match="is not JSON"):
        client.load_workflow(tmp_path / "broken.json")
    with pytest.raises(ClientError, match="whole request body"):
        client.load_workflow(EXAMPLES / "requests" / "overrides.json")
    with pytest.raises(ClientError, match="cannot read the workflow"):
        client.load_workflow(tmp_path / "missing.json")


def test_endpoint_selection() -> None:
    runpod = endpoint_from(None, {"RUNPOD_ENDPOINT_ID": "abc123", "RUNPOD_API_KEY": "rpa_secret"})
    assert runpod.base_url == "https://api.runpod.ai/v2/abc123"
    assert runpod.api_key == "rpa_secret"
    assert endpoint_from("http://127.0.0.1:8000/", {}).base_url == "http://127.0.0.1:8000"
    with pytest.raises(ClientError, match="set RUNPOD_API_KEY"):
        endpoint_from(None, {"RUNPOD_ENDPOINT_ID": "abc123"})
    with pytest.raises(ClientError, match="set RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY"):
        endpoint_from(None, {})
    with pytest.raises(ClientError, match="must start with http"):
        endpoint_from("127.0.0.1:8000", {})


def test_argument_parsers(tmp_path: Path) -> None:
    assert parse_set('6.inputs.text="a cat"') == {"node_id": "6", "field": "inputs.text", "value": "a cat"}
    assert parse_set("6.inputs.text=a cat")["value"] == "a cat"
    assert parse_set("3.inputs.steps=20")["value"] == 20
    assert parse_set("3.inputs.denoise=0.5")["value"] == 0.5
    assert parse_set("9.inputs.size=[1, 2]")["value"] == [1, 2]
    assert parse_set("9.inputs.text=a=b")["value"] == "a=b"
    assert parse_size("768x512") == (768, 512)
    picture = tmp_path / "p.png"
    picture.write_bytes(b"x")
    assert parse_image(str(picture)) == ("p.png", picture)
    assert parse_image(f"masks/m.png={picture}") == ("masks/m.png", picture)


def test_progress_lines() -> None:
    message = {"node_id": "3", "class_type": "KSampler", "nodes_done": 2, "nodes_total": 7, "step": 5, "steps": 20}
    assert describe_progress(message | {"percent": 32.1}) == " 32.1% node 3 (KSampler) step 5/20 [2/7 nodes]"
    assert describe_progress("warming up") == "warming up"


def test_error_formats() -> None:
    sdk_error = {"error_type": "<class 'KeyError'>", "error_message": "'x'", "error_traceback": "Traceback..."}
    text = format_error({"id": "j", "status": "FAILED", "error": json.dumps(sdk_error)}, verbose=True)
    assert "job j FAILED: <class 'KeyError'>" in text and "'x'" in text and "Traceback..." in text
    assert format_error({"id": "j", "status": "TIMED_OUT"}) == "job j TIMED_OUT: (no error message)"
    assert format_error({"id": "j", "status": "FAILED", "error": "plain words"}) == "job j FAILED: plain words"


def test_saved_names_stay_inside_the_folder(tmp_path: Path) -> None:
    entries = [
        {"filename": "../../escape.png", "type": "base64", "data": base64.b64encode(b"one").decode()},
        {"filename": "escape.png", "type": "base64", "data": base64.b64encode(b"two").decode()},
        {"filename": "", "type": "base64", "data": base64.b64encode(b"three").decode()},
    ]
    saved, failed = save_outputs({"images": entries, "text": [{"node_id": "../7", "text": "hello"}]}, tmp_path / "o")
    assert failed == []
    assert [p.name for p in saved] == ["escape.png", "escape_2.png", "images_2", "text_node7.txt"]
    assert [p.read_bytes() for p in saved] == [b"one", b"two", b"three", b"hello"]
    assert all(p.parent == tmp_path / "o" for p in saved)
    assert not (tmp_path / "escape.png").exists()


def test_hostile_output_names_and_urls_do_not_stop_the_other_outputs(tmp_path: Path) -> None:
    """A NUL or 300 characters in a name used to crash the client with a traceback, losing the outputs after it;
    a ``file://`` URL must never copy a local file into the output folder."""
    secret = tmp_path / "secret.txt"
    secret.write_text("local file")
    data = base64.b64encode(b"img").decode()
    entries = [
        {"filename": "bad\x00name.png", "type": "base64", "data": data},
        {"filename": "x" * 300 + ".png", "type": "base64", "data": data},
        {"filename": "stolen.txt", "type": "s3_url", "data": secret.as_uri()},
        {"filename": "last.png", "type": "base64", "data": data},
    ]
    saved, failed = save_outputs({"images": entries}, tmp_path / "o")
    assert len(saved) == 3 and saved[0].name == "badname.png" and saved[2].name == "last.png"
    assert len(saved[1].name.encode()) <= 200 and saved[1].name.endswith(".png")
    assert all(p.read_bytes() == b"img" for p in saved)
    [problem] = failed
    assert "stolen.txt" in problem and "refusing to fetch a file: URL" in problem
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(p.name for p in saved)


# --- against a loopback server that speaks RunPod's job API ----------------------------------------------------


@dataclass
class FakeRunPod:
    """Replays scripted ``/status`` answers; records every request (method, path, Authorization); ``polled`` is
    set at the first ``/status`` request."""

    statuses: list[dict[str, Any]]
    runsync: dict[str, Any] | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str = ""
    polled: threading.Event = field(default_factory=threading.Event)

    def answer(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        if method == "POST" and path.endswith("/run"):
            return 200, {"id": "job-1", "status": "IN_QUEUE"}
        if method == "POST" and path.endswith("/runsync"):
            return 200, self.runsync or {"id": "job-1", "status": "IN_QUEUE"}
        if method == "GET" and path.endswith("/status/job-1"):
            self.polled.set()
            body = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            return 200, {"id": "job-1", **body}
        if method == "POST" and path.endswith("/cancel/job-1"):
            return 200, {"id": "job-1", "status": "CANCELLED"}
        return 404, {"error": "not found"}


@contextlib.contextmanager
def fake_runpod(fake: FakeRunPod) -> Iterator[FakeRunPod]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            fake.requests.append((self.command, self.path, self.headers.get("Authorization")))
            status, body = fake.answer(self.command, self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_port}/v2/ep1"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


PNG_BYTES = b"\x89PNG\r\n\x1a\n" + os.urandom(300)


def completed_output() -> dict[str, Any]:
    return {
        "status": "success",
        "images": [{"filename": "a.png", "type": "base64", "data": base64.b64encode(PNG_BYTES).decode()}],
        "videos": [{"filename": "v.mp4", "type": "base64", "data": base64.b64encode(b"\x00\x01video").decode()}],
        "text": [{"node_id": "12", "text": "a caption"}],
        "warnings": ["temp output left out"],
    }


def progress(percent: float, step: int) -> dict[str, Any]:
    return {
        "status": "IN_PROGRESS",
        "output": {"node_id": "3", "class_type": "KSampler", "nodes_done": 2, "nodes_total": 4}
        | {"step": step, "steps": 4, "percent": percent},
    }


MODEL_FREE = str(EXAMPLES / "workflows" / "model_free.json")


def routes(fake: FakeRunPod) -> list[tuple[str, str]]:
    """(method, route) of each request: ``/v2/ep1/status/job-1`` -> ("GET", "status")."""
    return [(method, path.removeprefix("/v2/ep1/").split("/")[0]) for method, path, _ in fake.requests]


def test_async_polling_shows_progress_as_it_comes(tmp_path: Path) -> None:
    script = [
        {"status": "IN_QUEUE"},
        {"status": "IN_QUEUE"},
        progress(56.2, 1),
        progress(56.2, 1),  # the same update twice is shown once
        progress(81.2, 3),
        {"status": "COMPLETED", "output": completed_output()},
    ]
    answers = len(script)
    with fake_runpod(FakeRunPod(script)) as fake:
        result = run_client(
            MODEL_FREE,
            *("--url", fake.url, "--poll", "0.05", "--out", str(tmp_path / "o")),
            env={"RUNPOD_API_KEY": "rpa_test_key"},
        )
    assert result.returncode == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if line.startswith(("IN_", "COMPLETED"))]
    assert shown == [
        "IN_QUEUE",
        "IN_PROGRESS  56.2% node 3 (KSampler) step 1/4 [2/4 nodes]",
        "IN_PROGRESS  81.2% node 3 (KSampler) step 3/4 [2/4 nodes]",
        "COMPLETED",
    ]
    assert "worker warning: temp output left out" in result.stderr
    saved = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in saved] == ["a.png", "v.mp4", "text_node12.txt"]
    assert saved[0].read_bytes() == PNG_BYTES
    assert saved[1].read_bytes() == b"\x00\x01video"
    assert saved[2].read_text() == "a caption"
    assert routes(fake) == [("POST", "run")] + [("GET", "status")] * answers
    assert {auth for _, _, auth in fake.requests} == {"Bearer rpa_test_key"}


def test_runsync_that_is_not_done_falls_back_to_polling(tmp_path: Path) -> None:
    fake = FakeRunPod([progress(50, 2), {"status": "COMPLETED", "output": completed_output()}])
    fake.runsync = {"id": "job-1", "status": "IN_PROGRESS"}
    with fake_runpod(fake):
        code = client.main(
            [MODEL_FREE, "--url", fake.url, "--sync", "--poll", "0.05", "--out", str(tmp_path / "o")], env={}
        )
    assert code == 0
    assert routes(fake) == [("POST", "runsync"), ("GET", "status"), ("GET", "status")]
    assert (tmp_path / "o" / "a.png").read_bytes() == PNG_BYTES


@pytest.mark.parametrize("final", ["FAILED", "CANCELLED", "TIMED_OUT"])
def test_unsuccessful_final_states_exit_1(tmp_path: Path, final: str) -> None:
    error = {"error_type": "comfyui_execution", "message": "node 7 (VAEDecode) raised", "details": {"node_id": "7"}}
    body: dict[str, Any] = {"status": final}
    if final == "FAILED":
        body["error"] = json.dumps(error)
    with fake_runpod(FakeRunPod([body])) as fake:
        result = run_client(MODEL_FREE, "--url", fake.url, "--poll", "0.05", "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert f"job job-1 {final}" in result.stderr
    if final == "FAILED":
        assert "comfyui_execution\n  node 7 (VAEDecode) raised\n  node_id: 7" in result.stderr
    assert not (tmp_path / "o").exists()


def test_ctrl_c_cancels_the_job(tmp_path: Path) -> None:
    with fake_runpod(FakeRunPod([progress(10, 1)])) as fake:
        process = subprocess.Popen(
            [sys.executable, "-m", "comfy_worker.tools.client", MODEL_FREE, "--url", fake.url, "--poll", "0.05"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        with stopped_on_exit(process, grace_s=0):  # a failed wait below leaves no client (nor its pipes) behind
            deadline = time.monotonic() + 180  # the client's imports on a loaded machine
            while not fake.polled.wait(timeout=0.5):
                if process.poll() is not None:
                    pytest.fail(
                        f"the client exited ({process.returncode}) before it polled:\n{process.communicate()[1]}"
                    )
                assert time.monotonic() < deadline, "the client never polled in 180 s"
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert ("POST", "/v2/ep1/cancel/job-1") in [(m, p) for m, p, _ in fake.requests]
    assert "cancelled job job-1" in stderr


def test_max_wait_cancels_and_fails(tmp_path: Path) -> None:
    with fake_runpod(FakeRunPod([{"status": "IN_QUEUE"}])) as fake:
        result = run_client(MODEL_FREE, "--url", fake.url, "--poll", "0.05", "--max-wait", "0.3")
    assert result.returncode == 1
    assert "not finished after 0.3 s" in result.stderr
    assert any(m == "POST" and p.endswith("/cancel/job-1") for m, p, _ in fake.requests)


def test_unreachable_endpoint_is_a_clear_error(tmp_path: Path) -> None:
    result = run_client(MODEL_FREE, "--url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "POST http://127.0.0.1:9/run failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unsaved_output_fails_the_command_after_saving_the_rest(tmp_path: Path) -> None:
    output = completed_output()
    output["images"].insert(0, {"filename": "passwd", "type": "s3_url", "data": "file:///etc/passwd"})
    with fake_runpod(FakeRunPod([{"status": "COMPLETED", "output": output}])) as fake:
        result = run_client(MODEL_FREE, "--url", fake.url, "--poll", "0.05", "--out", str(tmp_path / "o"))
    assert result.returncode == 1, result.stderr
    assert [Path(line).name for line in result.stdout.splitlines()] == ["a.png", "v.mp4", "text_node12.txt"]
    assert "output not saved: images[0] ('passwd')" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "passwd").exists()


def test_http_401_names_the_api_key(tmp_path: Path) -> None:
    fake = FakeRunPod([{"status": "IN_QUEUE"}])
    fake.answer = lambda method, path: (401, {"error": "Unauthorized"})  # type: ignore[method-assign]
    with fake_runpod(fake):
        result = run_client(MODEL_FREE, "--url", fake.url)
    assert result.returncode == 1
    assert "refused the API key (HTTP 401): check RUNPOD_API_KEY" in result.stderr


# --- outputs delivered through S3 -------------------------------------------------------------------------------


def test_s3_url_outputs_are_downloaded(tmp_path: Path) -> None:
    with run_s3rver(tmp_path / "s3") as s3, serve_api(ComfyBackend.standin(), tmp_path / "w", **s3.env()) as worker:
        workflow = chain(("EmptyImage", {"width": 16, "height": 16, "batch_size": 2, "color": 255}), prefix="s3")
        out = tmp_path / "out"
        code = client.main(
            [str(write_json(tmp_path / "wf.json", workflow)), "--url", worker.api_url, "--sync", "--out", str(out)],
            env={},
        )
        assert code == 0
        s3_client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        objects = s3_client.list_objects_v2(Bucket=s3.bucket)["Contents"]
        assert len(objects) == 2
        stored = {
            o["Key"].rsplit("/", 1)[-1]: s3_client.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
            for o in objects
        }
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    assert saved == stored
    for data in saved.values():
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (16, 16)
