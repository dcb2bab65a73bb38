"""Models a job brings by URL (``input.models``): downloaded from a loopback file server into the model cache
that ComfyUI sees, cached for the next job, evicted least recently used beyond MODEL_CACHE_MAX_GB but never
while a job uses them, and every bad model refused before ComfyUI sees the prompt.

The worker is the real ``handler.py`` behind the runpod SDK's local API with the stand-in ComfyUI, whose
``/models/<folder>`` and prompt validation list the files of every models root, as ComfyUI's do.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from comfy_worker.errors import InputError
from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.download_options import DownloadOptions
from comfy_worker.runtime.models import ModelCache

from .file_server import FileServer, make_data
from .worker_process import ComfyBackend, WorkerProcess, serve_api

KB = 1024
LOOPBACK = "127.0.0.1/32"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    server = FileServer(tmp_path_factory.mktemp("served"))
    yield server
    server.close()


def extra_model_paths(cache: Path) -> str:
    return f"job_models:\n  base_path: {json.dumps(str(cache))}\n  checkpoints: checkpoints\n  loras: loras\n"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    os.environ.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    root = tmp_path_factory.mktemp("job-models")
    cache = root / "model-cache"
    (root / "extra_model_paths.yaml").write_text(extra_model_paths(cache))  # provisioning writes this
    env = {
        "MODEL_CACHE_DIR": str(cache),
        "MODEL_CACHE_MAX_GB": str(60 * KB / 1024**3),  # 60 KiB: the eviction test fills it
        "MODEL_URL_MAX_GB": str(40 * KB / 1024**3),
        "COMFYUI_EXTRA_MODEL_PATHS": str(root / "extra_model_paths.yaml"),
        "INPUT_URL_ALLOWLIST": LOOPBACK,  # the file server is on loopback, which the SSRF guard refuses otherwise
    }
    with serve_api(ComfyBackend.standin(), root, **env) as process:
        yield process


def checkpoint_graph(name: str) -> dict[str, Any]:
    """CheckpointLoaderSimple validates its ckpt_name against every checkpoints folder (the stand-in cannot
    execute it: a job that gets that far found the file)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "m"}},
    }


def run_job(worker: WorkerProcess, name: str, models: list[dict[str, Any]]) -> dict[str, Any]:
    body = worker.runsync({"workflow": checkpoint_graph(name), "models": models})
    assert body["status"] == "FAILED", body  # the stand-in has no checkpoint loader to run
    error: dict[str, Any] = json.loads(str(body["error"]))
    return error


def comfy_sees(worker: WorkerProcess, folder: str) -> list[str]:
    listed: list[str] = requests.get(f"{worker.comfy_url}/models/{folder}", timeout=10).json()
    return listed


def model(files: FileServer, path: str, size: int, seed: int, **behaviour: Any) -> dict[str, Any]:
    """Serve ``size`` bytes at ``path`` (``behaviour``: the file server's faults) and name it as a job's model."""
    files.add(path, make_data(size, seed), **behaviour)
    return {"url": files.url(path), "destination": "checkpoints", "filename": path.rsplit("/", 1)[-1]}


def test_a_job_downloads_its_model_and_the_next_job_finds_it_cached(worker: WorkerProcess, files: FileServer) -> None:
    wanted = model(files, "/m/own.safetensors", 20 * KB, seed=1)
    wanted["sha256"] = hashlib.sha256(make_data(20 * KB, 1)).hexdigest()
    first = run_job(worker, "own.safetensors", [wanted])
    assert first["error_type"] == "comfyui_execution", first  # validation found the file: the model is there
    assert "own.safetensors" in comfy_sees(worker, "checkpoints")
    assert len(files.gets("/m/own.safetensors")) >= 1
    before = len(files.gets("/m/own.safetensors"))
    second = run_job(worker, "own.safetensors", [wanted])
    assert second["error_type"] == "comfyui_execution", second
    assert len(files.gets("/m/own.safetensors")) == before, "a cached model is not fetched again"


def test_the_download_time_is_in_the_timings(worker: WorkerProcess, files: FileServer) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "timed"}},
    }
    body = worker.runsync({"workflow": graph, "models": [model(files, "/m/timed.safetensors", 4 * KB, seed=5)]})
    assert body["status"] == "COMPLETED", body
    timings = body["output"]["timings"]  # type: ignore[index]
    assert timings["models_s"] >= 0
    assert list(timings) == ["prepare_s", "models_s", "upload_s", "queued_s", "comfyui_s", "outputs_s"]


def test_without_the_model_comfyui_refuses_the_name(worker: WorkerProcess) -> None:
    error = run_job(worker, "absent.safetensors", [])
    assert error["error_type"] == "workflow_validation"  # the control for the test above


def test_the_least_recently_used_model_is_evicted_beyond_the_cap(worker: WorkerProcess, files: FileServer) -> None:
    cache = Path(worker.env["MODEL_CACHE_DIR"])
    for index in range(3):  # 3 x 25 KiB > 60 KiB
        run_job(
            worker, f"lru{index}.safetensors", [model(files, f"/m/lru{index}.safetensors", 25 * KB, seed=10 + index)]
        )
    present = {path.name for path in (cache / "checkpoints").iterdir()}
    assert "lru2.safetensors" in present and "lru1.safetensors" in present
    assert "lru0.safetensors" not in present
    assert "lru0.safetensors" not in comfy_sees(worker, "checkpoints")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"status": 404}, "404"),
        ({"sha256": "0" * 64}, "checksum"),
        ({"size": 50 * KB}, "the limit is"),
    ],
)
def test_a_bad_model_fails_the_job_before_comfyui_sees_it(
    worker: WorkerProcess, files: FileServer, change: dict[str, Any], expected: str
) -> None:
    path = f"/bad/{'-'.join(change)}.safetensors"
    wanted = model(files, path, change.get("size", 4 * KB), seed=3, status=change.get("status"))
    if "sha256" in change:
        wanted["sha256"] = change["sha256"]
    error = run_job(worker, "bad.safetensors", [wanted])
    assert error["error_type"] == "validation", error
    assert expected in error["message"]
    assert error["prompt_id"] is None  # nothing was queued


def test_model_fields_are_validated(worker: WorkerProcess) -> None:
    body = worker.runsync(
        {"workflow": checkpoint_graph("x"), "models": [{"url": "ftp://h/x", "destination": "chekpoints"}]}
    )
    error = json.loads(str(body["error"]))
    assert error["error_type"] == "validation"
    assert "did you mean 'checkpoints'?" in error["message"] and "models[0].filename" in error["message"]


def test_an_internal_address_is_refused(tmp_path: Path, files: FileServer) -> None:
    cache = ModelCache(tmp_path / "cache", 10**9, 10**9, download_options(), 30.0, allowlist=())
    wanted = ModelConfig(url=files.url("/m/own.safetensors"), destination="loras", filename="own.safetensors")
    with pytest.raises(InputError) as caught:
        cache.prepare([wanted], lambda *_: None)
    assert "127.0.0.1" in caught.value.message and "INPUT_URL_ALLOWLIST" in caught.value.message


def download_options() -> DownloadOptions:
    return DownloadOptions(progress_bar=False, progress_interval_s=0.1)  # the cache guards its own sessions


def test_progress_says_which_file_and_how_far(tmp_path: Path, files: FileServer) -> None:
    allowlist = (ipaddress.ip_network(LOOPBACK),)
    cache = ModelCache(tmp_path / "cache", 10**9, 10**9, download_options(), 30.0, allowlist)
    files.add("/slow/lora.bin", make_data(384 * KB, 31), rate=384 * KB)  # 64 KiB every 1/6 s
    reports: list[tuple[str, int, int | None]] = []
    wanted = ModelConfig(url=files.url("/slow/lora.bin"), destination="loras", filename="slow.safetensors")
    cache.prepare([wanted], lambda name, done, total: reports.append((name, done, total))).release()
    assert len(reports) >= 2
    assert {name for name, _, _ in reports} == {"slow.safetensors"}
    assert all(total == 384 * KB for _, _, total in reports)
    assert [done for _, done, _ in reports] == sorted(done for _, done, _ in reports)


def test_a_model_in_use_is_not_evicted_and_a_renamed_url_replaces_the_old_file(
    tmp_path: Path, files: FileServer
) -> None:
    allowlist = (ipaddress.ip_network(LOOPBACK),)
    cache = ModelCache(tmp_path / "cache", 25 * KB, 10**9, download_options(), 30.0, allowlist)
    files.add("/p/a.bin", make_data(20 * KB, 21))
    files.add("/p/b.bin", make_data(20 * KB, 22))
    files.add("/p/a2.bin", make_data(8 * KB, 23))
    a = ModelConfig(url=files.url("/p/a.bin"), destination="loras", filename="a.safetensors")
    b = ModelConfig(url=files.url("/p/b.bin"), destination="loras", filename="b.safetensors")
    in_use = cache.prepare([a], lambda *_: None)  # a job still running with a
    done = cache.prepare([b], lambda *_: None)  # 40 KiB > 25 KiB, but a is pinned
    done.release()
    loras = tmp_path / "cache" / "loras"
    assert {path.name for path in loras.iterdir()} == {"a.safetensors", "b.safetensors"}
    renamed = ModelConfig(url=files.url("/p/a2.bin"), destination="loras", filename="a.safetensors")
    with pytest.raises(InputError, match="being downloaded or used by a running job"):
        cache.prepare([renamed], lambda *_: None)
    in_use.release()
    cache.prepare([renamed], lambda *_: None).release()  # now the newer file takes the name; b goes (LRU)
    assert (loras / "a.safetensors").read_bytes() == make_data(8 * KB, 23)
    assert not (loras / "b.safetensors").exists()


def test_two_workers_asking_for_one_model_fetch_it_once(tmp_path: Path, files: FileServer) -> None:
    allowlist = (ipaddress.ip_network(LOOPBACK),)
    files.add("/shared/big.bin", make_data(512 * KB, 41), rate=1024 * KB)
    wanted = ModelConfig(url=files.url("/shared/big.bin"), destination="loras", filename="shared.safetensors")
    caches = [  # two workers on one volume: separate objects, one cache folder
        ModelCache(tmp_path / "cache", 10**9, 10**9, download_options(), 30.0, allowlist) for _ in range(2)
    ]
    with ThreadPoolExecutor(2) as pool:
        pins = list(pool.map(lambda cache: cache.prepare([wanted], lambda *_: None), caches))
    for pin in pins:
        pin.release()
    assert files.bytes_sent["/shared/big.bin"] <= 512 * KB + 16  # the whole file once (plus 1-byte probes)
    assert (tmp_path / "cache" / "loras" / "shared.safetensors").read_bytes() == make_data(512 * KB, 41)
