"""Run the real worker (``handler.py``) as a subprocess in front of a ComfyUI, as a user would.

``ComfyBackend`` says which ComfyUI the worker launches: the stand-in in ``tests/standin_comfyui`` (fast
tests) or a real checkout named by ``COMFYUI_DIR`` (with ``COMFYUI_PYTHON`` as its interpreter).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from comfy_worker.runtime.job import Worker
from comfy_worker.settings import Settings

from .processes import stop_group

REPO = Path(__file__).resolve().parents[1]
STANDIN_DIR = REPO / "tests" / "standin_comfyui"
# Every variable the worker reads starts with one of these: none of the developer's may leak into a test.
WORKER_ENV_PREFIXES = (
    "COMFY",
    "RUNPOD_",
    "JOB_",
    "BUCKET_",
    "S3_",
    "INPUT_URL_",
    "INPUT_IMAGE_",
    "OUTPUT_CONVERT_",
    "MAX_RESULT",
    "CLEANUP_",
    "WARMUP_",
    "REFRESH_",
    "INTERRUPT_",
    "PROGRESS_",
    "LOG_LEVEL",
    "WORKER_PYTHON",
    "WORKER_PID_FILE",
    "RP_API_",
    "WORKSPACE",
    "MODELS_DIR",
    "CONFIG_YML",
    "BAKED_CONFIG",
    "PROVISION_",
    "NODE_INSTALL_",
    "JUPYTER_",
    "HF_",
    "CIVITAI_",
    "DOWNLOAD_",
)


# How soon after its timeout a timed-out job's result must come (the README's promise is about 3 s; a loaded
# test machine gets a little more).
TIMEOUT_MARGIN_S = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ComfyBackend:
    """Which ComfyUI the worker starts, and with which Python."""

    name: str
    comfyui_dir: Path
    python: str
    boot_timeout_s: float

    @classmethod
    def standin(cls) -> ComfyBackend:
        return cls("standin", STANDIN_DIR, sys.executable, 60.0)  # a loaded 2-core machine

    @classmethod
    def real(cls) -> ComfyBackend | None:
        raw = os.environ.get("COMFYUI_DIR", "").strip()
        if not raw:
            return None
        return cls("real", Path(raw), os.environ.get("COMFYUI_PYTHON", "").strip() or sys.executable, 180.0)


def backend_params() -> list[Any]:
    """The stand-in always; a real ComfyUI too when COMFYUI_DIR is set (skipped with that reason otherwise)."""
    real = ComfyBackend.real()
    return [
        pytest.param(ComfyBackend.standin(), id="standin"),
        pytest.param(
            real,
            id="real",
            marks=[
                pytest.mark.comfyui,
                pytest.mark.skipif(real is None, reason="set COMFYUI_DIR to a ComfyUI checkout to run against it"),
            ],
        ),
    ]


@dataclass
class WorkerProcess:
    """A running ``handler.py`` and the folders of its ComfyUI."""

    process: subprocess.Popen[bytes]
    env: dict[str, str]
    root: Path
    log_path: Path
    comfy_url: str
    api_url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def runsync(self, job_input: dict[str, object], timeout_s: float = 120) -> dict[str, object]:
        # json.dumps, not requests' json=: it writes NaN and Infinity as a client's JSON library may
        body = json.dumps({"input": job_input})
        headers = {"Content-Type": "application/json"}
        response = requests.post(f"{self.api_url}/runsync", data=body, headers=headers, timeout=timeout_s)
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body


def worker_env(backend: ComfyBackend, root: Path, comfy_port: int, **extra: str) -> dict[str, str]:
    """The environment a test worker runs with: only loopback (ComfyUI and Jupyter too, where start.sh would
    listen on 0.0.0.0), folders and the pid file under ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(WORKER_ENV_PREFIXES)}
    env |= {
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "RUNPOD_SKIP_GPU_CHECK": "true",
        "COMFYUI_DIR": str(backend.comfyui_dir),
        "COMFYUI_PYTHON": backend.python,
        "COMFY_API_URL": f"http://127.0.0.1:{comfy_port}",
        "COMFYUI_INPUT_DIR": str(root / "input"),
        "COMFYUI_OUTPUT_DIR": str(root / "output"),
        "COMFYUI_TEMP_DIR": str(root / "temp"),
        "COMFYUI_LISTEN": "127.0.0.1",
        "JUPYTER_LISTEN": "127.0.0.1",
        "WORKER_PID_FILE": str(root / "worker.pid"),
        "COMFY_STARTUP_TIMEOUT": str(backend.boot_timeout_s),
        "PROGRESS_INTERVAL": "0",
        "LOG_LEVEL": "INFO",
    }
    return env | extra


def worker_settings(backend: ComfyBackend, root: Path, comfy_port: int, **extra: str) -> Settings:
    """Settings for an in-process ``Worker`` (``app.build_worker``), from the same environment."""
    return Settings.from_env(worker_env(backend, root, comfy_port, **extra))


def close_worker(worker: Worker) -> None:
    """Stop an in-process worker: its WebSocket reader, HTTP session and the ComfyUI it started."""
    worker.events.close()
    worker.client.close()
    if worker.supervisor is not None:
        worker.supervisor.stop()


def runsync_when_up(
    url: str, workflow: dict[str, Any], process: subprocess.Popen[bytes], log: Path, timeout_s: float = 120
) -> dict[str, Any]:
    """POST ``workflow`` to ``url``/runsync once the worker (started as ``process``, writing ``log``) listens."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, log.read_text()
        try:
            body: dict[str, Any] = requests.post(
                f"{url}/runsync", json={"input": {"workflow": workflow}}, timeout=60
            ).json()
            return body
        except requests.ConnectionError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)


def stop(process: subprocess.Popen[bytes], grace_s: float = 15, first_signal: int = signal.SIGINT) -> None:
    """Ctrl-C (SIGINT) for ``handler.py``, SIGTERM for ``start.sh`` (what Docker sends; a shell's background
    children ignore SIGINT), then SIGKILL for whatever is left of the process group (ComfyUI, Jupyter)."""
    stop_group(process, first_signal, grace_s)


@contextlib.contextmanager
def serve_api(backend: ComfyBackend, root: Path, **extra_env: str) -> Iterator[WorkerProcess]:
    """``python handler.py --rp_serve_api`` on a free loopback port, ready when it yields."""
    root.mkdir(parents=True, exist_ok=True)
    comfy_port, api_port = free_port(), free_port()
    env = worker_env(backend, root, comfy_port, **extra_env)
    log_path = root / "worker.log"
    command = [
        sys.executable,
        str(REPO / "handler.py"),
        "--rp_serve_api",
        "--rp_api_host",
        "127.0.0.1",
        "--rp_api_port",
        str(api_port),
        "--rp_log_level",
        "INFO",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    worker = WorkerProcess(process, env, root, log_path, env["COMFY_API_URL"], f"http://127.0.0.1:{api_port}")
    try:
        deadline = time.monotonic() + backend.boot_timeout_s + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the worker exited with {process.returncode}:\n{worker.log()[-4000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{worker.api_url}/", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker's local API did not come up:\n{worker.log()[-4000:]}")
            time.sleep(0.2)
        yield worker
    finally:
        stop(process)
