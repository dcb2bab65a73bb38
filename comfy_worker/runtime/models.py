"""Models a job brings by URL (``input.models``): downloaded into a cache on the volume that ComfyUI sees.

Services built on the worker let their users bring their own LoRA or checkpoint. The files go to
``MODEL_CACHE_DIR/<destination>/<filename>`` with the provisioning downloader (resume, sha256, per-file
locks, tokens), through the input URLs' SSRF guard, within ``MODEL_URL_MAX_GB`` each. ComfyUI sees the cache as
one more models root (provisioning writes it into ComfyUI's ``extra_model_paths.yaml``).

The cache is shared by every worker on the volume, and kept under ``MODEL_CACHE_MAX_GB`` by evicting the least
recently used files. What a job uses is *pinned* for the job's duration (a shared ``flock`` on the file's pin,
which eviction must take exclusively), so no running job, on this worker or another, loses a file; config.yml's
models live in ``MODELS_DIR``, outside the cache, and are never evicted. ``.index.json`` records each file's
URL, size and last use, under a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_worker.errors import InputError
from comfy_worker.fsutil import atomic_write, hold_lock
from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.download_options import DownloadOptions
from comfy_worker.provision.downloads import download_models
from comfy_worker.redact import redact_url
from comfy_worker.runtime.fetch import ForbiddenAddressError, Network, check_url

log = logging.getLogger(__name__)
GB = 1024**3
INDEX = ".index.json"

# (file name, bytes done, bytes in all or None): what the job's progress updates report
ProgressReport = Callable[[str, int, int | None], None]


@dataclass
class Pins:
    """The shared locks that keep a job's cached files from eviction until the job ends."""

    fds: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # as the workflow names them: "<subfolder/>name"

    def release(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class ModelCache:
    def __init__(
        self,
        cache_dir: Path,
        max_bytes: int,
        file_max_bytes: int,
        options: DownloadOptions,
        lock_deadline_s: float,
        allowlist: tuple[Network, ...] = (),
    ) -> None:
        self.root = cache_dir
        self.allowlist = allowlist
        self.max_bytes = max_bytes
        self.options = dataclasses.replace(options, max_bytes=file_max_bytes)
        self.lock_deadline_s = lock_deadline_s
        self.pins_dir = cache_dir / ".pins"

    def prepare(self, models: Sequence[ModelConfig], progress: ProgressReport) -> Pins:
        """Download (or find) every model, pinned; then evict beyond the cap. InputError names what failed."""
        self._check_hosts(models)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pins_dir.mkdir(exist_ok=True)
        pins = Pins()
        try:
            for model in models:
                pins.fds.append(self._pin(model.url, exclusive=False))
            with self._index() as index:
                self._replace_stale(models, index)
            options = dataclasses.replace(self.options, on_progress=progress)
            results = download_models(list(models), self.root, options)
            failed = [result for result in results if result.status == "failed"]
            if failed:
                raise InputError(
                    "A model of the job could not be downloaded: " + "; ".join(str(r.error) for r in failed),
                    {"models": [{"url": redact_url(r.model.url), "error": r.error} for r in failed]},
                )
            with self._index() as index:
                now = time.time()
                for result in results:
                    assert result.path is not None
                    relative = result.path.relative_to(self.root).as_posix()
                    index[relative] = {"url": result.model.url, "size": result.path.stat().st_size, "used": now}
                    pins.files.append(relative.split("/", 1)[1])
                self._evict(index, keep={r.path.relative_to(self.root).as_posix() for r in results if r.path})
            return pins
        except BaseException:
            pins.release()
            raise

    def _check_hosts(self, models: Sequence[ModelConfig]) -> None:
        """Refuse internal addresses at once, with the input URLs' rule (the guarded session also checks every
        redirect's connection, and the downloader reports such a refusal without retrying)."""
        for index, model in enumerate(models):
            try:
                check_url(model.url, self.allowlist)
            except ForbiddenAddressError as exc:
                raise InputError(f"models[{index}].url: {exc}", {"url": redact_url(model.url)}) from None

    def _pin_path(self, url: str) -> Path:
        return self.pins_dir / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".lock")

    def _pin(self, url: str, *, exclusive: bool) -> int:
        """A flock on the URL's pin file: shared while a job uses it, exclusive (non-blocking) to evict it."""
        fd = os.open(self._pin_path(url), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if exclusive else fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _index(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The cache's index, read and written back under its lock (one change at a time, every worker)."""
        with hold_lock(self.root / ".index.lock", what="the model cache's index", deadline_s=self.lock_deadline_s):
            path = self.root / INDEX
            try:
                index: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                index = {}
            yield index
            atomic_write(path, json.dumps(index, indent=1, sort_keys=True))

    def _replace_stale(self, models: Sequence[ModelConfig], index: dict[str, dict[str, Any]]) -> None:
        """A cached file of the requested name but from another URL is removed first (the newer file wins),
        unless a running job uses it."""
        for model in models:
            if model.filename is None:
                continue
            relative = f"{model.destination}/{model.filename}"
            entry = index.get(relative)
            if entry is None or entry.get("url") == model.url:
                continue
            try:
                fd = self._pin(str(entry["url"]), exclusive=True)
            except BlockingIOError:
                raise InputError(
                    f"models: the cache holds another {relative} (from {redact_url(str(entry['url']))}) that a "
                    "running job uses; give this model another filename.",
                    {"file": relative},
                ) from None
            try:
                self._remove(relative, index)
            finally:
                os.close(fd)

    def _evict(self, index: dict[str, dict[str, Any]], keep: set[str]) -> None:
        """Remove the least recently used files until the cache is within MODEL_CACHE_MAX_GB."""
        total = sum(int(entry.get("size", 0)) for entry in index.values())
        for relative, entry in sorted(index.items(), key=lambda item: float(item[1].get("used", 0))):
            if total <= self.max_bytes:
                return
            if relative in keep:
                continue
            try:
                fd = self._pin(str(entry.get("url")), exclusive=True)
            except BlockingIOError:
                continue  # a running job uses it
            try:
                self._remove(relative, index)
                total -= int(entry.get("size", 0))
                log.info("model cache: evicted %s (%.2f GB) to stay within the cap", relative, entry["size"] / GB)
            finally:
                os.close(fd)
        if total > self.max_bytes:
            log.warning("model cache: %.2f GB in use by running jobs, over MODEL_CACHE_MAX_GB", total / GB)

    def _remove(self, relative: str, index: dict[str, dict[str, Any]]) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / relative).unlink()
        index.pop(relative, None)
