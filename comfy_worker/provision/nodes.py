"""Custom nodes from config.yml: checked out at their versions in parallel, requirements installed once.

Git work (network bound) runs several nodes at a time. Requirements go into the environment that runs
ComfyUI in one installer run, so the resolver sees every node's needs together; when that fails, each node
is installed alone to name the culprit. ``install.py`` scripts run after, one by one, as ComfyUI-Manager
runs them. A node that fails is reported with its own error and the others still install.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from comfy_worker.provision import gitrepo, pyenv
from comfy_worker.provision.config import NodeConfig
from comfy_worker.redact import redact_url, redact_urls

log = logging.getLogger(__name__)
DISABLED_SUFFIX = ".disabled"  # ComfyUI (and ComfyUI-Manager) skip custom_nodes/<name>.disabled


@dataclass(frozen=True)
class NodeResult:
    name: str
    url: str
    version: str
    status: Literal["installed", "unchanged", "failed"]
    commit: str | None = None
    description: str = ""
    error: str | None = None
    requirements_key: str | None = None

    def state(self) -> dict[str, Any]:
        """What state.json records; the URL without credentials (compared redacted too, see _is_unchanged)."""
        return {"url": redact_url(self.url), "version": self.version, "commit": self.commit}


def node_name(url: str) -> str:
    """The folder a node is cloned into: its repository's name, as ComfyUI-Manager names it."""
    return url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].removesuffix(".git")


def _is_unchanged(node: NodeConfig, path: Path, previous: Mapping[str, Any] | None) -> bool:
    """Installed from this very entry, and still at the commit it was installed at: no network needed."""
    if not previous or previous.get("url") != redact_url(node.url) or previous.get("version") != node.version:
        return False
    return previous.get("commit") is not None and gitrepo.head_commit(path) == previous["commit"]


def _checkout(node: NodeConfig, path: Path, previous: Mapping[str, Any] | None) -> NodeResult:
    name = path.name
    if _is_unchanged(node, path, previous):
        assert previous is not None
        return NodeResult(name, node.url, node.version, "unchanged", previous["commit"], "as installed")
    disabled = path.with_name(path.name + DISABLED_SUFFIX)
    if not path.exists() and disabled.is_dir():
        disabled.rename(path)  # back in the config: enable it again instead of cloning anew
        log.info("%s: enabled again", name)
    try:
        resolved = gitrepo.resolve_version(node.url, node.version)
        commit = gitrepo.checkout(node.url, resolved, path)
    except gitrepo.GitError as exc:
        return NodeResult(name, node.url, node.version, "failed", error=str(exc))
    log.info("%s: %s (%s)", name, resolved.description, commit[:10])
    return NodeResult(name, node.url, node.version, "installed", commit, resolved.description)


def checkout_all(
    nodes: Sequence[NodeConfig],
    custom_nodes_dir: Path,
    previous: Mapping[str, Mapping[str, Any]],
    concurrency: int = 4,
) -> list[NodeResult]:
    """Check every node out at its version, ``concurrency`` at a time; results in config order."""
    custom_nodes_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[str, str] = {}
    jobs: list[tuple[NodeConfig, Path] | NodeResult] = []
    for node in nodes:
        name = node_name(node.url)
        if name in seen:
            jobs.append(NodeResult(name, node.url, node.version, "failed", error=f"{seen[name]} already uses {name}/"))
            continue
        seen[name] = node.url
        jobs.append((node, custom_nodes_dir / name))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [
            job if isinstance(job, NodeResult) else pool.submit(_checkout, job[0], job[1], previous.get(job[1].name))
            for job in jobs
        ]
        return [job if isinstance(job, NodeResult) else job.result() for job in futures]


def _with_key(result: NodeResult, custom_nodes_dir: Path) -> NodeResult:
    """The result with the key of what decides its dependencies (requirements.txt, install.py)."""
    path = custom_nodes_dir / result.name
    key = pyenv.requirements_key("node", result.name, [path / "requirements.txt", path / "install.py"])
    return replace(result, requirements_key=key)


def install_dependencies(
    results: Sequence[NodeResult], custom_nodes_dir: Path, python: str, marker: Path
) -> list[NodeResult]:
    """Install what each checked-out node needs into ``python``'s environment, unless the marker has it."""
    installed = pyenv.read_marker(marker)
    keyed = [result if result.status == "failed" else _with_key(result, custom_nodes_dir) for result in results]
    pending = [result for result in keyed if result.requirements_key and result.requirements_key not in installed]
    if not pending:
        return keyed
    failures: dict[str, str] = {}
    with_requirements = [r for r in pending if (custom_nodes_dir / r.name / "requirements.txt").is_file()]
    if with_requirements:
        try:
            pyenv.pip_install(python, [custom_nodes_dir / r.name / "requirements.txt" for r in with_requirements])
        except pyenv.InstallError:  # install them one by one to tell which node's requirements fail
            for result in with_requirements:
                try:
                    pyenv.pip_install(python, [custom_nodes_dir / result.name / "requirements.txt"])
                except pyenv.InstallError as exc:
                    failures[result.name] = str(exc)
    for result in pending:
        script = custom_nodes_dir / result.name / "install.py"
        if result.name not in failures and script.is_file():
            try:
                pyenv.run_script(python, script)
            except pyenv.InstallError as exc:
                failures[result.name] = str(exc)
    done = [r.requirements_key for r in pending if r.name not in failures and r.requirements_key]
    pyenv.add_to_marker(marker, done)
    return [
        replace(result, status="failed", error=failures[result.name]) if result.name in failures else result
        for result in keyed
    ]


def disable_removed(custom_nodes_dir: Path, previous: Mapping[str, Any], nodes: Sequence[NodeConfig]) -> list[str]:
    """Nodes this worker installed that left the config are renamed ``<name>.disabled``, not deleted.

    Nodes it did not install (copied in by hand) are never touched.
    """
    wanted = {node_name(node.url) for node in nodes}
    disabled = []
    for name in sorted(set(previous) - wanted):
        path = custom_nodes_dir / name
        if path.is_dir():
            target = path.with_name(name + DISABLED_SUFFIX)
            if target.exists():
                continue
            path.rename(target)
            disabled.append(name)
            log.info("%s: no longer in config.yml, disabled (renamed to %s)", name, target.name)
    return disabled


def install_nodes(
    nodes: Sequence[NodeConfig],
    custom_nodes_dir: Path,
    python: str,
    previous: Mapping[str, Mapping[str, Any]] | None = None,
    concurrency: int = 4,
) -> list[NodeResult]:
    """Check out every node, then install their requirements into ``python``'s environment."""
    results = checkout_all(nodes, custom_nodes_dir, previous or {}, concurrency)
    return install_dependencies(results, custom_nodes_dir, python, pyenv.marker_path(python))


def check_versions(nodes: Sequence[NodeConfig]) -> list[NodeResult]:
    """Each node's version resolved, without a checkout: run when ComfyUI itself failed, so a node's bad
    version is reported in the same run instead of only after ComfyUI is fixed. Failures only."""
    failed = []
    for node in nodes:
        try:
            gitrepo.resolve_version(node.url, node.version)
        except gitrepo.GitError as exc:
            failed.append(NodeResult(node_name(node.url), node.url, node.version, "failed", error=str(exc)))
    return failed


def plan(nodes: Sequence[NodeConfig], custom_nodes_dir: Path) -> list[str]:
    """What ``install_nodes`` would do, one line per node (resolves versions; changes nothing)."""
    lines = []
    for node in nodes:
        path = custom_nodes_dir / node_name(node.url)
        try:
            resolved = gitrepo.resolve_version(node.url, node.version)
        except gitrepo.GitError as exc:
            lines.append(f"{path.name}: FAILS: {exc}")
            continue
        current = gitrepo.head_commit(path)
        if current == resolved.commit:
            action = "up to date"
        elif current:
            action = f"check out (now at {current[:10]})"
        else:
            action = "clone"
        lines.append(f"{path.name}: {resolved.description} ({resolved.commit[:10]}): {action} -> {path}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``install_nodes.py``: install config.yml's custom nodes into a ComfyUI checkout."""
    from comfy_worker.provision.config import parse
    from comfy_worker.provision.config_source import ConfigError
    from comfy_worker.provision.logs import setup_logging
    from comfy_worker.provision.workspace import Workspace

    parser = argparse.ArgumentParser(description="Install config.yml's custom nodes into ComfyUI's custom_nodes.")
    parser.add_argument(
        "--config", type=Path, help="config file (default: the one start.sh uses, see docs/configuration.md)"
    )
    parser.add_argument(
        "--comfyui-dir", type=Path, help="the ComfyUI checkout (default: COMFYUI_DIR or the workspace's)"
    )
    parser.add_argument("--python", help="the Python that runs ComfyUI (default: COMFYUI_PYTHON, else this one)")
    parser.add_argument("--concurrency", type=int, default=4, help="nodes checked out at once (default 4)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    args = parser.parse_args(argv)
    setup_logging(os.environ)
    workspace = Workspace.from_env(os.environ)
    try:
        config = parse(*workspace.config_text(os.environ, args.config))
    except (OSError, ConfigError) as exc:
        log.error("%s", exc)
        return 2
    custom_nodes_dir = (args.comfyui_dir or workspace.comfyui_dir) / "custom_nodes"
    if args.dry_run:
        sys.stdout.write("".join(line + "\n" for line in plan(config.nodes, custom_nodes_dir)))
        return 0
    python = args.python or workspace.comfyui_python
    results = install_nodes(config.nodes, custom_nodes_dir, python, concurrency=args.concurrency)
    for result in results:
        detail = result.error if result.status == "failed" else f"{result.description} {result.commit or ''}"
        sys.stdout.write(f"{result.name}: {result.status}: {redact_urls(detail or '')}\n")
    return 1 if any(result.status == "failed" for result in results) else 0
