"""A newer ComfyUI (0.38) behind the worker: the stand-in in its 0.38 flavour (``STANDIN_COMFYUI_FLAVOUR=0.38``,
``tests/standin_comfyui/standin_flavour.py``) and the worker's parsers fed 0.38's frames and fields.

What 0.38 changed on the API was read in its source (server.py, main.py, comfy/cli_args.py,
comfy_execution/jobs.py, progress.py, asset_enrichment.py, app/assets/seeder.py): a client-chosen prompt_id
must be a canonical lowercase UUID, ``/api/jobs`` lists and cancels jobs, ``progress_state`` entries may carry
``activity``, the asset seeder's ``assets.seed.*`` events go to every socket, file outputs carry asset ids,
``system_stats.system.os`` is ``sys.platform``, and ``--normalvram``/``--disable-ipex-optimize`` are gone.
Here the stand-in is shown to do each, then whole jobs run through the worker against it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from PIL import Image

from comfy_worker.comfy.events import EventStream, Frame
from comfy_worker.runtime import outputs
from comfy_worker.runtime.attempt import Attempt
from comfy_worker.runtime.follow import Follower, Progress

from .comfy_servers import STANDIN_MAIN, ComfyServer, run_standin
from .conftest import REPO
from .runpod_platform import RunpodPlatform
from .worker_process import ComfyBackend, WorkerProcess, free_port, serve_api, worker_env

NEWER = {"STANDIN_COMFYUI_FLAVOUR": "0.38"}
CANONICAL = "0f8fad5b-d9cb-469f-a165-70867728950e"


# -- the stand-in's 0.38 flavour ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def newer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    with run_standin(tmp_path_factory.mktemp("newer-standin"), env=NEWER) as server:
        yield server


def sleep_then_save(seconds: float, steps: int, prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def post_prompt(server: ComfyServer, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{server.url}/prompt", json=body, timeout=30)


def history_when_done(server: ComfyServer, prompt_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        entry = requests.get(f"{server.url}/history/{prompt_id}", timeout=10).json().get(prompt_id)
        if entry is not None:
            found: dict[str, Any] = entry
            return found
        assert time.monotonic() < deadline, f"prompt {prompt_id} did not finish"
        time.sleep(0.05)


def queue_ids(server: ComfyServer) -> dict[str, list[str]]:
    queue = requests.get(f"{server.url}/queue", timeout=10).json()
    return {key: [item[1] for item in queue[key]] for key in ("queue_running", "queue_pending")}


def wait_running(server: ComfyServer, prompt_id: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while prompt_id not in queue_ids(server)["queue_running"]:
        assert time.monotonic() < deadline, f"prompt {prompt_id} never started"
        time.sleep(0.05)


def standin_exit(tmp_path: Path, *args: str, flavour: str | None) -> subprocess.CompletedProcess[str]:
    """The stand-in's start-up, ended by ``--quick-test-for-ci`` once its command line is taken."""
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/bin:/bin"} | ({"STANDIN_COMFYUI_FLAVOUR": flavour} if flavour else {})
    command = [sys.executable, str(STANDIN_MAIN), "--base-directory", str(base), "--quick-test-for-ci", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("flag", ["--normalvram", "--disable-ipex-optimize"])
def test_the_newer_standin_refuses_the_flags_0_38_removed(tmp_path: Path, flag: str) -> None:
    newer = standin_exit(tmp_path, flag, flavour="0.38")
    assert newer.returncode == 2, newer.stderr
    assert f"unrecognized arguments: {flag}" in newer.stderr
    assert standin_exit(tmp_path, flag, flavour=None).returncode == 0  # 0.3.64 had them


def test_the_newer_standin_takes_disable_api_nodes_as_offline(tmp_path: Path) -> None:
    done = standin_exit(tmp_path, "--disable-api-nodes", "--offline", "--disable-partner-nodes", flavour="0.38")
    assert done.returncode == 0, done.stderr
    assert "--disable-api-nodes is deprecated" in done.stderr
    assert standin_exit(tmp_path, "--offline", flavour=None).returncode == 2  # 0.3.64 did not have it


def test_an_unknown_flavour_is_refused(tmp_path: Path) -> None:
    done = standin_exit(tmp_path, flavour="9.9")
    assert done.returncode != 0 and "STANDIN_COMFYUI_FLAVOUR='9.9'" in done.stderr


def test_system_stats_report_the_platform_and_the_release(newer: ComfyServer) -> None:
    system = requests.get(f"{newer.url}/system_stats", timeout=10).json()["system"]
    assert system["os"] == sys.platform
    assert system["comfyui_version"] == "0.38.1"
    assert isinstance(system["comfy_package_versions"], list)
    assert requests.get(f"{newer.url}/features", timeout=10).json()["assets"] is True


@pytest.mark.parametrize(
    "prompt_id",
    [
        CANONICAL.upper(),
        CANONICAL.replace("-", ""),
        "{" + CANONICAL + "}",
        f"urn:uuid:{CANONICAL}",
        "job-1",
        12345,
    ],
)
def test_a_prompt_id_that_is_not_a_canonical_uuid_is_refused(newer: ComfyServer, prompt_id: object) -> None:
    graph = sleep_then_save(0, 1, "refused")
    response = post_prompt(newer, {"prompt": graph, "prompt_id": prompt_id})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_prompt_id"
    assert response.json()["node_errors"] == {}


def test_a_canonical_or_null_prompt_id_is_taken(newer: ComfyServer, tmp_path: Path) -> None:
    graph = sleep_then_save(0, 1, "taken")
    taken = post_prompt(newer, {"prompt": graph, "prompt_id": CANONICAL})
    assert taken.status_code == 200 and taken.json()["prompt_id"] == CANONICAL
    minted = post_prompt(newer, {"prompt": graph, "prompt_id": None}).json()["prompt_id"]
    assert str(uuid.UUID(minted)) == minted
    entry = history_when_done(newer, CANONICAL)
    assert isinstance(entry["prompt"][3]["create_time"], int)
    with run_standin(tmp_path / "default") as default:  # 0.3.64 takes any id
        assert post_prompt(default, {"prompt": graph, "prompt_id": "job-1"}).json()["prompt_id"] == "job-1"


def test_the_jobs_api_lists_and_cancels(newer: ComfyServer) -> None:
    running, pending = str(uuid.uuid4()), str(uuid.uuid4())
    for prompt_id in (running, pending):
        body = {"prompt": sleep_then_save(60, 600, "jobs"), "prompt_id": prompt_id, "client_id": "jobs"}
        assert post_prompt(newer, body).status_code == 200
    wait_running(newer, running)
    listed = requests.get(f"{newer.url}/api/jobs", params={"status": "pending,in_progress"}, timeout=10).json()
    assert {job["id"]: job["status"] for job in listed["jobs"]} == {running: "in_progress", pending: "pending"}
    assert listed["pagination"] == {"offset": 0, "limit": None, "total": 2, "has_more": False}
    one = requests.get(f"{newer.url}/api/jobs/{pending}", timeout=10).json()
    assert one["status"] == "pending" and "3" in one["workflow"]["prompt"]

    assert requests.post(f"{newer.url}/api/jobs/{pending}/cancel", timeout=10).json() == {"cancelled": True}
    assert pending not in queue_ids(newer)["queue_pending"]
    batch = requests.post(f"{newer.url}/api/jobs/cancel", json={"job_ids": [running]}, timeout=10)
    assert batch.json() == {"cancelled": True}
    entry = history_when_done(newer, running, timeout_s=30)  # well before its 60 s
    assert entry["status"]["status_str"] == "error"
    assert requests.get(f"{newer.url}/api/jobs/{running}", timeout=10).json()["status"] == "cancelled"
    assert requests.post(f"{newer.url}/api/jobs/{running}/cancel", timeout=10).json() == {"cancelled": False}
    assert requests.get(f"{newer.url}/api/jobs/{pending}", timeout=10).status_code == 404

    refused = requests.post(f"{newer.url}/api/jobs/cancel", json={"job_ids": ["x", running]}, timeout=10)
    assert refused.status_code == 400 and refused.json()["invalid_ids"] == ["x"]
    bad_status = requests.get(f"{newer.url}/api/jobs", params={"status": "done"}, timeout=10)
    assert bad_status.status_code == 400
    assert requests.get(f"{newer.url}/api/api/jobs", timeout=10).status_code == 200  # as 0.38 registers it
    assert requests.get(f"{newer.url}/jobs", timeout=10).status_code == 404


def test_a_finished_job_shows_its_outputs_with_asset_ids(newer: ComfyServer) -> None:
    prompt_id = str(uuid.uuid4())
    assert post_prompt(newer, {"prompt": sleep_then_save(0, 1, "done"), "prompt_id": prompt_id}).status_code == 200
    history_when_done(newer, prompt_id)
    job = requests.get(f"{newer.url}/api/jobs/{prompt_id}", timeout=10).json()
    assert job["status"] == "completed" and job["outputs_count"] == 2
    assert job["preview_output"]["type"] == "output" and job["preview_output"]["nodeId"] == "3"
    saved = job["outputs"]["3"]["images"][0]
    assert str(uuid.UUID(saved["id"])) == saved["id"] and saved["preview_id"] == saved["id"]


def test_an_upload_answers_with_its_asset(newer: ComfyServer) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, "PNG")
    files = {"image": ("asset.png", buffer.getvalue(), "image/png")}
    answer = requests.post(f"{newer.url}/upload/image", files=files, data={"overwrite": "true"}, timeout=10).json()
    assert answer["name"] == "asset.png" and answer["asset"]["size"] == len(buffer.getvalue())
    assert answer["asset"]["mime_type"] == "image/png" and answer["asset"]["asset_hash"].startswith("blake3:")


class Socket:
    """A WebSocket to the stand-in whose text frames a thread collects."""

    def __init__(self, server: ComfyServer, client_id: str) -> None:
        self.ws = websocket.create_connection(server.ws_url(client_id), timeout=60)
        self.frames: list[Frame] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                opcode, payload = self.ws.recv_data()
            except (OSError, websocket.WebSocketException):
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self.frames.append(json.loads(payload))

    def wait_for(self, wanted: Callable[[Frame], bool], timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(wanted(frame) for frame in list(self.frames)):
            assert time.monotonic() < deadline, self.frames
            time.sleep(0.02)

    def close(self) -> None:
        self.ws.close()
        self._thread.join(timeout=10)


def test_a_jobs_frames_carry_0_38s_fields_and_seed_events_reach_every_socket(newer: ComfyServer) -> None:
    job, observer = Socket(newer, "job-socket"), Socket(newer, "observer")
    try:
        prompt_id = str(uuid.uuid4())
        body = {"prompt": sleep_then_save(0.3, 3, "frames"), "prompt_id": prompt_id, "client_id": "job-socket"}
        assert post_prompt(newer, body).status_code == 200
        job.wait_for(lambda f: f["type"] == "executing" and f["data"] == {"node": None, "prompt_id": prompt_id})
        observer.wait_for(lambda f: f["type"] == "assets.seed.completed")
    finally:
        job.close()
        observer.close()
    kinds = [f["type"] for f in job.frames]
    start, end = kinds.index("execution_start"), len(kinds) - 1
    assert kinds[end] == "executing"
    seeds = [i for i, kind in enumerate(kinds) if kind.startswith("assets.seed.")]
    assert seeds and all(start < i < end for i in seeds), kinds  # among the job's own frames
    assert {"assets.seed.paused", "assets.seed.started", "assets.seed.completed"} <= {kinds[i] for i in seeds}
    observed = {f["type"] for f in observer.frames}
    assert {"assets.seed.paused", "assets.seed.completed"} <= observed  # an unrelated socket gets them too
    assert not observed & {"executing", "executed", "progress_state"}
    states = [n for f in job.frames if f["type"] == "progress_state" for n in f["data"]["nodes"].values()]
    assert {"loading"} == {n["activity"] for n in states if "activity" in n}
    saved = next(f["data"]["output"] for f in job.frames if f["type"] == "executed" and f["data"]["node"] == "3")
    assert set(saved["images"][0]) == {"filename", "subfolder", "type", "id", "preview_id"}


# -- the worker's parsers, fed 0.38's frames and fields -------------------------------------------------------------
PROMPT = "5a0c3f1e-8f1d-4a53-9d0e-1b2c3d4e5f60"
SEED_EVENTS = [
    {"type": "assets.seed.paused", "data": {}},
    {"type": "assets.seed.started", "data": {"roots": ["output"], "total": 3, "phase": "fast"}},
    {"type": "assets.seed.completed", "data": {"phase": "fast", "total": 3, "created": 1, "elapsed": 0.01}},
]


def routed(texts: list[str]) -> list[Frame]:
    """What a job subscribed to PROMPT receives when the WebSocket reader gets ``texts``."""
    stream = EventStream("ws://127.0.0.1:9/ws", client_id="c")

    async def collect() -> list[Frame]:
        with stream.subscription(PROMPT) as frames:
            for text in texts:
                stream._route(text)
            await asyncio.sleep(0)  # the deliveries are scheduled on this loop
            return [frames.get_nowait() for _ in range(frames.qsize())]

    return asyncio.run(collect())


def test_the_router_passes_a_jobs_frames_on_with_their_new_fields_and_drops_the_rest() -> None:
    state = {
        "type": "progress_state",
        "data": {
            "prompt_id": PROMPT,
            "nodes": {"2": {"state": "running", "value": 0, "max": 1, "activity": "loading"}},
        },
    }
    unknown = {"type": "some_new_event", "data": {"prompt_id": PROMPT, "extra": [1, 2]}}
    other = {"type": "executing", "data": {"node": "1", "prompt_id": "another-prompt"}}
    texts = [json.dumps(frame) for frame in [*SEED_EVENTS, state, unknown, other]]
    texts += ["not json", "[1, 2]", json.dumps({"type": "x", "data": "text"}), json.dumps({"type": "x"})]
    assert routed(texts) == [state, unknown]


@pytest.mark.parametrize("prompt_id", [["a list"], {"a": "dict"}, 7])
def test_a_frame_whose_prompt_id_is_not_a_string_is_ignored(prompt_id: object) -> None:
    """A broadcast from a custom node or a later release with an odd ``prompt_id``: an unhashable one used to
    raise TypeError in the reader thread, which ended it (no more frames, no reconnect)."""
    odd = json.dumps({"type": "assets.seed.custom", "data": {"prompt_id": prompt_id}})
    mine = {"type": "executing", "data": {"node": None, "prompt_id": PROMPT}}
    assert routed([odd, json.dumps(mine)]) == [mine]


class NoComfy:
    """Follow() must not need ComfyUI while the frames tell it everything."""

    connected = True

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the follower asked ComfyUI: {name}")


def test_following_a_prompt_through_0_38_frames() -> None:
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {}},
        "2": {"class_type": "KSampler", "inputs": {}},
        "3": {"class_type": "SaveImage", "inputs": {}},
    }
    node_state = {"state": "running", "value": 0, "max": 1, "node_id": "2", "prompt_id": PROMPT}
    output = {"images": [{"filename": "a.png", "subfolder": "", "type": "output", "id": "x", "preview_id": "x"}]}
    frames: list[Frame] = [
        {"type": "execution_start", "data": {"prompt_id": PROMPT, "timestamp": 1}},
        *SEED_EVENTS[:1],
        {"type": "execution_cached", "data": {"nodes": ["1"], "prompt_id": PROMPT, "timestamp": 2}},
        {"type": "progress_state", "data": {"prompt_id": PROMPT, "nodes": {"2": node_state | {"activity": "loading"}}}},
        {"type": "executing", "data": {"node": "2", "display_node": "2", "prompt_id": PROMPT}},
        {"type": "progress", "data": {"value": 1, "max": 2, "prompt_id": PROMPT, "node": "2"}},
        {"type": "progress", "data": {"value": 2, "max": 2, "prompt_id": PROMPT, "node": "2"}},
        {"type": "executing", "data": {"node": "3", "display_node": "3", "prompt_id": PROMPT}},
        {"type": "executed", "data": {"node": "3", "display_node": "3", "output": output, "prompt_id": PROMPT}},
        {"type": "execution_success", "data": {"prompt_id": PROMPT, "timestamp": 3}},
        *SEED_EVENTS[1:],
        {"type": "executing", "data": {"node": None, "prompt_id": PROMPT}},
    ]
    sent: list[dict[str, Any]] = []

    async def follow() -> None:
        queue: asyncio.Queue[Frame] = asyncio.Queue()
        for frame in frames:
            queue.put_nowait(frame)
        follower = Follower(NoComfy(), NoComfy(), None)  # type: ignore[arg-type]
        tracker = Progress(workflow, sent.append, interval_s=0)
        clock = Attempt("job", started=time.monotonic(), folder="jobs/x", timeout_s=60)
        clock.wait_behind_others()
        await follower.follow(PROMPT, queue, tracker, clock)
        assert queue.empty()
        assert not clock.waiting, "its first frame told that ComfyUI started the prompt"

    asyncio.run(follow())
    assert [(m["node_id"], m.get("step"), m["nodes_done"], m["percent"]) for m in sent] == [
        (None, None, 1, 33.3),
        ("2", None, 1, 33.3),
        ("2", 1, 1, 50.0),
        ("2", 2, 1, 66.7),
        ("3", None, 2, 66.7),
    ]


def test_outputs_with_asset_ids_are_read_as_before() -> None:
    entry = {
        "outputs": {
            "3": {"images": [{"filename": "a.png", "subfolder": "s", "type": "output", "id": "i", "preview_id": "i"}]},
            "4": {"images": [{"filename": "b.png", "subfolder": "", "type": "temp", "id": "j", "preview_id": "j"}]},
            "5": {
                "gifs": [
                    {"filename": "c.mp4", "subfolder": "", "type": "output", "format": "video/h264-mp4", "id": "k"}
                ]
            },
            "6": {"text": ["hello"]},
        }
    }
    collected = outputs.collect(entry, include_temp=True)
    assert [(f.node_id, f.relative_path, f.folder_type, f.kind) for f in collected.files] == [
        ("3", "s/a.png", "output", "images"),
        ("4", "b.png", "temp", "images"),
        ("5", "c.mp4", "output", "videos"),
    ]
    assert collected.texts == [{"node_id": "6", "text": "hello"}]


# -- whole jobs through the worker, in front of the 0.38 stand-in ----------------------------------------------------
@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    with serve_api(ComfyBackend.standin(), tmp_path_factory.mktemp("newer-worker"), **NEWER) as process:
        yield process


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(entry: dict[str, Any]) -> set[tuple[int, ...]]:
    with Image.open(io.BytesIO(base64.b64decode(entry["data"]))) as image:
        return set(image.convert("RGB").getdata())


def test_a_job_with_an_upload_saved_and_preview_images(worker: WorkerProcess) -> None:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "newer"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    job = {
        "workflow": graph,
        "images": [{"name": "red.png", "image": png_b64(Image.new("RGB", (6, 4), (255, 0, 0)))}],
        "output": {"include_temp": True},
    }
    body = worker.runsync(job)
    assert body["status"] == "COMPLETED", body
    output: dict[str, Any] = body["output"]
    prompt_id = output["prompt_id"]
    assert str(uuid.UUID(prompt_id)) == prompt_id  # the worker's own id passes 0.38's rule
    saved, preview = output["images"]
    assert (saved["node_id"], saved["mime_type"], pixels(saved)) == ("3", "image/png", {(0, 255, 255)})
    assert (preview["node_id"], pixels(preview)) == ("4", {(255, 0, 0)})
    assert set(saved) == {"filename", "subfolder", "node_id", "mime_type", "size_bytes", "type", "data"}
    assert output["warnings"] == []
    # what the worker read: 0.38's history, asset ids on every file
    history = requests.get(f"{worker.comfy_url}/history/{prompt_id}", timeout=10).json()[prompt_id]
    assert all("id" in item for node in ("3", "4") for item in history["outputs"][node]["images"])


def test_a_cached_resubmission_returns_the_same_image(worker: WorkerProcess) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x123456}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "again"}},
    }
    first, second = (worker.runsync({"workflow": graph})["output"] for _ in range(2))
    assert first["prompt_id"] != second["prompt_id"]
    assert pixels(first["images"][0]) == pixels(second["images"][0]) == {(0x12, 0x34, 0x56)}


def test_a_failed_job_reports_the_newer_comfyui(worker: WorkerProcess) -> None:
    graph = {"1": {"class_type": "StandinFail", "inputs": {"message": "boom", "exception_type": "ValueError"}}}
    body = worker.runsync({"workflow": graph})
    assert body["status"] == "FAILED"
    error = json.loads(str(body["error"]))
    assert error["error_type"] == "comfyui_execution"
    assert error["message"] == "Node 1 (StandinFail) failed: ValueError: boom"
    comfyui = error["diagnostics"]["comfyui"]  # read from 0.38's system_stats
    assert comfyui["version"] == "0.38.1" and comfyui["devices"][0]["name"] == "cpu"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunpodPlatform, str]]:
    """``python handler.py`` in RunPod's production loop (the loopback job API), in front of the 0.38 stand-in."""
    root = tmp_path_factory.mktemp("newer-prod")
    env = worker_env(ComfyBackend.standin(), root, free_port(), **NEWER)
    with RunpodPlatform() as platform:
        command = [sys.executable, str(REPO / "handler.py")]
        platform.spawn(command, pod_id="pod-newer", extra_env=env, cwd=root, log_path=root / "worker.log")
        yield platform, env["COMFY_API_URL"]


def test_progress_is_posted_through_0_38s_frames(deployed: tuple[RunpodPlatform, str]) -> None:
    platform, _ = deployed
    job = platform.submit({"workflow": sleep_then_save(1.0, 5, "progress"), "output": {"include_temp": True}})
    body = platform.wait_result(job, timeout=120)
    assert body["output"]["status"] == "success", body
    assert [image["node_id"] for image in body["output"]["images"]] == ["3", "4"]

    def steps() -> list[dict[str, Any]]:
        return [p for p in platform.progress(job) if p.get("class_type") == "StandinSleep" and "step" in p]

    deadline = time.monotonic() + 60  # progress posts come from threads of their own and can trail the result
    while [p["step"] for p in steps()] != [1, 2, 3, 4, 5] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(p["step"], p["steps"], p["nodes_done"], p["nodes_total"]) for p in steps()] == [
        (step, 5, 1, 4) for step in range(1, 6)
    ], platform.progress(job)
    # Each post is sent from a thread of its own (the SDK's progress_update), so they may arrive out of order:
    # what is computed is in range, and grows with the step.
    assert all(0 <= p["percent"] <= 100 for p in platform.progress(job))
    by_step = [p["percent"] for p in sorted(steps(), key=lambda p: p["step"])]
    assert by_step == sorted(by_step), steps()


def test_cancel_stops_the_prompt_on_0_38(deployed: tuple[RunpodPlatform, str]) -> None:
    """The worker keeps /queue delete and /interrupt (both still in 0.38) rather than /api/jobs/{id}/cancel."""
    platform, comfy_url = deployed
    job = platform.submit({"workflow": sleep_then_save(120, 1200, "cancelled"), "timeout": 600})
    platform.wait_progress(job, count=1, timeout=120)
    platform.cancel(job)
    platform.wait_stop_delivered(job, timeout=10)
    deadline = time.monotonic() + 60  # well before the 120 s the prompt would run
    while requests.get(f"{comfy_url}/queue", timeout=10).json()["queue_running"]:
        assert time.monotonic() < deadline, "the cancelled prompt still runs"
        time.sleep(0.1)
    jobs = requests.get(f"{comfy_url}/api/jobs", params={"status": "cancelled"}, timeout=10).json()["jobs"]
    assert len(jobs) == 1 and jobs[0]["status"] == "cancelled"  # 0.38's own account: interrupted, not failed
    assert platform.results(job) == []
    follow_up = platform.submit({"workflow": sleep_then_save(0, 1, "after")})
    assert platform.wait_result(follow_up, timeout=60)["output"]["status"] == "success"
