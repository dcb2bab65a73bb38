"""The job flow in-process, against the stand-in ComfyUI started by the worker's own supervisor:
progress, timeouts that interrupt ComfyUI, cancellation, a dropped WebSocket, a ComfyUI that cannot start.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from comfy_worker.runtime.app import build_worker
from comfy_worker.runtime.job import Worker
from comfy_worker.settings import Settings

from .comfy_servers import run_standin
from .worker_process import TIMEOUT_MARGIN_S, ComfyBackend, close_worker, free_port, worker_settings


def settings_for(root: Path, comfy_port: int, **extra: str) -> Settings:
    return worker_settings(ComfyBackend.standin(), root, comfy_port, INTERRUPT_GRACE="5", **extra)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    # Files stay on disk in this module so tests can compare them with the results; cleanup is tested below.
    built = build_worker(settings_for(tmp_path_factory.mktemp("flow"), free_port(), CLEANUP_JOB_FILES="false"))
    assert built.startup_error is None, built.startup_error.to_dict()
    yield built
    close_worker(built)


def rebuilt(worker: Worker, settings: Settings) -> Worker:
    """Another Worker on the same ComfyUI with other settings."""
    return Worker(
        settings, worker.client, worker.events, worker.supervisor, fetcher=worker.fetcher, storage=worker.storage
    )


def sleep_graph(seconds: float, prefix: str = "flow", steps: int = 0) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def run(worker: Worker, job_input: dict[str, Any], progress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    sink = progress.append if progress is not None else (lambda _message: None)
    return asyncio.run(worker.run("test-job", job_input, sink))


def error_of(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" in result, result
    error: dict[str, Any] = json.loads(result["error"])
    return error


def test_progress_updates_follow_the_sampler_steps(worker: Worker) -> None:
    progress: list[dict[str, Any]] = []
    result = run(worker, {"workflow": sleep_graph(0.5, steps=5)}, progress)
    assert result["status"] == "success", result
    steps = [m for m in progress if m.get("class_type") == "StandinSleep" and "step" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5]
    assert all(m["steps"] == 5 and m["nodes_total"] == 3 for m in steps)
    percents = [m["percent"] for m in progress]
    assert percents == sorted(percents) and percents[-1] <= 100


def test_progress_is_rate_limited(worker: Worker) -> None:
    limited = dataclasses.replace(worker.settings, progress_interval_s=10.0)
    slow = rebuilt(worker, limited)
    progress: list[dict[str, Any]] = []
    assert run(slow, {"workflow": sleep_graph(0.3, prefix="rate", steps=10)}, progress)["status"] == "success"
    assert len(progress) == 1, progress


def test_timeout_interrupts_the_prompt_and_names_the_node(worker: Worker) -> None:
    started = time.monotonic()
    result = run(worker, {"workflow": sleep_graph(30, prefix="slow"), "timeout": 1})
    elapsed = time.monotonic() - started
    error = error_of(result)
    assert error["error_type"] == "timeout"
    assert "timeout of 1s while node 2 (StandinSleep) was running" in error["message"]
    assert error["details"]["node_id"] == "2"
    assert elapsed < 1 + TIMEOUT_MARGIN_S, f"the result came {elapsed:.1f}s after the job started"
    assert run(worker, {"workflow": sleep_graph(0.1, prefix="after")})["status"] == "success"
    assert worker.client.queue() == {"queue_running": [], "queue_pending": []}
    assert worker.supervisor is not None and worker.supervisor.restarts == 0, "the interrupt sufficed"


def test_cancellation_interrupts_comfyui_and_reraises(worker: Worker) -> None:
    async def cancel_midway() -> None:
        task = asyncio.create_task(worker.run("cancel-me", {"workflow": sleep_graph(120, prefix="cancel")}, print))
        deadline = time.monotonic() + 60
        while not (await asyncio.to_thread(worker.client.queue))["queue_running"]:  # running in ComfyUI
            assert time.monotonic() < deadline and not task.done(), "the job never started running"
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    deadline = time.monotonic() + 60  # well before the 120 s the job would sleep without the interrupt
    while worker.client.queue()["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker.client.queue() == {"queue_running": [], "queue_pending": []}
    assert run(worker, {"workflow": sleep_graph(0.1, prefix="after_cancel")})["status"] == "success"


def test_execution_error_then_success(worker: Worker) -> None:
    graph = {
        "1": {"class_type": "StandinFail", "inputs": {"message": "boom ünïcode", "exception_type": "ValueError"}},
    }
    error = error_of(run(worker, {"workflow": graph}))
    assert error["error_type"] == "comfyui_execution"
    assert error["message"] == "Node 1 (StandinFail) failed: ValueError: boom ünïcode"
    assert run(worker, {"workflow": sleep_graph(0, prefix="ok")})["status"] == "success"


def test_every_output_kind(worker: Worker) -> None:
    def saver(node_id: str, kind: str, extension: str, **extra: Any) -> dict[str, Any]:
        inputs = {"filename_prefix": f"kinds_{node_id}", "kind": kind, "extension": extension, **extra}
        return {"class_type": "StandinSaveFile", "inputs": inputs}

    graph = {
        "1": saver("1", "gifs", "mp4", format="video/h264-mp4", size_bytes=2048),
        "2": saver("2", "audio", "flac", size_bytes=100),
        "3": saver("3", "text", "txt", content="a caption"),
        "4": saver("4", "files", "glb", size_bytes=10),
        "5": saver("5", "images", "webp", extra_ui='{"animated": [true]}', size_bytes=30),
    }
    result = run(worker, {"workflow": graph})
    assert result["status"] == "success", result
    assert [(v["node_id"], v["mime_type"], v["size_bytes"]) for v in result["videos"]] == [("1", "video/mp4", 2048)]
    assert [(a["node_id"], a["mime_type"]) for a in result["audio"]] == [("2", "audio/flac")]
    assert result["text"] == [{"node_id": "3", "text": "a caption"}]
    assert [(f["node_id"], f["mime_type"]) for f in result["files"]] == [("4", "model/gltf-binary")]
    assert [(i["node_id"], i["mime_type"]) for i in result["images"]] == [("5", "image/webp")]


def test_outputs_come_from_the_prompts_frames_in_the_workflows_order(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every frame seen, the outputs are the ``executed`` frames' (no /history round trip), a cached
    resubmission's too (ComfyUI sends ``executed`` for a cached output node), in the workflow's node order."""
    asked: list[str] = []
    history = worker.client.history
    monkeypatch.setattr(worker.client, "history", lambda prompt_id: asked.append(prompt_id) or history(prompt_id))
    graph = {
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "order_last_run"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "5": {
            "class_type": "StandinSaveFile",
            "inputs": {"filename_prefix": "order_text", "kind": "text", "extension": "txt", "content": "caption"},
        },
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 77}},
    }
    job = {"workflow": graph, "output": {"include_temp": True}}
    first, again = run(worker, job), run(worker, job)
    assert asked == [], "the outputs were all in the frames"
    for result in (first, again):
        assert result["status"] == "success", result
        assert [(i["node_id"], i["subfolder"]) for i in result["images"]] == [("9", ""), ("2", "")]
        assert result["text"] == [{"node_id": "5", "text": "caption"}]
    assert [i["filename"] for i in again["images"]] == [i["filename"] for i in first["images"]], "from the cache"
    entry = history(first["prompt_id"])
    assert entry is not None
    listed = {(str(n), f["filename"]) for n, out in entry["outputs"].items() for f in out.get("images", [])}
    assert {(i["node_id"], i["filename"]) for i in first["images"]} == listed, "the same files /history lists"


def test_comfyui_that_cannot_start_fails_every_job_with_its_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken_comfyui"
    broken.mkdir()
    (broken / "main.py").write_text(
        "import sys\nprint('loading custom nodes...')\nprint('ImportError: no module named torch')\nsys.exit(3)\n"
    )
    settings = Settings.from_env({"COMFYUI_DIR": str(broken), "COMFY_API_URL": f"http://127.0.0.1:{free_port()}"})
    with caplog.at_level(logging.INFO):
        failing = build_worker(settings)
    try:
        assert failing.startup_error is not None
        logged = [record.getMessage() for record in caplog.records]
        assert sum("no module named torch" in line for line in logged) == 1, "ComfyUI's output is logged once"
        for _ in range(2):
            result = run(failing, {"workflow": sleep_graph(0)})
            assert result.get("refresh_worker") is True
            error = error_of(result)
            assert error["error_type"] == "comfyui_unavailable"
            assert "exited with code 3" in error["message"]
            assert "ImportError: no module named torch" in error["details"]["log_tail"]
        # input errors are still reported as such
        assert error_of(run(failing, {"workflow": []}))["error_type"] == "validation"
    finally:
        close_worker(failing)


def test_no_comfyui_and_no_folder(tmp_path: Path) -> None:
    settings = Settings.from_env({"COMFYUI_DIR": str(tmp_path), "COMFY_API_URL": f"http://127.0.0.1:{free_port()}"})
    failing = build_worker(settings)
    try:
        error = error_of(run(failing, {"workflow": sleep_graph(0)}))
        assert error["error_type"] == "comfyui_unavailable"
        assert "holds no main.py" in error["message"]
    finally:
        close_worker(failing)


def test_outputs_come_through_view_when_the_folders_are_unknown(worker: Worker) -> None:
    remote = dataclasses.replace(
        worker.settings, comfyui_output_dir=None, comfyui_temp_dir=None, comfyui_input_dir=None
    )
    over_http = rebuilt(worker, remote)
    assert over_http.folders == {}
    graph = sleep_graph(0, prefix="view")
    graph["1"]["inputs"]["color"] = 0xFF0000
    result = run(over_http, {"workflow": graph, "output": {"include_temp": True}})
    assert result["status"] == "success", result
    saved = Path(worker.settings.comfyui_output_dir or "") / result["images"][0]["filename"]
    assert base64.b64decode(result["images"][0]["data"]) == saved.read_bytes()


def test_frames_of_other_prompts_on_our_socket_are_ignored(worker: Worker) -> None:
    other_id = str(uuid.uuid4())
    worker.client.queue_prompt(sleep_graph(0.8, prefix="someone_else"), other_id)  # same client_id as the worker
    result = run(worker, {"workflow": sleep_graph(0.1, prefix="mine")})
    assert result["status"] == "success", result
    assert [i["filename"].split("_0")[0] for i in result["images"]] == ["mine"]
    other = worker.client.history(other_id)
    assert other is not None and other["status"]["status_str"] == "success", "the other prompt ran first"


def test_binary_preview_frames_are_ignored(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, free_port(), COMFYUI_ARGS="--preview-method latent2rgb")
    previewing = build_worker(settings)
    try:
        assert previewing.startup_error is None
        progress: list[dict[str, Any]] = []
        result = run(previewing, {"workflow": sleep_graph(0.3, prefix="preview", steps=3)}, progress)
        assert result["status"] == "success", result
        assert [m["step"] for m in progress if "step" in m] == [1, 2, 3]
    finally:
        close_worker(previewing)


def test_temp_outputs_are_found_on_disk(worker: Worker) -> None:
    graph = sleep_graph(0, prefix="unused")
    graph["3"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    result = run(worker, {"workflow": graph, "output": {"include_temp": True}})
    assert result["status"] == "success", result
    on_disk = worker.folders["temp"] / result["images"][0]["filename"]
    assert on_disk.is_file(), "temp outputs must be read from COMFYUI_TEMP_DIR, not fetched over HTTP"
    assert base64.b64decode(result["images"][0]["data"]) == on_disk.read_bytes()


def test_a_temp_output_deleted_meanwhile_leaves_the_jobs_other_outputs(worker: Worker) -> None:
    """A ComfyUI starting on the same temp folder deletes the preview while the job still runs: the job
    completes with its saved image and a warning naming the preview, instead of failing altogether."""
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x123456}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},  # an output node: it runs first
        "3": {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": 1.0, "steps": 0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "kept"}},
    }
    temp = worker.folders["temp"]
    before = set(temp.rglob("*.png"))
    deleted: list[str] = []

    def delete_the_preview(message: dict[str, Any]) -> None:
        if message.get("node_id") == "3" and not deleted:  # the sleep runs: the preview is written
            for path in set(temp.rglob("*.png")) - before:
                path.unlink()
                deleted.append(path.name)

    result = asyncio.run(
        worker.run("temp-gone", {"workflow": graph, "output": {"include_temp": True}}, delete_the_preview)
    )
    assert result["status"] == "success", result
    assert len(deleted) == 1
    assert [(i["node_id"], i["filename"][:5]) for i in result["images"]] == [("4", "kept_")]
    [warning] = [w for w in result["warnings"] if "could not be read" in w]
    assert warning.startswith(f"The temp output {deleted[0]} (node 2) could not be read")


def test_errors_carry_diagnostics(worker: Worker) -> None:
    (worker.folders["input"] / "diag").mkdir(parents=True, exist_ok=True)
    (worker.folders["input"] / "diag" / "present.png").write_bytes(b"x")
    (worker.folders["input"] / "jobs" / "another-job").mkdir(parents=True, exist_ok=True)
    (worker.folders["input"] / "jobs" / "another-job" / "secret_plan.png").write_bytes(b"x")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "diag/presnt.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "diag"}},
    }
    error = error_of(run(worker, {"workflow": graph}))
    assert error["error_type"] == "workflow_validation"
    report = error["diagnostics"]
    assert report["comfyui"]["state"] == "running"
    assert report["comfyui"]["version"]
    assert report["comfyui"]["devices"][0]["vram_total_gb"] > 0
    assert report["system"]["ram_available_gb"] > 0 and report["system"]["output_dir_free_gb"] > 0
    assert report["comfyui_log_tail"], "ComfyUI's last log lines"
    assert "diag/present.png" in report["input_files"]
    assert not any(name.startswith("jobs/") for name in report["input_files"]), "other jobs' inputs stay private"
    assert "Invalid image file: diag/presnt.png; closest in the input folder: diag/present.png" in error["message"]
    assert isinstance(report["model_folders"], dict)
    plain = error_of(run(worker, {"workflow": sleep_graph(0, prefix="d"), "seed": 1}))
    assert "model_folders" not in plain["diagnostics"], "file listings only for errors about files"


def test_free_after_job_clears_comfyui_caches(worker: Worker) -> None:
    graph = sleep_graph(0, prefix="freed")
    graph["1"]["inputs"]["color"] = 424242
    first = run(worker, {"workflow": graph})
    cached = run(worker, {"workflow": graph})
    assert cached["images"][0]["filename"] == first["images"][0]["filename"], "a resubmission is cached"
    freeing = rebuilt(worker, dataclasses.replace(worker.settings, free_after_job="models"))
    run(freeing, {"workflow": graph})  # this job's /free empties ComfyUI's cache afterwards
    after_free = run(worker, {"workflow": graph})
    assert after_free["images"][0]["filename"] != first["images"][0]["filename"], "the cache was emptied"


def test_low_memory_asks_for_a_new_worker(worker: Worker) -> None:
    demanding = dataclasses.replace(worker.settings, refresh_min_free_ram_gb=1_000_000.0)
    result = run(rebuilt(worker, demanding), {"workflow": sleep_graph(0, prefix="lowmem")})
    assert result["status"] == "success"
    assert result["refresh_worker"] is True
    assert "refresh_worker" not in run(worker, {"workflow": sleep_graph(0, prefix="enough")})


def test_cleanup_removes_only_this_jobs_files(worker: Worker) -> None:
    tidy = rebuilt(worker, dataclasses.replace(worker.settings, cleanup_job_files=True))
    others = [worker.folders["output"] / "someone_else_00001_.png", worker.folders["input"] / "shared" / "keep.png"]
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not mine")
    image = base64.b64encode(Path(others[1]).read_bytes()).decode()
    graph = sleep_graph(0, prefix="tidy")
    graph["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    job = {
        "workflow": graph,
        "images": [{"name": "jobs_in/x/up.png", "image": image}],
        "output": {"include_temp": True},
    }
    before_temp = set(worker.folders["temp"].rglob("*.png"))
    result = run(tidy, job)
    assert result["status"] == "success", result
    saved = next(i for i in result["images"] if i["filename"].startswith("tidy_"))
    assert saved["subfolder"].startswith("jobs/"), "outputs go to the job's own folder"
    assert base64.b64decode(saved["data"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (worker.folders["output"] / saved["subfolder"]).exists()
    assert not (worker.folders["input"] / "jobs_in").exists(), "the upload and its empty folders are gone"
    assert set(worker.folders["temp"].rglob("*.png")) <= before_temp, "the job's temp files are gone"
    assert all(path.read_bytes() == b"not mine" for path in others), "other files are never touched"


def test_cleanup_keeps_cached_resubmissions_working(worker: Worker) -> None:
    tidy = rebuilt(worker, dataclasses.replace(worker.settings, cleanup_job_files=True))
    graph = sleep_graph(0, prefix="again")
    graph["1"]["inputs"]["color"] = 0x123456
    first, second = run(tidy, {"workflow": graph}), run(tidy, {"workflow": graph})
    assert first["status"] == second["status"] == "success", second
    assert first["images"][0]["subfolder"] != second["images"][0]["subfolder"]
    assert len(base64.b64decode(second["images"][0]["data"])) > 0


def test_cleanup_after_a_failed_job(worker: Worker) -> None:
    tidy = rebuilt(worker, dataclasses.replace(worker.settings, cleanup_job_files=True))
    image = base64.b64encode(b"fake").decode()
    graph = {"1": {"class_type": "StandinFail", "inputs": {"message": "nope"}}}
    error = error_of(run(tidy, {"workflow": graph, "images": [{"name": "failed_job.png", "image": image}]}))
    assert error["error_type"] == "comfyui_execution"
    assert not (worker.folders["input"] / "failed_job.png").exists()


def test_a_prompt_lost_by_a_comfyui_restarted_elsewhere_fails_clearly(tmp_path: Path) -> None:
    port = free_port()
    with run_standin(tmp_path / "first", port=port) as first:
        attached = build_worker(settings_for(tmp_path, port))
        try:
            assert attached.supervisor is not None and attached.supervisor.attached

            async def scenario() -> dict[str, Any]:
                task = asyncio.create_task(attached.run("lost", {"workflow": sleep_graph(30)}, lambda _m: None))
                while not (await asyncio.to_thread(attached.client.queue))["queue_running"]:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                first.process.kill()
                first.process.wait(5)
                with run_standin(tmp_path / "second", port=port):  # a new ComfyUI, empty queue and history
                    return await asyncio.wait_for(task, timeout=20)

            error = error_of(asyncio.run(scenario()))
            assert error["error_type"] == "comfyui_crashed"
            assert "no longer knows prompt" in error["message"]
        finally:
            close_worker(attached)


def solid_png(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def load_and_save(image_name: str, prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def first_pixel(result: dict[str, Any]) -> tuple[int, int, int]:
    assert result.get("status") == "success", result
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["data"]))) as image:
        pixel: tuple[int, int, int] = image.convert("RGB").getpixel((0, 0))
        return pixel


def test_inputs_are_per_job_and_never_replace_or_remove_existing_files(worker: Worker) -> None:
    tidy = rebuilt(worker, dataclasses.replace(worker.settings, cleanup_job_files=True))
    existing = worker.folders["input"] / "important_mask.png"
    existing.write_bytes(base64.b64decode(solid_png((1, 2, 3))))
    before = existing.read_bytes()

    async def two_jobs() -> list[dict[str, Any]]:
        jobs = [
            tidy.run(
                f"job-{index}",
                {
                    "workflow": load_and_save("important_mask.png [input]" if index else "important_mask.png", "mine"),
                    "images": [{"name": "important_mask.png", "image": solid_png(color)}],
                },
                lambda _m: None,
            )
            for index, color in enumerate([(200, 0, 0), (0, 0, 200)])
        ]
        return list(await asyncio.gather(*jobs))

    red, blue = asyncio.run(two_jobs())
    assert first_pixel(red) == (200, 0, 0), "each job reads its own upload"
    assert first_pixel(blue) == (0, 0, 200), "each job reads its own upload"
    assert existing.read_bytes() == before, "a file already in the input folder is neither replaced nor removed"
    assert first_pixel(run(tidy, {"workflow": load_and_save("important_mask.png", "theirs")})) == (1, 2, 3)


@pytest.mark.parametrize(
    ("prefix", "message"),
    [("../../victim", "has a '.' or '..' segment"), ("a/./b", "has a '.' or '..' segment"), (7, "not a string")],
)
def test_output_prefixes_that_leave_the_jobs_folder_are_refused(worker: Worker, prefix: Any, message: str) -> None:
    tidy = rebuilt(worker, dataclasses.replace(worker.settings, cleanup_job_files=True))
    graph = sleep_graph(0, prefix="ok")
    error = error_of(
        run(
            tidy,
            {"workflow": graph, "overrides": [{"node_id": "3", "field": "inputs.filename_prefix", "value": prefix}]},
        )
    )
    assert error["error_type"] == "validation", error
    assert "node 3 (SaveImage) filename_prefix" in error["message"] and message in error["message"]
    assert not list(worker.folders["output"].parent.rglob("victim*")), "nothing was saved outside"


def test_an_empty_prefix_is_isolated_and_cleaned_too(worker: Worker) -> None:
    tidy = rebuilt(worker, dataclasses.replace(worker.settings, cleanup_job_files=True))
    before = set(worker.folders["output"].rglob("*"))
    result = run(tidy, {"workflow": sleep_graph(0, prefix="")})
    assert result["status"] == "success", result
    assert result["images"][0]["subfolder"].startswith("jobs/") and result["images"][0]["filename"].startswith(
        "ComfyUI"
    )
    assert set(worker.folders["output"].rglob("*")) <= before | {worker.folders["output"] / "jobs"}
