"""Models a job brings by URL (``input.models``): downloaded into a cache on the volume that ComfyUI sees.

Services built on the worker let their users bring their own LoRA or checkpoint. The files go to
``MODEL_CACHE_DIR/<destination>/<filename>`` with the provisioning downloader (resume, sha256, per-file
locks, tokens), through the input URLs' SSRF guard, within ``MODEL_URL_MAX_GB`` each. ComfyUI sees the cache as
one more models root (provisioning writes it into ComfyUI's ``extra_model_paths.yaml``).

ComfyUI knows a model only by its name, so a name must always hold the bytes of the URL the index says.
``.index.json`` (under a lock) records each file's URL, size and last use, and a job *claims* each of its
files before anything is downloaded: it records its URL there (removing a file, or a partial file, of any
other URL first), and holds the file's *pin*, a shared ``flock`` on ``.pins/<hash of the file's path>``,
from then until the job ends. Changing what a name holds (another URL) or evicting it takes that pin
exclusively, so it waits for no one: a name in use by a running job or download, on this worker or another,
is refused for another URL with an error that says so, and shared by jobs asking for the same URL (one
download). The cache stays under ``MODEL_CACHE_MAX_GB`` by evicting the least recently used files, partial
ones included; config.yml's models live in ``MODELS_DIR``, outside the cache, and are never evicted.

A job's downloads run in a thread of their own, which watches the job's ``Stop``: at the job's deadline or
end its sockets are shut, so it ends within about a second, and it keeps its pins until it has really
ended (a download that outlives its job would otherwise write under a name another job has just claimed).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from comfy_worker.errors import InputError
from comfy_worker.fsutil import atomic_write, hold_lock
from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.download_options import DownloadOptions
from comfy_worker.provision.downloads import ModelResult, download_models
from comfy_worker.provision.transfer import PARTIAL_SUFFIXES
from comfy_worker.provision.verify import verified_record
from comfy_worker.redact import redact_url
from comfy_worker.runtime.fetch import ForbiddenAddressError, Network, Stop, check_url, guarded_session

log = logging.getLogger(__name__)
GB = 1024**3
INDEX = ".index.json"

# (file name, bytes done, bytes in all or None): what the job's progress updates report
ProgressReport = Callable[[str, int, int | None], None]


class Pins:
    """The shared locks that keep a job's cached files from eviction and from another URL until it ends."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.files: list[str] = []  # as the workflow names them: "<subfolder/>name"
        self._lock = threading.Lock()

    def release(self) -> None:
        """Close every pin (idempotent; the job's end and the download thread may both call it)."""
        with self._lock:
            fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


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

    def prepare(
        self,
        models: Sequence[ModelConfig],
        progress: ProgressReport,
        deadline: float | None = None,
        stop: Stop | None = None,
    ) -> Pins:
        """Download (or find) every model, pinned until ``stop`` is set (without one: until the caller releases
        the pins); then evict beyond the cap. InputError names what failed.

        The work runs in its own thread; this call waits for it until ``deadline`` (``time.monotonic``) or
        ``stop``, and at the deadline sets ``stop``, which ends the downloads. So the caller's thread (the
        event loop's shared pool) is free at the job's end whatever the downloads do.
        """
        stop = stop or Stop()
        outcome: concurrent.futures.Future[Pins] = concurrent.futures.Future()
        finished = threading.Event()
        outcome.add_done_callback(lambda _: finished.set())
        stop.on_set(finished.set)
        threading.Thread(
            target=self._run, args=(models, progress, stop, outcome), name="job-models", daemon=True
        ).start()
        finished.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not outcome.done():
            stop.set()  # the job's time is up: its downloads stop now and release their pins when they end
            raise InputError("models: the job ran out of time while its models were downloading.")
        return outcome.result()

    def _run(
        self,
        models: Sequence[ModelConfig],
        progress: ProgressReport,
        stop: Stop,
        outcome: concurrent.futures.Future[Pins],
    ) -> None:
        try:
            pins = self._prepare(models, progress, stop)
        except BaseException as exc:  # the waiting thread re-raises it (or, past the deadline, nobody does)
            outcome.set_exception(exc)
            return
        stop.on_set(pins.release)  # the job's end releases them; at once when it has ended already
        outcome.set_result(pins)

    def _prepare(self, models: Sequence[ModelConfig], progress: ProgressReport, stop: Stop) -> Pins:
        self._check_hosts(models)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pins_dir.mkdir(exist_ok=True)
        pins = Pins()
        files = {_relative(model) for model in models}
        try:
            with self._index() as index:
                for model in models:
                    pins.fds.append(self._claim(model, index))
            options = dataclasses.replace(
                self.options, on_progress=progress, session=lambda: guarded_session(self.allowlist, stop)
            )
            results = download_models(list(models), self.root, options, cancelled=stop)
            failed = [result for result in results if result.status == "failed"]
            if failed:
                raise InputError(
                    "A model of the job could not be downloaded: " + "; ".join(str(r.error) for r in failed),
                    {"models": [{"url": redact_url(r.model.url), "error": r.error} for r in failed]},
                )
            with self._index() as index:
                self._record(results, index)
                self._evict(index, keep=files)
            pins.files = [relative.split("/", 1)[1] for relative in sorted(files)]
            return pins
        except BaseException:
            pins.release()  # first: this job's partial files count against the cap like the rest
            with contextlib.suppress(Exception), self._index() as index:
                self._evict(index, keep=set())
            raise

    def _check_hosts(self, models: Sequence[ModelConfig]) -> None:
        """Refuse internal addresses at once, with the input URLs' rule (the guarded session also checks every
        redirect's connection, and the downloader reports such a refusal without retrying)."""
        for index, model in enumerate(models):
            try:
                check_url(model.url, self.allowlist)
            except ForbiddenAddressError as exc:
                raise InputError(f"models[{index}].url: {exc}", {"url": redact_url(model.url)}) from None

    def _pin(self, relative: str, exclusive: bool) -> int | None:
        """A non-blocking flock on the file's pin: shared while a job uses the file, exclusive to change or
        evict it; None when it is held the other way. Exclusive pins are only taken under the index's lock,
        and are brief, so a shared one never has to wait."""
        path = self.pins_dir / (hashlib.sha256(relative.encode()).hexdigest()[:32] + ".lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _claim(self, model: ModelConfig, index: dict[str, dict[str, Any]]) -> int:
        """Pin the model's file for this job and make the index name the model's URL for it (under the
        index's lock). A file of another URL, or of none the index knows, is removed first unless someone
        holds its pin: then the job is refused, as the file is another URL's for as long as that lasts."""
        relative = _relative(model)
        entry = index.get(relative)
        fd = self._pin(relative, exclusive=True)
        if fd is not None:
            if entry is None or entry.get("url") != model.url:
                self._remove(relative, index)
                index[relative] = {"url": model.url, "size": 0, "used": time.time()}
            fcntl.flock(fd, fcntl.LOCK_SH)  # no one else can pin it meanwhile: they need the index's lock
            return fd
        if entry is not None and entry.get("url") == model.url:
            shared = self._pin(relative, exclusive=False)
            if shared is not None:  # another job uses this very URL: one download, one file, shared
                return shared
        raise InputError(  # not which URL: that is another job's business
            f"models: the cache's {relative} is being downloaded or used by a running job, for another URL than "
            "this job's; give this model another filename, or send the job again once that one ends.",
            {"file": relative},
        )

    @contextlib.contextmanager
    def _index(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The cache's index, read and written back under its lock (one change at a time, every worker); also
        when a change fails half-way (a refused claim): what was removed from the disk is out of it too."""
        with hold_lock(self.root / ".index.lock", what="the model cache's index", deadline_s=self.lock_deadline_s):
            path = self.root / INDEX
            try:
                index: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                index = {}
            try:
                yield index
            finally:
                atomic_write(path, json.dumps(index, indent=1, sort_keys=True))

    def _record(self, results: Sequence[ModelResult], index: dict[str, dict[str, Any]]) -> None:
        """Each file's size and last use; its URL is the one its claim recorded, which its pin kept."""
        now = time.time()
        for result in results:
            assert result.path is not None
            relative = result.path.relative_to(self.root).as_posix()
            index[relative] = {"url": result.model.url, "size": result.path.stat().st_size, "used": now}

    def _evict(self, index: dict[str, dict[str, Any]], keep: set[str]) -> None:
        """Remove the least recently used files, partial ones included, until the cache is within
        MODEL_CACHE_MAX_GB, and entries with nothing on the disk; never one that a job or download holds the
        pin of."""
        self._adopt(index)
        usage = {relative: self._usage(relative) for relative in index}
        total = sum(usage.values())
        for relative in sorted(index, key=lambda name: float(index[name].get("used", 0))):
            if relative in keep or (usage[relative] and total <= self.max_bytes):
                continue
            fd = self._pin(relative, exclusive=True)
            if fd is None:
                continue  # a running job or download uses it
            try:
                self._remove(relative, index)
                total -= usage[relative]
                if usage[relative]:
                    log.info("model cache: evicted %s (%.3f GB) to stay within the cap", relative, usage[relative] / GB)
            finally:
                os.close(fd)
        if total > self.max_bytes:
            log.warning("model cache: %.3f GB in use by running jobs, over MODEL_CACHE_MAX_GB", total / GB)

    def _adopt(self, index: dict[str, dict[str, Any]]) -> None:
        """Files on disk that the index does not know (a lost index, a killed worker's leftovers) join it with
        no URL, so they count against the cap and are evicted like the rest (and never served for a URL)."""
        for path in self.root.glob("*/**/*"):
            relative = path.relative_to(self.root).as_posix()
            if any(part.startswith(".") for part in relative.split("/")) or not path.is_file():
                continue
            for suffix in PARTIAL_SUFFIXES:
                relative = relative.removesuffix(suffix)
            if relative not in index:
                with contextlib.suppress(OSError):
                    index[relative] = {"url": None, "size": 0, "used": path.stat().st_mtime}

    def _usage(self, relative: str) -> int:
        """The bytes a file takes: the file, and its partial download (what of it is on the disk: segments
        are written at their offsets, so a partial file may be sparse)."""
        total = 0
        for name, partial in ((relative, False), *((relative + suffix, True) for suffix in PARTIAL_SUFFIXES)):
            with contextlib.suppress(OSError):
                stat = (self.root / name).stat()
                total += min(stat.st_size, stat.st_blocks * 512) if partial else stat.st_size
        return total

    def _remove(self, relative: str, index: dict[str, dict[str, Any]]) -> None:
        target = self.root / relative
        for path in (target, *(target.with_name(target.name + suffix) for suffix in PARTIAL_SUFFIXES)):
            path.unlink(missing_ok=True)
        verified_record(target, self.root).unlink(missing_ok=True)
        index.pop(relative, None)


def _relative(model: ModelConfig) -> str:
    return f"{model.destination}/{model.filename}"
