"""Shared fixtures: isolation from the developer's environment, and paths to the recorded material."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from .worker_process import WORKER_ENV_PREFIXES

REPO = Path(__file__).resolve().parents[1]
# Recordings of a real ComfyUI 0.3.64 (see the README there): the stand-in's contract and its node list.
TRANSCRIPTS = REPO / "tests" / "comfyui_transcripts"
EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(WORKER_ENV_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    # The runpod SDK's start-up checks otherwise open a connection to a public DNS server.
    monkeypatch.setenv("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    monkeypatch.setenv("RUNPOD_SKIP_GPU_CHECK", "true")


def load_transcript(name: str) -> dict[str, Any]:
    """A recorded transcript; a missing one fails the test (the recordings are part of the repository)."""
    data: dict[str, Any] = json.loads((TRANSCRIPTS / name).read_text())
    return data


def recorded_history(name: str) -> list[dict[str, Any]]:
    """Every ``/history/{id}`` entry a transcript recorded, in order."""
    entries = []
    for event in load_transcript(name)["events"]:
        if event["kind"] == "http_response" and event["path"].startswith("/history/") and event["status"] == 200:
            body = event["body"]["json"]
            entries.extend(body.values())
    return entries


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The image tier's image sizes and start-up times, after the results."""
    from .docker_image import FIGURES, SIZES

    for line in SIZES:
        terminalreporter.write_line(f"image size: {line}")
    for line in FIGURES:
        terminalreporter.write_line(f"image tier: {line}")
