"""``python handler.py --test_input`` and ``./test_input.json``: the runpod SDK's one-job local mode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO
from .worker_process import ComfyBackend, free_port, worker_env


def run_handler(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = worker_env(ComfyBackend.standin(), cwd, free_port())
    return subprocess.run(
        [sys.executable, str(REPO / "handler.py"), "--rp_log_level", "INFO", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_test_input_json_in_the_working_directory(tmp_path: Path) -> None:
    shutil.copy(REPO / "test_input.json", tmp_path / "test_input.json")
    done = run_handler(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Job local_test completed successfully." in done.stdout
    assert "'status': 'success'" in done.stdout
    assert "'filename': 'model_free_00001_.png'" in done.stdout


def test_test_input_flag_and_a_failing_job(tmp_path: Path) -> None:
    bad = {"input": {"workflow": {"1": {"class_type": "NoSuchNodeXYZ", "inputs": {}}}}}
    done = run_handler(tmp_path, "--test_input", json.dumps(bad))
    assert done.returncode == 1, "a failed job makes the SDK exit 1"
    assert '"error_type": "workflow_validation"' in done.stdout
    assert "no node type NoSuchNodeXYZ (node 1)" in done.stdout


def test_the_sdks_own_debug_lines_are_masked(tmp_path: Path) -> None:
    secret = "hf_DebugLineSecret0123456789"
    texting = {
        "1": {
            "class_type": "StandinSaveFile",
            "inputs": {"filename_prefix": "t", "kind": "text", "extension": "txt", "content": f"key={secret}"},
        }
    }
    env = worker_env(ComfyBackend.standin(), tmp_path, free_port(), HF_TOKEN=secret)
    job = json.dumps({"input": {"workflow": texting}})
    done = subprocess.run(
        [sys.executable, str(REPO / "handler.py"), "--rp_log_level", "DEBUG", "--test_input", job],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "key=***" in done.stdout, "the SDK printed the job's input and output, masked"
    assert secret not in done.stdout + done.stderr
