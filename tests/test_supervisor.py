"""The ComfyUI process as the worker's log shows it: how long ComfyUI took from its launch, and a log a person
can read (ComfyUI's per-folder lines at DEBUG, its output forwarded once)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.supervisor import ComfySupervisor

from .worker_process import ComfyBackend, free_port, worker_settings


def test_the_wait_is_counted_from_comfyuis_launch(tmp_path: Path) -> None:
    port = free_port()
    settings = worker_settings(ComfyBackend.standin(), tmp_path, port, COMFYUI_ARGS="--standin-startup-delay 1.5")
    supervisor = ComfySupervisor(settings)
    client = ComfyClient(settings.comfy_api_url, client_id="test")
    try:
        supervisor.launch_early()
        time.sleep(1.0)  # the worker's own imports run meanwhile
        waited = supervisor.wait_ready(client)
    finally:
        supervisor.stop()
        client.close()
    assert waited >= 1.5  # counted from the launch, not from when the worker started waiting


def test_comfyuis_per_folder_lines_are_debug_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = worker_settings(ComfyBackend.standin(), tmp_path, free_port())
    supervisor = ComfySupervisor(settings)
    lines = "Adding extra search path checkpoints /volume/models/checkpoints\nTo see the GUI go to: http://x\n"
    process = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.stdout.write({lines!r})"], stdout=subprocess.PIPE, text=True
    )
    with caplog.at_level(logging.DEBUG, logger="comfyui"):
        supervisor._pump_log(process)
    process.wait(timeout=10)
    levels = {record.getMessage(): record.levelno for record in caplog.records if record.name == "comfyui"}
    assert levels == {
        "Adding extra search path checkpoints /volume/models/checkpoints": logging.DEBUG,
        "To see the GUI go to: http://x": logging.INFO,
    }
    assert supervisor.log_tail()[0].startswith("Adding extra search path")  # kept for error reports
