"""``start.sh``, the entrypoint: local mode serves the runpod local API, RunPod mode takes jobs."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO
from .runpod_platform import RunpodPlatform
from .worker_process import ComfyBackend, free_port, runsync_when_up, stop, worker_env

MODEL_FREE = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "start_sh"}},
}


def nothing_to_provision(root: Path) -> dict[str, str]:
    """A volume in ``root`` and a config without nodes or models: start.sh's provisioning has nothing to do."""
    return {"WORKER_PYTHON": sys.executable, "WORKSPACE": str(root / "volume"), "CONFIG_YML": "nodes: []\n"}


def test_local_mode_serves_the_local_api(tmp_path: Path) -> None:
    api_port = free_port()
    env = worker_env(
        ComfyBackend.standin(), tmp_path, free_port(), RP_API_PORT=str(api_port), **nothing_to_provision(tmp_path)
    )
    log = tmp_path / "start.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(REPO / "start.sh")], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        body = runsync_when_up(f"http://127.0.0.1:{api_port}", MODEL_FREE, process, log, timeout_s=60)
        assert body["status"] == "COMPLETED", body
        assert "local mode: the runpod local API on 127.0.0.1:" in log.read_text()
    finally:
        stop(process)


def test_runpod_mode_takes_jobs(tmp_path: Path) -> None:
    env = worker_env(ComfyBackend.standin(), tmp_path, free_port(), **nothing_to_provision(tmp_path))
    with RunpodPlatform() as platform:
        worker = platform.spawn([str(REPO / "start.sh")], extra_env=env, cwd=tmp_path, log_path=tmp_path / "w.log")
        job = platform.submit({"workflow": MODEL_FREE})
        assert platform.wait_result(job, timeout=60)["output"]["status"] == "success"
        assert "local mode" not in worker.log()
        assert worker.terminate() == 0


def test_sigterm_stops_the_worker_and_the_comfyui_it_started(tmp_path: Path) -> None:
    """Docker stops a container with SIGTERM to start.sh (PID 1): every child must go, ComfyUI included."""
    api_port, comfy_port = free_port(), free_port()
    env = worker_env(
        ComfyBackend.standin(), tmp_path, comfy_port, RP_API_PORT=str(api_port), **nothing_to_provision(tmp_path)
    )
    log = tmp_path / "start.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(REPO / "start.sh")], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        runsync_when_up(f"http://127.0.0.1:{api_port}", MODEL_FREE, process, log, timeout_s=60)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert "start.sh: stopping (SIGTERM)" in log.read_text()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", comfy_port), timeout=1).close()
    finally:
        stop(process)
