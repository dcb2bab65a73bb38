"""The ComfyUI process as the worker's log shows it: how long ComfyUI took from its launch, and a log a person
can read (ComfyUI's chatter at DEBUG: per-folder lines, alembic's, refused prompts; its output forwarded once)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.errors import ComfyUnavailableError

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


def test_a_stopped_comfyui_is_never_started_again(tmp_path: Path) -> None:
    # A background watch that sees ComfyUI gone after the worker stopped it asks for a restart: none may start.
    settings = worker_settings(ComfyBackend.standin(), tmp_path, free_port())
    supervisor = ComfySupervisor(settings)
    client = ComfyClient(settings.comfy_api_url, client_id="test")
    try:
        supervisor.launch_early()
        supervisor.wait_ready(client)
        assert supervisor.restartable
        supervisor.stop()
        assert not supervisor.restartable
        with pytest.raises(ComfyUnavailableError, match="stopping"):
            supervisor.restart(client)
        assert not supervisor.alive()
    finally:
        supervisor.stop()
        client.close()


CHATTER = [
    "Adding extra search path checkpoints /volume/models/checkpoints",
    "INFO  [alembic.runtime.migration] Context impl SQLiteImpl.",
    "INFO  [alembic.runtime.migration] Will assume non-transactional DDL.",
    "INFO  [alembic.runtime.migration] Running upgrade  -> e9c714da8d57, init",
    "invalid prompt: {'type': 'prompt_outputs_failed_validation', 'message': 'Prompt outputs failed validation'}",
]
WORTH_READING = [
    "To see the GUI go to: http://x",
    "Prompt executed in 0.42 seconds",
    "ERROR [alembic.runtime.migration] the upgrade failed",  # not chatter: a failing migration is news
]


def test_comfyuis_chatter_is_debug_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Dozens of per-folder lines and alembic's migration check at every start, and ComfyUI's own line for a
    refused prompt, which repeats the worker's warning: at DEBUG, and still in the tail for error reports."""
    settings = worker_settings(ComfyBackend.standin(), tmp_path, free_port())
    supervisor = ComfySupervisor(settings)
    lines = "".join(f"{line}\n" for line in CHATTER + WORTH_READING)
    process = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.stdout.write({lines!r})"], stdout=subprocess.PIPE, text=True
    )
    with caplog.at_level(logging.DEBUG, logger="comfyui"):
        supervisor._pump_log(process)
    process.wait(timeout=10)
    levels = {record.getMessage(): record.levelno for record in caplog.records if record.name == "comfyui"}
    assert levels == {line: logging.DEBUG for line in CHATTER} | {line: logging.INFO for line in WORTH_READING}
    assert supervisor.log_tail() == CHATTER + WORTH_READING  # kept for error reports


def test_the_standins_start_has_comfyuis_alembic_lines_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = worker_settings(ComfyBackend.standin(), tmp_path, free_port())
    supervisor = ComfySupervisor(settings)
    client = ComfyClient(settings.comfy_api_url, client_id="test")
    try:
        with caplog.at_level(logging.DEBUG, logger="comfyui"):
            supervisor.launch_early()
            supervisor.wait_ready(client)
    finally:
        supervisor.stop()
        client.close()
    assert supervisor._reader is not None
    supervisor._reader.join(timeout=10)  # its last lines in
    alembic = [record for record in caplog.records if "[alembic." in record.getMessage()]
    assert alembic and {record.levelno for record in alembic} == {logging.DEBUG}
    assert any(record.levelno == logging.INFO for record in caplog.records if record.name == "comfyui")


@pytest.mark.parametrize("flag", ["--normalvram", "--disable-ipex-optimize"])
def test_a_flag_this_comfyui_does_not_know_is_named_with_where_it_came_from(tmp_path: Path, flag: str) -> None:
    """ComfyUI 0.38 removed --normalvram and --disable-ipex-optimize: a COMFYUI_ARGS written for 0.3.64 makes it
    exit with argparse's status 2, and the start-up error says which flag and where to remove it."""
    args = f"--disable-smart-memory {flag}"
    settings = worker_settings(
        ComfyBackend.standin(), tmp_path, free_port(), COMFYUI_ARGS=args, STANDIN_COMFYUI_FLAVOUR="0.38"
    )
    supervisor = ComfySupervisor(settings)
    client = ComfyClient(settings.comfy_api_url, client_id="test")
    try:
        supervisor.launch_early()
        with pytest.raises(ComfyUnavailableError) as raised:
            supervisor.wait_ready(client)
    finally:
        supervisor.stop()
        client.close()
    message = raised.value.message
    assert message.startswith("ComfyUI exited with code 2 before it was ready: it refused its command line")
    assert f"unrecognized arguments: {flag}" in message
    assert f"COMFYUI_ARGS (--disable-smart-memory {flag})" in message
    assert any(f"unrecognized arguments: {flag}" in line for line in raised.value.details["log_tail"])
