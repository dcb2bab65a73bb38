"""The repository's Dockerfile built and run for real, for the ``image`` tier and bench/cold_start.py.

No registry image can be pulled on these machines, so stand-ins are made once and kept in the engine:
a Debian 12 base from debootstrap (CUDA_IMAGE; Python 3.11) and a uv image from the ``uv`` wheel on PyPI
(UV_IMAGE, the layout of ghcr.io/astral-sh/uv). PyTorch comes from the ordinary package index. The build
context is the repository's tracked files with the Dockerfile's ``# syntax=`` line dropped (it would make
BuildKit pull a frontend image). The host's CA bundle is passed as the ``ca_bundle`` build secret and mounted
(``CA_BUNDLE``) at run time: never baked. Every build and container uses the host's network and loopback ports.

``engine()`` starts a Docker engine when none answers (as CI does: ``dockerd --bridge=none --iptables=false``),
and says why not when it cannot: the tier is then skipped with that reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conftest import REPO
from .file_server import FileServer
from .git_repos import Repo, git

DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").is_file() else (shutil.which("docker") or "docker")
BASE_IMAGE = "comfy-worker-test/debian:bookworm"
PYTHON_VERSION = "3.11"  # Debian 12's
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTAINER_CA_BUNDLE = "/run/comfy-worker-ca.crt"
TEST_ENV = {"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true"}
SIZES: list[str] = []  # the images built, with their sizes: printed in the terminal summary (conftest)
FIGURES: list[str] = []  # start-up times the tier measured: printed there too
_STARTED: list[subprocess.Popen[bytes]] = []  # the engine engine() started, if it did


class DockerError(RuntimeError):
    """A docker command failed; the message ends with its output."""


def docker(
    *args: str, timeout_s: float = 600, check: bool = True, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DOCKER_BUILDKIT="1")
    done = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout_s, check=False, env=env, **kwargs
    )  # type: ignore[call-overload]
    if check and done.returncode != 0:
        raise DockerError(
            f"docker {' '.join(args[:3])} failed ({done.returncode}): {(done.stderr or done.stdout)[-3000:]}"
        )
    result: subprocess.CompletedProcess[str] = done
    return result


def _engine_answers() -> bool:
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout_s=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def engine() -> str | None:
    """None when an engine answers (started here if need be), else why there is none."""
    if not shutil.which(DOCKER):
        return f"no docker client ({DOCKER}): apt-get install docker.io"
    if _engine_answers():
        return None
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        return "no Docker engine answers and dockerd cannot be started here (not installed, or not root)"
    log_path = Path(tempfile.gettempdir()) / "comfy-worker-dockerd.log"
    with log_path.open("ab") as log:  # the engine keeps its own copy of the descriptor
        started = subprocess.Popen(
            [dockerd, "--bridge=none", "--iptables=false"], stdout=log, stderr=log, start_new_session=True
        )
    _STARTED.append(started)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _engine_answers():
            return None
        if started.poll() is not None:
            return f"dockerd exited with code {started.returncode} (see {log_path})"
        time.sleep(1)
    return f"dockerd did not answer within 60 s (see {log_path})"


def stop_engine() -> None:
    """Stop the engine ``engine()`` started (one started by CI or a person is left alone)."""
    while _STARTED:
        started = _STARTED.pop()
        started.terminate()
        try:
            started.wait(timeout=30)
        except subprocess.TimeoutExpired:
            started.kill()


def image_exists(ref: str) -> bool:
    return docker("image", "inspect", ref, check=False, timeout_s=30).returncode == 0


def image_size(ref: str) -> int:
    return int(docker("image", "inspect", ref, "--format", "{{.Size}}").stdout.strip())


def ensure_base_image() -> str:
    """Debian 12 from debootstrap (about a minute, once per engine) as the CUDA_IMAGE stand-in."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    if not shutil.which("debootstrap"):
        raise DockerError("debootstrap is missing (apt-get install debootstrap): it makes the stand-in base image")
    with tempfile.TemporaryDirectory(prefix="comfy-worker-rootfs-") as root:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", root, "http://deb.debian.org/debian"],
            capture_output=True,
            check=True,
            timeout=900,
        )
        with subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE) as tar:  # closes the pipe
            docker("import", "-", BASE_IMAGE, stdin=tar.stdout)
        if tar.returncode != 0:
            raise DockerError(f"tar of the debootstrap root exited with {tar.returncode}")
    return BASE_IMAGE


def uv_version() -> str:
    """The uv version the Dockerfile pins (UV_IMAGE's tag)."""
    match = re.search(r"^ARG UV_IMAGE=\S+:(\S+)$", (REPO / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert match, "the Dockerfile has no ARG UV_IMAGE=...:VERSION"
    return match.group(1)


def ensure_uv_image() -> str:
    """``FROM scratch`` + the uv and uvx binaries of the ``uv`` wheel: ghcr.io/astral-sh/uv's layout."""
    ref = f"comfy-worker-test/uv:{uv_version()}"
    if image_exists(ref):
        return ref
    pip = shutil.which("python3") or sys.executable
    with tempfile.TemporaryDirectory(prefix="comfy-worker-uv-") as tmp:
        folder = Path(tmp)
        subprocess.run(
            [pip, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", "--dest", tmp,
             "--platform", "manylinux_2_17_x86_64", f"uv=={uv_version()}"],
            capture_output=True,
            check=True,
            timeout=600,
        )  # fmt: skip
        [wheel] = folder.glob("uv-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if re.search(r"\.data/scripts/uvx?$", name):
                    target = folder / "context" / Path(name).name
                    target.parent.mkdir(exist_ok=True)
                    target.write_bytes(archive.read(name))
                    target.chmod(0o755)
        (folder / "context" / "Dockerfile").write_text("FROM scratch\nCOPY uv uvx /\n")
        docker("build", "--quiet", "--tag", ref, str(folder / "context"))
    return ref


def build_context(dest: Path) -> Path:
    """The repository's tracked (and not ignored) files, with the Dockerfile's ``# syntax=`` line dropped."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    dockerfile = dest / "Dockerfile"
    dockerfile.write_text(re.sub(r"^# syntax=.*\n", "", dockerfile.read_text(), count=1))
    return dest


def build_args(**extra: str) -> dict[str, str]:
    """The build arguments that make the Dockerfile build here (stand-in images, the ordinary index)."""
    return {
        "CUDA_IMAGE": ensure_base_image(),
        "UV_IMAGE": ensure_uv_image(),
        "PYTHON_VERSION": PYTHON_VERSION,
        "TORCH_INDEX_URL": "https://pypi.org/simple",
        **extra,
    }


def build(tag: str, context: Path, args: dict[str, str], log: Path, timeout_s: float = 3000) -> float:
    """``docker build`` the context's Dockerfile with host networking; the seconds it took."""
    command = ["build", "--network", "host", "--progress", "plain", "--tag", tag]
    for name, value in args.items():
        command += ["--build-arg", f"{name}={value}"]
    if HOST_CA_BUNDLE.is_file():
        command += ["--secret", f"id=ca_bundle,src={HOST_CA_BUNDLE}"]
    previous = image_id(tag)
    started = time.monotonic()
    done = docker(*command, str(context), timeout_s=timeout_s, check=False)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise DockerError(f"docker build failed (log: {log}): {(done.stderr or done.stdout)[-4000:]}")
    seconds = time.monotonic() - started
    if previous and previous != image_id(tag):  # the last run's image, now untagged: its layers would pile up
        docker("image", "rm", previous, check=False, timeout_s=120)
    return seconds


def image_id(ref: str) -> str | None:
    done = docker("image", "inspect", "--format", "{{.Id}}", ref, check=False, timeout_s=30)
    return done.stdout.strip() if done.returncode == 0 else None


def serve_git(server: FileServer, repo: Repo, name: str) -> str:
    """Serve ``repo`` over git's dumb HTTP protocol from the loopback file server; its URL."""
    bare = server.root / f"{name}.git"
    shutil.rmtree(bare, ignore_errors=True)
    git(repo.path.parent, "clone", "--quiet", "--bare", str(repo.path), str(bare))
    git(bare, "update-server-info")
    for file in bare.rglob("*"):
        if file.is_file():
            server.add_file(f"/{name}.git/{file.relative_to(bare)}", file)
    return server.url(f"/{name}.git")


@dataclass
class Container:
    """One ``docker run -d`` of an image; ``remove()`` takes it away whatever state it is in."""

    image: str
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)  # "host:container[:ro]"
    network: str = "host"
    args: Sequence[str] = ()
    entrypoint: str | None = None
    workdir: str | None = None
    name: str = field(default_factory=lambda: f"comfy-worker-test-{uuid.uuid4().hex[:10]}")
    started_at: float = 0.0

    def start(self) -> Container:
        command = ["run", "-d", "--name", self.name, "--network", self.network]
        if HOST_CA_BUNDLE.is_file():
            command += ["-v", f"{HOST_CA_BUNDLE}:{CONTAINER_CA_BUNDLE}:ro"]
            command += ["-e", f"CA_BUNDLE={CONTAINER_CA_BUNDLE}"]
        for mount in self.mounts:
            command += ["-v", mount]
        for key, value in {**TEST_ENV, **self.env}.items():
            command += ["-e", f"{key}={value}"]
        if self.entrypoint is not None:
            command += ["--entrypoint", self.entrypoint]
        if self.workdir is not None:
            command += ["--workdir", self.workdir]
        self.started_at = time.monotonic()
        docker(*command, self.image, *self.args, timeout_s=120)
        return self

    def start_again(self) -> Container:
        """``docker start`` of the stopped container: the restart of a container whose layer is kept."""
        self.started_at = time.monotonic()
        docker("start", self.name, timeout_s=120)
        return self

    def logs(self) -> str:
        done = docker("logs", self.name, check=False, timeout_s=60)
        return done.stdout + done.stderr

    def running(self) -> bool:
        done = docker("inspect", "--format", "{{.State.Running}}", self.name, check=False, timeout_s=30)
        return done.stdout.strip() == "true"

    def exit_code(self) -> int:
        return int(docker("inspect", "--format", "{{.State.ExitCode}}", self.name, timeout_s=30).stdout.strip())

    def exec(self, *command: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *command, timeout_s=timeout_s, check=False)

    def stop(self, timeout_s: int = 10) -> float:
        """``docker stop`` (SIGTERM, SIGKILL after ``timeout_s``); the seconds it took."""
        started = time.monotonic()
        docker("stop", "--time", str(timeout_s), self.name, timeout_s=timeout_s + 60)
        return time.monotonic() - started

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False, timeout_s=60)


def runsync_inside(
    container: Container, port: int, job_input: Mapping[str, Any], timeout_s: float = 180
) -> dict[str, object]:
    """POST /runsync to the local API from inside the container (it may have no network), with the worker's
    own Python; retried until the API answers."""
    script = (
        "import sys, time, urllib.error, urllib.request\n"
        "url, timeout, body = sys.argv[1], float(sys.argv[2]), sys.argv[3].encode()\n"
        "deadline = time.monotonic() + timeout\n"
        "while True:\n"
        "    try:\n"
        "        request = urllib.request.Request(url, data=body, headers={'Content-Type': 'application/json'})\n"
        "        print(urllib.request.urlopen(request, timeout=timeout).read().decode())\n"
        "        break\n"
        "    except urllib.error.URLError as exc:\n"
        "        if not isinstance(exc.reason, ConnectionError) or time.monotonic() > deadline:\n"
        "            raise\n"
        "        time.sleep(0.1)\n"
    )
    url = f"http://127.0.0.1:{port}/runsync"
    body = json.dumps({"input": job_input})
    done = container.exec("/opt/venv/bin/python", "-c", script, url, str(timeout_s), body, timeout_s=timeout_s + 30)
    if done.returncode != 0:
        raise AssertionError(f"runsync inside the container failed: {done.stderr[-3000:]}\n{container.logs()[-4000:]}")
    result: dict[str, object] = json.loads(done.stdout)
    return result
