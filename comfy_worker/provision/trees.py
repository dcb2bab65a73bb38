"""Install trees: ComfyUI with its custom nodes, and their venv, one tree per config, switched atomically.

Every worker of an endpoint shares the volume, and the autoscaler starts new workers while old ones still run
jobs. A worker that installed a changed config in place (another node version, another requirement) would
change the files under the ComfyUI of a worker mid-job, which imports lazily and reads its nodes' files as it
goes, and would leave the volume half-way between two configs while it works. So each combination of ComfyUI
version, custom nodes and Python environment gets a tree of its own in ``.comfy-worker/trees/<key>/``:

- ``ComfyUI/``: the checkout and its ``custom_nodes/``; its ``input``, ``output``, ``user`` and ``temp``
  folders are links to the volume's ``$WORKSPACE/input``, ``output``, ``user`` and ``temp``, which every tree
  shares (on serverless each worker keeps its own elsewhere anyway: ``settings.local_state_dir``);
- ``venv/``: the custom nodes' requirements (in the image only);
- ``tree.json``: what is installed there (``run.State``); ``complete``: written once the tree is ready;
  ``configs/<sha256>``: the configs provisioned into it;
- ``leases/``: one file per worker running this tree, refreshed while it runs.

A new tree starts as a copy of the current one made of hard links (no space, a second or so), and the
installers then change only what differs: git and pip replace files rather than rewriting them, so the old
tree's files stay as they were. ``$WORKSPACE/ComfyUI`` is a relative symbolic link to the current tree
(relative: a pod mounts the volume at /workspace, a serverless worker at /runpod-volume), replaced in one
rename once the new tree is complete and boots. A worker keeps the tree it started with for its life (a
restart asked for by apply_config.sh moves it to the current one); a tree that is neither current nor leased
is removed by the next provisioning run. The ComfyUI a user brought (``COMFYUI_DIR``, or a checkout on the
volume the worker did not install) is left where it is, and installed into in place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_worker.provision.pyenv import relocate_venv
from comfy_worker.redact import redact_url

if TYPE_CHECKING:
    from comfy_worker.provision.config import Config
    from comfy_worker.provision.workspace import Workspace

log = logging.getLogger(__name__)

TREES_DIRNAME = "trees"
# ComfyUI's folders for what it writes as it runs: the volume's own, the same in every tree (what a user keeps
# there must not depend on the config, and a worker moved to another tree keeps writing where it did)
SHARED_FOLDERS = ("input", "output", "user", "temp")
LEASE_STALE_S = 15 * 60.0  # a lease not refreshed for this long belongs to a worker that is gone
_LINK_ERRORS = (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)


@dataclass(frozen=True)
class Tree:
    """One install tree on the volume."""

    root: Path

    @property
    def key(self) -> str:
        return self.root.name

    @property
    def comfyui_dir(self) -> Path:
        return self.root / "ComfyUI"

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def state_file(self) -> Path:
        return self.root / "tree.json"

    @property
    def leases(self) -> Path:
        return self.root / "leases"

    @property
    def environment(self) -> str:
        """The Python environment the tree was made for (``environment_of``)."""
        try:
            return (self.root / "environment").read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def set_environment(self, environment: str) -> None:
        (self.root / "environment").write_text(environment + "\n", encoding="utf-8")

    @property
    def complete(self) -> bool:
        return (self.root / "complete").is_file()

    def mark_complete(self) -> None:
        (self.root / "complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()), encoding="utf-8")


@dataclass(frozen=True)
class CloneStats:
    """What copying a tree cost: files linked (no space), files copied (``bytes_copied``) and the time."""

    linked: int = 0
    copied: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0


def trees_dir(workspace: Workspace) -> Path:
    return workspace.state_dir / TREES_DIRNAME


def environment_of(workspace: Workspace) -> str:
    """The Python environment under ComfyUI: the image's venv key (COMFYUI_VENV_KEY), else the interpreter."""
    return workspace.comfyui_venv.name if workspace.comfyui_venv is not None else workspace.comfyui_python


def key_of(config: Config, workspace: Workspace, force: bool = False) -> str:
    """The tree a config needs: its ComfyUI and nodes, and the Python environment under them (models are
    shared by all trees and do not count). PROVISION_FORCE asks for a tree made afresh."""
    environment = environment_of(workspace)
    described = {
        "comfyui_repo": redact_url(workspace.comfyui_repo),
        "comfyui": config.comfyui.model_dump(),
        "nodes": [node.model_dump() for node in config.nodes],
        "environment": environment,
        "forced": time.time() if force else None,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def current(workspace: Workspace) -> Tree | None:
    """The tree ``$WORKSPACE/ComfyUI`` links to, if it is one of ours."""
    link = workspace.comfyui_link
    if not link.is_symlink():
        return None
    target = link.resolve()
    if target.name != "ComfyUI" or target.parent.parent != trees_dir(workspace).resolve():
        return None
    return Tree(trees_dir(workspace) / target.parent.name)


def in_use(workspace: Workspace, installed_before: bool) -> bool:
    """Whether this volume's ComfyUI is kept in install trees: not when COMFYUI_DIR names another one, nor
    when ``$WORKSPACE/ComfyUI`` is a checkout the worker did not install (``installed_before``: the worker's
    state records one it installed there before trees)."""
    if workspace.comfyui_dir != workspace.comfyui_link:
        return False
    link = workspace.comfyui_link
    return current(workspace) is not None or not (link.exists() or link.is_symlink()) or installed_before


def clone(source_comfyui: Path, source_venv: Path | None, tree: Tree) -> CloneStats:
    """Make ``tree`` a copy of a ComfyUI folder (and venv) made of hard links; files are copied where the
    filesystem has no hard links. ComfyUI's shared folders are linked to the volume's, not copied."""
    started = time.monotonic()
    counts = [0, 0, 0]  # linked, copied, bytes copied
    tree.root.mkdir(parents=True, exist_ok=True)

    def copy(src: str, dst: str) -> None:
        if counts[1] == 0:
            try:
                os.link(src, dst)
                counts[0] += 1
                return
            except OSError as exc:
                if exc.errno not in _LINK_ERRORS:
                    raise
                log.warning("No hard links on this volume (%s): the install tree is copied", exc)
        shutil.copy2(src, dst)
        counts[1] += 1
        counts[2] += os.path.getsize(dst)

    def ignore(folder: str, names: list[str]) -> set[str]:
        if Path(folder) == source_comfyui:
            return {name for name in names if name in SHARED_FOLDERS}
        return set()

    shutil.copytree(source_comfyui, tree.comfyui_dir, symlinks=True, ignore=ignore, copy_function=copy)
    link_shared_folders(tree)
    if source_venv is not None and (source_venv / "bin" / "python").exists():
        shutil.copytree(source_venv, tree.venv, symlinks=True, copy_function=copy)
        relocate_venv(tree.venv, source_venv, tree.venv)
    return CloneStats(counts[0], counts[1], counts[2], time.monotonic() - started)


def link_shared_folders(tree: Tree) -> None:
    """``ComfyUI/input``, ``output`` and ``user`` of the tree: relative links to the volume's own folders."""
    volume = tree.root.parent.parent.parent  # trees/<key> -> trees -> .comfy-worker -> the volume
    if not (tree.comfyui_dir / "main.py").is_file():
        return  # no ComfyUI in it (its clone failed)
    for name in SHARED_FOLDERS:
        (volume / name).mkdir(parents=True, exist_ok=True)
        link = tree.comfyui_dir / name
        if link.is_symlink():
            continue
        if link.is_dir():  # a fresh checkout's own (ComfyUI ships input/ and output/ with a placeholder)
            shutil.rmtree(link)
        link.symlink_to(os.path.relpath(volume / name, tree.comfyui_dir))


def adopt_folders(legacy_comfyui: Path, volume: Path) -> None:
    """Before trees, ComfyUI's input, output and user folders were inside the checkout on the volume: they
    move to the volume's shared folders once (where those do not exist yet)."""
    for name in SHARED_FOLDERS:
        old, new = legacy_comfyui / name, volume / name
        if not old.is_dir() or old.is_symlink():
            continue
        if not new.exists():
            old.rename(new)
            old.symlink_to(os.path.relpath(new, legacy_comfyui))  # a worker still running there writes on
        else:  # the volume has that folder already: what it lacks moves in, nothing is overwritten
            for entry in old.iterdir():
                if not (new / entry.name).exists() and not (new / entry.name).is_symlink():
                    entry.rename(new / entry.name)
        log.info("Moved %s to %s (shared by every install tree)", old, new)


def switch(workspace: Workspace, tree: Tree) -> None:
    """Point ``$WORKSPACE/ComfyUI`` at ``tree`` in one rename. A ComfyUI folder there from before trees (one
    the worker installed) is moved into ``trees/`` first, where it is removed like any tree nobody uses."""
    link = workspace.comfyui_link
    if link.is_dir() and not link.is_symlink():
        adopt_folders(link, workspace.root)  # again: what the old worker wrote since the copy began
        legacy = trees_dir(workspace) / f"before-trees-{int(time.time())}"
        link.rename(legacy)
        log.info("Moved the ComfyUI installed before install trees to %s", legacy)
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    temporary.symlink_to(os.path.relpath(tree.comfyui_dir, link.parent))
    temporary.replace(link)
    log.info("%s now links to install tree %s", link, tree.key)


def mark_config(tree: Tree, sha256: str) -> None:
    """Record that ``tree`` is what the config with this SHA-256 was provisioned into (the newest mark wins)."""
    (tree.root / "configs").mkdir(exist_ok=True)
    (tree.root / "configs" / sha256).touch()


def tree_of_config(workspace: Workspace, sha256: str) -> Tree | None:
    """The complete tree most recently provisioned for the config with this SHA-256, if any is left."""
    found: list[tuple[float, Tree]] = []
    with contextlib.suppress(OSError):
        for entry in trees_dir(workspace).iterdir():
            tree = Tree(entry)
            with contextlib.suppress(OSError):
                found.append(((entry / "configs" / sha256).stat().st_mtime, tree))
    complete = [(mtime, tree) for mtime, tree in found if tree.complete]
    return max(complete, key=lambda pair: pair[0])[1] if complete else None


def worker_id(env: Mapping[str, str]) -> str:
    """Who holds a lease: the RunPod pod (one per worker) or the host, and the process."""
    pod = env.get("RUNPOD_POD_ID", "").strip()
    return f"{pod or socket.gethostname()}-{os.getpid()}"


def take_lease(tree: Tree, holder: str) -> Path:
    """A lease on ``tree`` for a worker about to start from it; the worker refreshes it (COMFYUI_TREE_LEASE)."""
    tree.leases.mkdir(exist_ok=True)
    lease = tree.leases / holder
    lease.write_text(f"{time.time():.0f}\n", encoding="utf-8")
    return lease


def leased(tree: Tree, now: float) -> bool:
    with contextlib.suppress(OSError):
        return any(now - entry.stat().st_mtime < LEASE_STALE_S for entry in tree.leases.iterdir())
    return False


def collect_garbage(workspace: Workspace, keep: Tree | None, now: float | None = None) -> list[str]:
    """Remove the trees that are neither ``keep``, nor current, nor leased by a live worker; return their keys.
    Run under the volume's lock, so no tree is removed while another run builds it."""
    now = time.time() if now is None else now
    folder = trees_dir(workspace)
    if not folder.is_dir():
        return []
    wanted = {tree.root.resolve() for tree in (keep, current(workspace)) if tree is not None}
    removed = []
    for entry in sorted(folder.iterdir()):
        tree = Tree(entry)
        if not entry.is_dir() or entry.resolve() in wanted or leased(tree, now):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(tree.key)
    if removed:
        log.info("Removed install trees no worker uses: %s", ", ".join(removed))
    return removed
