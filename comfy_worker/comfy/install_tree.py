"""The install tree this worker's ComfyUI runs from (``provision/trees.py``): the lease that keeps it on the
volume while the worker lives, and the move to the volume's current tree when apply_config.sh asks for it.

A provisioning run of another worker removes the trees that are neither current nor leased; a lease is a
file whose modification time says the worker is alive (``LEASE_REFRESH_S`` here, stale after the provisioning
side's ``LEASE_STALE_S``, 15 minutes: a killed worker's lease lapses by itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from pathlib import Path

from comfy_worker.settings import Settings

log = logging.getLogger(__name__)

LEASE_REFRESH_S = 60.0


class TreeLease:
    """Keeps this worker's lease file fresh from a daemon thread; ``release`` removes it."""

    def __init__(self, path: Path | None, refresh_s: float = LEASE_REFRESH_S) -> None:
        self.path = path
        self.refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def keep(self) -> None:
        """Start refreshing (idempotent)."""
        if self.path is None or self._thread is not None:
            return
        self._touch()
        self._thread = threading.Thread(target=self._run, name="install-tree-lease", daemon=True)
        self._thread.start()

    def move_to(self, path: Path) -> None:
        """Lease another tree instead (the old lease is removed once the new one exists)."""
        old, self.path = self.path, path
        self._touch()
        if old is not None and old != path:
            with contextlib.suppress(OSError):
                old.unlink()

    def release(self) -> None:
        self._stop.set()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self._touch()

    def _touch(self) -> None:
        path = self.path
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError as exc:  # the volume went away for a moment: the next refresh tries again
            log.warning("Could not refresh the install tree's lease %s: %s", path, exc)


def follow_link(settings: Settings) -> Settings:
    """``settings`` with the ComfyUI and Python of the tree ``COMFYUI_TREE_LINK`` points to now; the same
    settings when there is no link, or it points where the worker already runs."""
    link, current = settings.comfyui_tree_link, settings.comfyui_dir
    if link is None or current is None:
        return settings
    target = link.resolve()
    if target == current.resolve() or not (target / "main.py").is_file():
        return settings
    python = settings.comfyui_python
    if Path(python) == current.parent / "venv" / "bin" / "python":  # the tree's own venv: the new tree's
        python = str(target.parent / "venv" / "bin" / "python")
    lease = target.parent / "leases" / settings.comfyui_tree_lease.name if settings.comfyui_tree_lease else None
    log.info("ComfyUI moves to install tree %s (%s)", target.parent.name, target)
    return dataclasses.replace(settings, comfyui_dir=target, comfyui_python=python, comfyui_tree_lease=lease)
