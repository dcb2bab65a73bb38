"""The per-job model cache under attack: a redirect to an internal address. The cache is the real
``ModelCache`` over loopback file servers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfy_worker.errors import InputError
from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.download_options import DownloadOptions
from comfy_worker.runtime.fetch import guarded_session
from comfy_worker.runtime.models import ModelCache

from .file_server import FileServer, Redirect

KB = 1024
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    server = FileServer(tmp_path_factory.mktemp("served"))
    yield server
    server.close()


def options(**changes: Any) -> DownloadOptions:
    session = lambda: guarded_session(LOOPBACK)  # noqa: E731
    return DownloadOptions(progress_bar=False, progress_interval_s=0.1, session=session, **changes)


def new_cache(root: Path, max_bytes: int = 10**9, **changes: Any) -> ModelCache:
    return ModelCache(root / "cache", max_bytes, 10**9, options(**changes), 30.0, LOOPBACK)


def lora(url: str, filename: str = "dd.safetensors") -> ModelConfig:
    return ModelConfig(url=url, destination="loras", filename=filename)


def test_a_redirect_to_an_internal_address_is_refused_and_not_retried(tmp_path: Path, files: FileServer) -> None:
    files.routes["/to/internal"] = Redirect(f"http://127.0.0.2:{files.port}/file/10")
    cache = new_cache(tmp_path, retries=3, retry_backoff_s=0.01)
    with pytest.raises(InputError) as refused:
        cache.prepare([lora(files.url("/to/internal"), "r.safetensors")], lambda *_: None)
    message = refused.value.message
    assert "refused" in message and "127.0.0.2" in message and "INPUT_URL_ALLOWLIST" in message, message
    assert "gave up after" not in message, message
    assert len(files.gets("/to/internal")) == 1, "a refusal is not retried"
