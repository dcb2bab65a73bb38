"""How much memory does delivering a job's outputs take? Prints figures; asserts nothing.

Each case runs the worker's output phases (``outputs.load`` then ``delivery.deliver``, as a job does) in a
child process of its own, on files in a folder that stands for ComfyUI's output folder, and reports the
child's peak RSS over its idle RSS (measured after its imports and set-up, the peak reset through
``/proc/self/clear_refs``):

- ``s3``: 8 outputs of 50 MB (random bytes) uploaded to s3rver (the tests' S3 server, ``tests/s3_server.py``);
- ``decode``: one of the large images below decoded alone: the baseline of ``webp``, from the same run;
- ``webp``: one, then two 8192x8192 PNGs converted to WebP and delivered as base64 (two cost what one
  does when they are converted one at a time); ``--pillow`` converts with Pillow's WebP save instead of
  libwebp directly (``comfy_worker.runtime.webp``), for comparison: it needs several times the decoded image;
- ``jpeg``: the same two as JPEG (Pillow);
- ``RGBA``: one such image with transparency, to WebP (libwebp compresses its alpha plane losslessly, which
  takes several times the plane) and to JPEG (flattened onto white in the decoded image's own memory);
- ``base64 4x10``, ``base64 1x40``: outputs of random bytes returned as base64 (against the result's size).

    python -m bench.outputs_memory [--side 8192] [--pillow]   # from the repository root; s3rver in .tools

Targets (issue #20): s3 peak over idle <= 150 MB; webp <= 1.5 x one decoded image; base64 <= 2.5 x the result.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.runtime import delivery, outputs, webp
from comfy_worker.settings import Settings
from comfy_worker.storage import S3Storage
from tests.s3_server import run_s3rver

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
S3_TARGET_MB = 150
WEBP_TARGET = 1.5
BASE64_TARGET = 2.5


def status_kb(field: str) -> int:
    line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith(field + ":"))
    return int(line.split()[1])


def entry_for(names: list[str]) -> dict[str, Any]:
    return {
        "outputs": {
            str(i): {"images": [{"filename": n, "subfolder": "", "type": "output"}]} for i, n in enumerate(names)
        }
    }


def child(case: str, folder: Path, names: list[str], image_format: str, pillow: bool) -> None:
    """One case, in this (fresh) process: print its idle RSS and its peak over it, in MB, as JSON."""
    if pillow:
        webp.available = lambda: False  # type: ignore[assignment]  # the worker's fallback without libwebp
    else:
        assert webp.available(), "libwebp is not installed (apt-get install libwebp7): pass --pillow"
    storage = None
    if case == "s3":
        settings = Settings.from_env(dict(os.environ)).s3
        assert settings is not None
        storage = S3Storage(settings)
    client = ComfyClient("http://127.0.0.1:9", client_id="bench", timeout_s=0.5)  # never asked: files are local
    collected = outputs.collect(entry_for(names), include_temp=False)
    spool = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    gc.collect()
    idle = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    result: Any
    if case == "decode":
        with Image.open(folder / names[0]) as image:
            image.load()
            result = image.size
    else:
        payloads, _ = outputs.load(
            client, {"output": folder}, collected, image_format, 90, 10**9, spool, threading.Event()
        )
        mode = "s3" if storage else "base64"
        result, _ = delivery.deliver(payloads, mode, storage, 10**12, {"job_id": "bench", "prompt_id": "-"}, None)
        result = sum(len(item["data"]) for _, item in result)
    peak = status_kb("VmHWM")
    print(json.dumps({"idle_mb": idle / 1024, "over_idle_mb": (peak - idle) / 1024, "result": result}))


def run_child(
    case: str, folder: Path, names: list[str], image_format: str, env: dict[str, str], pillow: bool = False
) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.outputs_memory",
            "--child",
            case,
            "--folder",
            str(folder),
            "--format",
            image_format,
            *(["--pillow"] if pillow else []),
            *names,
        ],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def random_files(folder: Path, prefix: str, count: int, size: int) -> list[str]:
    names = []
    for index in range(count):
        name = f"{prefix}_{index}.bin"
        with (folder / name).open("wb") as sink:
            for _ in range(size // MB):
                sink.write(os.urandom(MB))
        names.append(name)
    return names


def large_images(folder: Path, side: int) -> list[str]:
    """Two RGB PNGs of photo-like content (gradients and noise: WebP does not shrink them to nothing), and
    one with transparency (a gradient alpha) as a third."""
    size = (side, side)
    bands = [
        Image.linear_gradient("L").resize(size),
        Image.effect_noise(size, 40),
        Image.radial_gradient("L").resize(size),
    ]
    with Image.merge("RGB", bands) as image:
        for index in range(2):
            image.save(folder / f"large_{index}.png", compress_level=1)
    with Image.merge("RGBA", [*bands, bands[0].transpose(Image.Transpose.ROTATE_90)]) as image:
        image.save(folder / "large_rgba.png", compress_level=1)
    for band in bands:
        band.close()
    return ["large_0.png", "large_1.png", "large_rgba.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--child")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--format", default="png")
    parser.add_argument("--pillow", action="store_true", help="WebP through Pillow's save, not libwebp directly")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.names, args.format, args.pillow)
        return
    with tempfile.TemporaryDirectory(prefix="bench-outputs-") as scratch:
        folder = Path(scratch) / "output"
        folder.mkdir()
        rows: list[tuple[str, float, str]] = []
        names = random_files(folder, "s3", 8, 50 * MB)
        with run_s3rver(Path(scratch) / "s3") as server:
            s3 = run_child("s3", folder, names, "png", server.env())
        rows.append(("s3 8x50 MB", s3["over_idle_mb"], f"{s3['over_idle_mb'] / S3_TARGET_MB:.2f} x 150 MB"))
        for name in names:
            (folder / name).unlink()
        images = large_images(folder, args.side)
        decoded = run_child("decode", folder, images, "png", {})["over_idle_mb"]
        rows.append((f"decode 1 of {args.side}x{args.side}", decoded, "baseline"))
        encoder = "Pillow" if args.pillow else "libwebp"
        one = run_child("webp", folder, images[:1], "webp", {}, args.pillow)["over_idle_mb"]
        rows.append((f"webp ({encoder}) 1 of {args.side}x{args.side}", one, f"{one / decoded:.2f} x decoded"))
        two = run_child("webp", folder, images[:2], "webp", {}, args.pillow)["over_idle_mb"]
        ratios = f"{two / decoded:.2f} x decoded (target 1.5), {two / one:.2f} x converting one"
        rows.append((f"webp ({encoder}) 2 of {args.side}x{args.side}", two, ratios))
        jpeg = run_child("jpeg", folder, images[:2], "jpeg", {})["over_idle_mb"]
        rows.append((f"jpeg 2 of {args.side}x{args.side}", jpeg, f"{jpeg / decoded:.2f} x decoded (target 1.5)"))
        for image_format in ("webp", "jpeg"):
            alpha = run_child(image_format, folder, images[2:], image_format, {}, args.pillow)["over_idle_mb"]
            rows.append((f"{image_format} 1 RGBA {args.side}x{args.side}", alpha, f"{alpha / decoded:.2f} x decoded"))
        for count, size in ((4, 10), (1, 40)):
            names = random_files(folder, f"b64_{count}", count, size * MB)
            figures = run_child("base64", folder, names, "png", {})
            result_mb = figures["result"] / MB
            ratio = figures["over_idle_mb"] / result_mb
            rows.append((f"base64 {count}x{size} MB", figures["over_idle_mb"], f"{ratio:.2f} x result (target 2.5)"))
    width = max(len(name) for name, _, _ in rows)
    for name, over_idle, ratio in rows:
        print(f"{name:<{width}}  peak over idle {over_idle:8.1f} MB   {ratio}")


if __name__ == "__main__":
    main()
