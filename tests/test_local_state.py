"""Each worker's own ComfyUI state (COMFYUI_LOCAL_STATE): where the folders go, what ComfyUI is told, what is
taken from the volume, and what is removed. ``tests/test_fleet.py`` runs the whole endpoint."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.supervisor import JOBS_FOLDER, ComfySupervisor, prepare_folders
from comfy_worker.runtime import cleanup
from comfy_worker.settings import Settings

from .comfy_servers import stop_process
from .worker_process import STANDIN_DIR, ComfyBackend, backend_params, free_port

SERVERLESS = {"RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/e/job-take/$ID", "RUNPOD_POD_ID": "pod 7/x"}


def test_serverless_keeps_comfyuis_state_in_a_folder_of_the_workers_own(tmp_path: Path) -> None:
    s = Settings.from_env(SERVERLESS | {"COMFYUI_DIR": "/runpod-volume/ComfyUI", "COMFYUI_LOCAL_DIR": str(tmp_path)})
    own = tmp_path / f"comfy-worker-pod_7_x-{os.getpid()}"  # the pod id made a plain name
    assert s.comfyui_local_dir == own
    assert (s.comfyui_input_dir, s.comfyui_output_dir) == (own / "input", own / "output")
    assert (s.comfyui_temp_dir, s.comfyui_user_dir) == (own / "temp", own / "user")
    default = Settings.from_env(SERVERLESS | {"COMFYUI_DIR": "/runpod-volume/ComfyUI"})
    assert default.comfyui_local_dir is not None and default.comfyui_local_dir.parent == Path(tempfile.gettempdir())


def test_local_runs_and_pods_keep_comfyuis_folders_where_users_look() -> None:
    for env in ({}, {"RUNPOD_POD_ID": "pod"}, SERVERLESS | {"COMFYUI_LOCAL_STATE": "false"}):
        s = Settings.from_env(env | {"COMFYUI_DIR": "/workspace/ComfyUI"})
        assert s.comfyui_local_dir is None and s.comfyui_user_dir is None, env
        assert s.comfyui_input_dir == Path("/workspace/ComfyUI/input")
        assert s.comfyui_output_dir == Path("/workspace/ComfyUI/output")


def test_local_state_can_be_asked_for_and_named_folders_still_win(tmp_path: Path) -> None:
    env = {"COMFYUI_DIR": "/c", "COMFYUI_LOCAL_STATE": "true", "COMFYUI_LOCAL_DIR": str(tmp_path)}
    s = Settings.from_env(env | {"COMFYUI_OUTPUT_DIR": "/data/out"})
    assert s.comfyui_local_dir == tmp_path / f"comfy-worker-{os.getpid()}"
    assert s.comfyui_output_dir == Path("/data/out")
    assert s.comfyui_input_dir == tmp_path / f"comfy-worker-{os.getpid()}" / "input"
    assert Settings.from_env(SERVERLESS).comfyui_local_dir is None  # no COMFYUI_DIR: the worker starts no ComfyUI


def test_comfyui_is_told_its_user_folder_and_database(tmp_path: Path) -> None:
    env = SERVERLESS | {"COMFYUI_DIR": str(STANDIN_DIR), "COMFYUI_LOCAL_DIR": str(tmp_path)}
    s = Settings.from_env(env)
    command = ComfySupervisor(s).command()
    assert s.comfyui_user_dir is not None and s.comfyui_temp_dir is not None
    user = s.comfyui_user_dir.resolve()
    assert command[command.index("--user-directory") + 1] == str(user)
    assert command[command.index("--database-url") + 1] == f"sqlite:///{user}/comfyui.db"
    assert command[command.index("--temp-directory") + 1] == str(s.comfyui_temp_dir.parent.resolve())
    assert "--user-directory" not in ComfySupervisor(Settings.from_env({"COMFYUI_DIR": str(STANDIN_DIR)})).command()


def test_an_older_comfyui_without_the_flags_still_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ComfyUI exits at once on an unknown flag: a release without --database-url is not given it."""
    old = tmp_path / "ComfyUI"
    (old / "comfy").mkdir(parents=True)
    (old / "main.py").write_text("")
    (old / "comfy" / "cli_args.py").write_text('parser.add_argument("--user-directory", type=str)\n')
    s = Settings.from_env(SERVERLESS | {"COMFYUI_DIR": str(old), "COMFYUI_LOCAL_DIR": str(tmp_path)})
    with caplog.at_level(logging.WARNING):
        command = ComfySupervisor(s).command()
    assert "--user-directory" in command and "--database-url" not in command
    assert "no --database-url option" in caplog.text


def volume_with_state(tmp_path: Path) -> Path:
    """A ComfyUI checkout on the volume with what users and provisioning leave in its user and input folders."""
    volume = tmp_path / "volume" / "ComfyUI"
    shutil.copytree(STANDIN_DIR, volume, ignore=shutil.ignore_patterns("__pycache__", "input", "output", "temp"))
    manager = volume / "user" / "default" / "ComfyUI-Manager"
    manager.mkdir(parents=True)
    (manager / "config.ini").write_text("[default]\nnetwork_mode = offline\n")
    for name in ("comfyui.db", "comfyui.db-wal", "comfyui.db.bkp"):
        (volume / "user" / name).write_bytes(b"SQLite format 3\x00")
    (volume / "input" / "masks").mkdir(parents=True)
    (volume / "input" / "masks" / "m.png").write_bytes(b"mask")
    (volume / "input" / "example.png").write_bytes(b"example")
    (volume / "input" / "jobs" / "old-job").mkdir(parents=True)
    return volume


def test_the_workers_folders_start_from_the_volumes_settings_and_inputs(tmp_path: Path) -> None:
    volume = volume_with_state(tmp_path)
    s = Settings.from_env(SERVERLESS | {"COMFYUI_DIR": str(volume), "COMFYUI_LOCAL_DIR": str(tmp_path / "local")})
    assert s.comfyui_user_dir is not None and s.comfyui_input_dir is not None
    prepare_folders(s)
    user, inputs = s.comfyui_user_dir, s.comfyui_input_dir
    # ComfyUI-Manager's network_mode (provisioning writes it on the volume) still applies; no database is shared
    assert (user / "default" / "ComfyUI-Manager" / "config.ini").read_text().endswith("offline\n")
    assert sorted(p.name for p in user.iterdir()) == ["default"]
    # a workflow still reads the volume's input files by name; the old jobs' folders are not linked
    assert (inputs / "example.png").read_bytes() == b"example"
    assert (inputs / "masks" / "m.png").read_bytes() == b"mask"
    assert sorted(p.name for p in inputs.iterdir()) == ["example.png", "masks"]
    assert JOBS_FOLDER == cleanup.JOBS_FOLDER  # a linked jobs folder would put uploads onto the volume
    (user / "default" / "comfy.settings.json").write_text("{}")
    prepare_folders(s)  # a restarted ComfyUI keeps what it wrote
    assert (user / "default" / "comfy.settings.json").is_file()
    assert (s.comfyui_temp_dir or Path()).is_dir() and (s.comfyui_output_dir or Path()).is_dir()


def test_a_worker_leaves_the_volumes_temp_files_and_database_alone(tmp_path: Path) -> None:
    """A ComfyUI started by the worker empties only its own temp folder and opens only its own database; the
    worker removes its folder when it stops (links are unlinked, the volume's inputs stay)."""
    volume = volume_with_state(tmp_path)
    (volume / "temp").mkdir()
    (volume / "temp" / "ComfyUI_temp_other_00001_.png").write_bytes(b"another worker's preview")
    port = free_port()
    env = SERVERLESS | {
        "COMFYUI_DIR": str(volume),
        "COMFYUI_LOCAL_DIR": str(tmp_path / "local"),
        "COMFY_API_URL": f"http://127.0.0.1:{port}",
        "COMFYUI_PYTHON": sys.executable,
    }
    s = Settings.from_env(env)
    supervisor = ComfySupervisor(s)
    client = ComfyClient(s.comfy_api_url, client_id="test")
    assert s.comfyui_local_dir is not None and s.comfyui_user_dir is not None
    try:
        supervisor.launch_early()
        supervisor.wait_ready(client, timeout_s=60)
        assert (s.comfyui_user_dir / "comfyui.db").is_file()
        assert (volume / "temp" / "ComfyUI_temp_other_00001_.png").is_file()
    finally:
        supervisor.stop()
        client.close()
    assert not s.comfyui_local_dir.exists()
    assert (volume / "input" / "example.png").read_bytes() == b"example"
    assert (volume / "user" / "comfyui.db").read_bytes() == b"SQLite format 3\x00"


def test_cleanup_job_files_false_keeps_the_workers_folder(tmp_path: Path) -> None:
    env = SERVERLESS | {
        "COMFYUI_DIR": str(STANDIN_DIR),
        "COMFYUI_LOCAL_DIR": str(tmp_path),
        "COMFY_API_URL": f"http://127.0.0.1:{free_port()}",
        "COMFYUI_PYTHON": sys.executable,
        "CLEANUP_JOB_FILES": "false",
    }
    s = Settings.from_env(env)
    supervisor = ComfySupervisor(s)
    client = ComfyClient(s.comfy_api_url, client_id="test")
    try:
        supervisor.launch_early()
        supervisor.wait_ready(client, timeout_s=60)
    finally:
        supervisor.stop()
        client.close()
    assert s.comfyui_local_dir is not None and (s.comfyui_local_dir / "user").is_dir()


@pytest.mark.parametrize("backend", backend_params())
def test_comfyui_deletes_its_temp_folder_at_start_and_at_a_clean_exit(backend: ComfyBackend, tmp_path: Path) -> None:
    """Why a shared temp folder loses files: what the stand-in must do as ComfyUI does (main.py's
    cleanup_temp() before it serves and after Ctrl-C)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    (temp / "before.png").write_bytes(b"x")
    port = free_port()
    command = [backend.python, str(backend.comfyui_dir / "main.py"), "--cpu", "--port", str(port)]
    command += ["--temp-directory", str(tmp_path), "--input-directory", str(tmp_path / "input")]
    command += ["--output-directory", str(tmp_path / "output"), "--disable-auto-launch"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = ComfyClient(f"http://127.0.0.1:{port}", client_id="test")
    try:
        deadline = time.monotonic() + backend.boot_timeout_s
        while not client.is_ready(timeout_s=1.0):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert not (temp / "before.png").exists()
        (temp / "during.png").write_bytes(b"x")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        assert not temp.exists()
    finally:
        client.close()
        stop_process(process)
