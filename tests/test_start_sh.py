"""``start.sh``, the entrypoint: local mode serves the runpod local API, RunPod mode takes jobs."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO
from .file_server import FileServer, make_data
from .runpod_platform import RunpodPlatform
from .worker_process import ComfyBackend, free_port, runsync_when_up, stop, worker_env

MODEL_FREE = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "start_sh"}},
}


def nothing_to_provision(root: Path) -> dict[str, str]:
    """A volume in ``root`` and a config without nodes or models: start.sh's provisioning has nothing to do."""
    return {"WORKER_PYTHON": sys.executable, "WORKSPACE": str(root / "volume"), "CONFIG_YML": "nodes: []\n"}


def start_sh(env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """``start.sh`` in a process group of its own, output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(REPO / "start.sh")], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def group_members(pgid: int) -> list[str]:
    """The processes still in the process group ``pgid`` (zombies left out: they are only waiting to be reaped)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(stat.parent.name)
    return members


def test_local_mode_serves_the_local_api(tmp_path: Path) -> None:
    api_port = free_port()
    env = worker_env(
        ComfyBackend.standin(), tmp_path, free_port(), RP_API_PORT=str(api_port), **nothing_to_provision(tmp_path)
    )
    log = tmp_path / "start.log"
    process = start_sh(env, log, cwd=tmp_path)
    try:
        body = runsync_when_up(f"http://127.0.0.1:{api_port}", MODEL_FREE, process, log, timeout_s=180)
        assert body["status"] == "COMPLETED", body
        assert "local mode: the runpod local API on 127.0.0.1:" in log.read_text()
    finally:
        stop(process, first_signal=signal.SIGTERM)


def test_runpod_mode_takes_jobs(tmp_path: Path) -> None:
    env = worker_env(ComfyBackend.standin(), tmp_path, free_port(), **nothing_to_provision(tmp_path))
    with RunpodPlatform() as platform:
        worker = platform.spawn([str(REPO / "start.sh")], extra_env=env, cwd=tmp_path, log_path=tmp_path / "w.log")
        job = platform.submit({"workflow": MODEL_FREE})
        assert platform.wait_result(job, timeout=180)["output"]["status"] == "success"
        assert "local mode" not in worker.log()
        assert worker.terminate() == 0


def test_sigterm_stops_the_worker_and_the_comfyui_it_started(tmp_path: Path) -> None:
    """Docker stops a container with SIGTERM to start.sh (PID 1): every child must go, ComfyUI included."""
    api_port, comfy_port = free_port(), free_port()
    env = worker_env(
        ComfyBackend.standin(), tmp_path, comfy_port, RP_API_PORT=str(api_port), **nothing_to_provision(tmp_path)
    )
    log = tmp_path / "start.log"
    process = start_sh(env, log)
    try:
        runsync_when_up(f"http://127.0.0.1:{api_port}", MODEL_FREE, process, log, timeout_s=180)
        process.send_signal(signal.SIGTERM)  # start.sh exec'd the worker: the signal reaches it directly
        process.wait(timeout=60)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", comfy_port), timeout=1).close()
        assert group_members(process.pid) == [], "a child of start.sh outlived it"
    finally:
        stop(process, first_signal=signal.SIGTERM)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_the_worker_and_jupyter_beside_it(tmp_path: Path, stop_signal: signal.Signals) -> None:
    """With Jupyter, start.sh keeps running as the worker's parent: Ctrl-C (SIGINT) and SIGTERM must stop both.

    A script's background children ignore SIGINT (bash sets them so), so passing SIGINT on stopped nothing:
    start.sh waited for ever, and the worker, its ComfyUI and Jupyter outlived a test's SIGKILL of start.sh."""
    record = tmp_path / "jupyter-argv.json"
    (tmp_path / "fake-jupyter").mkdir()
    (tmp_path / "fake-jupyter" / "jupyter.py").write_text(
        "import json, sys, time\n"
        "if '--version' in sys.argv: print('4.4'); sys.exit(0)\n"
        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "time.sleep(600)\n"
    )
    api_port = free_port()
    env = worker_env(
        ComfyBackend.standin(),
        tmp_path,
        free_port(),
        RP_API_PORT=str(api_port),
        JUPYTER_PASSWORD="s3cret",
        JUPYTER_PORT=str(free_port()),
        PYTHONPATH=str(tmp_path / "fake-jupyter"),
        **nothing_to_provision(tmp_path),
    )
    log = tmp_path / "start.log"
    process = start_sh(env, log)
    try:
        body = runsync_when_up(f"http://127.0.0.1:{api_port}", MODEL_FREE, process, log, timeout_s=180)
        assert body["status"] == "COMPLETED", body
        deadline = time.monotonic() + 120
        while not record.exists():
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.1)
        assert len(group_members(process.pid)) >= 3, "start.sh, the worker, Jupyter (and ComfyUI)"
        process.send_signal(stop_signal)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"start.sh still runs 60 s after {stop_signal.name}:\n{log.read_text()[-3000:]}")
        deadline = time.monotonic() + 60  # Jupyter is stopped after the worker exits, without waiting for it
        while group_members(process.pid):
            assert time.monotonic() < deadline, f"left running: {group_members(process.pid)}"
            time.sleep(0.1)
        assert f"start.sh: stopping (SIG{stop_signal.name.removeprefix('SIG')})" in log.read_text()
    finally:
        stop(process, first_signal=signal.SIGTERM)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_provisioning_stops_start_sh_at_once(tmp_path: Path, stop_signal: signal.Signals) -> None:
    """A download is under way (the server holds it back for good): the signal must not wait for it (docker
    stop kills after 10 s; the image tier times that)."""
    server = FileServer(tmp_path / "served")
    try:
        data = make_data(2 * 1024 * 1024)
        server.add("/slow.safetensors", data, hold_at=64 * 1024)
        config = (
            f"nodes: []\nmodels:\n  - url: {server.url('/slow.safetensors')}\n    destination: checkpoints\n"
            f"    sha256: {hashlib.sha256(data).hexdigest()}\n"
        )
        env = worker_env(
            ComfyBackend.standin(), tmp_path, free_port(), **{**nothing_to_provision(tmp_path), "CONFIG_YML": config}
        )
        log = tmp_path / "start.log"
        process = start_sh(env, log)
        try:
            deadline = time.monotonic() + 180
            while not list((tmp_path / "volume" / "models" / "checkpoints").glob("*.part")):
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            process.send_signal(stop_signal)
            assert process.wait(timeout=60) != 0
            name = stop_signal.name.removeprefix("SIG")
            assert f"start.sh: stopping (SIG{name})" in log.read_text()
            assert "local mode" not in log.read_text()  # it did not go on to start the worker
            assert group_members(process.pid) == [], "the provisioning outlived start.sh"
        finally:
            stop(process, first_signal=signal.SIGTERM)
    finally:
        server.close()


def test_make_venv_skips_uv_while_the_requirements_are_unchanged(tmp_path: Path) -> None:
    """./start.sh outside the image: the worker's own requirements are installed once, not at every start."""
    for name in ("start.sh", "requirements.txt", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(f'#!/bin/sh\necho "$*" >>{tmp_path / "uv.log"}\n')
    (bin_dir / "uv").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}

    def make_venv() -> list[str]:
        subprocess.run(["bash", "-c", "source ./start.sh && make_venv"], cwd=tmp_path, env=env, check=True)
        uv_log = tmp_path / "uv.log"
        return uv_log.read_text().splitlines() if uv_log.exists() else []

    assert len(make_venv()) == 1  # the first time: uv pip install
    assert len(make_venv()) == 1  # unchanged: no uv call at all
    with (tmp_path / "requirements.txt").open("a") as requirements:
        requirements.write("# changed\n")
    assert len(make_venv()) == 2
