"""Custom nodes and ComfyUI from real git repositories made in the test: versions, checkouts, requirements."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_worker.provision import gitrepo, nodes, pyenv
from comfy_worker.provision.config import NodeConfig

from .conftest import REPO
from .git_repos import Repo, make_wheel, node_repo


@pytest.fixture(scope="module")
def target_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh environment standing for "the Python that runs ComfyUI" (not the one running the tests)."""
    venv = tmp_path_factory.mktemp("env") / "venv"
    if shutil.which("uv"):
        subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    return str(venv / "bin" / "python")


def imports(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False).returncode == 0


@pytest.fixture
def history(tmp_path: Path) -> Repo:
    """Tags v1.0.0 < v1.2.0 (annotated) < v1.10.0 on older commits, main ahead of them, a feature branch."""
    repo = Repo(tmp_path / "src" / "history")
    repo.commit({"version.txt": "1.0.0"})
    repo.tag("v1.0.0")
    repo.commit({"version.txt": "1.2.0"})
    repo.tag("v1.2.0", annotated=True)
    repo.commit({"version.txt": "1.10.0"})
    repo.tag("v1.10.0")
    repo.tag("not-a-release")
    repo.commit({"version.txt": "main"})
    repo.branch("feature")
    repo.commit({"version.txt": "feature"})
    repo.switch("main")
    return repo


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("latest", "1.10.0"),  # newest by version, not by name (1.10 > 1.2)
        ("nightly", "main"),
        ("v1.2.0", "1.2.0"),  # annotated: the commit, not the tag object
        ("feature", "feature"),
    ],
)
def test_versions_resolve_and_check_out(history: Repo, tmp_path: Path, version: str, expected: str) -> None:
    resolved = gitrepo.resolve_version(history.url, version)
    checkout = tmp_path / "checkout"
    commit = gitrepo.checkout(history.url, resolved, checkout)
    assert (checkout / "version.txt").read_text() == expected
    assert gitrepo.head_commit(checkout) == commit == resolved.commit


def test_commit_versions_full_and_abbreviated(history: Repo, tmp_path: Path) -> None:
    first = subprocess.run(
        ["git", "rev-list", "--max-parents=0", "HEAD"], cwd=history.path, capture_output=True, text=True, check=True
    ).stdout.strip()
    for version, folder in ((first, "full"), (first[:9], "short")):
        resolved = gitrepo.resolve_version(history.url, version)
        gitrepo.checkout(history.url, resolved, tmp_path / folder)
        assert (tmp_path / folder / "version.txt").read_text() == "1.0.0"


def test_moving_a_checkout_between_versions_discards_local_edits(history: Repo, tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    gitrepo.checkout(history.url, gitrepo.resolve_version(history.url, "v1.0.0"), checkout)
    (checkout / "version.txt").write_text("edited by hand")
    gitrepo.checkout(history.url, gitrepo.resolve_version(history.url, "v1.0.0"), checkout)
    assert (checkout / "version.txt").read_text() == "1.0.0"
    gitrepo.checkout(history.url, gitrepo.resolve_version(history.url, "nightly"), checkout)
    assert (checkout / "version.txt").read_text() == "main"


def test_an_unknown_version_names_the_newest_tags(history: Repo) -> None:
    with pytest.raises(gitrepo.GitError, match=r"'v9' is not a tag, branch or commit of .*Newest tags: v1.10.0, v1.2"):
        gitrepo.resolve_version(history.url, "v9")


def test_latest_without_release_tags_is_the_default_branch(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "untagged")
    head = repo.commit({"a": "1"})
    assert gitrepo.resolve_version(repo.url, "latest").commit == head


def test_unreachable_repository_fails_without_prompting(tmp_path: Path) -> None:
    with pytest.raises(gitrepo.GitError, match="git ls-remote failed"):
        gitrepo.resolve_version(str(tmp_path / "nowhere"), "latest")


def test_a_folder_that_is_not_ours_is_left_alone(history: Repo, tmp_path: Path) -> None:
    mine = tmp_path / "custom_nodes" / "history"
    mine.mkdir(parents=True)
    (mine / "keep.txt").write_text("mine")
    results = nodes.checkout_all([NodeConfig(url=history.url)], tmp_path / "custom_nodes", {})
    assert results[0].status == "failed" and "is not a git checkout" in (results[0].error or "")
    assert (mine / "keep.txt").read_text() == "mine"
    other = node_repo(tmp_path / "src", "other")
    clone = tmp_path / "clone" / "history"
    gitrepo.checkout(other.url, gitrepo.resolve_version(other.url, "latest"), clone)
    with pytest.raises(gitrepo.GitError, match=r"is a clone of .*other, not of"):
        gitrepo.checkout(history.url, gitrepo.resolve_version(history.url, "latest"), clone)


def test_nodes_install_their_requirements_into_comfyuis_python(tmp_path: Path, target_python: str) -> None:
    wheels = tmp_path / "wheels"
    dep_a, dep_b = make_wheel(wheels, "tinydep_a"), make_wheel(wheels, "tinydep_b")
    src = tmp_path / "src"
    a = node_repo(src, "node-a", extra={"requirements.txt": f"{dep_a}\n"})
    b = node_repo(src, "node-b", extra={"requirements.txt": f"{dep_b}\n", "install.py": "open('ran', 'w')\n"})
    c = node_repo(src, "node-c.git")
    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    config = [NodeConfig(url=a.url), NodeConfig(url=b.url + "/"), NodeConfig(url=c.url, version="nightly")]
    results = nodes.install_nodes(config, custom_nodes, target_python)
    assert [(r.name, r.status) for r in results] == [
        ("node-a", "installed"),
        ("node-b", "installed"),
        ("node-c", "installed"),
    ], results
    assert imports(target_python, "tinydep_a") and imports(target_python, "tinydep_b")
    assert not imports(sys.executable, "tinydep_a"), "installed into the test runner's Python instead"
    assert (custom_nodes / "node-b" / "ran").is_file(), "install.py did not run in the node's folder"
    marker = pyenv.read_marker(pyenv.marker_path(target_python))
    assert {r.requirements_key for r in results} <= marker

    (custom_nodes / "node-b" / "ran").unlink()
    previous = {r.name: r.state() for r in results}
    again = nodes.install_nodes(config, custom_nodes, target_python, previous)
    assert [r.status for r in again] == ["unchanged"] * 3
    assert not (custom_nodes / "node-b" / "ran").exists(), "install.py ran again although nothing changed"


def test_one_failing_node_is_named_and_the_others_install(tmp_path: Path, target_python: str) -> None:
    src = tmp_path / "src"
    good = node_repo(src, "good", extra={"requirements.txt": f"{make_wheel(tmp_path / 'w', 'tinydep_good')}\n"})
    broken = node_repo(src, "broken", extra={"requirements.txt": f"{tmp_path / 'missing-1.0-py3-none-any.whl'}\n"})
    crashing = node_repo(src, "crashing", extra={"install.py": "raise SystemExit('no GPU driver found')\n"})
    config = [NodeConfig(url=good.url), NodeConfig(url=broken.url), NodeConfig(url=crashing.url)]
    config.append(NodeConfig(url=good.url, version="v7"))  # same folder twice
    config.append(NodeConfig(url=str(src / "absent")))
    results = {r.name + str(i): r for i, r in enumerate(nodes.install_nodes(config, tmp_path / "cn", target_python))}
    assert results["good0"].status == "installed" and imports(target_python, "tinydep_good")
    assert results["broken1"].status == "failed" and "requirements could not be installed" in str(results["broken1"])
    assert results["crashing2"].status == "failed" and "no GPU driver found" in (results["crashing2"].error or "")
    assert "already uses good/" in (results["good3"].error or "")
    assert "git ls-remote failed" in (results["absent4"].error or "")


def test_nodes_that_leave_the_config_are_disabled_then_enabled_again(tmp_path: Path, target_python: str) -> None:
    src, custom_nodes = tmp_path / "src", tmp_path / "custom_nodes"
    keep, drop = node_repo(src, "keep"), node_repo(src, "drop")
    (custom_nodes / "by-hand").mkdir(parents=True)
    results = nodes.install_nodes([NodeConfig(url=keep.url), NodeConfig(url=drop.url)], custom_nodes, target_python)
    previous = {r.name: r.state() for r in results}
    assert nodes.disable_removed(custom_nodes, previous, [NodeConfig(url=keep.url)]) == ["drop"]
    assert sorted(p.name for p in custom_nodes.iterdir()) == ["by-hand", "drop.disabled", "keep"]
    back = nodes.install_nodes([NodeConfig(url=drop.url)], custom_nodes, target_python, {})
    assert back[0].status == "installed" and (custom_nodes / "drop" / "__init__.py").is_file()
    assert not (custom_nodes / "drop.disabled").exists()


def test_parallel_checkouts_keep_config_order(tmp_path: Path, target_python: str) -> None:
    repos = [node_repo(tmp_path / "src", f"n{i}") for i in range(6)]
    results = nodes.install_nodes([NodeConfig(url=r.url) for r in repos], tmp_path / "cn", target_python, {}, 6)
    assert [r.name for r in results] == [f"n{i}" for i in range(6)]
    assert all(r.status == "installed" for r in results)


def test_install_nodes_cli_dry_run_and_install(tmp_path: Path, target_python: str) -> None:
    node = node_repo(tmp_path / "src", "cli-node")
    config = tmp_path / "config.yml"
    config.write_text(f"nodes:\n  - url: {node.url}\n    version: v1.0.0\n")
    comfy = tmp_path / "ComfyUI"
    command = [sys.executable, str(REPO / "install_nodes.py"), "--config", str(config), "--comfyui-dir", str(comfy)]
    dry = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, check=True)
    assert "cli-node: tag v1.0.0" in dry.stdout and ": clone ->" in dry.stdout
    assert not (comfy / "custom_nodes" / "cli-node").exists()
    done = subprocess.run([*command, "--python", target_python], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "cli-node: installed: tag v1.0.0" in done.stdout
    dry = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, check=True)
    assert ": up to date ->" in dry.stdout
    config.write_text(f"nodes:\n  - url: {tmp_path / 'gone'}\n")
    failed = subprocess.run([*command, "--python", target_python], capture_output=True, text=True, check=False)
    assert failed.returncode == 1 and "gone: failed: git ls-remote failed" in failed.stdout
