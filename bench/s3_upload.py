"""Uploading outputs to an S3-compatible server on loopback: parallel vs one by one vs raw put_object.

8 payloads of 12.6 MB (the size of a 2048x2048 noisy PNG), same server, same run, repeated and interleaved:

- ``parallel``: ``S3Storage.upload_many`` (what jobs do: threads, multipart above 16 MB);
- ``sequential``: ``S3Storage.upload`` one after another;
- ``put_object``: boto3's plain ``put_object``, one after another (the server's raw throughput).

    python bench/s3_upload.py [--repeats 3]      # needs s3rver in .tools (./test.sh installs it)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from comfy_worker.settings import S3Settings
from comfy_worker.storage import S3Storage, Upload

REPO = Path(__file__).resolve().parents[1]
S3RVER = REPO / ".tools" / "node_modules" / ".bin" / "s3rver"
SIZE = 12_598_766
COUNT = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not S3RVER.exists():
        raise SystemExit("s3rver is missing: run ./test.sh once (it installs it into .tools)")
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="bench-s3-")
    server = subprocess.Popen(
        [str(S3RVER), "-d", data_dir, "-a", "127.0.0.1", "-p", str(port), "--silent", "--configure-bucket", "bench"]
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)
        storage = S3Storage(
            S3Settings(
                bucket="bench",
                access_key_id="S3RVER",
                secret_access_key="S3RVER",
                endpoint_url=f"http://127.0.0.1:{port}",
            )
        )
        payloads = [os.urandom(SIZE) for _ in range(COUNT)]

        def items(tag: str) -> list[Upload]:
            return [Upload(f"{tag}/{i}.png", data, "image/png") for i, data in enumerate(payloads)]

        def put_objects(tag: str) -> None:
            for item in items(tag):
                storage.client.put_object(Bucket="bench", Key=item.key, Body=item.data, ContentType=item.content_type)

        figures: dict[str, list[float]] = {"parallel": [], "sequential": [], "put_object": []}
        for repeat in range(args.repeats):
            figures["put_object"].append(timed(lambda r=repeat: put_objects(f"raw{r}")))
            figures["sequential"].append(timed(lambda r=repeat: [storage.upload(i) for i in items(f"seq{r}")]))
            figures["parallel"].append(timed(lambda r=repeat: storage.upload_many(items(f"par{r}"))))
        total_mb = SIZE * COUNT / 1e6
        print(f"{COUNT} x {SIZE / 1e6:.1f} MB to s3rver on loopback, median of {args.repeats}:")
        base = statistics.median(figures["put_object"])
        for name, values in figures.items():
            median = statistics.median(values)
            print(
                f"  {name:>10}: {median:6.2f} s  {total_mb / median:7.1f} MB/s  ({base / median:.2f}x raw put_object)"
            )
        speedup = statistics.median(figures["sequential"]) / statistics.median(figures["parallel"])
        print(f"  parallel vs one by one: {speedup:.2f}x")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
