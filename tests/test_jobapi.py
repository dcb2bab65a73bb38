"""The one job-API client (comfy_worker/tools/jobapi.py), shared by comfy-worker-client and the ComfyUI bridge:
one source, a byte-identical copy in the bridge, the standard library only, and what it refuses to follow."""

from __future__ import annotations

import ast
import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfy_worker.tools.jobapi import JobAPI, JobAPIError, output_chunks, safe_output_name

from .conftest import REPO
from .file_server import FileServer, Redirect

SOURCE = REPO / "comfy_worker" / "tools" / "jobapi.py"
BRIDGE_COPY = REPO / "bridge" / "comfy_runpod_bridge" / "jobapi.py"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    files = FileServer(tmp_path / "a")
    yield files
    files.close()


@pytest.fixture
def other_host(tmp_path: Path) -> Iterator[FileServer]:
    files = FileServer(tmp_path / "b")
    yield files
    files.close()


def test_the_bridge_carries_a_byte_identical_copy() -> None:
    assert BRIDGE_COPY.read_bytes() == SOURCE.read_bytes(), (
        f"{BRIDGE_COPY.relative_to(REPO)} differs from its source: edit {SOURCE.relative_to(REPO)} only, then "
        f"cp {SOURCE.relative_to(REPO)} {BRIDGE_COPY.relative_to(REPO)}"
    )


def test_it_imports_the_standard_library_only() -> None:
    tree = ast.parse(SOURCE.read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree)), "a relative import"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "FILE:///etc/passwd", "ftp://127.0.0.1/x", "data:,hello"])
def test_output_urls_other_than_http_are_refused(url: str) -> None:
    with pytest.raises(JobAPIError, match="refusing to fetch"):
        b"".join(output_chunks({"filename": "x", "type": "s3_url", "data": url}))


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1:9/passwd"])
def test_a_redirect_to_another_scheme_is_refused(server: FileServer, target: str) -> None:
    server.routes["/out.png"] = Redirect(target)
    with pytest.raises(JobAPIError, match=r"(HTTP 302|redirected to a ftp: URL)"):
        b"".join(output_chunks({"filename": "out.png", "type": "s3_url", "data": server.url("/out.png")}))


def test_outputs_are_fetched_over_http_and_decoded_from_base64(server: FileServer) -> None:
    server.add("/o.png", b"png bytes")
    assert b"".join(output_chunks({"type": "s3_url", "data": server.url("/o.png")})) == b"png bytes"
    assert b"".join(output_chunks({"type": "base64", "data": base64.b64encode(b"raw").decode()})) == b"raw"
    with pytest.raises(JobAPIError, match="not valid base64"):
        b"".join(output_chunks({"filename": "x", "data": "%%%"}))


def test_the_api_key_does_not_follow_a_redirect_to_another_host(server: FileServer, other_host: FileServer) -> None:
    other_host.add("/status/j1", json.dumps({"id": "j1", "status": "IN_QUEUE"}).encode())
    server.routes["/v2/ep/status/j1"] = Redirect(other_host.url("/status/j1"))
    api = JobAPI(server.url("/v2/ep"), "rpa_secret_key")
    assert api.status("j1")["status"] == "IN_QUEUE"
    [sent] = server.requests
    [followed] = other_host.requests
    assert sent.headers.get("authorization") == "Bearer rpa_secret_key"
    assert "authorization" not in followed.headers


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("a\\b\\c.png", "c.png"),
        ("nul\x00in\x1fname.png", "nulinname.png"),
        ("", "fallback"),
        ("..", "fallback"),
        (None, "fallback"),
    ],
)
def test_output_names_are_made_safe(name: object, expected: str) -> None:
    assert safe_output_name(name, "fallback") == expected


def test_long_names_keep_their_extension_and_fit_the_filesystem(tmp_path: Path) -> None:
    for name in ("x" * 300 + ".png", "é" * 300 + ".webp", "y" * 300):
        safe = safe_output_name(name, "f")
        assert len(safe.encode()) <= 200
        assert safe.endswith(name.rpartition(".")[2] if "." in name else "y")
        (tmp_path / safe).write_bytes(b"ok")  # the filesystem takes it
