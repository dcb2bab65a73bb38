"""Provisioning: make the volume match config.yml (ComfyUI, custom nodes, models), only when it changed.

``python -m comfy_worker.provision`` is what start.sh runs before the worker. The gate comes first and uses
only the standard library, so an unchanged config costs milliseconds: the SHA-256 of the resolved config is
stored on the volume only after a provisioning run succeeded, and the Python environment's own marker
(``pyenv``) must list every requirement set the config needs, because that environment lives in the image,
not on the volume. When the gate fails, each item is compared with its recorded state and only what
changed is re-done.

Several workers may share a volume and start together: the git and pip work runs under one lock on the
volume (the later ones then find it done), models under one lock per file (``downloads``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_worker.fsutil import DEFAULT_LOCK_DEADLINE_S, LockTimeout, atomic_write, hold_lock
from comfy_worker.provision import pyenv
from comfy_worker.provision.config_source import ConfigError, ResolvedConfig, resolve
from comfy_worker.provision.logs import setup_logging
from comfy_worker.provision.workspace import Workspace
from comfy_worker.redact import redact_url, redact_urls

if TYPE_CHECKING:
    from comfy_worker.provision.config import Config
    from comfy_worker.provision.trees import Tree

log = logging.getLogger("comfy_worker.provision")
SLOW_LOG_INTERVAL_S = 60.0
DEFAULT_PID_FILE = "/tmp/comfy-worker.pid"  # noqa: S108 - per container, where apply_config.sh runs too


@dataclass
class State:
    """What is on the volume, per item; ``provisioned_sha256`` only once everything required succeeded."""

    provisioned_sha256: str | None = None
    comfyui: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    env_keys: list[str] = field(default_factory=list)
    tree: str | None = None  # the install tree these items are in (``trees``); None: in place

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        return cls(
            provisioned_sha256=data.get("provisioned_sha256"),
            comfyui=dict(data.get("comfyui") or {}),
            nodes={str(k): dict(v) for k, v in (data.get("nodes") or {}).items()},
            env_keys=[str(key) for key in data.get("env_keys") or []],
            tree=data.get("tree"),
        )

    def items(self, other: State) -> State:
        """This state with the per-item records of ``other`` (an install tree's)."""
        return replace(other, provisioned_sha256=self.provisioned_sha256)

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.__dict__, indent=1, sort_keys=True))


def state_path(workspace: Workspace) -> Path:
    return workspace.state_dir / "state.json"


def gate(workspace: Workspace, resolved: ResolvedConfig, state: State, force: bool = False) -> str | None:
    """Why provisioning must run, or None when the volume and the environment already match the config."""
    if force:
        return "PROVISION_FORCE is set"
    if state.provisioned_sha256 is None:
        if state.comfyui or state.nodes or workspace.status_file.exists():
            return f"the last provisioning run did not complete (failed or interrupted; see {workspace.status_file})"
        return "nothing was provisioned on this volume yet"
    if state.provisioned_sha256 != resolved.sha256:
        return f"the config changed ({state.provisioned_sha256[:12]} -> {resolved.sha256[:12]})"
    if not (workspace.comfyui_dir / "main.py").is_file():
        return f"ComfyUI is missing from {workspace.comfyui_dir}"
    if workspace.comfyui_venv is not None and not (workspace.comfyui_venv / "bin" / "python").is_file():
        return f"the venv for custom nodes is missing from {workspace.comfyui_venv} (a new image on this volume?)"
    missing = set(state.env_keys) - pyenv.installed_keys(workspace.comfyui_python)
    if missing:
        return f"this Python environment lacks {len(missing)} requirement set(s) (a new image on this volume?)"
    return None


def volume_lock(workspace: Workspace, env: Mapping[str, str]) -> contextlib.AbstractContextManager[None]:
    """The volume's lock for the git and pip work; a holder silent for PROVISION_LOCK_TIMEOUT is given up on."""
    from comfy_worker.settings import env_float

    deadline_s = env_float(env, "PROVISION_LOCK_TIMEOUT", DEFAULT_LOCK_DEADLINE_S, minimum=1.0)
    return hold_lock(workspace.state_dir / "provision.lock", what="provisioning this volume", deadline_s=deadline_s)


@contextlib.contextmanager
def reporting_slowness(env: Mapping[str, str], interval_s: float = SLOW_LOG_INTERVAL_S) -> Iterator[None]:
    """Say every ``interval_s`` that provisioning is still running: RunPod replaces a worker that takes longer
    than RUNPOD_INIT_TIMEOUT to start, and its log is the only place to see why."""
    stop = threading.Event()
    started = time.monotonic()
    limit = env.get("RUNPOD_INIT_TIMEOUT", "").strip()
    hint = f"RUNPOD_INIT_TIMEOUT is {limit} s" if limit else "RUNPOD_INIT_TIMEOUT is unset (RunPod's default)"

    def report() -> None:
        while not stop.wait(interval_s):
            log.warning(
                "Still provisioning after %.0fs (%s; a worker slower to start is replaced: raise it for a cold "
                "volume, or bake the image)",
                time.monotonic() - started,
                hint,
            )

    thread = threading.Thread(target=report, name="provision-clock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


@dataclass
class Report:
    """What a provisioning run did; written to status.json for the worker to report."""

    sha256: str
    source: str
    reason: str
    failed: list[dict[str, str]] = field(default_factory=list)
    optional_failed: list[dict[str, str]] = field(default_factory=list)
    done: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def comfyui_changed(self) -> bool:
        """ComfyUI, a custom node or their requirements changed: a running ComfyUI must restart to see it.

        New models need no restart: ComfyUI re-lists model folders when they change.
        """
        return any(not item.startswith("model ") for item in self.done)

    def fail(self, kind: str, name: str, error: str, optional: bool = False) -> None:
        """Record a failure; URLs in it lose their credentials (status.json reaches every job)."""
        name, error = redact_urls(name), redact_urls(error)
        log.error("%s %s failed: %s", kind, name, error)
        (self.optional_failed if optional else self.failed).append({"kind": kind, "name": name, "error": error})

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "config_sha256": self.sha256,
            "config_source": self.source,
            "reason": self.reason,
            "failed": self.failed,
            "optional_failed": self.optional_failed,
            "done": self.done,
            "comfyui_changed": self.comfyui_changed,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def install_comfyui(workspace: Workspace, config: Config, state: State, report: Report) -> None:
    """Clone ComfyUI at the configured version, unless a ComfyUI this worker did not install is there."""
    from comfy_worker.provision import gitrepo

    path, repo, version = workspace.comfyui_dir, workspace.comfyui_repo, config.comfyui.version
    previous = state.comfyui
    if (path / "main.py").is_file() and not previous:
        log.info("Using the ComfyUI already at %s (not installed by the worker: its version is left alone)", path)
        return
    unchanged = previous.get("repo") == redact_url(repo) and previous.get("version") == version
    if unchanged and gitrepo.head_commit(path) == previous.get("commit"):
        return
    try:
        resolved = gitrepo.resolve_version(repo, version)
        seed_from_baked(workspace, resolved.commit)
        commit = gitrepo.checkout(repo, resolved, path)
    except gitrepo.GitError as exc:
        report.fail("comfyui", repo, str(exc))
        return
    state.comfyui = {"repo": redact_url(repo), "version": version, "commit": commit}
    report.done.append(f"ComfyUI: {resolved.description} ({commit[:10]})")
    log.info("ComfyUI: %s (%s) in %s", resolved.description, commit[:10], path)


def seed_from_baked(workspace: Workspace, commit: str) -> None:
    """Copy the image's ComfyUI checkout onto the volume when it is the wanted commit: no download."""
    from comfy_worker.provision import gitrepo

    baked, path = workspace.comfyui_baked_dir, workspace.comfyui_dir
    if baked is None or path.exists() or gitrepo.head_commit(baked) != commit:
        return
    for stale in path.parent.glob(f".{path.name}.*"):  # left by a stopped container (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    gitrepo.git("clone", "--quiet", "--no-hardlinks", str(baked), str(temporary))
    gitrepo.git("remote", "set-url", "origin", workspace.comfyui_repo, cwd=temporary)
    temporary.rename(path)
    log.info("ComfyUI: copied the image's checkout (%s) from %s", commit[:10], baked)


def make_comfyui_venv(workspace: Workspace, report: Report) -> None:
    """The volume's venv for custom nodes' requirements, on top of the image's Python (see ``pyenv``)."""
    if workspace.comfyui_venv is None or workspace.comfyui_base_python is None:
        return
    try:
        pyenv.make_venv(workspace.comfyui_venv, workspace.comfyui_base_python)
    except pyenv.InstallError as exc:
        report.fail("venv", str(workspace.comfyui_venv), str(exc))


def compile_bytecode(workspace: Workspace) -> None:
    """Byte-compile ComfyUI and its custom nodes once, here, instead of in every fresh container's boot."""
    try:
        subprocess.run(
            [
                workspace.comfyui_python,
                "-m",
                "compileall",
                "-q",
                "-j",
                "0",
                "-x",
                r"/\.git/",
                str(workspace.comfyui_dir),
            ],
            capture_output=True,
            timeout=600,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("Could not byte-compile %s: %s", workspace.comfyui_dir, exc)


def install_comfyui_requirements(workspace: Workspace, state: State, report: Report) -> str | None:
    """ComfyUI's own requirements in the environment that runs it; the requirement set's key.

    A ComfyUI the worker did not install (an existing checkout) runs in the user's own Python: what goes in
    is said in the log, and torch, torchvision and torchaudio are left out entirely, since PyPI's builds
    (for another CUDA) would sit beside, or replace, the torch the user chose.
    """
    requirements = workspace.comfyui_dir / "requirements.txt"
    if not requirements.is_file():
        return None
    files = [requirements, pyenv.COMFYUI_EXTRA_REQUIREMENTS]
    key = pyenv.requirements_key("comfyui", "ComfyUI", files)
    if key in pyenv.installed_keys(workspace.comfyui_python):
        return key  # the image's ComfyUI: its requirements were installed when the image was built
    marker = pyenv.marker_path(workspace.comfyui_python)
    leave_out: tuple[str, ...] = ()
    if not state.comfyui:
        leave_out = pyenv.PROTECTED
        log.warning(
            "Installing the requirements of the existing ComfyUI checkout (%s) into its Python %s, "
            "leaving out %s (install those yourself)",
            requirements,
            workspace.comfyui_python,
            ", ".join(leave_out),
        )
    try:
        pyenv.pip_install(workspace.comfyui_python, files, leave_out=leave_out)
    except pyenv.InstallError as exc:
        report.fail("comfyui", "requirements.txt", str(exc))
        return None
    pyenv.add_to_marker(marker, [key])
    report.done.append("ComfyUI requirements")
    return key


def check_comfyui_starts(workspace: Workspace, report: Report) -> None:
    """ComfyUI's own start-up check with what was installed: a missing module is named here, not in every job."""
    from comfy_worker.provision import bootcheck

    found = bootcheck.check(workspace.comfyui_dir, workspace.comfyui_python)
    if found.error:
        report.fail("comfyui", "start-up check", found.error)
    for name, error in sorted(found.broken_nodes.items()):
        report.fail("node", name, f"ComfyUI could not import it: {error}")
    if found.ok:
        log.info("ComfyUI starts with what is installed")


def check_node_versions(config: Config, report: Report) -> None:
    """ComfyUI failed, so no node is installed this run; still report the nodes whose version is wrong."""
    from comfy_worker.provision import nodes

    for result in nodes.check_versions(config.nodes):
        report.fail("node", result.name, result.error or "failed")


def install_custom_nodes(
    workspace: Workspace, config: Config, state: State, report: Report, concurrency: int
) -> list[str]:
    from comfy_worker.provision import nodes

    results = nodes.install_nodes(
        config.nodes, workspace.custom_nodes_dir, workspace.comfyui_python, state.nodes, concurrency
    )
    for name in nodes.disable_removed(workspace.custom_nodes_dir, state.nodes, config.nodes):
        state.nodes.pop(name, None)
        report.done.append(f"node {name}: disabled")
    for result in results:
        if result.status == "failed":
            report.fail("node", result.name, result.error or "failed")
            continue
        state.nodes[result.name] = result.state()
        if result.status == "installed":
            report.done.append(f"node {result.name}: {result.description}")
    return [result.requirements_key for result in results if result.requirements_key and result.status != "failed"]


def install_models(workspace: Workspace, config: Config, env: Mapping[str, str], report: Report) -> None:
    if not config.models:
        return
    from comfy_worker.provision import downloads
    from comfy_worker.provision.download_options import DownloadOptions

    results = downloads.download_models(config.models, workspace.models_dir, DownloadOptions.from_env(env))
    for result in results:
        name = f"{result.model.destination}/{result.path.name if result.path else result.model.url}"
        if result.status == "failed":
            report.fail("model", name, result.error or "failed", optional=result.model.optional)
        elif result.status == "downloaded":
            report.done.append(f"model {name}")


def write_extra_model_paths(workspace: Workspace, config: Config) -> None:
    """Every model folder on the volume, for ComfyUI's --extra-model-paths-config; and the same folders in the
    cache of models that jobs bring by URL (runtime/models.py)."""
    from comfy_worker.provision.config import MODEL_FOLDERS

    workspace.models_dir.mkdir(parents=True, exist_ok=True)
    for model in config.models:
        (workspace.models_dir / model.destination.split("/")[0]).mkdir(exist_ok=True)
    present = {path.name for path in workspace.models_dir.iterdir() if path.is_dir() and not path.name.startswith(".")}
    lines = [
        "# Written by comfy-worker's provisioning at every run: every model folder on the volume.",
        "comfy_worker_volume:",
        f"  base_path: {json.dumps(str(workspace.models_dir))}",
        *(f"  {name}: {json.dumps(name)}" for name in sorted(present | set(MODEL_FOLDERS))),
        "comfy_worker_model_cache:",
        f"  base_path: {json.dumps(str(workspace.model_cache_dir))}",
        *(f"  {name}: {json.dumps(name)}" for name in sorted(MODEL_FOLDERS)),
    ]
    atomic_write(workspace.extra_model_paths, "\n".join(lines) + "\n")


def run(workspace: Workspace, resolved: ResolvedConfig, env: Mapping[str, str], reason: str, force: bool) -> Report:
    """Provision what changed; the config's SHA-256 is stored only when every required item succeeded."""
    from comfy_worker.provision import trees
    from comfy_worker.provision.config import parse
    from comfy_worker.settings import env_int

    report = Report(resolved.sha256, resolved.source, reason)
    config = parse(resolved.text, resolved.source)
    concurrency = env_int(env, "NODE_INSTALL_CONCURRENCY", 4, minimum=1)
    with volume_lock(workspace, env):
        state = State.load(state_path(workspace))
        if gate(at_current_tree(workspace), resolved, state, force) is None:
            log.info("Another worker provisioned this config meanwhile; nothing left to do")
            return report
        last_run_completed = state.provisioned_sha256 is not None
        state.provisioned_sha256 = None  # the volume is between two configs until the end of this run
        if trees.in_use(workspace, installed_before=bool(state.comfyui) and state.tree is None):
            state = provision_tree(workspace, config, state, report, concurrency, last_run_completed, force)
        else:
            install(workspace, config, state, report, concurrency, last_run_completed)
        state.save(state_path(workspace))
    install_models(workspace, config, env, report)
    write_extra_model_paths(workspace, config)
    with volume_lock(workspace, env):
        state = State.load(state_path(workspace))
        state.provisioned_sha256 = resolved.sha256 if report.ok else None
        state.save(state_path(workspace))
        if report.ok and (tree := trees.current(workspace)) is not None:
            trees.mark_config(tree, resolved.sha256)
    return report


def install(
    workspace: Workspace, config: Config, state: State, report: Report, concurrency: int, last_run_completed: bool
) -> None:
    """ComfyUI, the venv, the requirements and the custom nodes into ``workspace``'s ComfyUI, then the check
    that it starts; ``state`` records each item."""
    install_comfyui(workspace, config, state, report)
    make_comfyui_venv(workspace, report)
    env_keys = []
    if report.ok:
        env_keys.append(install_comfyui_requirements(workspace, state, report))
        env_keys += install_custom_nodes(workspace, config, state, report, concurrency)
    else:
        check_node_versions(config, report)
    state.env_keys = sorted(key for key in env_keys if key)
    if report.comfyui_changed:
        compile_bytecode(workspace)
    if report.ok and (report.comfyui_changed or not last_run_completed):
        check_comfyui_starts(workspace, report)


def provision_tree(
    workspace: Workspace,
    config: Config,
    state: State,
    report: Report,
    concurrency: int,
    last_run_completed: bool,
    force: bool,
) -> State:
    """The config's install tree (``trees``): used again when built before, else made from the current one
    and installed into; ``$WORKSPACE/ComfyUI`` is switched to it once it is complete and starts. Return the
    volume's state, which mirrors the tree the link points to."""
    from comfy_worker.provision import trees

    base = trees.current(workspace)
    tree = trees.Tree(trees.trees_dir(workspace) / trees.key_of(config, workspace, force))
    if base is not None and base.root == tree.root and tree.complete:
        return state.items(State.load(tree.state_file))  # only models changed: this tree is the config's
    if tree.complete:
        tree_state = State.load(tree.state_file)
        report.done.append(f"install tree {tree.key}: built before, used again")
    else:
        tree_state = start_tree(workspace, base, tree, state, report)
        install(workspace.in_tree(tree), config, tree_state, report, concurrency, last_run_completed)
        trees.link_shared_folders(tree)  # a checkout of another version may have made its own again
        tree_state.save(tree.state_file)
        if report.ok:
            tree.mark_complete()
    if report.ok or base is None:  # a failed tree serves only where there is none better
        trees.switch(workspace, tree)
        trees.collect_garbage(workspace, keep=tree)
        return state.items(tree_state)
    log.error("Install tree %s is incomplete: the workers go on with tree %s", tree.key, base.key)
    return state.items(State.load(base.state_file))


def start_tree(workspace: Workspace, base: Tree | None, tree: Tree, state: State, report: Report) -> State:
    """A new tree as a copy of the current one (or of the ComfyUI installed before trees), with its records;
    an interrupted build's tree as it was left."""
    from comfy_worker.provision import trees

    if tree.root.exists():
        log.info("Install tree %s: going on with an interrupted build", tree.key)
        return State.load(tree.state_file)
    environment = trees.environment_of(workspace)
    venv: Path | None
    if base is not None:
        source, records = base.comfyui_dir, State.load(base.state_file)
        venv = base.venv if base.environment == environment else None  # else another image's: not that one
    elif (workspace.comfyui_link / "main.py").is_file():  # the ComfyUI installed before trees
        trees.adopt_folders(workspace.comfyui_link, workspace.root)  # before the tree links to the volume's
        source, venv, records = workspace.comfyui_link, workspace.comfyui_venv, replace(state)
    else:
        tree.root.mkdir(parents=True)
        tree.set_environment(environment)
        report.done.append(f"install tree {tree.key}")
        return State(tree=tree.key)
    stats = trees.clone(source, venv if workspace.comfyui_venv is not None else None, tree)
    tree.set_environment(environment)
    log.info(
        "Install tree %s: made from %s in %.1fs (%d files linked, %d copied, %.1f MB)",
        tree.key,
        source,
        stats.seconds,
        stats.linked,
        stats.copied,
        stats.bytes_copied / 1e6,
    )
    report.done.append(f"install tree {tree.key}")
    tree_state = replace(records, provisioned_sha256=None, tree=tree.key)
    if workspace.comfyui_venv is not None and venv is None:
        tree_state.env_keys = []  # a venv made afresh: every requirement set is installed again
    tree_state.save(tree.state_file)
    return tree_state


def at_current_tree(workspace: Workspace) -> Workspace:
    """The workspace with the ComfyUI and venv of the install tree ``$WORKSPACE/ComfyUI`` links to, if any."""
    from comfy_worker.provision import trees

    tree = trees.current(workspace) if workspace.comfyui_dir == workspace.comfyui_link else None
    return workspace.in_tree(tree) if tree is not None else workspace


def write_status(workspace: Workspace, status: dict[str, Any]) -> None:
    """status.json, whole (the worker reads it while a later run may be writing it), and without credentials:
    every job reports it, and an error may quote a URL from config.yml."""
    atomic_write(workspace.status_file, redact_urls(json.dumps(status, indent=1)))


def provision(env: Mapping[str, str], workspace: Workspace) -> tuple[int, Report | None]:
    """Gate, then provision when needed; status.json says how it went. Exit status 0 = ready.

    The report is None when nothing was done (the gate passed, or the config could not be read).
    """
    force = env.get("PROVISION_FORCE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        resolved = resolve(env, workspace.volume_config, workspace.baked_config)
    except (ConfigError, OSError) as exc:
        log.error("%s", exc)
        write_status(workspace, {"ok": False, "failed": [{"kind": "config", "name": "config.yml", "error": str(exc)}]})
        return 1, None
    reason = gate(at_current_tree(workspace), resolved, State.load(state_path(workspace)), force)
    if reason is None:
        log.info("config.yml unchanged (%s, sha256 %s): nothing to install", resolved.source, resolved.sha256[:12])
        return 0, None
    log.info("Provisioning from %s (sha256 %s) because %s", resolved.source, resolved.sha256[:12], reason)
    started = time.monotonic()
    try:
        with reporting_slowness(env):
            report = run(workspace, resolved, env, reason, force)
    except ConfigError as exc:
        log.error("%s", exc)
        write_status(workspace, {"ok": False, "failed": [{"kind": "config", "name": "config.yml", "error": str(exc)}]})
        return 1, None
    except LockTimeout as exc:
        log.error("%s", exc)
        failed = {"kind": "lock", "name": "provision.lock", "error": str(exc)}
        write_status(workspace, {"ok": False, "failed": [failed]})
        return 1, None
    except Exception as exc:  # unexpected: still explain it to every job instead of dying silently
        log.exception("Provisioning failed")
        error = f"{type(exc).__name__}: {exc} ({traceback.format_exc(limit=3).splitlines()[-2].strip()})"
        write_status(workspace, {"ok": False, "failed": [{"kind": "provisioning", "name": "", "error": error}]})
        return 1, None
    atomic_write(workspace.state_dir / "config.yml", resolved.text)
    write_status(workspace, report.to_json())
    seconds = time.monotonic() - started
    if report.ok:
        log.info("Provisioned in %.1fs: %s", seconds, "; ".join(report.done) or "everything was in place")
        return 0, report
    log.error("Provisioning failed after %.1fs: %d required item(s) failed", seconds, len(report.failed))
    return 1, report


def dry_run(env: Mapping[str, str], workspace: Workspace) -> int:
    """Print what provisioning would do; change nothing."""
    from comfy_worker.provision import downloads, gitrepo, nodes
    from comfy_worker.provision.config import parse
    from comfy_worker.provision.download_options import DownloadOptions
    from comfy_worker.settings import SettingsError

    try:
        resolved = resolve(env, workspace.volume_config, workspace.baked_config)
        config = parse(resolved.text, resolved.source)
        options = DownloadOptions.from_env(env)
    except (ConfigError, SettingsError, OSError) as exc:
        log.error("%s", exc)
        return 1
    reason = gate(at_current_tree(workspace), resolved, State.load(state_path(workspace)))
    out = [f"workspace: {workspace.root} ({workspace.mode}); config: {resolved.source} (sha256 {resolved.sha256[:12]})"]
    repo = redact_url(workspace.comfyui_repo)
    out.append(f"gate: {reason or 'unchanged, nothing would be done'}")
    try:
        comfy = gitrepo.resolve_version(workspace.comfyui_repo, config.comfyui.version)
        out.append(f"ComfyUI {repo}: {comfy.description} -> {workspace.comfyui_dir}")
    except gitrepo.GitError as exc:
        out.append(f"ComfyUI: FAILS: {exc}")
    out += [f"node {line}" for line in nodes.plan(config.nodes, workspace.custom_nodes_dir)]
    out.append(downloads.format_plan(downloads.plan(config.models, workspace.models_dir, options)).rstrip("\n"))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def ask_worker_to_restart(env: Mapping[str, str], report: Report | None) -> None:
    """SIGHUP the running worker when ComfyUI must restart to load changed nodes; it waits for its job."""
    if report is None or not report.comfyui_changed:
        log.info("No custom node changed: ComfyUI keeps running (new models are picked up without a restart)")
        return
    pid_file = Path(env.get("WORKER_PID_FILE", "").strip() or DEFAULT_PID_FILE)
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        log.error("Could not ask the worker to restart ComfyUI (%s: %s): restart the worker", pid_file, exc)
        return
    log.info("Asked the worker (pid %d) to restart ComfyUI; it does so once its running job is done", pid)


MANAGER_CONFIGS = ("user/__manager/config.ini", "user/default/ComfyUI-Manager/config.ini")  # new, old Manager


def set_manager_network_mode(workspace: Workspace, env: Mapping[str, str]) -> None:
    """ComfyUI-Manager fetches its registry from the network at every boot (tens of seconds on a cold worker):
    on serverless its config says ``network_mode = offline`` (COMFYUI_MANAGER_NETWORK_MODE chooses).

    Run at every start (a few stat calls; a write only when the file says otherwise).
    """
    import configparser

    wanted = env.get("COMFYUI_MANAGER_NETWORK_MODE", "").strip().lower()
    wanted = wanted or ("offline" if workspace.mode == "serverless" else "")
    nodes = workspace.custom_nodes_dir
    if not wanted or not nodes.is_dir() or not any(p.name.lower() == "comfyui-manager" for p in nodes.iterdir()):
        return
    for relative in MANAGER_CONFIGS:
        path = workspace.comfyui_dir / relative
        config = configparser.ConfigParser(interpolation=None)
        config.read(path, encoding="utf-8")
        if config.has_section("default") and config.get("default", "network_mode", fallback="") == wanted:
            continue
        if not config.has_section("default"):
            config.add_section("default")
        config.set("default", "network_mode", wanted)
        text = io.StringIO()
        config.write(text)
        atomic_write(path, text.getvalue())
        log.info("ComfyUI-Manager: network_mode = %s in %s", wanted, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install config.yml's ComfyUI, custom nodes and models (SHA-gated).")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument(
        "--print-env", action="store_true", help="print the worker's paths as KEY=VALUE lines (start.sh reads them)"
    )
    parser.add_argument(
        "--lease",
        action="store_true",
        help="with --print-env: a worker starts next; keep its install tree for it (COMFYUI_TREE_LEASE)",
    )
    parser.add_argument(
        "--apply",
        action="store_true",
        help="then ask the running worker (WORKER_PID_FILE) to restart ComfyUI if nodes changed (apply_config.sh)",
    )
    args = parser.parse_args(argv)
    setup_logging(os.environ)
    workspace = Workspace.from_env(os.environ)
    if args.dry_run:
        return dry_run(os.environ, workspace)
    try:
        status, report = provision(os.environ, workspace)
        set_manager_network_mode(workspace, os.environ)
        if args.apply:
            ask_worker_to_restart(os.environ, report)
        return status
    finally:
        if args.print_env:
            paths = worker_env(workspace, os.environ, lease=args.lease)
            sys.stdout.write("".join(f"{key}={value}\n" for key, value in paths.items()))


def own_tree(workspace: Workspace, env: Mapping[str, str]) -> Tree | None:
    """The install tree last provisioned for this worker's own config: while two releases of an endpoint with
    different configs run on one volume, the link points to whichever provisioned last, but each worker runs
    its own. Found by the config's SHA-256 (``trees.mark_config``), so a warm start parses nothing."""
    from comfy_worker.provision import trees

    try:
        resolved = resolve(env, workspace.volume_config, workspace.baked_config)
    except (ConfigError, OSError):
        return None
    return trees.tree_of_config(workspace, resolved.sha256)


def worker_env(workspace: Workspace, env: Mapping[str, str], lease: bool) -> dict[str, str]:
    """What start.sh exports for the worker. With install trees: the current tree's ComfyUI and Python (the
    worker keeps them for its life), a lease on that tree taken under the volume's lock (so no provisioning
    run removes it meanwhile), and the link a restart asked for by apply_config.sh follows. The tree is the one
    of this worker's config when it is complete (``own_tree``), else the one the link points to."""
    from comfy_worker.provision import trees

    if workspace.comfyui_dir != workspace.comfyui_link or not workspace.comfyui_link.is_symlink():
        return workspace.worker_env()
    if not lease:
        return at_current_tree(workspace).worker_env()
    try:
        with volume_lock(workspace, env):
            tree = own_tree(workspace, env) or trees.current(workspace)
            if tree is None:
                return workspace.worker_env()
            lease_file = trees.take_lease(tree, trees.worker_id(env))
    except (OSError, LockTimeout) as exc:
        log.error("Could not take a lease on the install tree (%s): starting from the link", exc)
        return workspace.worker_env()
    return {
        **workspace.in_tree(tree).worker_env(),
        "COMFYUI_TREE_LINK": str(workspace.comfyui_link),
        "COMFYUI_TREE_LEASE": str(lease_file),
    }


if __name__ == "__main__":
    sys.exit(main())
