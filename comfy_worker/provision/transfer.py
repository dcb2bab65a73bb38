"""Resumable HTTP transfer of one file into ``<target>.part``: parallel Range segments, a JSON sidecar, retries.

Why not a library: huggingface_hub writes to a process-unique temporary file that it deletes on failure, and
urllib/requests have no resume. A worker on a shared network volume gets killed mid-download (scale-down,
time-outs), so every segment's progress is kept in ``<target>.part.json`` (url, size, validator, bytes done per
segment) and a new process continues each segment where it stopped. ``If-Range`` with the validator makes a
server whose file changed answer 200 instead of 206, which restarts the download from zero instead of mixing two
versions. A server without Range support gets one stream (a restart then re-fetches from zero).

Errors: ``TransferError`` (not retryable: 4xx, disk full, changed file twice, a connection the session's guard
refuses), ``HttpStatusError`` (a status code, subclass of TransferError), ``Cancelled`` (the caller set
``TransferTuning.cancelled``: a job's deadline or end; the part is kept for a resume). Connection errors and
5xx/429 are retried here with backoff, resuming.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
import urllib3

from comfy_worker.fsutil import atomic_write

log = logging.getLogger(__name__)

SIDECAR_VERSION = 1
MIN_SEGMENT = 4 * 1024 * 1024  # smaller segments cost more requests than they save
WRITE_SIZE = 4 * 1024 * 1024  # bytes gathered before one pwrite
READ_SIZE = 1024 * 1024  # most bytes one socket read returns
FLUSH_AFTER_S = 0.5  # a slow stream still reaches the disk (and the sidecar) this often
SAVE_EVERY_S = 1.0  # sidecar writes: at most this often per file (a kill re-fetches at most this much)
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
PARTIAL_SUFFIXES = (".part", ".part.json")  # beside a target while it downloads: the partial file, its sidecar


class TransferError(Exception):
    """The transfer cannot succeed by retrying (a 4xx, a full disk, a file that keeps changing)."""


class HttpStatusError(TransferError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Cancelled(TransferError):
    """The caller stopped the transfer (``TransferTuning.cancelled``): not retried, the part stays for a resume."""


class RefusedConnection(OSError):
    """A connection the session itself refused to open (the worker's SSRF guard: a redirect to an internal
    address): final, never retried."""


def refused_connection(exc: BaseException) -> RefusedConnection | None:
    """The guard's refusal inside the wrapping of requests and urllib3, or None when the cause is another."""
    seen: list[BaseException] = [exc]
    while seen:
        current = seen.pop()
        if isinstance(current, RefusedConnection):
            return current
        nested = [getattr(current, "reason", None), current.__cause__, current.__context__, *current.args]
        seen += [item for item in nested if isinstance(item, BaseException)]
    return None


class RetryableError(Exception):
    """A connection error or a 5xx: try again from where the segment stopped."""


class _Stopped(Exception):
    """Another segment of the file failed: this one stops too (its progress stays in the sidecar)."""


class _Halt:
    """Why a segment stops before its end: another segment of the file failed, or the caller cancelled."""

    def __init__(self, cancelled: threading.Event) -> None:
        self.failed = threading.Event()
        self.cancelled = cancelled

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("stopped: the download was cancelled (the job ended or ran out of time)")
        if self.failed.is_set():
            raise _Stopped

    def pause(self, delay: float) -> None:
        """Wait ``delay`` seconds before a retry, ending (as ``check`` does) as soon as either is set."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            self.check()
            self.failed.wait(min(left, 0.2))
        self.check()


class _Restart(Exception):
    """The server answered 200 to a Range request: the file changed (If-Range) or ranges are unsupported."""

    def __init__(self, no_ranges: bool) -> None:
        super().__init__("file changed on the server" if not no_ranges else "server ignores Range")
        self.no_ranges = no_ranges


@dataclass(frozen=True)
class Remote:
    """What a probe (or the Hub's metadata) says about a file, and how to ask for its bytes."""

    url: str  # requested for every range; redirects (CDN, signed URLs) are followed afresh each time
    display_url: str  # secrets redacted: for logs, errors and the sidecar
    headers: Mapping[str, str] = field(repr=False)
    size: int | None
    ranges: bool
    validator: str | None  # strong ETag or Last-Modified: the sidecar's identity of the version
    if_range: bool = True  # send If-Range (off for the Hub: its CDN has other ETags, the content is pinned)
    filename: str | None = None  # from Content-Disposition
    sha256: str | None = None  # the content's digest when the server says it (the Hub's LFS etag)


@dataclass
class Segment:
    start: int
    end: int  # exclusive; -1: unknown size (read to EOF)
    done: int = 0

    @property
    def remaining(self) -> int:
        return -1 if self.end < 0 else self.end - self.start - self.done


@dataclass(frozen=True)
class TransferTuning:
    connections: int = 8
    segment_threshold: int = 64 * 1024 * 1024
    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    session: Callable[[], requests.Session] = field(default=requests.Session, repr=False, compare=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)


class Sidecar:
    """``<part>.json``: the version being fetched and the bytes written per segment, saved as data lands."""

    def __init__(self, path: Path, remote: Remote, segments: list[Segment]) -> None:
        self.path = path
        self.remote = remote
        self.segments = segments
        self._lock = threading.Lock()
        self._saved_at = 0.0

    @staticmethod
    def load(path: Path, remote: Remote) -> list[Segment] | None:
        """The saved segments when the sidecar describes this very version (url, size, validator), else None."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        same = (
            data.get("version") == SIDECAR_VERSION
            and data.get("url") == remote.display_url
            and data.get("size") == remote.size
            and data.get("validator") == remote.validator
            and data.get("ranges") is True
            and remote.ranges
        )
        if not same:
            return None
        return [Segment(int(s), int(e), int(d)) for s, e, d in data["segments"]]

    def record(self, segment: Segment, written: int, force: bool = False) -> None:
        with self._lock:
            segment.done += written
            now = time.monotonic()
            if force or now - self._saved_at >= SAVE_EVERY_S:
                self._save()
                self._saved_at = now

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        data = {
            "version": SIDECAR_VERSION,
            "url": self.remote.display_url,
            "size": self.remote.size,
            "validator": self.remote.validator,
            "ranges": self.remote.ranges,
            "segments": [[s.start, s.end, s.done] for s in self.segments],
        }
        atomic_write(self.path, json.dumps(data))


def plan_segments(size: int | None, ranges: bool, tuning: TransferTuning) -> list[Segment]:
    """Equal segments for a large file on a Range-capable server; one stream otherwise."""
    if size is None:
        return [Segment(0, -1)]
    if size == 0:
        return [Segment(0, 0)]
    count = 1
    if ranges and size >= tuning.segment_threshold:
        count = max(1, min(tuning.connections, size // MIN_SEGMENT))
    step = -(-size // count)
    return [Segment(start, min(start + step, size)) for start in range(0, size, step)] or [Segment(0, 0)]


def fetch(
    remote: Remote,
    part: Path,
    tuning: TransferTuning,
    on_bytes: Callable[[int], None],
    reprobe: Callable[[], Remote],
    on_resume: Callable[[int], None] = lambda _n: None,
) -> Remote:
    """Fill ``part`` with the remote file, resuming from its sidecar; return the Remote that was fetched.

    ``on_bytes(n)`` counts bytes as they are written; ``on_resume(n)`` says the transfer (re)starts at byte n.
    A changed file (or a server that turns out to ignore ranges) restarts once from zero with a fresh probe.
    """
    for attempt in range(3):
        sidecar_path = part.with_name(part.name + ".json")
        segments = Sidecar.load(sidecar_path, remote) if part.exists() else None
        if segments is None:
            if part.exists() or sidecar_path.exists():
                log.info("%s: partial file is of another version or not resumable: starting from zero", part.name)
            segments = plan_segments(remote.size, remote.ranges, tuning)
            part.unlink(missing_ok=True)
        else:
            resumed = sum(s.done for s in segments)
            log.info("%s: resuming at %d of %s bytes", part.name, resumed, remote.size)
            on_resume(resumed)
        if not remote.ranges:
            log.info("%s: server does not support ranges: one stream, a restart re-fetches from zero", part.name)
        sidecar = Sidecar(sidecar_path, remote, segments)
        sidecar.save()
        try:
            _fetch_segments(remote, part, sidecar, tuning, on_bytes)
            return remote
        except _Restart as restart:
            if attempt == 2:
                raise TransferError(f"{remote.display_url}: {restart} on every attempt") from None
            log.warning("%s: %s: starting again from zero", part.name, restart)
            part.unlink(missing_ok=True)
            sidecar_path.unlink(missing_ok=True)
            on_resume(0)
            remote = reprobe()
            if restart.no_ranges:
                remote = dataclasses.replace(remote, ranges=False)
    raise AssertionError("unreachable")


def _fetch_segments(
    remote: Remote, part: Path, sidecar: Sidecar, tuning: TransferTuning, on_bytes: Callable[[int], None]
) -> None:
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        pending = [s for s in sidecar.segments if s.remaining != 0]
        stop = _Halt(tuning.cancelled)  # the first segment that fails sets it: the others stop at their next chunk
        if len(pending) <= 1:
            for segment in pending:
                _run_segment(remote, fd, segment, sidecar, tuning, on_bytes, stop)
        else:
            with ThreadPoolExecutor(len(pending), thread_name_prefix="segment") as pool:
                futures = [pool.submit(_run_segment, remote, fd, s, sidecar, tuning, on_bytes, stop) for s in pending]
                errors = [f.exception() for f in futures]
            failures = [e for e in errors if e is not None and not isinstance(e, _Stopped)]
            if failures:
                restarts = [e for e in failures if isinstance(e, _Restart)]
                raise (restarts or failures)[0]
        os.fsync(fd)  # on the disk before it is renamed onto its name: a crash leaves the old state or the file
    finally:
        sidecar.save()
        os.close(fd)


def _run_segment(
    remote: Remote,
    fd: int,
    segment: Segment,
    sidecar: Sidecar,
    tuning: TransferTuning,
    on_bytes: Callable[[int], None],
    stop: _Halt,
) -> None:
    """Fetch one segment, retrying with backoff; every failure without progress counts against the retries.

    Any failure sets ``stop``, so the other segments of the file end too instead of fetching for nothing.
    """
    try:
        _fetch_one_segment(remote, fd, segment, sidecar, tuning, on_bytes, stop)
    except BaseException:
        stop.failed.set()
        raise


def _fetch_one_segment(
    remote: Remote,
    fd: int,
    segment: Segment,
    sidecar: Sidecar,
    tuning: TransferTuning,
    on_bytes: Callable[[int], None],
    stop: _Halt,
) -> None:
    failures = 0
    with tuning.session() as session:
        while segment.remaining != 0:
            before = segment.done
            try:
                _stream_segment(session, remote, fd, segment, sidecar, on_bytes, stop)
                if segment.end < 0:
                    return  # unknown size: the server's EOF is the end
            except RetryableError as exc:
                stop.check()  # a connection shut because the caller cancelled is not retried
                failures = 0 if segment.done > before else failures + 1
                if failures > tuning.retries:
                    raise TransferError(
                        f"{remote.display_url}: {exc} (gave up after {tuning.retries} retries)"
                    ) from None
                delay = min(tuning.backoff_s * 2 ** max(failures - 1, 0), 30.0)
                log.warning(
                    "%s: %s; retrying at byte %d in %.1f s",
                    remote.display_url,
                    exc,
                    segment.start + segment.done,
                    delay,
                )
                stop.pause(delay)
    sidecar.record(segment, 0, force=True)


def _stream_segment(
    session: requests.Session,
    remote: Remote,
    fd: int,
    segment: Segment,
    sidecar: Sidecar,
    on_bytes: Callable[[int], None],
    stop: _Halt,
) -> None:
    stop.check()
    if not remote.ranges and segment.done:
        # No ranges: a retry re-reads from the first byte, so the bytes already counted are counted again.
        on_bytes(-segment.done)
        sidecar.record(segment, -segment.done)
    offset = segment.start + segment.done
    headers = {**remote.headers, "Accept-Encoding": "identity"}
    ranged = remote.ranges and (offset > 0 or segment.end != remote.size)
    if ranged:
        last = "" if segment.end < 0 else str(segment.end - 1)
        headers["Range"] = f"bytes={offset}-{last}"
        if remote.if_range and remote.validator:
            headers["If-Range"] = remote.validator
    try:
        with session.get(remote.url, headers=headers, stream=True, timeout=(15, 60)) as response:
            _check_status(response, remote, ranged)
            for data in _chunks(response):
                _write(fd, data, offset, remote)
                offset += len(data)
                sidecar.record(segment, len(data))
                on_bytes(len(data))
                if segment.remaining < 0 and segment.end >= 0:
                    raise TransferError(f"{remote.display_url}: the server sent more bytes than the range asked for")
                stop.check()
    except (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.HTTPError,
        ConnectionError,
        TimeoutError,
    ) as exc:
        refused = refused_connection(exc)
        if refused is not None:
            raise TransferError(f"refused to connect: {refused}") from None
        raise RetryableError(f"connection error: {type(exc).__name__}") from None
    stop.check()  # a connection shut by a cancel ends like a file of unknown size: that end is not the file's
    if segment.end >= 0 and segment.remaining > 0:
        raise RetryableError(f"connection closed with {segment.remaining} bytes of the segment left")


def _check_status(response: requests.Response, remote: Remote, ranged: bool) -> None:
    status = response.status_code
    if status in RETRY_STATUSES:
        raise RetryableError(f"HTTP {status}")
    if status == 200 and ranged:
        raise _Restart(no_ranges="If-Range" not in response.request.headers)
    if status not in (200, 206):
        raise HttpStatusError(status, f"HTTP {status} {response.reason or ''}".strip())


def _chunks(response: requests.Response) -> Iterator[bytes | bytearray]:
    """Large writes without waiting for a slow server: gather reads up to WRITE_SIZE or FLUSH_AFTER_S."""
    raw = response.raw
    buffer = bytearray()
    flushed = time.monotonic()
    while True:
        try:
            data = raw.read1(READ_SIZE, decode_content=False)
        except Exception:
            if buffer:
                yield bytes(buffer)  # what arrived before the error is kept: the retry starts after it
            raise
        if data:
            buffer += data
        now = time.monotonic()
        if buffer and (not data or len(buffer) >= WRITE_SIZE or now - flushed >= FLUSH_AFTER_S):
            yield bytes(buffer) if len(buffer) < WRITE_SIZE else buffer  # big ones: no copy, a new buffer after
            buffer = bytearray()
            flushed = now
        if not data:
            return


def _write(fd: int, data: bytes | bytearray, offset: int, remote: Remote) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TransferError(f"disk full writing {remote.display_url} ({exc.strerror})") from None
        raise
