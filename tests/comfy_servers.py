"""Start a ComfyUI server for a test: the stand-in (fast, no torch) or a real checkout (slow, opt-in).

Both helpers are context managers that lay out an isolated base directory, start the server on a free
loopback port with ComfyUI's own command line, wait for ``GET /system_stats`` to answer 200 and stop the process
(SIGTERM, then SIGKILL for its whole process group) on exit. A failed start raises ``ServerStartError`` with the
tail of the server's log.
Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .processes import stop_group

HOST = "127.0.0.1"
STANDIN_MAIN = Path(__file__).resolve().parent / "standin_comfyui" / "main.py"
STANDIN_START_TIMEOUT = 60.0  # a loaded 2-core machine
REAL_START_TIMEOUT = 180.0
STOP_TIMEOUT = 10.0


class ServerStartError(RuntimeError):
    """The server process died or did not answer ``/system_stats`` before the deadline."""


@dataclass
class ComfyServer:
    """A running server: where to reach it and where its files go."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    log_path: Path
    base_dir: Path
    kind: str = "standin"
    argv: list[str] = field(default_factory=list)

    def ws_url(self, client_id: str | None = None) -> str:
        """``ws://127.0.0.1:P/ws`` with ``?clientId=`` when given."""
        base = f"ws://{HOST}:{self.port}/ws"
        return f"{base}?clientId={client_id}" if client_id else base

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _layout(base_dir: Path) -> tuple[Path, Path, Path]:
    """Input, output and temp folders under ``base_dir`` (plus the ``custom_nodes`` folder ComfyUI insists on)."""
    base_dir.mkdir(parents=True, exist_ok=True)
    for name in ("input", "output", "custom_nodes"):
        (base_dir / name).mkdir(exist_ok=True)
    # ComfyUI uses ``<--temp-directory>/temp``.
    return base_dir / "input", base_dir / "output", base_dir / "temp"


def _comfy_args(base_dir: Path, port: int, extra_args: Sequence[str]) -> list[str]:
    return [
        "--listen",
        HOST,
        "--port",
        str(port),
        "--cpu",
        "--disable-auto-launch",
        "--base-directory",
        str(base_dir),
        "--input-directory",
        str(base_dir / "input"),
        "--output-directory",
        str(base_dir / "output"),
        "--temp-directory",
        str(base_dir),
        *extra_args,
    ]


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM, wait, then SIGKILL for the process group (the server started with ``start_new_session``).
    Returns the exit status."""
    return stop_group(process, signal.SIGTERM, timeout)


def wait_until_ready(server: ComfyServer, timeout: float) -> None:
    """Poll ``/system_stats`` until 200; fail early (with the log tail) if the process exits."""
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    with requests.Session() as session:
        while True:
            code = server.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"{server.kind} ComfyUI exited with status {code} before it was ready\n"
                    f"command: {' '.join(server.argv)}\n--- log tail ({server.log_path}) ---\n{server.log_tail()}"
                )
            try:
                response = session.get(f"{server.url}/system_stats", timeout=2)
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                last_error = type(exc).__name__
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{server.kind} ComfyUI did not answer /system_stats within {timeout:.0f} s ({last_error})\n"
                    f"command: {' '.join(server.argv)}\n--- log tail ({server.log_path}) ---\n{server.log_tail()}"
                )
            time.sleep(0.02)


@contextlib.contextmanager
def _run(
    kind: str,
    argv: list[str],
    cwd: Path,
    base_dir: Path,
    port: int,
    timeout: float,
    env: Mapping[str, str] | None,
) -> Iterator[ComfyServer]:
    input_dir, output_dir, temp_dir = _layout(base_dir)
    log_path = base_dir / f"{kind}-comfyui-{port}.log"
    process_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, env=process_env, start_new_session=True
        )
    server = ComfyServer(
        url=f"http://{HOST}:{port}",
        port=port,
        process=process,
        input_dir=input_dir,
        output_dir=output_dir,
        temp_dir=temp_dir,
        log_path=log_path,
        base_dir=base_dir,
        kind=kind,
        argv=argv,
    )
    try:
        wait_until_ready(server, timeout)
        yield server
    finally:
        stop_process(process)


@contextlib.contextmanager
def run_standin(
    base_dir: Path,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    *,
    python: str | None = None,
    timeout: float = STANDIN_START_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> Iterator[ComfyServer]:
    """The stand-in ComfyUI (``tests/standin_comfyui/main.py``) on a free loopback port, files under ``base_dir``."""
    port = port or free_port()
    argv = [python or sys.executable, str(STANDIN_MAIN), *_comfy_args(base_dir, port, extra_args)]
    with _run("standin", argv, STANDIN_MAIN.parent, base_dir, port, timeout, env) as server:
        yield server


@contextlib.contextmanager
def run_real_comfyui(
    base_dir: Path,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    *,
    comfyui_dir: str | os.PathLike[str] | None = None,
    python: str | None = None,
    timeout: float = REAL_START_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> Iterator[ComfyServer]:
    """A real ComfyUI checkout (``COMFYUI_DIR``, run by ``COMFYUI_PYTHON``) on the CPU, files under ``base_dir``."""
    directory = comfyui_dir or os.environ.get("COMFYUI_DIR")
    if not directory:
        raise ServerStartError("COMFYUI_DIR is not set: no real ComfyUI checkout to run")
    checkout = Path(directory).resolve()
    if not (checkout / "main.py").is_file():
        raise ServerStartError(f"{checkout} has no main.py: not a ComfyUI checkout")
    interpreter = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
    port = port or free_port()
    argv = [interpreter, str(checkout / "main.py"), *_comfy_args(base_dir, port, extra_args)]
    with _run("real", argv, checkout, base_dir, port, timeout, env) as server:
        yield server
