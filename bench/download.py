"""The model downloader on loopback: against curl, one connection vs segments, 4 files at once, a resumed kill.

A 1 GiB file (and 4 x 256 MiB) served by tests/file_server.py (sendfile) from /tmp, downloaded into /tmp:

- ``curl``: ``curl -s -o`` of the same file (skipped with a message when curl is missing);
- ``single`` / ``segmented``: DOWNLOAD_CONNECTIONS=1 vs the default 8 Range connections;
- ``4 files``: DOWNLOAD_CONCURRENCY=4 on four files vs the throughput of one of them alone;
- ``resume``: download_models.py killed (SIGKILL) half-way through a rate-limited file, then run again: the
  bytes fetched a second time.

    python -m bench.download [--size-mb 1024] [--repeats 2]   # from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.download_options import DownloadOptions
from comfy_worker.provision.downloads import download_models
from tests.file_server import FileServer

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        for _ in range(size // (64 * MIB)):
            file.write(os.urandom(64 * MIB))
        file.write(os.urandom(size % (64 * MIB)))
    return path


def timed(action: Callable[[], None], repeats: int) -> float:
    """The best of ``repeats`` runs, in seconds (loopback numbers are noisy on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.monotonic()
        action()
        times.append(time.monotonic() - start)
    return min(times)


def ours(server: FileServer, paths: list[str], out: Path, **options: object) -> Callable[[], None]:
    def run() -> None:
        shutil.rmtree(out, ignore_errors=True)
        models = [ModelConfig(url=server.url(p), destination="checkpoints") for p in paths]
        opts = DownloadOptions(hf_endpoint="http://127.0.0.1:9", progress_bar=False, **options)  # type: ignore[arg-type]
        results = download_models(models, out, opts)
        assert all(r.status == "downloaded" for r in results), [r.error for r in results]

    return run


def curl(url: str, out: Path) -> Callable[[], None]:
    def run() -> None:
        out.unlink(missing_ok=True)
        subprocess.run(["curl", "-s", "-o", str(out), url], check=True)

    return run


def resume(server: FileServer, work: Path, size: int) -> tuple[int, int]:
    """Kill download_models.py half-way through a slow download, run it again: (bytes before, re-fetched)."""
    served = server.add_file("/slow.bin", work / "big.bin", rate=size / 8 / 4)  # ~4 s for 8 connections
    config = work / "config.yml"
    config.write_text(json.dumps({"models": [{"url": server.url("/slow.bin"), "destination": "checkpoints"}]}))
    out = work / "resume"
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "DOWNLOAD_PROGRESS_INTERVAL": "1"}
    args = [sys.executable, str(REPO / "download_models.py"), "--config", str(config), "--models-dir", str(out)]
    sidecar = out / "checkpoints" / "slow.bin.part.json"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        try:
            done = sum(s[2] for s in json.loads(sidecar.read_text())["segments"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= size // 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = server.bytes_sent["/slow.bin"]
    served.rate = None
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return before, server.bytes_sent["/slow.bin"] - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    size = args.size_mb * MIB
    work = Path(tempfile.mkdtemp(prefix="bench-download-", dir="/tmp"))
    server = FileServer(work / "served")
    try:
        server.add_file("/big.bin", random_file(work / "big.bin", size))
        quarter = [f"/q{i}.bin" for i in range(4)]
        for path in quarter:
            server.add_file(path, random_file(work / f"{path[1:]}", size // 4))
        mb = size / 1e6
        figures: dict[str, float] = {}
        if shutil.which("curl"):
            figures["curl"] = mb / timed(curl(server.url("/big.bin"), work / "curl.bin"), args.repeats)
            (work / "curl.bin").unlink(missing_ok=True)
        else:
            print("curl not found: the curl comparison is skipped")
        figures["single"] = mb / timed(ours(server, ["/big.bin"], work / "out", connections=1), args.repeats)
        figures["segmented"] = mb / timed(ours(server, ["/big.bin"], work / "out"), args.repeats)
        one = mb / 4 / timed(ours(server, quarter[:1], work / "out"), args.repeats)
        four = mb / timed(ours(server, quarter, work / "out"), args.repeats)
        shutil.rmtree(work / "out", ignore_errors=True)
        print(f"{args.size_mb} MiB file, best of {args.repeats}, MB/s:")
        for name, rate in figures.items():
            print(f"  {name:<10} {rate:8.0f}")
        if "curl" in figures:
            for name in ("single", "segmented"):
                print(f"  {name} / curl = {figures[name] / figures['curl']:.2f}x")
        print(f"  one {args.size_mb // 4} MiB file alone: {one:.0f} MB/s; four at once: {four:.0f} MB/s aggregate")
        before, again = resume(server, work, size)
        print(
            f"  resume: killed after {before / MIB:.0f} MiB sent; the rerun fetched {again / MIB:.0f} MiB "
            f"({100 * again / size:.0f}% of the file; {100 * (before + again - size) / size:.1f}% fetched twice)"
        )
        print("  server seconds are shared: the server runs in this process (sendfile) on the same cores")
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
        print(f"(removed {work})")


if __name__ == "__main__":
    main()
