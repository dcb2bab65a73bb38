"""ComfyUI alive, its WebSocket cut by a real TCP proxy: the worker reconnects (and takes the job's outputs
from /history, as frames were lost), and a job ComfyUI finished while the socket was down still completes
(seen through /history). Stand-in, and real ComfyUI when set.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfy_worker.runtime.app import build_worker
from comfy_worker.runtime.job import Worker

from .tcp_proxy import tcp_proxy
from .worker_process import ComfyBackend, backend_params, close_worker, free_port, worker_settings


@pytest.fixture(params=backend_params())
def comfy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Worker, ComfyBackend]]:
    """A worker that started its ComfyUI; the tests attach second workers to it through the proxy."""
    backend: ComfyBackend = request.param
    owner = build_worker(worker_settings(backend, tmp_path / "owner", free_port()))
    assert owner.startup_error is None
    yield owner, backend
    close_worker(owner)


def long_job(backend: ComfyBackend, prefix: str) -> dict[str, Any]:
    """About 1.5 s on the stand-in, several seconds of blurring on a real ComfyUI."""
    slow: dict[str, Any] = (
        {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": 1.5}}
        if backend.name == "standin"
        else {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}}
    )
    size = 8 if backend.name == "standin" else 2048
    return {
        "workflow": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": 3}},
            "2": slow,
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
        },
        "timeout": 120,
    }


def run(worker: Worker, job_input: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(worker.run("socket", job_input, lambda _message: None))


def test_dropped_websocket_reconnects_and_completes(
    comfy: tuple[Worker, ComfyBackend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, backend = comfy
    with tcp_proxy(owner.settings.comfy_port) as proxy:
        proxied = build_worker(worker_settings(backend, tmp_path, proxy.port))
        try:
            assert proxied.supervisor is not None and proxied.supervisor.attached
            asked: list[str] = []
            history = proxied.client.history
            monkeypatch.setattr(proxied.client, "history", lambda p: asked.append(p) or history(p))
            cut: list[int] = []
            threading.Timer(0.5, lambda: cut.append(proxy.cut_websockets())).start()
            result = run(proxied, long_job(backend, "drop"))
            assert cut == [1], "the worker's socket was cut during the job"
            assert result.get("status") == "success", result
            assert result["images"]
            assert result["prompt_id"] in asked, "frames may be lost in a gap: the outputs come from /history"
            assert proxied.events.wait_connected(5), "the worker reconnected"
        finally:
            close_worker(proxied)


def test_completion_seen_through_history_while_the_socket_is_down(
    comfy: tuple[Worker, ComfyBackend], tmp_path: Path
) -> None:
    owner, backend = comfy
    hold_s = 5.0 if backend.name == "standin" else 40.0
    with tcp_proxy(owner.settings.comfy_port) as proxy:
        proxied = build_worker(worker_settings(backend, tmp_path, proxy.port))
        try:

            def cut_and_hold() -> None:
                proxy.refuse_websockets.set()
                proxy.cut_websockets()

            threading.Timer(0.3, cut_and_hold).start()
            threading.Timer(hold_s, proxy.refuse_websockets.clear).start()
            started = time.monotonic()
            result = run(proxied, long_job(backend, "down"))
            elapsed = time.monotonic() - started
            assert result.get("status") == "success", result
            assert result["images"], "outputs come from /history"
            assert elapsed < hold_s - 1, f"completion must come from /history, not the reconnect ({elapsed:.1f}s)"
            assert not proxied.events.connected
        finally:
            close_worker(proxied)
