"""start.sh end to end on a temporary volume: ComfyUI and custom nodes from local git repositories.

ComfyUI is the stand-in server made into a tagged repository (a real ComfyUI checkout when COMFYUI_DIR is
set); node requirements are wheels made here, so nothing leaves the machine.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from comfy_worker.provision.workspace import Workspace

from .conftest import REPO
from .file_server import FileServer, make_data
from .git_repos import Repo, make_wheel, node_repo, output_node_repo, real_comfyui_repo, standin_comfyui_repo
from .processes import stopped_on_exit
from .worker_process import WORKER_ENV_PREFIXES, ComfyBackend, backend_params, free_port, runsync_when_up, stop

MODEL_FREE = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "provisioned"}},
}


class Volume:
    """A volume, the repositories it installs from, and start.sh runs against them."""

    def __init__(self, root: Path, comfyui: Repo, python: str = sys.executable) -> None:
        self.root = root
        self.path = root / "volume"
        self.comfyui = comfyui
        self.python = python
        self.baked = root / "baked.yml"

    def env(self, **extra: str) -> dict[str, str]:
        """start.sh's environment: the volume, the pid file and the repositories in ``root``; ComfyUI and
        Jupyter on loopback (local mode would listen on 0.0.0.0)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(WORKER_ENV_PREFIXES)}
        return env | {
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
            "WORKER_PYTHON": sys.executable,
            "COMFYUI_PYTHON": self.python,
            "WORKSPACE": str(self.path),
            "COMFYUI_REPO": self.comfyui.url,
            "BAKED_CONFIG": str(self.baked),
            "WORKER_PID_FILE": str(self.root / "worker.pid"),
            "COMFYUI_LISTEN": "127.0.0.1",
            "JUPYTER_LISTEN": "127.0.0.1",
            **extra,
        }

    def provision(self, config: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
        if config is not None:
            self.baked.write_text(config)
        return subprocess.run(
            [str(REPO / "start.sh"), "provision"],
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    @property
    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / ".comfy-worker" / "state.json").read_text())
        return data

    @property
    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / ".comfy-worker" / "status.json").read_text())
        return data


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    return Volume(tmp_path, standin_comfyui_repo(tmp_path / "src"))


def config_with(*node_urls: str, comfyui: str = "latest", models: list[dict[str, Any]] | None = None) -> str:
    lines = [f"comfyui:\n  version: {comfyui}\nnodes:"]
    lines += [f"  - url: {url}" for url in node_urls] or ["  []"]
    lines += [f"models: {json.dumps(models)}"] if models else []  # JSON is YAML
    return "\n".join(lines).replace("nodes:\n  []", "nodes: []") + "\n"


@pytest.fixture
def files(tmp_path: Path) -> Iterator[FileServer]:
    server = FileServer(tmp_path / "served")
    yield server
    server.close()


def test_first_start_provisions_and_the_second_skips(volume: Volume, tmp_path: Path) -> None:
    node = node_repo(tmp_path / "src", "my-node")
    first = volume.provision(config_with(node.url))
    assert first.returncode == 0, first.stderr
    assert "ComfyUI: latest = tag v0.3.64" in first.stderr and "node my-node: latest = tag v1.0.0" in first.stderr
    assert (volume.path / "ComfyUI" / "main.py").is_file()
    assert (volume.path / "ComfyUI" / "custom_nodes" / "my-node" / "__init__.py").is_file()
    assert volume.state["provisioned_sha256"] == volume.status["config_sha256"]
    assert volume.status["ok"] is True and volume.status["config_source"] == str(volume.baked)
    assert (volume.path / ".comfy-worker" / "config.yml").read_text() == volume.baked.read_text()

    # Nothing may even be asked of the repositories when the config did not change.
    shutil.move(node.path, tmp_path / "moved-node")
    shutil.move(volume.comfyui.path, tmp_path / "moved-comfyui")
    second = volume.provision()
    assert second.returncode == 0, second.stderr
    assert "config.yml unchanged" in second.stderr and "Provisioning" not in second.stderr


def test_an_edited_config_redoes_only_what_changed(volume: Volume, tmp_path: Path) -> None:
    first_node, second_node = node_repo(tmp_path / "src", "first"), node_repo(tmp_path / "src", "second")
    assert volume.provision(config_with(first_node.url)).returncode == 0
    shutil.move(volume.comfyui.path, tmp_path / "moved-comfyui")  # ComfyUI unchanged: never consulted
    shutil.move(first_node.path, tmp_path / "moved-first")  # the first node unchanged: never consulted
    edited = volume.provision(config_with(str(tmp_path / "src" / "first"), second_node.url))
    assert edited.returncode == 0, edited.stderr
    assert "because the config changed" in edited.stderr
    assert "node second: latest = tag v1.0.0" in edited.stderr
    assert "ComfyUI:" not in edited.stderr and "node first" not in edited.stderr
    assert sorted(volume.state["nodes"]) == ["first", "second"]

    removed = volume.provision(config_with(str(tmp_path / "src" / "first")))
    assert removed.returncode == 0, removed.stderr
    assert "node second: disabled" in removed.stderr
    assert (volume.path / "ComfyUI" / "custom_nodes" / "second.disabled").is_dir()


def test_config_yml_env_plain_and_base64_win_over_the_volume_and_the_image(volume: Volume, tmp_path: Path) -> None:
    node = node_repo(tmp_path / "src", "from-env")
    volume.baked.write_text(config_with())
    volume.path.mkdir()
    (volume.path / "config.yml").write_text("comfyui: {version: does-not-exist}\n")
    plain = config_with(node.url)
    done = volume.provision(CONFIG_YML=plain)
    assert done.returncode == 0, done.stderr
    assert "Provisioning from CONFIG_YML" in done.stderr and "node from-env" in done.stderr
    assert (volume.path / ".comfy-worker" / "config.yml").read_text() == plain

    encoded = base64.b64encode(config_with(comfyui="v0.3.64").encode()).decode()
    done = volume.provision(CONFIG_YML=encoded)
    assert done.returncode == 0, done.stderr
    assert "node from-env: disabled" in done.stderr  # the decoded config has no nodes
    assert volume.status["config_source"] == "CONFIG_YML"

    volume_config = volume.provision()  # without CONFIG_YML: the volume's config.yml, with its bad version
    assert volume_config.returncode == 1
    assert "'does-not-exist' is not a tag, branch or commit" in volume.status["failed"][0]["error"]


def test_a_failing_required_item_leaves_the_sha_unwritten_and_is_retried(volume: Volume, tmp_path: Path) -> None:
    good = node_repo(tmp_path / "src", "good")
    missing = tmp_path / "src" / "late"
    failed = volume.provision(config_with(good.url, str(missing)))
    assert failed.returncode == 1
    assert volume.state["provisioned_sha256"] is None
    assert volume.status["ok"] is False
    assert [(f["kind"], f["name"]) for f in volume.status["failed"]] == [("node", "late")]
    assert "good" in volume.state["nodes"], "what succeeded is recorded, so the retry skips it"

    node_repo(tmp_path / "src", "late")  # the repository appears: the next start retries only that node
    retried = volume.provision()
    assert retried.returncode == 0, retried.stderr
    assert "node late: latest" in retried.stderr and "node good" not in retried.stderr
    assert volume.state["provisioned_sha256"] == volume.status["config_sha256"]


def test_an_invalid_config_is_reported_and_nothing_is_installed(volume: Volume) -> None:
    done = volume.provision("models:\n  - {url: 'https://example.invalid/a.bin', destination: chekpoints}\n")
    assert done.returncode == 1
    assert "models[0].destination: 'chekpoints' is not a ComfyUI model folder" in done.stderr
    assert volume.status["failed"][0]["kind"] == "config"
    assert not (volume.path / "ComfyUI").exists()


def test_a_new_python_environment_gets_the_requirements_again(volume: Volume, tmp_path: Path) -> None:
    """A new image on an old volume: the SHA matches, but the image's environment lacks the node's deps."""
    wheel = make_wheel(tmp_path / "wheels", "tinydep_env")
    node = node_repo(tmp_path / "src", "needs-dep", extra={"requirements.txt": f"{wheel}\n"})
    pythons = []
    for name in ("old-image", "new-image"):
        venv = tmp_path / name
        subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
        pythons.append(str(venv / "bin" / "python"))
    volume.python = pythons[0]
    assert volume.provision(config_with(node.url)).returncode == 0
    volume.python = pythons[1]
    again = volume.provision()
    assert again.returncode == 0, again.stderr
    assert "this Python environment lacks 2 requirement set(s)" in again.stderr
    assert "node needs-dep" not in again.stderr, "the checkout on the volume was fine; only the deps were missing"
    check = subprocess.run([pythons[1], "-c", "import tinydep_env"], capture_output=True, check=False)
    assert check.returncode == 0, "the node's requirement was not installed into the new environment"


def test_a_comfyui_already_there_is_used_as_it_is(volume: Volume, tmp_path: Path) -> None:
    mine = tmp_path / "my-comfyui"
    shutil.copytree(volume.comfyui.path, mine, ignore=shutil.ignore_patterns(".git"))
    done = volume.provision(config_with(comfyui="nightly"), COMFYUI_DIR=str(mine))
    assert done.returncode == 0, done.stderr
    assert f"Using the ComfyUI already at {mine}" in done.stderr
    assert not (mine / ".git").exists()


def test_dry_run_prints_the_plan_and_changes_nothing(volume: Volume, tmp_path: Path) -> None:
    node = node_repo(tmp_path / "src", "planned")
    volume.baked.write_text(config_with(node.url))
    done = subprocess.run(
        [sys.executable, "-m", "comfy_worker.provision", "--dry-run"],
        env=volume.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "gate: nothing was provisioned on this volume yet" in done.stdout
    assert "ComfyUI " in done.stdout and "latest = tag v0.3.64" in done.stdout
    assert "node planned: latest = tag v1.0.0" in done.stdout and ": clone ->" in done.stdout
    assert not (volume.path / "ComfyUI").exists()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for_job(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> dict[str, Any]:
    return runsync_when_up(url, MODEL_FREE, process, log, timeout_s)


def run_start_sh(volume: Volume, log: Path, **extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """start.sh in a process group of its own (``stop_start_sh`` ends all of it), on free ports."""
    api_port = free_port()
    env = volume.env(**({"RP_API_PORT": str(api_port), "COMFY_API_URL": f"http://127.0.0.1:{free_port()}"} | extra))
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(REPO / "start.sh")], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, f"http://127.0.0.1:{api_port}"


def stop_start_sh(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as Docker stops a container, then SIGKILL for what is left of the group."""
    stop(process, first_signal=signal.SIGTERM)


def test_start_sh_provisions_then_serves_jobs_on_the_installed_comfyui(
    volume: Volume, files: FileServer, tmp_path: Path
) -> None:
    files.add("/weights.safetensors", make_data(64 * 1024))
    models = [
        {"url": files.url("/weights.safetensors"), "destination": "checkpoints/sd15"},
        {"url": files.url("/gone.safetensors"), "destination": "loras", "optional": True},
    ]
    volume.baked.write_text(config_with(node_repo(tmp_path / "src", "served-node").url, models=models))
    log = tmp_path / "start.log"
    comfy_port = free_port()
    process, url = run_start_sh(volume, log, COMFY_API_URL=f"http://127.0.0.1:{comfy_port}")
    try:
        body = wait_for_job(url, process, log)
        assert body["status"] == "COMPLETED", body
        assert any("Provisioning: model loras/" in w and "404" in w for w in body["output"]["warnings"]), body
        text = log.read_text()
        assert f"--extra-model-paths-config {volume.path}/.comfy-worker/extra_model_paths.yaml" in text
        # COMFYUI_LISTEN (here loopback) reaches ComfyUI's command line; local mode's default, 0.0.0.0, is
        # test_workspace_detection's
        assert f"{(volume.path / 'ComfyUI').resolve()}/main.py --listen 127.0.0.1" in text  # the install tree's
        seen = requests.get(f"http://127.0.0.1:{comfy_port}/models/checkpoints", timeout=10).json()
        assert "sd15/weights.safetensors" in seen, "ComfyUI does not see the model on the volume"
    finally:
        stop_start_sh(process)


def test_a_failing_required_model_leaves_the_sha_unwritten(volume: Volume, files: FileServer) -> None:
    data = make_data(256 * 1024, seed=3)
    models = [{"url": files.url("/late.safetensors"), "destination": "vae"}]
    failed = volume.provision(config_with(models=models))
    assert failed.returncode == 1
    assert volume.state["provisioned_sha256"] is None
    assert volume.status["failed"][0]["kind"] == "model" and "404" in volume.status["failed"][0]["error"]
    files.add("/late.safetensors", data)
    retried = volume.provision()
    assert retried.returncode == 0, retried.stderr
    assert (volume.path / "models" / "vae" / "late.safetensors").read_bytes() == data
    assert volume.state["provisioned_sha256"] == volume.status["config_sha256"]
    assert "ComfyUI:" not in retried.stderr, "only the failed model is retried"


def test_an_edited_config_downloads_only_the_new_model(volume: Volume, files: FileServer) -> None:
    files.add("/a.safetensors", make_data(128 * 1024, seed=1))
    files.add("/b.safetensors", make_data(128 * 1024, seed=2))
    first = [{"url": files.url("/a.safetensors"), "destination": "loras"}]
    assert volume.provision(config_with(models=first)).returncode == 0
    both = [*first, {"url": files.url("/b.safetensors"), "destination": "loras"}]
    assert volume.provision(config_with(models=both)).returncode == 0
    assert len(files.gets("/a.safetensors")) == 2, "a.safetensors was fetched again"  # probe + download, once
    assert len(files.gets("/b.safetensors")) == 2


def test_four_workers_starting_together_install_everything_once(
    volume: Volume, files: FileServer, tmp_path: Path
) -> None:
    models = []
    for i in range(3):
        data = make_data(2 * 1024 * 1024, seed=i)
        files.add(f"/m{i}.safetensors", data, rate=4 * 1024 * 1024)  # slow enough for the starts to overlap
        models.append({"url": files.url(f"/m{i}.safetensors"), "destination": "checkpoints", "sha256": sha256(data)})
    volume.baked.write_text(config_with(node_repo(tmp_path / "src", "shared-node").url, models=models))
    with contextlib.ExitStack() as stack:
        starts = [
            stack.enter_context(
                stopped_on_exit(
                    subprocess.Popen(
                        [str(REPO / "start.sh"), "provision"],
                        env=volume.env(),
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        start_new_session=True,
                    )
                )
            )
            for _ in range(4)
        ]
        outputs = [start.communicate(timeout=300) for start in starts]
    assert [start.returncode for start in starts] == [0, 0, 0, 0], outputs
    logs = "".join(err for _, err in outputs)
    assert logs.count("comfy_worker.provision: ComfyUI: latest = tag v0.3.64") == 1, logs  # one clone
    assert logs.count("comfy_worker.provision.nodes: shared-node: latest") == 1, logs
    for i in range(3):
        assert files.bytes_sent[f"/m{i}.safetensors"] == 2 * 1024 * 1024 + 1, "downloaded more than once"
    assert sorted(p.name for p in (volume.path / "models" / "checkpoints").iterdir()) == [
        "m0.safetensors",
        "m1.safetensors",
        "m2.safetensors",
    ], "a partial or temporary file was left in the model folder"
    assert volume.state["provisioned_sha256"] == volume.status["config_sha256"]


def test_a_failed_provisioning_explains_itself_in_every_job(volume: Volume, tmp_path: Path) -> None:
    volume.baked.write_text(config_with(comfyui="v9.9.9"))
    log = tmp_path / "start.log"
    process, url = run_start_sh(volume, log, RUNPOD_WEBHOOK_GET_JOB="")
    try:
        body = wait_for_job(url, process, log)
        assert body["status"] == "FAILED", body
        error = json.loads(body["error"])
        assert error["error_type"] == "comfyui_unavailable"
        failed = error["diagnostics"]["provisioning"]["failed"]
        assert failed[0]["kind"] == "comfyui" and "'v9.9.9' is not a tag, branch or commit" in failed[0]["error"]
        assert "Provisioning failed first: comfyui" in error["message"]
        assert "provisioning failed: the worker starts anyway" in log.read_text()
    finally:
        stop_start_sh(process)


def fake_jupyter(folder: Path, record: Path) -> Path:
    """A ``jupyter`` module (for PYTHONPATH) that writes its token and arguments to ``record``, then waits."""
    folder.mkdir()
    (folder / "jupyter.py").write_text(
        "import json, os, sys, time\n"
        "if '--version' in sys.argv: print('4.4'); sys.exit(0)\n"
        f"open({str(record)!r}, 'w').write(json.dumps([os.environ.get('JUPYTER_TOKEN'), *sys.argv[1:]]))\n"
        "time.sleep(600)\n"
    )
    return folder


def test_jupyter_starts_only_with_a_password_and_never_on_serverless(volume: Volume, tmp_path: Path) -> None:
    record = tmp_path / "jupyter-argv.json"
    fake = fake_jupyter(tmp_path / "fake-jupyter", record)
    volume.baked.write_text(config_with())
    jupyter_port = str(free_port())
    for extra, expect_started in (
        ({}, False),
        ({"JUPYTER_PASSWORD": "s3cret", "JUPYTER_PORT": jupyter_port}, True),
    ):
        log = tmp_path / "start.log"
        process, url = run_start_sh(volume, log, PYTHONPATH=str(fake), **extra)
        try:
            assert wait_for_job(url, process, log)["status"] == "COMPLETED"
            # start.sh starts Jupyter before the worker, so it has its argument file (or never will) by now;
            # its Python may still be starting on a loaded machine
            deadline = time.monotonic() + 120
            while expect_started and not record.exists():
                assert time.monotonic() < deadline and process.poll() is None, log.read_text()
                time.sleep(0.1)
            assert record.exists() == expect_started, log.read_text()
        finally:
            stop_start_sh(process)
    token, *argv = json.loads(record.read_text())
    assert argv[:1] == ["lab"] and argv[argv.index("--port") + 1] == jupyter_port
    assert argv[argv.index("--ip") + 1] == "127.0.0.1"  # JUPYTER_LISTEN (the tests' loopback)
    assert token == "s3cret" and not any("s3cret" in arg for arg in argv)  # `ps` shows the command line


def test_workspace_detection() -> None:
    def only(*dirs: str) -> Any:
        return lambda path: str(path) in dirs

    serverless = Workspace.from_env({"RUNPOD_WEBHOOK_GET_JOB": "x", "RUNPOD_POD_ID": "p"}, only("/runpod-volume"))
    assert (serverless.mode, serverless.root, serverless.listen) == ("serverless", Path("/runpod-volume"), "127.0.0.1")
    assert serverless.comfyui_dir == Path("/runpod-volume/ComfyUI")
    assert serverless.models_dir == Path("/runpod-volume/models")
    pod = Workspace.from_env({"RUNPOD_POD_ID": "p"}, only("/workspace"))
    assert (pod.mode, pod.root, pod.listen) == ("pod", Path("/workspace"), "0.0.0.0")
    local = Workspace.from_env({}, only())
    assert (local.mode, local.root, local.listen) == ("local", REPO / "workspace", "0.0.0.0")
    assert Workspace.from_env({}, only("/workspace")).root == REPO / "workspace", "/workspace only on a pod"
    custom = Workspace.from_env(
        {"WORKSPACE": "/data", "MODELS_DIR": "/models", "COMFYUI_DIR": "/opt/ComfyUI", "COMFYUI_LISTEN": "::"},
        only("/runpod-volume"),
    )
    assert (custom.root, custom.models_dir, custom.comfyui_dir, custom.listen) == (
        Path("/data"),
        Path("/models"),
        Path("/opt/ComfyUI"),
        "::",
    )
    assert custom.state_dir == Path("/data/.comfy-worker")


def comfyui_repo_for(backend: ComfyBackend, root: Path) -> Repo:
    return standin_comfyui_repo(root) if backend.name == "standin" else real_comfyui_repo(root, backend.comfyui_dir)


def run_job(url: str, workflow: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = requests.post(f"{url}/runsync", json={"input": {"workflow": workflow}}, timeout=120).json()
    return body


@pytest.mark.parametrize("backend", backend_params())
def test_apply_config_restarts_comfyui_only_when_nodes_changed(backend: ComfyBackend, tmp_path: Path) -> None:
    """Provisioned nodes load in ComfyUI; apply_config.sh adds one to the running worker, which restarts ComfyUI.

    The stand-in does not load custom nodes, so with it the restart itself is what is checked.
    """
    volume = Volume(tmp_path, comfyui_repo_for(backend, tmp_path / "src"), backend.python)
    first, second = (
        output_node_repo(tmp_path / "src", "ProvisionedA"),
        output_node_repo(tmp_path / "src", "ProvisionedB"),
    )
    volume.baked.write_text(config_with(first.url))
    pid_file = tmp_path / "worker.pid"
    extra = {"WORKER_PID_FILE": str(pid_file), "COMFY_STARTUP_TIMEOUT": str(backend.boot_timeout_s)}
    log = tmp_path / "start.log"
    process, url = run_start_sh(volume, log, **extra)
    real = backend.name == "real"
    uses = {"1": {"class_type": "ProvisionedA", "inputs": {"value": 5}}} if real else MODEL_FREE
    try:
        body = wait_for_job(url, process, log, timeout_s=backend.boot_timeout_s + 120)
        assert body["status"] == "COMPLETED", body
        if real:
            body = run_job(url, uses)
            assert body["output"]["text"] == [{"node_id": "1", "text": "ProvisionedA=5"}], body

        volume.baked.write_text(config_with(first.url) + "# a comment changes the SHA, not what is installed\n")
        unchanged = subprocess.run(
            [str(REPO / "apply_config.sh")], env=volume.env(**extra), capture_output=True, text=True, check=False
        )
        assert unchanged.returncode == 0, unchanged.stderr
        assert "No custom node changed: ComfyUI keeps running" in unchanged.stderr

        volume.baked.write_text(config_with(first.url, second.url))
        applied = subprocess.run(
            [str(REPO / "apply_config.sh")], env=volume.env(**extra), capture_output=True, text=True, check=False
        )
        assert applied.returncode == 0, applied.stderr
        assert f"Asked the worker (pid {pid_file.read_text().strip()}) to restart ComfyUI" in applied.stderr
        deadline = time.monotonic() + backend.boot_timeout_s + 30
        while "ComfyUI restarted and ready" not in log.read_text():
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.2)
        assert log.read_text().count("Restarting ComfyUI to load the changed custom nodes") == 1
        if real:
            body = run_job(url, {"1": {"class_type": "ProvisionedB", "inputs": {"value": 7}}})
            assert body["output"]["text"] == [{"node_id": "1", "text": "ProvisionedB=7"}], body
        else:
            assert run_job(url, MODEL_FREE)["status"] == "COMPLETED"
    finally:
        stop_start_sh(process)


def test_a_nodes_baked_image_downloads_only_the_models_at_run_time(
    volume: Volume, files: FileServer, tmp_path: Path
) -> None:
    """bake.sh nodes at build time (the real start.sh provision), then the first start of that image."""
    files.add("/late.safetensors", make_data(64 * 1024, seed=9))
    models = [{"url": files.url("/late.safetensors"), "destination": "checkpoints"}]
    volume.baked.write_text(config_with(node_repo(tmp_path / "src", "baked-node").url, models=models))
    baked = subprocess.run(
        [str(REPO / "bake.sh"), "nodes"], env=volume.env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert baked.returncode == 0, baked.stderr
    assert (volume.path / "ComfyUI" / "custom_nodes" / "baked-node").is_dir()
    assert not files.gets("/late.safetensors"), "models must wait for run time"

    volume_models = tmp_path / "network-volume" / "models"
    first_start = volume.provision(MODELS_DIR=str(volume_models))
    assert first_start.returncode == 0, first_start.stderr
    assert "ComfyUI:" not in first_start.stderr and "baked-node" not in first_start.stderr, "re-did the bake"
    assert (volume_models / "checkpoints" / "late.safetensors").is_file()


def test_a_run_killed_between_two_configs_is_not_taken_for_the_old_one(
    volume: Volume, files: FileServer, tmp_path: Path
) -> None:
    """Config A, then B killed while its model downloads (B's node version already checked out), then A again:
    the gate must not trust A's SHA, since the volume holds B's node now."""
    node = Repo(tmp_path / "src" / "moving")
    node.commit({"__init__.py": "VERSION = 1\n"})
    node.tag("v1")
    node.commit({"__init__.py": "VERSION = 2\n"})
    node.tag("v2")
    config_a = f"nodes:\n  - {{url: {node.url}, version: v1}}\n"
    assert volume.provision(config_a).returncode == 0
    files.add("/slow.safetensors", make_data(4 * 1024 * 1024), hold_at=1024)  # B never finishes it
    model = json.dumps([{"url": files.url("/slow.safetensors"), "destination": "vae"}])
    volume.baked.write_text(f"nodes:\n  - {{url: {node.url}, version: v2}}\nmodels: {model}\n")
    with (tmp_path / "b.log").open("wb") as out:
        run_b = subprocess.Popen(
            [str(REPO / "start.sh"), "provision"], env=volume.env(), stderr=out, start_new_session=True
        )
    with stopped_on_exit(run_b, first_signal=None, grace_s=0):  # killed, as a container is: all its processes
        deadline = time.monotonic() + 120
        while not [get for get in files.gets("/slow.safetensors") if get.headers.get("range") != "bytes=0-0"]:
            assert time.monotonic() < deadline and run_b.poll() is None, (tmp_path / "b.log").read_text()
            time.sleep(0.05)
    installed = volume.path / "ComfyUI" / "custom_nodes" / "moving" / "__init__.py"
    assert installed.read_text() == "VERSION = 2\n"

    back_to_a = volume.provision(config_a)
    assert back_to_a.returncode == 0, back_to_a.stderr
    assert "config.yml unchanged" not in back_to_a.stderr
    assert installed.read_text() == "VERSION = 1\n"


# --- hardening: locks, credentials, half-made clones, messages ----------------------------------------------------


def test_a_hung_holder_of_the_volume_lock_fails_the_start_with_its_name(volume: Volume, tmp_path: Path) -> None:
    """A worker that hangs (or, with lock files, dies on another machine) holding the volume's lock used to block
    every start forever; now the start gives up after PROVISION_LOCK_TIMEOUT and says who holds the lock."""
    lock = volume.path / ".comfy-worker" / "provision.lock"
    lock.parent.mkdir(parents=True)
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "open(sys.argv[1] + '.owner', 'w').write('stuck-worker pid 4711')\n"
            "open(sys.argv[2], 'w').close()\n"
            "time.sleep(600)\n",
            str(lock),
            str(ready),
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120  # a Python start on a loaded machine
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
            time.sleep(0.05)
        done = volume.provision(config_with(), PROVISION_LOCK_TIMEOUT="1")
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()
    assert done.returncode == 1, done.stderr
    [failed] = volume.status["failed"]
    assert failed["kind"] == "lock" and "stuck-worker pid 4711" in failed["error"], failed
    assert "stuck-worker pid 4711" in done.stderr


class GitOverHttp:
    """Bare copies of repositories served by ``git http-backend`` (git's smart HTTP) on loopback; the
    credentials in the URLs are accepted and ignored, as a server that needs none would."""

    def __init__(self, root: Path) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Backend(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.cgi()

            def do_POST(self) -> None:
                self.cgi()

            def cgi(self) -> None:
                path, _, query = self.path.partition("?")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                env = {
                    "PATH": os.environ["PATH"],
                    "GIT_PROJECT_ROOT": str(root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "PATH_INFO": path,
                    "QUERY_STRING": query,
                    "REQUEST_METHOD": self.command,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                }
                done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=False)
                head, _, payload = done.stdout.partition(b"\r\n\r\n")
                headers = [line.split(":", 1) for line in head.decode().split("\r\n") if ":" in line]
                status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() != "status":
                        self.send_header(name, value.strip())
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.root = root
        root.mkdir(parents=True)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, repo: Repo, credentials: str) -> str:
        bare = self.root / f"{repo.path.name}.git"
        subprocess.run(["git", "clone", "--quiet", "--bare", repo.url, str(bare)], check=True)
        subprocess.run(["git", "config", "uploadpack.allowAnySHA1InWant", "true"], cwd=bare, check=True)
        return f"http://{credentials}@127.0.0.1:{self.server.server_address[1]}/{bare.name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_credentials_in_urls_stay_out_of_logs_status_and_state(
    volume: Volume, files: FileServer, tmp_path: Path
) -> None:
    """config.yml's private node URLs (user:token@) and model URLs (?token=) must not reach the log, status.json
    (every job's diagnostics) or state.json, also when git or the server quotes them in an error."""
    secret = "s3cr3t-t0ken"
    http = GitOverHttp(tmp_path / "http")
    try:
        good = http.serve(node_repo(tmp_path / "src", "private-node"), f"user:{secret}")
        bad = http.serve(node_repo(tmp_path / "src", "bad-version"), f"{secret}")
        model = {"url": files.url("/missing.bin") + f"?token={secret}", "destination": "vae"}
        config = f"nodes:\n  - {{url: '{good}'}}\n  - {{url: '{bad}', version: nope}}\nmodels: {json.dumps([model])}\n"
        first = volume.provision(config)
        second = volume.provision()
    finally:
        http.close()
    assert first.returncode == 1, first.stderr
    assert "private-node: latest = tag v1.0.0" in first.stderr
    assert {f["name"] for f in volume.status["failed"]} >= {"bad-version"}
    assert "'nope' is not a tag" in json.dumps(volume.status)
    for text, where in (
        (first.stderr + first.stdout + second.stderr + second.stdout, "the log"),
        ((volume.path / ".comfy-worker" / "status.json").read_text(), "status.json"),
        ((volume.path / ".comfy-worker" / "state.json").read_text(), "state.json"),
    ):
        assert secret not in text, f"the token leaked into {where}"
    assert "node private-node" not in second.stderr, "the node installed from a URL with a token was redone"


def test_a_half_made_comfyui_clone_is_replaced_when_the_url_is_fixed(volume: Volume, tmp_path: Path) -> None:
    """A wrong COMFYUI_REPO whose fetch fails leaves workspace/ComfyUI/.git and nothing else; the corrected URL
    must then install instead of failing with "is a clone of <old>, not of <new>" until the folder is removed."""
    wrong = node_repo(tmp_path / "src", "not-comfyui")
    commit = subprocess.run(
        ["git", "rev-parse", "v0.3.64"], cwd=volume.comfyui.path, capture_output=True, text=True, check=True
    ).stdout.strip()
    failed = volume.provision(config_with(comfyui=commit), COMFYUI_REPO=wrong.url)
    assert failed.returncode == 1
    assert volume.status["failed"][0]["kind"] == "comfyui"
    assert [p.name for p in (volume.path / "ComfyUI").iterdir()] == [".git"]

    fixed = volume.provision()
    assert fixed.returncode == 0, fixed.stderr
    assert "because the last provisioning run did not complete" in fixed.stderr
    assert "nothing was provisioned" not in fixed.stderr
    assert (volume.path / "ComfyUI" / "main.py").is_file()


def test_a_bad_comfyui_version_still_reports_a_bad_node_version(volume: Volume, tmp_path: Path) -> None:
    node = node_repo(tmp_path / "src", "typo-node")
    done = volume.provision(f"comfyui: {{version: v9.9.9}}\nnodes:\n  - {{url: {node.url}, version: v1.0.O}}\n")
    assert done.returncode == 1
    failed = {(f["kind"], f["name"]): f["error"] for f in volume.status["failed"]}
    assert "'v9.9.9' is not a tag" in failed["comfyui", volume.comfyui.url]
    assert "'v1.0.O' is not a tag" in failed["node", "typo-node"]


def test_dry_run_of_an_invalid_config_is_a_message_not_a_traceback(volume: Volume) -> None:
    volume.baked.write_text("models:\n  - {url: 'https://example.invalid/a.bin', destination: chekpoints}\n")
    done = subprocess.run(
        [sys.executable, "-m", "comfy_worker.provision", "--dry-run"],
        env=volume.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "models[0].destination: 'chekpoints' is not a ComfyUI model folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_existing_checkout_gets_its_requirements_without_torch_and_says_so(volume: Volume, tmp_path: Path) -> None:
    """An existing checkout runs in the user's own Python: never install a torch there (PyPI's would be built
    for another CUDA), and say what is installed into which Python."""
    wheel = make_wheel(tmp_path / "wheels", "comfy_dep")
    mine = tmp_path / "my-comfyui"
    shutil.copytree(volume.comfyui.path, mine, ignore=shutil.ignore_patterns(".git"))
    own = (mine / "requirements.txt").read_text()  # what the stand-in needs to start (the start-up check runs it)
    (mine / "requirements.txt").write_text(f"{own}torch\ntorchaudio>=2.0  # CUDA build\nTorchVision==0.20\n{wheel}\n")
    venv = tmp_path / "user-venv"
    subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    volume.python = str(venv / "bin" / "python")
    done = volume.provision(config_with(), COMFYUI_DIR=str(mine))
    assert done.returncode == 0, done.stderr
    assert f"into its Python {volume.python}" in done.stderr
    assert "leaving out torch, torchvision, torchaudio" in done.stderr
    listed = subprocess.run(
        ["uv", "pip", "list", "--python", volume.python], capture_output=True, text=True, check=True
    ).stdout
    assert "comfy-dep" in listed.replace("_", "-")
    assert "torch" not in listed


def test_slow_provisioning_is_reported_with_runpods_start_up_limit(caplog: pytest.LogCaptureFixture) -> None:
    from comfy_worker.provision.run import reporting_slowness

    with caplog.at_level("WARNING"), reporting_slowness({"RUNPOD_INIT_TIMEOUT": "900"}, interval_s=0.05):
        time.sleep(0.3)
    messages = [record.getMessage() for record in caplog.records]
    assert messages and "Still provisioning after" in messages[0] and "RUNPOD_INIT_TIMEOUT is 900 s" in messages[0]


def test_a_layered_venv_is_made_aside_and_installed_into_with_its_own_pip(tmp_path: Path) -> None:
    """The image's layout: node requirements go into a venv on the volume made on top of the Python that holds
    PyTorch and ComfyUI's requirements (whose marker the gate reads too: the image tier shows that)."""
    from comfy_worker.provision import pyenv

    folder = tmp_path / "volume" / "venvs" / "py-key"
    layered = pyenv.make_venv(folder, sys.executable)
    assert pyenv.make_venv(folder, sys.executable) == layered  # idempotent
    assert pyenv.prefixes(layered) == (folder, Path(sys.base_prefix))  # read from pyvenv.cfg, no interpreter run
    pyenv.add_to_marker(pyenv.marker_path(layered), ["node:x:1"])
    assert "node:x:1" in pyenv.installed_keys(layered)
    assert pyenv.installer(layered) == [layered, "-m", "pip", "install"]  # uv would not see the base's packages
    assert not list(folder.parent.glob(".*"))  # made aside, moved into place


def test_the_workspace_puts_the_comfyui_venv_on_the_volume_keyed_by_the_image() -> None:
    env = {"WORKSPACE": "/vol", "COMFYUI_BASE_PYTHON": "/usr/bin/python3.12", "COMFYUI_VENV_KEY": "py3.12-torch2.9"}
    workspace = Workspace.from_env(env)
    assert workspace.comfyui_venv == Path("/vol/.comfy-worker/venvs/py3.12-torch2.9")
    assert workspace.comfyui_python == "/vol/.comfy-worker/venvs/py3.12-torch2.9/bin/python"
    assert Workspace.from_env({**env, "COMFYUI_PYTHON": "/other/python"}).comfyui_venv is None


def test_comfyui_manager_is_kept_offline_on_serverless_only(tmp_path: Path) -> None:
    from comfy_worker.provision.run import MANAGER_CONFIGS, set_manager_network_mode

    manager = tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-Manager"
    manager.mkdir(parents=True)
    old = tmp_path / "ComfyUI" / MANAGER_CONFIGS[1]
    old.parent.mkdir(parents=True)
    old.write_text("[default]\nuse_uv = True\nnetwork_mode = public\n")
    set_manager_network_mode(Workspace.from_env({"WORKSPACE": str(tmp_path)}), {})
    assert "public" in old.read_text()  # local and pods: the Manager is the user's
    serverless = Workspace.from_env({"WORKSPACE": str(tmp_path), "RUNPOD_WEBHOOK_GET_JOB": "https://x"})
    set_manager_network_mode(serverless, {})
    for relative in MANAGER_CONFIGS:
        text = (tmp_path / "ComfyUI" / relative).read_text()
        assert "network_mode = offline" in text
    assert "use_uv = True" in old.read_text()
    set_manager_network_mode(serverless, {"COMFYUI_MANAGER_NETWORK_MODE": "private"})
    assert "network_mode = private" in old.read_text()
