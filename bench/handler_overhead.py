"""How much time does the worker add on top of ComfyUI itself? Prints figures; asserts nothing.

Same run, same ComfyUI, interleaved so drift hits every variant alike:

- ``comfyui``: ComfyUI's own round trip: an open WebSocket, ``POST /prompt``, wait for ``executing`` null.
- ``handler``: the worker's job function called in-process (validation, queue, follow, /history, outputs,
  base64).
- ``runsync``: ``POST /runsync`` through the runpod SDK's local API (``handler.py --rp_serve_api``).

Then the large job: 4 x 2048x2048 noisy PNGs (about 12.6 MB each) through the handler, against reading the
same four files and base64-encoding them alone.

    python bench/handler_overhead.py [--jobs 50]                 # ComfyUI: the stand-in
    COMFYUI_DIR=... COMFYUI_PYTHON=... python bench/handler_overhead.py   # a real ComfyUI

Targets (issue "worker core"): handler median <= comfyui median + 5 ms; large job <= 1.2x files+base64.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests
import websocket
from PIL import Image

from comfy_worker.runtime.app import build_worker
from comfy_worker.runtime.job import Worker
from comfy_worker.settings import Settings

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def trivial(i: int) -> dict[str, Any]:
    """A two-node workflow that really executes (a new colour each time defeats ComfyUI's cache)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": i}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
    }


def comfy_round_trip(url: str, ws: websocket.WebSocket, client_id: str, graph: dict[str, Any]) -> float:
    started = time.perf_counter()
    prompt_id = str(uuid.uuid4())
    response = requests.post(
        f"{url}/prompt", json={"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}, timeout=30
    )
    response.raise_for_status()
    while True:
        message = ws.recv()
        if isinstance(message, str):
            frame = json.loads(message)
            data = frame.get("data") or {}
            if frame.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return time.perf_counter() - started


def run_handler(
    worker: Worker, loop: asyncio.AbstractEventLoop, job_input: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result = loop.run_until_complete(worker.run("bench", job_input, lambda _msg: None))
    elapsed = time.perf_counter() - started
    if "error" in result:
        raise RuntimeError(result["error"])
    return elapsed, result


def run_runsync(api_url: str, job_input: dict[str, Any]) -> float:
    started = time.perf_counter()
    body = requests.post(f"{api_url}/runsync", json={"input": job_input}, timeout=300).json()
    elapsed = time.perf_counter() - started
    if body.get("status") != "COMPLETED":
        raise RuntimeError(str(body)[:500])
    return elapsed


def summary(name: str, samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p90 = ordered[max(0, round(0.9 * len(ordered)) - 1)]
    figures = {"median_ms": statistics.median(ordered) * 1000, "p90_ms": p90 * 1000}
    print(f"{name:>10}: median {figures['median_ms']:8.2f} ms   p90 {figures['p90_ms']:8.2f} ms   (n={len(samples)})")
    return figures


def start_api(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(REPO / "handler.py"), "--rp_serve_api", "--rp_api_host", "127.0.0.1"]
    command += ["--rp_api_port", str(port), "--rp_log_level", "ERROR"]
    with log_path.open("wb") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return process
        except requests.RequestException:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"local API did not start: {log_path.read_text()[-2000:]}")


def files_then_base64(url: str, ws: websocket.WebSocket, client_id: str, graph: dict[str, Any], folder: Path) -> float:
    """The baseline: queue ``graph`` directly, and as soon as ComfyUI is done, read + base64 its files."""
    prompt_id = str(uuid.uuid4())
    body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
    requests.post(f"{url}/prompt", json=body, timeout=30).raise_for_status()
    files: list[Path] = []
    while True:
        message = ws.recv()
        if not isinstance(message, str):
            continue
        frame = json.loads(message)
        data = frame.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        if frame.get("type") == "executed":
            files += [folder / i["subfolder"] / i["filename"] for i in data["output"]["images"]]
        elif frame.get("type") == "executing" and data.get("node") is None:
            started = time.perf_counter()
            encoded = [base64.b64encode(path.read_bytes()).decode("ascii") for path in files]  # kept, as a result is
            elapsed = time.perf_counter() - started
            assert len(encoded) == 4
            return elapsed


def large_job(
    worker: Worker, loop: asyncio.AbstractEventLoop, ws: websocket.WebSocket, client_id: str, repeats: int
) -> None:
    """4 x 12.6 MB outputs: the handler's time after ComfyUI finished vs read + base64 at the same moment."""
    noise = Image.frombytes("RGB", (2048, 2048), os.urandom(2048 * 2048 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    graph: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "bench_noise.png"}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 4}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench_big"}},
    }
    images = [{"name": "bench_noise.png", "image": base64.b64encode(buffer.getvalue()).decode()}]
    # the handler's jobs upload their own copy (jobs/<id>/, removed after each); the baseline reads this one
    (worker.folders["input"] / "bench_noise.png").write_bytes(buffer.getvalue())
    folder = worker.folders["output"]
    job_times, output_times, baseline_times = [], [], []
    for repeat in range(repeats):
        graph["3"]["inputs"]["filename_prefix"] = f"bench_big_{repeat}"  # SaveImage really runs every time
        elapsed, result = run_handler(worker, loop, {"workflow": graph, "images": images})
        job_times.append(elapsed)
        output_times.append(result["timings"]["outputs_s"])
        del result
        graph["3"]["inputs"]["filename_prefix"] = f"bench_raw_{repeat}"
        baseline_times.append(files_then_base64(worker.settings.comfy_api_url, ws, client_id, graph, folder))
    size = next(folder.glob("bench_raw_0_*.png")).stat().st_size
    print(f"\nlarge job: 4 outputs of {size / 1e6:.1f} MB, {repeats} runs each, interleaved")
    job_s, out_s = statistics.median(job_times), statistics.median(output_times)
    base_s = statistics.median(baseline_times)
    print(f"  whole job in the handler (median):            {job_s * 1000:8.1f} ms (upload, ComfyUI run, outputs)")
    print(f"  handler result time after ComfyUI finished:   {out_s * 1000:8.1f} ms (/history, read, base64)")
    print(f"  read the files + base64 alone, same moment:   {base_s * 1000:8.1f} ms")
    print(f"  ratio result time / files+base64: {out_s / base_s:.2f}x (target <= 1.2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--large-repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    os.environ.setdefault("RUNPOD_SKIP_GPU_CHECK", "true")

    root = Path(tempfile.mkdtemp(prefix="bench-"))
    comfy_dir = os.environ.get("COMFYUI_DIR") or str(REPO / "tests" / "standin_comfyui")
    env = {
        **os.environ,
        "COMFYUI_DIR": comfy_dir,
        "COMFY_API_URL": f"http://127.0.0.1:{free_port()}",
        "COMFYUI_INPUT_DIR": str(root / "input"),
        "COMFYUI_OUTPUT_DIR": str(root / "output"),
        "COMFYUI_TEMP_DIR": str(root / "temp"),
        "LOG_LEVEL": "WARNING",
        "MAX_RESULT_MB": "100",  # the large job returns 64 MB of base64, over RunPod's default limit
        "CLEANUP_JOB_FILES": "false",  # the baseline prompts reuse the handler's uploaded noise image
    }
    settings = Settings.from_env(env)
    print(f"ComfyUI: {comfy_dir}  ({settings.comfy_api_url})")
    worker = build_worker(settings)  # starts ComfyUI and waits for it
    if worker.startup_error:
        raise SystemExit(worker.startup_error.message)
    api = start_api(env, free_port(), root / "api.log")  # attaches to the same ComfyUI
    loop = asyncio.new_event_loop()
    try:
        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"{settings.comfy_ws_url}?clientId={client_id}", timeout=60)
        api_url = f"http://127.0.0.1:{api.args[api.args.index('--rp_api_port') + 1]}"
        for i in range(5):  # warm-up: first prompts load ComfyUI's node code
            comfy_round_trip(settings.comfy_api_url, ws, client_id, trivial(10_000 + i))
            run_handler(worker, loop, {"workflow": trivial(20_000 + i)})
            run_runsync(api_url, {"workflow": trivial(30_000 + i)})
        samples: dict[str, list[float]] = {"comfyui": [], "handler": [], "runsync": []}
        for i in range(args.jobs):
            samples["comfyui"].append(comfy_round_trip(settings.comfy_api_url, ws, client_id, trivial(3 * i)))
            samples["handler"].append(run_handler(worker, loop, {"workflow": trivial(3 * i + 1)})[0])
            samples["runsync"].append(run_runsync(api_url, {"workflow": trivial(3 * i + 2)}))
        print(f"\ntrivial workflow, {args.jobs} jobs each, interleaved:")
        figures = {name: summary(name, values) for name, values in samples.items()}
        overhead = figures["handler"]["median_ms"] - figures["comfyui"]["median_ms"]
        print(f"handler overhead over ComfyUI's round trip: {overhead:+.2f} ms median (target <= 5 ms)")
        runsync_overhead = figures["runsync"]["median_ms"] - figures["comfyui"]["median_ms"]
        print(f"runsync overhead over ComfyUI's round trip: {runsync_overhead:+.2f} ms median")
        large_job(worker, loop, ws, client_id, args.large_repeats)
        ws.close()
    finally:
        api.terminate()
        api.wait(timeout=15)
        worker.events.close()
        if worker.supervisor:
            worker.supervisor.stop()
        loop.close()


if __name__ == "__main__":
    main()
