"""Cold starts through real containers: how long a fresh container on a warm volume takes to accept a job.

On RunPod serverless every new worker is a fresh container, often on a volume that earlier workers already
provisioned. This builds the repository's image (tests/docker_image.py: stand-in base and uv images, the
stand-in ComfyUI baked from a loopback git server), provisions a volume once (a custom node whose requirement
is a wheel, a model), then times, in the same run:

- ComfyUI's own boot: the image's ComfyUI started alone in a fresh container on that volume (``docker run``
  to its first HTTP answer), the floor any worker stands on;
- a fresh container on the warm volume: ``docker run`` to the first job's result through the local API,
  split into container start (``docker run`` to the entrypoint running), provisioning gate (to "nothing to
  install"), ComfyUI boot (the worker's "Starting ComfyUI" to "ComfyUI is ready"), worker ready (to the local
  API listening) and the first job;
- a restarted container (``docker stop`` + ``docker start`` of that container), the same way.

    python -m bench.cold_start [--rounds 3]   # from the repository root, with a Docker engine (or as root)

Target (issue #11): fresh and restarted containers accept their first job within ComfyUI's boot + 2 s.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import yaml

from tests import docker_image
from tests.docker_image import Container, build, build_args, build_context, serve_git
from tests.file_server import FileServer, make_data
from tests.git_repos import make_wheel, node_repo, standin_comfyui_repo
from tests.worker_process import free_port

COMFYUI_VERSION = "v0.3.64"
JOB = {
    "workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
    }
}
TARGET_MARGIN_S = 2.0


def log_time(container: Container, text: str, after: float = 0.0) -> float:
    """The Unix time of the first log line holding ``text`` (docker's own timestamps), after ``after``."""
    done = docker_image.docker("logs", "--timestamps", container.name)
    logs = done.stdout + done.stderr
    times = []
    for line in logs.splitlines():
        stamp, _, message = line.partition(" ")
        if text in message:
            seconds = parse_time(stamp)
            if seconds > after:
                times.append(seconds)
    if not times:
        raise RuntimeError(f"no {text!r} in the log of {container.name}")
    return min(times)


def parse_time(stamp: str) -> float:
    """Docker's RFC 3339 nanosecond timestamps, to Unix seconds."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float(f"0.{fraction or 0}")


def started_at(container: Container) -> float:
    return parse_time(docker_image.docker("inspect", "--format", "{{.State.StartedAt}}", container.name).stdout.strip())


def first_job(port: int, container: Container, timeout_s: float = 120) -> float:
    """Poll /runsync until the job completes; the Unix time it did."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            body = requests.post(f"http://127.0.0.1:{port}/runsync", json={"input": JOB}, timeout=timeout_s).json()
            if body.get("status") != "COMPLETED":
                raise RuntimeError(f"the job failed: {body}")
            return time.time()
        except requests.ConnectionError:
            if time.monotonic() > deadline or not container.running():
                raise RuntimeError(container.logs()[-4000:]) from None
            time.sleep(0.02)


def parts(container: Container, launched: float, done: float) -> dict[str, float]:
    start = started_at(container)
    gate = log_time(container, "nothing to install", after=start)
    comfy_start = log_time(container, "Starting ComfyUI", after=start)
    comfy_ready = log_time(container, "ComfyUI is ready", after=start)
    api = log_time(container, "Uvicorn running on", after=start)
    return {
        "container start": start - launched,
        "provisioning gate": gate - start,
        "ComfyUI boot (in the worker)": comfy_ready - comfy_start,
        "worker ready": api - start,
        "first job accepted": done - launched,
    }


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = FileServer(root / "served")
        self.repos = root / "repos"
        self.repos.mkdir()
        self.comfyui = standin_comfyui_repo(self.repos, COMFYUI_VERSION)
        wheel = make_wheel(root / "wheels", "bench_requirement", "1.0")
        self.server.add_file(f"/{wheel.name}", wheel)
        requirement = f"bench_requirement @ {self.server.url('/' + wheel.name)}\n"
        node_repo(self.repos, "ComfyUI-Bench", extra={"requirements.txt": requirement})
        data = make_data(1024 * 1024)
        self.server.add("/model.safetensors", data)
        self.config = yaml.safe_dump(
            {
                "comfyui": {"version": COMFYUI_VERSION},
                "nodes": [{"url": "/repos/ComfyUI-Bench", "version": "v1.0.0"}],
                "models": [
                    {
                        "url": self.server.url("/model.safetensors"),
                        "destination": "checkpoints",
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                ],
            }
        )
        self.volume = root / "volume"
        self.volume.mkdir()
        self.containers: list[Container] = []
        self.image = ""

    def build(self) -> None:
        args = build_args(COMFYUI_REPO=serve_git(self.server, self.comfyui, "ComfyUI"), COMFYUI_VERSION=COMFYUI_VERSION)
        seconds = build("comfy-worker-test:bake-none", build_context(self.root / "context"), args, self.root / "b.log")
        self.image = "comfy-worker-test:bake-none"
        print(f"image built in {seconds:.0f} s: {docker_image.image_size(self.image) / 1e9:.2f} GB")

    def worker(self) -> tuple[Container, int]:
        port = free_port()
        container = Container(
            self.image,
            env={
                "COMFYUI_REPO": "/repos/ComfyUI",
                "CONFIG_YML": self.config,
                "RP_API_PORT": str(port),
                "COMFY_API_URL": f"http://127.0.0.1:{free_port()}",
                "COMFYUI_LISTEN": "127.0.0.1",
            },
            mounts=[f"{self.repos}:/repos:ro", f"{self.volume}:/runpod-volume"],
        )
        self.containers.append(container)
        return container, port

    def warm_the_volume(self) -> None:
        container, port = self.worker()
        launched = time.time()
        container.start()
        first_job(port, container, timeout_s=600)
        print(f"first container on an empty volume: first job after {time.time() - launched:.1f} s")
        container.stop()

    def comfyui_boot(self) -> float:
        """The image's ComfyUI alone, in a fresh container on the warm volume: docker run to its first answer."""
        port = free_port()
        venv = next((self.volume / ".comfy-worker" / "venvs").iterdir()).name
        python = f"/runpod-volume/.comfy-worker/venvs/{venv}/bin/python"
        container = Container(
            self.image,
            mounts=[f"{self.volume}:/runpod-volume"],
            args=["/runpod-volume/ComfyUI/main.py", "--listen", "127.0.0.1", "--port", str(port), "--cpu"],
            entrypoint=python,
            workdir="/runpod-volume/ComfyUI",
        )
        self.containers.append(container)
        launched = time.time()
        container.start()
        deadline = time.monotonic() + 120
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/system_stats", timeout=1).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError(container.logs()[-4000:]) from None
                time.sleep(0.02)
        seconds = time.time() - launched
        container.remove()
        return seconds

    def fresh(self) -> tuple[Container, dict[str, float]]:
        container, port = self.worker()
        launched = time.time()
        container.start()
        done = first_job(port, container)
        return container, parts(container, launched, done)

    def restarted(self, container: Container) -> dict[str, float]:
        container.stop()
        port = int(container.env["RP_API_PORT"])
        launched = time.time()
        docker_image.docker("start", container.name)
        done = first_job(port, container)
        return parts(container, launched, done)

    def close(self) -> None:
        for container in self.containers:
            container.remove()
        self.server.close()


def report(title: str, runs: list[dict[str, float]]) -> float:
    print(f"\n{title} (median of {len(runs)}):")
    for name in runs[0]:
        print(f"  {name:30} {statistics.median(run[name] for run in runs):6.2f} s")
    return statistics.median(run["first job accepted"] for run in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    reason = docker_image.engine()
    if reason is not None:
        print(f"no Docker engine: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        bench = Bench(Path(tmp))
        try:
            bench.build()
            bench.warm_the_volume()
            boots = [bench.comfyui_boot() for _ in range(args.rounds)]
            fresh_runs, restarted_runs = [], []
            for _ in range(args.rounds):
                container, fresh = bench.fresh()
                fresh_runs.append(fresh)
                restarted_runs.append(bench.restarted(container))
                container.remove()
            boot = statistics.median(boots)
            print(f"\nComfyUI's own boot (docker run to its first answer, median of {len(boots)}): {boot:.2f} s")
            results: dict[str, Any] = {
                "fresh container on the warm volume": report("fresh container on the warm volume", fresh_runs),
                "restarted container": report("restarted container", restarted_runs),
            }
        finally:
            bench.close()
            docker_image.stop_engine()
    failed = False
    print(f"\ntarget: first job within ComfyUI's boot + {TARGET_MARGIN_S:g} s = {boot + TARGET_MARGIN_S:.2f} s")
    for name, seconds in results.items():
        ok = seconds <= boot + TARGET_MARGIN_S
        failed |= not ok
        print(f"  {name:36} {seconds:6.2f} s  {'ok' if ok else 'MISSED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
