"""A changed config while workers run (``comfy_worker/provision/trees.py``): each config's ComfyUI, custom nodes
and venv are an install tree of their own, and ``$WORKSPACE/ComfyUI`` is switched to the new one atomically.

The first test provisions with the image's layout (a venv on top of a base Python) and the stand-in ComfyUI:
what each tree holds, what the copy costs, leases, reuse and removal. The second runs two workers of the real
ComfyUI on one volume: the old one mid-job with a node that reads its files and imports its requirement
lazily, while the new one provisions the node's next version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from comfy_worker.provision import trees

from .figures import FIGURES
from .git_repos import Repo, make_wheel, real_comfyui_repo, standin_comfyui_repo
from .test_provision import Volume, run_start_sh, stop_start_sh
from .worker_process import ComfyBackend, backend_params, runsync_when_up

PROBE = '''
import os, time


class TreeProbe:
    """Waits for a file, then reads its node's data file and imports its requirement: as late as nodes do."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"wait_for": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "tests"

    def run(self, wait_for):
        deadline = time.monotonic() + 600
        while wait_for and not os.path.exists(wait_for) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(os.path.join(os.path.dirname(__file__), "helper.txt")) as file:
            helper = file.read().strip()
        import treedep

        return {"ui": {"text": [f"helper={helper} dep={treedep.VERSION}"]}}


NODE_CLASS_MAPPINGS = {"TreeProbe": TreeProbe}
'''


def probe_node(root: Path, with_requirement: bool = True) -> Repo:
    """The probe node at v1.0.0 (helper v1, treedep 1.0) and v2.0.0 (helper v2, treedep 2.0)."""
    repo = Repo(root / "tree-probe")
    for version in ("1.0", "2.0"):
        files = {"__init__.py": PROBE, "helper.txt": f"v{version[0]}\n"}
        if with_requirement:
            files["requirements.txt"] = f"{make_wheel(root / f'wheels-{version}', 'treedep', version)}\n"
        repo.commit(files, f"v{version}")
        repo.tag(f"v{version}.0")
    return repo


def node_config(repo: Repo, version: str, extra: str = "") -> str:
    return f"comfyui:\n  version: latest\nnodes:\n  - url: {repo.url}\n    version: {version}\n{extra}"


def linked_tree(volume: Volume) -> Path:
    link = volume.path / "ComfyUI"
    assert link.is_symlink() and not os.readlink(link).startswith("/"), "a relative link (pods mount elsewhere)"
    return link.resolve().parent


def dep_version(tree: Path) -> str:
    done = subprocess.run(
        [str(tree / "venv" / "bin" / "python"), "-c", "import treedep; print(treedep.VERSION)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def disk_usage(path: Path) -> int:
    """Bytes under ``path``, each hard-linked file once (as ``du`` counts them)."""
    seen, total = set(), 0
    for folder, _, names in os.walk(path):
        for name in names:
            stat = os.lstat(os.path.join(folder, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def test_a_changed_config_gets_a_tree_of_its_own_and_the_old_one_stays_whole(tmp_path: Path) -> None:
    volume = Volume(tmp_path, standin_comfyui_repo(tmp_path / "src"))
    image = {"COMFYUI_PYTHON": "", "COMFYUI_BASE_PYTHON": sys._base_executable, "COMFYUI_VENV_KEY": "py-tests"}
    node = probe_node(tmp_path / "src")

    first = volume.provision(node_config(node, "v1.0.0"), **image)
    assert first.returncode == 0, first.stderr
    old = linked_tree(volume)
    assert (old / "complete").is_file() and volume.state["tree"] == old.name
    assert dep_version(old) == "1.0"
    for name in trees.SHARED_FOLDERS:  # the same folders whatever the tree
        assert (old / "ComfyUI" / name).resolve() == (volume.path / name).resolve()
    (volume.path / "user" / "saved.json").write_text("{}")
    helper = old / "ComfyUI" / "custom_nodes" / "tree-probe" / "helper.txt"
    helper_inode = helper.stat().st_ino
    lease = trees.take_lease(trees.Tree(old), "worker-a")  # a worker runs the old tree
    before = disk_usage(volume.path)

    # Watch the link while the new tree is made: it must only ever point at a complete tree.
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            target = (volume.path / "ComfyUI").resolve().parent
            seen.add(f"{target.name}:{(target / 'complete').is_file()}")
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        second = volume.provision(node_config(node, "v2.0.0"), **image)
    finally:
        stop.set()
        watcher.join()
    assert second.returncode == 0, second.stderr
    new = linked_tree(volume)
    assert new != old and (new / "complete").is_file()
    assert all(entry.endswith(":True") for entry in seen), seen
    made = re.search(r"made from .* \((\d+) files linked, (\d+) copied, ([\d.]+) MB\)", second.stderr)
    assert made is not None, second.stderr
    assert int(made[1]) > 0 and int(made[2]) == 0, "the copy is made of hard links"

    # The old tree is as it was; the new one has the new version and its requirement.
    assert helper.read_text() == "v1\n" and helper.stat().st_ino == helper_inode
    assert dep_version(old) == "1.0" and dep_version(new) == "2.0"
    assert (new / "ComfyUI" / "custom_nodes" / "tree-probe" / "helper.txt").read_text() == "v2\n"
    assert (new / "ComfyUI" / "user" / "saved.json").is_file(), "the user folder is the volume's"
    assert old.is_dir(), "a leased tree is kept"
    grown = disk_usage(volume.path) - before
    assert grown < disk_usage(old) / 2, f"the new tree took {grown} bytes beside the old one's {disk_usage(old)}"

    # Only a model (or a comment) changed: the same tree, nothing copied.
    third = volume.provision(node_config(node, "v2.0.0", "# a comment\n"), **image)
    assert third.returncode == 0, third.stderr
    assert linked_tree(volume) == new and "install tree" not in third.stderr

    # Back to the first config: its tree is there, so it is used again at once; the unleased one goes.
    os.utime(lease, (time.time() - 2 * trees.LEASE_STALE_S,) * 2)  # worker A was killed long ago
    back = volume.provision(node_config(node, "v1.0.0"), **image)
    assert back.returncode == 0, back.stderr
    assert f"install tree {old.name}: built before, used again" in back.stderr
    assert linked_tree(volume) == old and not new.exists()


def test_a_volume_provisioned_in_place_moves_to_trees_and_keeps_the_users_files(tmp_path: Path) -> None:
    """A volume from before install trees: ``ComfyUI/`` a checkout the worker installed, with the UI's saved
    workflows and outputs inside."""
    volume = Volume(tmp_path, standin_comfyui_repo(tmp_path / "src"))
    node = probe_node(tmp_path / "src", with_requirement=False)
    legacy = volume.path / "ComfyUI"
    subprocess.run(["git", "clone", "--quiet", volume.comfyui.url, str(legacy)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=legacy, capture_output=True, text=True, check=True)
    (legacy / "user" / "default" / "workflows").mkdir(parents=True)
    (legacy / "user" / "default" / "workflows" / "mine.json").write_text("{}")
    (legacy / "output").mkdir()
    (legacy / "output" / "old.png").write_bytes(b"png")
    state = {"provisioned_sha256": "0" * 64, "comfyui": {"repo": volume.comfyui.url, "version": "latest",
             "commit": commit.stdout.strip()}, "nodes": {}, "env_keys": []}  # fmt: skip
    (volume.path / ".comfy-worker").mkdir()
    (volume.path / ".comfy-worker" / "state.json").write_text(json.dumps(state))

    done = volume.provision(node_config(node, "v1.0.0"))
    assert done.returncode == 0, done.stderr
    tree = linked_tree(volume)
    assert (tree / "ComfyUI" / "custom_nodes" / "tree-probe" / "helper.txt").read_text() == "v1\n"
    assert "ComfyUI:" not in done.stderr, "the checkout there was the source of the first tree: no new clone"
    assert (volume.path / "ComfyUI" / "user" / "default" / "workflows" / "mine.json").is_file()
    assert (volume.path / "output" / "old.png").read_bytes() == b"png"
    assert not list((volume.path / ".comfy-worker" / "trees").glob("before-trees-*")), "unused: removed"


def test_a_comfyui_the_worker_did_not_install_is_installed_into_in_place(tmp_path: Path) -> None:
    volume = Volume(tmp_path, standin_comfyui_repo(tmp_path / "src"))
    node = probe_node(tmp_path / "src", with_requirement=False)
    shutil.copytree(volume.comfyui.path, volume.path / "ComfyUI", ignore=shutil.ignore_patterns(".git"))
    done = volume.provision(node_config(node, "v1.0.0"))
    assert done.returncode == 0, done.stderr
    assert not (volume.path / "ComfyUI").is_symlink()
    assert (volume.path / "ComfyUI" / "custom_nodes" / "tree-probe" / "helper.txt").is_file()
    assert not (volume.path / ".comfy-worker" / "trees").exists()


def post(url: str, workflow: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = requests.post(f"{url}/runsync", json={"input": {"workflow": workflow}}, timeout=600).json()
    return body


def probe(wait_for: str = "") -> dict[str, Any]:
    return {"1": {"class_type": "TreeProbe", "inputs": {"wait_for": wait_for}}}


def texts(body: dict[str, Any]) -> list[str]:
    assert body.get("status") == "COMPLETED", body
    return [entry["text"] for entry in body["output"]["text"]]


@pytest.mark.parametrize("backend", [param for param in backend_params() if param.id == "real"])
def test_an_old_worker_finishes_its_job_on_its_tree_while_a_new_one_provisions_the_next(
    backend: ComfyBackend, tmp_path: Path
) -> None:
    """Worker A runs v1 of a node, mid-job; worker B starts with the config naming v2 and provisions it on the
    same volume. A's job then reads its node's files and imports its module: v1's, as loaded. Installed in
    place, it would have read v2's files in a checkout changed under it."""
    volume = Volume(tmp_path, real_comfyui_repo(tmp_path / "src", backend.comfyui_dir), backend.python)
    # Its "requirement" is a module of its own (the real ComfyUI's Python is shared by the tests, so nothing
    # is installed into it; the venv of each tree is the first test's).
    node = probe_node(tmp_path / "src", with_requirement=False)
    lazy = PROBE.replace("import treedep", "from . import treedep")
    node.commit({"__init__.py": lazy, "helper.txt": "v1\n", "treedep.py": "VERSION = '1.0'\n"}, "v1 module")
    node.tag("v1.0.1")
    node.commit({"helper.txt": "v2\n", "treedep.py": "VERSION = '2.0'\n"}, "v2 module")
    node.tag("v2.0.1")
    local = {"COMFY_STARTUP_TIMEOUT": str(backend.boot_timeout_s), "RUNPOD_WEBHOOK_GET_JOB": ""}
    go = tmp_path / "go"
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    a, a_url = run_start_sh(volume, a_log, CONFIG_YML=node_config(node, "v1.0.1"), **local)
    b: subprocess.Popen[bytes] | None = None
    try:
        first = runsync_when_up(a_url, probe(), a, a_log, timeout_s=backend.boot_timeout_s + 180)
        assert texts(first) == ["helper=v1 dep=1.0"]
        old = linked_tree(volume)
        held: list[dict[str, Any]] = []
        mid_job = threading.Thread(target=lambda: held.append(post(a_url, probe(str(go)))))
        mid_job.start()
        started = time.monotonic()
        b, b_url = run_start_sh(volume, b_log, CONFIG_YML=node_config(node, "v2.0.1"), **local)
        assert texts(runsync_when_up(b_url, probe(), b, b_log, timeout_s=backend.boot_timeout_s + 180)) == [
            "helper=v2 dep=2.0"
        ]
        b_served = time.monotonic() - started
        new = linked_tree(volume)
        assert new != old, b_log.read_text()[-3000:]

        go.write_text("")  # A's job goes on, after the switch
        mid_job.join(timeout=600)
        a_done = time.monotonic() - started
        assert not mid_job.is_alive() and texts(held[0]) == ["helper=v1 dep=1.0"], held
        made = re.search(r"made from .* in ([\d.]+)s \((\d+) files linked", b_log.read_text())
        provisioned = re.search(r"Provisioned in ([\d.]+)s", b_log.read_text())
        assert made is not None and provisioned is not None, b_log.read_text()[-3000:]
        FIGURES.append(
            (
                "comfyui",
                f"config rollout (real ComfyUI, worker processes): new worker's tree copied in {made[1]} s "
                f"({made[2]} files linked), provisioned in {provisioned[1]} s, its first job done {b_served:.1f} s "
                f"after its start, while the old worker's job ran on; that job done on the old tree at {a_done:.1f} s",
            )
        )
        assert texts(post(a_url, probe())) == ["helper=v1 dep=1.0"], "A stays on its tree"
        assert any((old / "leases").iterdir()), "A's tree is leased while A runs"
    finally:
        stop_start_sh(a)
        if b is not None:
            stop_start_sh(b)
    assert not any((old / "leases").iterdir()), "A's lease goes when A stops"


def test_a_worker_runs_its_own_configs_tree_whichever_the_link_points_to(tmp_path: Path) -> None:
    """Two releases of an endpoint with different configs on one volume: the link points to whichever
    provisioned last, but each worker starts from its own config's tree."""
    from comfy_worker.provision.run import worker_env
    from comfy_worker.provision.workspace import Workspace

    volume = Volume(tmp_path, standin_comfyui_repo(tmp_path / "src"))
    node = probe_node(tmp_path / "src", with_requirement=False)
    assert volume.provision(node_config(node, "v1.0.0")).returncode == 0
    first = linked_tree(volume)
    trees.take_lease(trees.Tree(first), "worker-of-release-1")
    assert volume.provision(node_config(node, "v2.0.0")).returncode == 0
    second = linked_tree(volume)
    assert second != first and first.is_dir()

    env = volume.env(CONFIG_YML=node_config(node, "v1.0.0"))
    printed = worker_env(Workspace.from_env(env), env, lease=True)
    assert Path(printed["COMFYUI_DIR"]).resolve() == (first / "ComfyUI").resolve()
    assert Path(printed["COMFYUI_TREE_LEASE"]).parent.parent.resolve() == first.resolve()
    env = volume.env()  # the baked config: release 2's
    assert Path(worker_env(Workspace.from_env(env), env, lease=True)["COMFYUI_DIR"]).parent.resolve() == second
