"""Download config.yml's models onto a (shared, often network) volume: resumable, verified, locked, logged.

Several workers on one volume start together, get killed mid-download and start again, so:

* every file goes to ``<target>.part`` (ComfyUI does not list it) with a sidecar that lets any later process
  resume each Range segment (``transfer``), is checked (``verify``: size; sha256 from the config or the Hub's
  LFS etag) and only then renamed onto the target: nobody ever sees a partial file at the target name;
* one lock per target under ``<models_dir>/.locks/`` (``fsutil.hold_lock``: flock, or lock files where the
  filesystem has no flock): the other workers wait, then find the file present and skip it; a holder silent
  for PROVISION_LOCK_TIMEOUT is given up on, with its name in the error;
* Hugging Face URLs (``sources``) use huggingface_hub for the metadata but not for the bytes: its download
  deletes its process-unique temporary file on failure, so a killed worker would start a 20 GB file from
  zero. The bytes come from the resolve URL pinned to the commit; requests drops the Authorization header on
  the redirect to the CDN.

This module is the orchestration: options (``download_options``), URL sources (``sources``), checks
(``verify``), progress (``progress``) and the transfer itself (``transfer``) live beside it. Errors: one
``DownloadError`` message per failing model, naming the (redacted) URL and the cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from comfy_worker.fsutil import LockTimeout, flock_works, hold_lock
from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.download_options import DownloadError, DownloadOptions
from comfy_worker.provision.progress import Board, mb
from comfy_worker.provision.sources import Source, explain, resolve, source_of
from comfy_worker.provision.transfer import Cancelled, Remote, TransferError, fetch
from comfy_worker.provision.verify import check_part, check_space, present, remember_sha256, wrong_sha256
from comfy_worker.redact import Redactor, redact_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelResult:
    model: ModelConfig
    path: Path | None
    status: Literal["downloaded", "present", "failed"]
    error: str | None
    size: int | None
    sha256: str | None  # checked digest; None when neither the config nor the server gave one


@dataclass(frozen=True)
class PlannedDownload:
    model: ModelConfig
    path: Path | None
    status: Literal["present", "download", "failed"]
    size: int | None
    error: str | None = None


class _Downloader:
    """One download_models call: shared options, locks, progress board and the caller's cancel."""

    def __init__(self, models_dir: Path, options: DownloadOptions, board: Board, cancelled: threading.Event) -> None:
        self.models_dir, self.options, self.board, self.cancelled = models_dir, options, board, cancelled
        self.tuning = dataclasses.replace(options.tuning, cancelled=cancelled)
        self.locks = models_dir / ".locks"
        self.locks.mkdir(parents=True, exist_ok=True)
        self.soft_locks = options.lock == "soft" or (options.lock == "auto" and not flock_works(self.locks))
        if self.soft_locks:
            log.warning(
                "%s: no flock on this filesystem: using lock files; one left by a worker killed on another "
                "machine is given up on after PROVISION_LOCK_TIMEOUT (%.0f s)",
                self.locks,
                options.lock_timeout_s,
            )
        self.redact = Redactor(options.secrets)

    def hold(self, target: Path) -> contextlib.AbstractContextManager[None]:
        key = target.relative_to(self.models_dir).as_posix().replace("/", "__")
        return hold_lock(
            self.locks / f"{key}.lock",
            what=f"the download of {target.name}",
            deadline_s=self.options.lock_timeout_s,
            soft=self.soft_locks,
            log_every_s=self.options.progress_interval_s,
        )

    def run(self, model: ModelConfig) -> ModelResult:
        source: Source | None = None
        try:
            source = source_of(model, self.options)
            return self._download(source)
        except TransferError as exc:
            message = f"{source.display_url}: {explain(exc, source)}" if source else str(exc)
        except (DownloadError, LockTimeout) as exc:
            message = str(exc)
        except OSError as exc:
            url = source.display_url if source else redact_url(model.url)
            cause = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else type(exc).__name__
            message = f"{url}: {cause}: {exc.strerror or exc}"
        if not message.startswith(redact_url(model.url)):
            message = f"{redact_url(model.url)}: {message}"
        return ModelResult(model, None, "failed", self.redact(message), None, None)

    def _download(self, source: Source) -> ModelResult:
        folder = self.models_dir / source.model.destination
        remote = None
        if source.offline_name:
            target = folder / source.offline_name
            if present(target, source.model.sha256, self.models_dir):
                return self._present(source, target)
        else:
            remote = resolve(source, self.options, self.cancelled)
            target = folder / (remote.filename or urlsplit(source.model.url).path.rsplit("/", 1)[-1] or "download")
        folder.mkdir(parents=True, exist_ok=True)
        with self.hold(target):
            if present(target, source.model.sha256, self.models_dir):
                return self._present(source, target)  # another worker finished it while this one waited
            if self.cancelled.is_set():  # cancelled while it waited for the lock
                raise Cancelled("stopped: the download was cancelled (the job ended or ran out of time)")
            return self._fetch(source, target, remote or resolve(source, self.options, self.cancelled))

    def _present(self, source: Source, target: Path) -> ModelResult:
        log.info("%s: present", target)
        return ModelResult(source.model, target, "present", None, target.stat().st_size, source.model.sha256)

    def _fetch(self, source: Source, target: Path, remote: Remote) -> ModelResult:
        expected = source.model.sha256 or remote.sha256
        if source.model.sha256 and remote.sha256 and source.model.sha256 != remote.sha256:
            raise DownloadError(
                f"{source.display_url}: wrong checksum: the config expects sha256 {source.model.sha256}, "
                f"the server's file has {remote.sha256} (not downloaded)"
            )
        limit = self.options.max_bytes
        if limit is not None and (remote.size is None or remote.size > limit):
            size = "does not say its size" if remote.size is None else f"is {mb(remote.size)}"
            raise DownloadError(f"{source.display_url}: the file {size}; the limit is {mb(limit)} (not downloaded)")
        part = target.with_name(target.name + ".part")
        check_space(target.parent, part, remote.size, target.name)
        log.info("%s: downloading %s (%s) from %s", target.name, target, mb(remote.size), source.display_url)
        started = time.monotonic()
        with self.board.track(target.name, remote.size) as progress:
            remote = fetch(
                remote,
                part,
                self.tuning,
                progress.add,
                lambda: resolve(source, self.options, self.cancelled),
                progress.resume,
            )
            fetched = progress.done - progress.baseline
        digest = check_part(part, remote, expected)
        os.replace(part, target)
        if digest:
            remember_sha256(target, self.models_dir, digest)
        elapsed = time.monotonic() - started
        log.info(
            "%s: done, %s in %.1f s (%.1f MB/s)%s",
            target.name,
            mb(fetched),
            elapsed,
            fetched / max(elapsed, 1e-6) / 1e6,
            ", sha256 ok" if digest else "",
        )
        return ModelResult(source.model, target, "downloaded", None, target.stat().st_size, digest)


def download_models(
    models: Sequence[ModelConfig],
    models_dir: Path,
    options: DownloadOptions,
    cancelled: threading.Event | None = None,
) -> list[ModelResult]:
    """Download every model to ``models_dir / destination / name``, DOWNLOAD_CONCURRENCY files at a time.

    Never raises for one model: each result says downloaded, present or failed (with the reason). Setting
    ``cancelled`` (a job's deadline or end) fails what is left at the next chunk or wait; parts stay to resume.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    with Board(options) as board, ThreadPoolExecutor(options.concurrency, thread_name_prefix="download") as pool:
        downloader = _Downloader(models_dir, options, board, cancelled or threading.Event())
        results = list(pool.map(downloader.run, models))
    for result in results:
        if result.status == "failed":
            kind = "optional model" if result.model.optional else "model"
            log.error("%s failed: %s", kind, result.error)
    return results


def plan(models: Sequence[ModelConfig], models_dir: Path, options: DownloadOptions) -> list[PlannedDownload]:
    """What ``download_models`` would do, without writing: target, present or to download, size when known."""
    redact = Redactor(options.secrets)

    def one(model: ModelConfig) -> PlannedDownload:
        source: Source | None = None
        try:
            source = source_of(model, options)
            folder = models_dir / model.destination
            if source.offline_name and (folder / source.offline_name).is_file():
                return on_disk(model, folder / source.offline_name, None)
            remote = resolve(source, options)
            path = folder / (source.offline_name or remote.filename or urlsplit(model.url).path.rsplit("/", 1)[-1])
            if path.is_file():
                return on_disk(model, path, remote.size)
            return PlannedDownload(model, path, "download", remote.size)
        except (DownloadError, TransferError) as exc:
            cause = explain(exc, source) if isinstance(exc, TransferError) and source else str(exc)
            return PlannedDownload(model, None, "failed", None, redact(f"{redact_url(model.url)}: {cause}"))

    def on_disk(model: ModelConfig, path: Path, size: int | None) -> PlannedDownload:
        """A file already there is present only with the config's sha256, as the real run would decide."""
        actual = wrong_sha256(path, model.sha256, models_dir, remember=False)
        if actual is None:
            return PlannedDownload(model, path, "present", path.stat().st_size)
        reason = f"the file there has sha256 {actual}, not the config's {model.sha256}"
        return PlannedDownload(model, path, "download", size, reason)

    with ThreadPoolExecutor(options.concurrency) as pool:
        return list(pool.map(one, models))


def failed_required(results: Sequence[ModelResult]) -> list[ModelResult]:
    return [r for r in results if r.status == "failed" and not r.model.optional]


def format_results(results: Sequence[ModelResult]) -> str:
    """The CLI's summary: one line per model, then the counts."""
    lines = []
    for r in results:
        where = r.path or f"{r.model.destination}/{r.model.target_name}"
        detail = f"{mb(r.size)}" if r.status != "failed" else f"{r.error}"
        optional = " (optional)" if r.model.optional else ""
        lines.append(f"{r.status:<10} {where}{optional}: {detail}")
    counts = {s: sum(r.status == s for r in results) for s in ("downloaded", "present", "failed")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines) + "\n"


def format_plan(plans: Sequence[PlannedDownload]) -> str:
    lines = []
    for p in plans:
        where = p.path or f"{p.model.destination}/{p.model.target_name}"
        detail = mb(p.size) if p.error is None else p.error if p.status == "failed" else f"{mb(p.size)} ({p.error})"
        lines.append(f"{p.status:<10} {where}: {detail}")
    return "\n".join(lines) + "\n"
