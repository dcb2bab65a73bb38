"""How much time does the worker add on top of ComfyUI itself? Prints figures; asserts nothing.

Same run, same ComfyUI, interleaved so drift hits every variant alike, in a new order each round (what runs
just after a ComfyUI round trip pays a little for it):

- ``comfyui``: ComfyUI's own round trip: an open WebSocket, ``POST /prompt`` (``requests.post``, as a plain
  client sends it), wait for ``executing`` null.
- ``handler``: the worker's job function called in-process (validation, queue, follow, /history, outputs,
  base64).
- ``runsync``: ``POST /runsync`` through the runpod SDK's local API (``handler.py --rp_serve_api``).
- ``sdk_floor``: the same local API around a handler that returns at once: what the SDK itself costs.
- ``worker_comfyui``: runpod-workers/worker-comfyui's ``handler.py`` behind the same local API, on the same
  ComfyUI, when ``--worker-comfyui DIR`` (or ``WORKER_COMFYUI_DIR``) names a checkout of it (AGPL-3.0: it is
  run from there, never copied here; ``git clone https://github.com/runpod-workers/worker-comfyui``).
- ``baseline``: another checkout of this worker (``--baseline DIR``), to compare a change with what it
  replaces in the same run.

The figure that counts is each local-API variant's median minus ComfyUI's: the per-job overhead of a
trivial job, and ours against worker-comfyui's as a ratio (issue "a stream of jobs": at most a third).

Then the large job: 4 x 2048x2048 noisy PNGs (about 12.6 MB each) through the handler, against reading the
same four files and base64-encoding them alone.

    python bench/handler_overhead.py [--jobs 50] [--worker-comfyui DIR] [--baseline DIR]  # the stand-in
    COMFYUI_DIR=... COMFYUI_PYTHON=... python bench/handler_overhead.py      # a real ComfyUI

Targets: runsync overhead <= worker_comfyui overhead / 3; large job <= 1.2x files+base64.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import itertools
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
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


def run_runsync(url: str, graph: dict[str, Any]) -> float:
    started = time.perf_counter()
    body = requests.post(f"{url}/runsync", json={"input": {"workflow": graph}}, timeout=300).json()
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


SDK_FLOOR = """
import runpod

runpod.serverless.start({"handler": lambda job: {"status": "success", "images": []}})
"""

# worker-comfyui's handler hard-codes ComfyUI at 127.0.0.1:8188 and imports src/network_volume.py
WORKER_COMFYUI = """
import sys

sys.path[:0] = [{root!r}, {src!r}]
import handler
import runpod

handler.COMFY_HOST = {host!r}
runpod.serverless.start({{"handler": handler.handler}})
"""


def start_api(env: dict[str, str], script: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``script --rp_serve_api`` on ``port``, once its local API answers."""
    command = [sys.executable, str(script), "--rp_serve_api", "--rp_api_host", "127.0.0.1"]
    command += ["--rp_api_port", str(port), "--rp_log_level", "ERROR"]
    with log_path.open("wb") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=script.parent)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return process
        except requests.RequestException:
            time.sleep(0.2)
    process.kill()
    process.wait()
    raise RuntimeError(f"local API of {script.name} did not start: {log_path.read_text()[-2000:]}")


def api_url(process: subprocess.Popen[bytes]) -> str:
    args = [str(arg) for arg in process.args]  # type: ignore[union-attr]
    return f"http://127.0.0.1:{args[args.index('--rp_api_port') + 1]}"


def start_apis(
    env: dict[str, str], root: Path, comfy_url: str, worker_comfyui: Path | None, baseline: Path | None
) -> dict[str, subprocess.Popen[bytes]]:
    """The local APIs to compare, by variant name: ours, the SDK's floor, worker-comfyui's and another
    checkout of this worker (``baseline``: before a change, in the same run) when given."""
    apis: dict[str, subprocess.Popen[bytes]] = {}
    floor = root / "sdk_floor.py"
    floor.write_text(SDK_FLOOR)
    scripts = {"runsync": REPO / "handler.py", "sdk_floor": floor}
    if baseline is not None:
        scripts["baseline"] = baseline / "handler.py"  # imports the comfy_worker beside it, not this one
    if worker_comfyui is not None:
        wrapper = root / "worker_comfyui_main.py"
        host = comfy_url.split("://", 1)[1]
        wrapper.write_text(WORKER_COMFYUI.format(root=str(worker_comfyui), src=str(worker_comfyui / "src"), host=host))
        scripts["worker_comfyui"] = wrapper
    for name, script in scripts.items():
        apis[name] = start_api(env, script, free_port(), root / f"{name}.log")  # each attaches to the same ComfyUI
    return apis


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


def overheads(figures: dict[str, dict[str, float]]) -> None:
    """Each variant's median over ComfyUI's own round trip, and ours against worker-comfyui's."""
    base = figures["comfyui"]["median_ms"]
    over = {
        name: values["median_ms"] - base for name, values in figures.items() if name not in ("comfyui", "sdk_floor")
    }
    print()
    for name, value in over.items():
        print(f"{name} overhead over ComfyUI's round trip: {value:+.2f} ms median")
    print(f"sdk_floor (a handler that returns at once, no ComfyUI): {figures['sdk_floor']['median_ms']:.2f} ms median")
    if "worker_comfyui" in over and over["worker_comfyui"] > 0:
        ratio = over["runsync"] / over["worker_comfyui"]
        print(f"runsync overhead / worker_comfyui overhead: {ratio:.2f} (target <= 0.33)")
        if "baseline" in over:
            print(f"baseline overhead / worker_comfyui overhead: {over['baseline'] / over['worker_comfyui']:.2f}")
    if "baseline" in over and over["baseline"] > 0:
        print(f"runsync overhead / baseline overhead: {over['runsync'] / over['baseline']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--large-repeats", type=int, default=5)
    parser.add_argument(
        "--worker-comfyui",
        type=Path,
        default=os.environ.get("WORKER_COMFYUI_DIR") or None,
        help="a checkout of runpod-workers/worker-comfyui, to run its handler alongside",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of this worker (git archive COMMIT | tar -x -C DIR), to run its handler.py alongside",
    )
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
        "LOG_LEVEL": "INFO",  # the default: a deployed worker logs each job (worker-comfyui prints more)
        "MAX_RESULT_MB": "100",  # the large job returns 64 MB of base64, over RunPod's default limit
    }
    settings = Settings.from_env(env)
    print(f"ComfyUI: {comfy_dir}  ({settings.comfy_api_url})")
    if args.worker_comfyui is None:
        print("worker-comfyui: not compared (give --worker-comfyui DIR or WORKER_COMFYUI_DIR)")
    worker = build_worker(settings)  # starts ComfyUI and waits for it
    if worker.startup_error:
        raise SystemExit(worker.startup_error.message)
    apis: dict[str, subprocess.Popen[bytes]] = {}
    loop = asyncio.new_event_loop()
    try:
        apis = start_apis(env, root, settings.comfy_api_url, args.worker_comfyui, args.baseline)
        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"{settings.comfy_ws_url}?clientId={client_id}", timeout=60)
        variants: dict[str, Callable[[dict[str, Any]], float]] = {
            "comfyui": lambda graph: comfy_round_trip(settings.comfy_api_url, ws, client_id, graph),
            "handler": lambda graph: run_handler(worker, loop, {"workflow": graph})[0],
        }
        for name, process in apis.items():
            variants[name] = functools.partial(run_runsync, api_url(process))
        colour = itertools.count(1_000_000)  # a new colour for every prompt: ComfyUI's cache never answers
        for _ in range(5):  # warm-up: first prompts load ComfyUI's node code
            for run in variants.values():
                run(trivial(next(colour)))
        samples: dict[str, list[float]] = {name: [] for name in variants}
        order = random.Random(20)  # each round in a new order: no variant always follows the same one
        for _ in range(args.jobs):
            for name in order.sample(list(variants), len(variants)):
                samples[name].append(variants[name](trivial(next(colour))))
        print(f"\ntrivial workflow, {args.jobs} jobs each, interleaved in a shuffled order:")
        overheads({name: summary(name, values) for name, values in samples.items()})
        large_job(worker, loop, ws, client_id, args.large_repeats)
        ws.close()
    finally:
        for process in apis.values():
            process.terminate()
        for process in apis.values():
            process.wait(timeout=15)
        worker.events.close()
        if worker.supervisor:
            worker.supervisor.stop()
        loop.close()


if __name__ == "__main__":
    main()
