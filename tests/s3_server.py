"""A real S3-compatible server on loopback for the storage tests: s3rver (npm), installed by test.sh into
``.tools``. It checks access keys, signatures and presigned-URL expiry, which moto's server does not.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .processes import stop_group
from .worker_process import REPO, free_port

S3RVER = REPO / ".tools" / "node_modules" / ".bin" / "s3rver"
ACCESS_KEY = "S3RVER"  # s3rver's built-in account
SECRET_KEY = "S3RVER"
SKIP_REASON = "s3rver is not installed: ./test.sh installs it into .tools with npm"  # the S3 tier's skip


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    process: subprocess.Popen[bytes]

    def env(self, **extra: str) -> dict[str, str]:
        """The worker's bucket settings for this server."""
        return {
            "BUCKET_ENDPOINT_URL": self.endpoint_url,
            "BUCKET_NAME": self.bucket,
            "BUCKET_ACCESS_KEY_ID": ACCESS_KEY,
            "BUCKET_SECRET_ACCESS_KEY": SECRET_KEY,
            **extra,
        }


@contextlib.contextmanager
def run_s3rver(data_dir: Path, bucket: str = "outputs", port: int | None = None) -> Iterator[S3Server]:
    if not S3RVER.exists():
        pytest.skip(SKIP_REASON)
    port = port or free_port()
    command = [str(S3RVER), "-d", str(data_dir), "-a", "127.0.0.1", "-p", str(port), "--silent"]
    process = subprocess.Popen(
        [*command, "--configure-bucket", bucket],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60  # node's start on a loaded machine
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if process.poll() is not None:  # read to the end only once it exited: it cannot block then
                raise RuntimeError(f"s3rver exited with {process.returncode}: {process.communicate()[1]!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"s3rver did not listen on 127.0.0.1:{port} within 60 s")
            time.sleep(0.1)
        yield S3Server(f"http://127.0.0.1:{port}", bucket, process)
    finally:
        stop_group(process, signal.SIGTERM, 5)
