"""The worker starts whatever its settings say, through the real runpod SDK: a bad value fails every job with a
``configuration`` error naming the variable (the worker keeps serving, where a crash would be a restart loop on
RunPod), every documented LOG_LEVEL starts it, and provisioning writes its status whatever LOG_LEVEL holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import EXAMPLES, REPO
from .worker_process import ComfyBackend, free_port, serve_api, worker_env


@pytest.mark.parametrize(
    "env",
    [
        {"LOG_LEVEL": "DEBUG"},
        {"LOG_LEVEL": "INFO"},
        {"LOG_LEVEL": "WARNING"},
        {"LOG_LEVEL": "WARN"},
        {"LOG_LEVEL": "ERROR"},
        {"LOG_LEVEL": "CRITICAL"},
        {"LOG_LEVEL": "INFO", "RUNPOD_LOG_LEVEL": "WARNING"},
    ],
    ids=lambda env: "-".join(env.values()),
)
def test_every_documented_log_level_starts_the_worker(env: dict[str, str], tmp_path: Path) -> None:
    """LOG_LEVEL=WARNING went to the SDK as RUNPOD_LOG_LEVEL, and its logger raised ``Invalid debug level`` at
    import: the worker never served. No --rp_log_level here, which would hide it."""
    job = (EXAMPLES / "requests" / "model_free.json").read_text()
    done = subprocess.run(
        [sys.executable, str(REPO / "handler.py"), "--test_input", job],
        cwd=tmp_path,
        env=worker_env(ComfyBackend.standin(), tmp_path, free_port(), **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Invalid debug level" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DOWNLOAD_CONCURRENCY": "0"}, "DOWNLOAD_CONCURRENCY='0' must be at least 1"),
        ({"MODEL_CACHE_DIR": "/proc/nope"}, "MODEL_CACHE_DIR='/proc/nope' is not a folder the worker can write to"),
    ],
    ids=["download-concurrency", "model-cache-dir"],
)
def test_a_bad_download_setting_fails_every_job_instead_of_the_worker(
    env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    env = {"MODEL_CACHE_DIR": str(tmp_path / "cache")} | env  # start.sh always sets it
    with serve_api(ComfyBackend.standin(), tmp_path / "worker", **env) as worker:
        for _ in range(2):
            body = worker.runsync({"workflow": {}})
            assert body["status"] == "FAILED", body
            error = json.loads(str(body["error"]))
            assert error["error_type"] == "configuration", error
            assert expected in error["message"]
        assert worker.process.poll() is None


def test_provisioning_writes_its_status_whatever_log_level_says(tmp_path: Path) -> None:
    """A LOG_LEVEL that logging refuses stopped provisioning before status.json and before the paths start.sh
    hands the worker, so every job failed with an unrelated message."""
    env = dict(os.environ, WORKSPACE=str(tmp_path), CONFIG_YML="nodes: [", LOG_LEVEL="loud")
    done = subprocess.run(
        [sys.executable, "-m", "comfy_worker.provision", "--print-env"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "LOG_LEVEL='loud' is not one of" in done.stderr, done.stderr
    status = json.loads((tmp_path / ".comfy-worker" / "status.json").read_text())
    assert status["failed"][0]["kind"] == "config", status  # the config's own error, reported as ever
    assert f"PROVISION_STATUS={tmp_path}/.comfy-worker/status.json" in done.stdout.splitlines()
