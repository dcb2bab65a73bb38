"""ComfyUI 0.38's assets system as a client sees it, for the stand-in's 0.38 flavour.

0.38 registers every file a prompt wrote as an asset when the node's result is sent: each file entry of the
``executed`` output (and of the history's) gains the asset's ``id`` and a ``preview_id`` (the image itself for
an image), and an upload answers with an ``asset`` object. Its background seeder (re)scans the model, input
and output folders and reports on the server's event bus, which sends to every socket: ``assets.seed.paused``
when a prompt starts while it scans, then ``resumed``, ``started``, ``fast_complete`` and ``completed`` as it
rescans the outputs. When the stand-in sends them is its own schedule (around every prompt, so they always
fall among a job's frames); their names and fields are 0.38's.
"""

from __future__ import annotations

import copy
import hashlib
import mimetypes
import os
import threading
import time
import uuid
from typing import Any, Protocol

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


class Publisher(Protocol):
    def publish(self, event: str | int, data: Any, sid: str | None = None) -> None: ...


class Assets:
    """Asset ids by file path (a file keeps its id when a cached prompt reports it again)."""

    def __init__(self, folder_of: Any) -> None:
        self.folder_of = folder_of  # folder type -> its path, or None (FolderPaths.folder_of)
        self._ids: dict[str, str] = {}
        self._lock = threading.Lock()

    def _id(self, path: str) -> str:
        with self._lock:
            return self._ids.setdefault(path, str(uuid.uuid4()))

    def _path(self, entry: dict[str, Any]) -> str | None:
        """The file an output entry names, if it exists inside its folder (0.38 skips the others)."""
        root = self.folder_of(entry.get("type"))
        if root is None:
            return None
        base = os.path.abspath(root)
        path = os.path.abspath(os.path.join(base, entry.get("subfolder") or "", str(entry["filename"])))
        if os.path.commonpath([base, path]) != base or not os.path.isfile(path):
            return None
        return path

    def enrich(self, ui: dict[str, Any] | None) -> dict[str, Any] | None:
        """A copy of a node's ui output with ``id`` and ``preview_id`` on every file entry."""
        if ui is None:
            return None
        enriched = copy.deepcopy(ui)
        for entries in enriched.values():
            for entry in entries if isinstance(entries, list) else []:
                if not isinstance(entry, dict) or "filename" not in entry or "type" not in entry:
                    continue
                path = self._path(entry)
                if path is None:
                    continue
                entry["id"] = self._id(path)
                if path.lower().endswith(IMAGE_SUFFIXES):
                    entry["preview_id"] = entry["id"]
        return enriched

    def upload(self, path: str, name: str, kind: str, data: bytes) -> dict[str, Any]:
        """The ``asset`` an upload answers with (the hash is the stand-in's, in blake3's written form)."""
        return {
            "id": self._id(path),
            "name": name,
            "asset_hash": f"blake3:{hashlib.sha256(data).hexdigest()}",
            "size": len(data),
            "mime_type": mimetypes.guess_type(name)[0] or "application/octet-stream",
            "tags": [kind],
        }

    def output_count(self) -> int:
        root = self.folder_of("output")
        if root is None or not os.path.isdir(root):
            return 0
        return sum(len(files) for _, _, files in os.walk(root))


def registered(outputs: dict[str, Any]) -> int:
    """How many files of a prompt's outputs are assets."""
    return sum(
        1
        for ui in outputs.values()
        for entries in (ui.values() if isinstance(ui, dict) else ())
        for entry in (entries if isinstance(entries, list) else ())
        if isinstance(entry, dict) and "id" in entry
    )


def seed_paused(hub: Publisher) -> None:
    hub.publish("assets.seed.paused", {})


def seed_rescan(hub: Publisher, assets: Assets, created: int) -> None:
    """The output rescan after a prompt, to every socket."""
    started = time.perf_counter()
    total = assets.output_count()
    hub.publish("assets.seed.resumed", {})
    hub.publish("assets.seed.started", {"roots": ["output"], "total": total, "phase": "fast"})
    skipped = max(total - created, 0)
    done = {"roots": ["output"], "created": created, "skipped": skipped, "total": total}
    hub.publish("assets.seed.fast_complete", done)
    elapsed = round(time.perf_counter() - started, 3)
    summary = {"phase": "fast", "total": total, "created": created, "enriched": 0, "skipped": skipped}
    hub.publish("assets.seed.completed", summary | {"elapsed": elapsed})
