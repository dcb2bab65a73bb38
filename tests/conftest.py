"""Shared fixtures: isolation from the developer's environment, and paths to the recorded material."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from .worker_process import WORKER_ENV_PREFIXES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRANSCRIPTS = SHARED / "comfyui" / "transcripts"
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
    path = TRANSCRIPTS / name
    if not path.is_file():
        pytest.skip(f"recorded transcript {path} is missing (the shared/ folder must sit beside the checkout)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def recorded_history(name: str) -> list[dict[str, Any]]:
    """Every ``/history/{id}`` entry a transcript recorded, in order."""
    entries = []
    for event in load_transcript(name)["events"]:
        if event["kind"] == "http_response" and event["path"].startswith("/history/") and event["status"] == 200:
            body = event["body"]["json"]
            entries.extend(body.values())
    return entries
