"""The per-job model cache (``input.models``) on loopback: a first fetch, the same model again (cached), and
eviction under the cap, with the worker's own ``ModelCache`` (the downloader behind the SSRF guard).

Three files of ``--size-mb`` each are served by tests/file_server.py from /tmp into a cache in /tmp whose cap
holds two of them:

- ``first fetch``: job 1 brings model A (download, sha256 check);
- ``cached``: job 2 brings A again (index, pin, nothing downloaded);
- ``B``: job 3 brings B (download; A and B fit);
- ``C + eviction``: job 4 brings C: download, then A, the least recently used, is evicted.

    python -m bench.job_models [--size-mb 256]   # from the repository root
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import tempfile
import time
from pathlib import Path

from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.download_options import DownloadOptions
from comfy_worker.runtime.models import ModelCache
from tests.file_server import FileServer

MIB = 1024 * 1024
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256)
    args = parser.parse_args()
    size = args.size_mb * MIB
    with tempfile.TemporaryDirectory(prefix="bench-job-models-") as tmp:
        root = Path(tmp)
        server = FileServer(root / "served")
        models = {}
        for name in "ABC":
            data = os.urandom(size)
            server.add(f"/{name}.bin", data)
            models[name] = ModelConfig(
                url=server.url(f"/{name}.bin"),
                destination="loras",
                filename=f"{name}.safetensors",
                sha256=hashlib.sha256(data).hexdigest(),
            )
        options = DownloadOptions(progress_bar=False)  # the cache guards its own sessions (LOOPBACK allowed)
        cache = ModelCache(root / "cache", int(2.5 * size), 100 * size, options, 60.0, LOOPBACK)
        figures: dict[str, object] = {"file_mb": args.size_mb, "cap_mb": round(2.5 * args.size_mb)}
        for label, name in (
            ("first_fetch_s", "A"),
            ("cached_s", "A"),
            ("second_model_s", "B"),
            ("third_with_eviction_s", "C"),
        ):
            before = sum(server.bytes_sent.values())
            started = time.monotonic()
            cache.prepare([models[name]], lambda *_: None).release()
            figures[label] = round(time.monotonic() - started, 3)
            figures[label.replace("_s", "_fetched_mb")] = round((sum(server.bytes_sent.values()) - before) / MIB, 1)
        left = sorted(path.name for path in (root / "cache" / "loras").iterdir())
        figures["cache_after"] = left
        figures["evicted"] = sorted({"A.safetensors", "B.safetensors", "C.safetensors"} - set(left))
        server.close()
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
