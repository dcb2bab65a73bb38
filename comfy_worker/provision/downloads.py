"""Download config.yml's models onto a (shared, often network) volume: resumable, verified, locked, logged.

Several workers on one volume start together, get killed mid-download and start again, so:

* every file goes to ``<target>.part`` (ComfyUI does not list it) with a sidecar that lets any later process
  resume each Range segment (``transfer.py``), is checked (size; sha256 from the config or the Hub's LFS etag)
  and only then renamed onto the target: nobody ever sees a partial file at the target name;
* one lock per target under ``<models_dir>/.locks/`` (flock; SoftFileLock where the filesystem has no flock):
  the other workers wait, then find the file present and skip it;
* Hugging Face URLs use huggingface_hub for what it does well (URL parsing, ``HF_ENDPOINT``, auth headers, file
  metadata) but not for the bytes: its download deletes its process-unique temporary file on failure, so a
  killed worker would start a 20 GB file from zero. The bytes come from the resolve URL pinned to the commit;
  requests drops the Authorization header on the redirect to the CDN.

Errors: one ``DownloadError`` message per failing model, naming the (redacted) URL and the cause.
"""

from __future__ import annotations

import email.message
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import requests
from filelock import BaseFileLock, FileLock, SoftFileLock, Timeout
from huggingface_hub import get_hf_file_metadata, hf_hub_url, parse_hf_uri
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # lazily exported
from tqdm import tqdm

from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.transfer import (
    HttpStatusError,
    Remote,
    RetryableError,
    TransferError,
    TransferTuning,
    fetch,
)
from comfy_worker.redact import Redactor, redact_url
from comfy_worker.settings import SettingsError, env_float, env_int

log = logging.getLogger(__name__)

HF_HOSTS = frozenset({"huggingface.co", "hf.co", "www.huggingface.co"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MIB = 1024 * 1024


class DownloadError(Exception):
    """One model cannot be downloaded; the message names the redacted URL and the cause."""


@dataclass(frozen=True)
class DownloadOptions:
    """How to download; ``from_env`` reads the README's download variables once."""

    concurrency: int = 4
    connections: int = 8
    progress_interval_s: float = 10.0
    hf_token: str | None = field(default=None, repr=False)
    host_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    hf_endpoint: str = "https://huggingface.co"
    segment_threshold: int = 64 * MIB
    retries: int = 5
    retry_backoff_s: float = 1.0
    lock: Literal["auto", "flock", "soft"] = "auto"
    progress_bar: bool | None = None  # None: a tqdm bar when stderr is a TTY, log lines otherwise

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DownloadOptions:
        """Parse the environment (a plain mapping, so tests pass dicts); raise SettingsError on bad values."""
        hosts = _host_tokens(env.get("DOWNLOAD_TOKENS", ""))
        civitai = env.get("CIVITAI_TOKEN", "").strip()
        if civitai:
            hosts.setdefault("civitai.com", civitai)
        lock = env.get("DOWNLOAD_LOCK", "auto").strip().lower() or "auto"
        if lock not in ("auto", "flock", "soft"):
            raise SettingsError(f"DOWNLOAD_LOCK={lock!r} is not one of auto, flock, soft")
        return cls(
            concurrency=env_int(env, "DOWNLOAD_CONCURRENCY", cls.concurrency, minimum=1),
            connections=env_int(env, "DOWNLOAD_CONNECTIONS", cls.connections, minimum=1),
            progress_interval_s=env_float(env, "DOWNLOAD_PROGRESS_INTERVAL", cls.progress_interval_s, minimum=0.1),
            hf_token=env.get("HF_TOKEN", "").strip() or None,
            host_tokens=hosts,
            hf_endpoint=(env.get("HF_ENDPOINT", "").strip() or cls.hf_endpoint).rstrip("/"),
            segment_threshold=int(env_float(env, "DOWNLOAD_SEGMENT_MIN_MB", 64.0, minimum=1.0) * MIB),
            retries=env_int(env, "DOWNLOAD_RETRIES", cls.retries),
            lock=lock,  # type: ignore[arg-type]
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(t for t in (self.hf_token, *self.host_tokens.values()) if t)

    @property
    def tuning(self) -> TransferTuning:
        return TransferTuning(self.connections, self.segment_threshold, self.retries, self.retry_backoff_s)

    def token_for(self, host: str) -> str | None:
        """The DOWNLOAD_TOKENS / CIVITAI_TOKEN token of ``host`` or of a domain it belongs to."""
        host = host.lower()
        for name, token in self.host_tokens.items():
            if host == name or host.endswith("." + name):
                return token
        return None


def _host_tokens(raw: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for number, item in enumerate((i.strip() for i in raw.split(",")), start=1):
        if not item:
            continue
        host, sep, token = item.partition("=")
        if not sep or not host.strip() or not token.strip():
            raise SettingsError(f"DOWNLOAD_TOKENS: item {number} is not host=token")  # never echo the value
        tokens[host.strip().lower()] = token.strip()
    return tokens


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


@dataclass(frozen=True)
class _Source:
    """A model's URL understood offline: Hub file or plain URL, the file name when it is known without asking."""

    model: ModelConfig
    display_url: str
    hf_repo: tuple[str, str, str | None, str] | None  # (repo_id, repo_type, revision, path_in_repo)
    offline_name: str | None

    @property
    def host(self) -> str:
        return (urlsplit(self.model.url).hostname or "").lower()


def _source(model: ModelConfig, options: DownloadOptions) -> _Source:
    display = redact_url(model.url)
    parts = urlsplit(model.url)
    hf_repo = None
    name = model.filename
    if (parts.hostname or "").lower() in HF_HOSTS or _origin(model.url) == _origin(options.hf_endpoint):
        try:
            uri = parse_hf_uri(model.url, endpoint=options.hf_endpoint)
        except ValueError:  # its message quotes the whole URL, query included: not repeated here
            raise DownloadError(f"{display}: not a Hugging Face file URL (expected .../resolve/<rev>/<file>)") from None
        if uri.type == "bucket" or not uri.path_in_repo:
            raise DownloadError(f"{display}: not a Hugging Face file URL (expected .../resolve/<revision>/<file>)")
        hf_repo = (uri.id, uri.type, uri.revision, uri.path_in_repo)
        name = name or uri.path_in_repo.rsplit("/", 1)[-1]
    else:
        last = parts.path.rsplit("/", 1)[-1]
        if name is None and "." in last.strip("."):
            name = last  # 'model.safetensors' yes; Civitai's '/api/download/models/12345' needs Content-Disposition
    return _Source(model, display, hf_repo, name)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _resolve(source: _Source, options: DownloadOptions) -> Remote:
    """Ask the server about the file (size, version, ranges, name), retrying connection errors and 5xx."""
    for attempt in range(options.retries + 1):
        try:
            return _hf_remote(source, options) if source.hf_repo else _probe(source, options)
        except RetryableError as exc:
            if attempt == options.retries:
                raise DownloadError(f"{source.display_url}: {exc} (gave up after {options.retries} retries)") from None
            time.sleep(min(options.retry_backoff_s * 2**attempt, 30.0))
    raise AssertionError("unreachable")


def _hf_remote(source: _Source, options: DownloadOptions) -> Remote:
    assert source.hf_repo is not None
    repo_id, repo_type, revision, path = source.hf_repo
    token: str | bool = options.hf_token or False  # False: never a token file from this machine's cache

    def url_at(rev: str | None) -> str:
        return hf_hub_url(repo_id, path, repo_type=repo_type, revision=rev, endpoint=options.hf_endpoint)

    try:
        meta = get_hf_file_metadata(url_at(revision), token=token, endpoint=options.hf_endpoint)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (429,) or status >= 500:
            raise RetryableError(f"HTTP {status} from the Hub") from None
        raise HttpStatusError(status, f"HTTP {status} from the Hub") from None
    except OSError as exc:
        raise RetryableError(f"cannot reach the Hub: {type(exc).__name__}") from None
    except Exception as exc:  # httpx2's transport errors are not OSErrors
        if type(exc).__module__.startswith("httpx"):
            raise RetryableError(f"cannot reach the Hub: {type(exc).__name__}") from None
        raise
    etag = (meta.etag or "").lower()
    return Remote(
        url=url_at(meta.commit_hash or revision),  # pinned: a push to 'main' mid-download changes nothing
        display_url=source.display_url,
        headers=build_hf_headers(token=token),
        size=meta.size,
        ranges=True,
        validator=meta.etag,
        if_range=False,  # the CDN's ETag is not the Hub's; the commit pins the content instead
        filename=None,
        sha256=etag if _SHA256.match(etag) else None,
    )


def _auth_headers(source: _Source, options: DownloadOptions) -> dict[str, str]:
    token = options.token_for(source.host)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _probe(source: _Source, options: DownloadOptions) -> Remote:
    """GET bytes 0-0: size (Content-Range), Range support, validator and name in one request that signed
    (GET-only) redirect targets accept too, unlike HEAD."""
    headers = _auth_headers(source, options)
    try:
        with requests.get(
            source.model.url,
            headers={**headers, "Range": "bytes=0-0", "Accept-Encoding": "identity"},
            stream=True,
            timeout=(15, 60),
        ) as response:
            return _remote_from_probe(source, headers, response)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise RetryableError(f"connection error: {type(exc).__name__}") from None


def _remote_from_probe(source: _Source, headers: dict[str, str], response: requests.Response) -> Remote:
    status = response.status_code
    if status in (408, 425, 429) or status >= 500:
        raise RetryableError(f"HTTP {status}")
    if status not in (200, 206, 416):
        raise HttpStatusError(status, f"HTTP {status} {response.reason or ''}".strip())
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    if status == 206 and total.isdigit():
        size: int | None = int(total)
    elif status == 416:
        size = int(total) if total.isdigit() else 0
    else:
        length = response.headers.get("Content-Length", "")
        size = int(length) if length.isdigit() else None
    etag = response.headers.get("ETag")
    validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
    return Remote(
        url=source.model.url,
        display_url=source.display_url,
        headers=headers,
        size=size,
        ranges=status == 206 and size is not None,
        validator=validator,
        filename=_disposition_name(response),
    )


def _disposition_name(response: requests.Response) -> str | None:
    """The file name from Content-Disposition (Civitai's download API), reduced to a plain name."""
    for candidate in (response, *reversed(response.history)):
        value = candidate.headers.get("Content-Disposition")
        if value:
            message = email.message.Message()
            message["Content-Disposition"] = value
            name = (message.get_filename() or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
            if name and name not in (".", "..") and "\x00" not in name:
                return name
    return None


def _explain(exc: TransferError, source: _Source) -> str:
    """The cause in words a user can act on."""
    if isinstance(exc, HttpStatusError) and exc.status in (401, 403):
        if source.hf_repo:
            need = "set HF_TOKEN (and accept the model's licence on its page if it is gated)"
        elif source.host.endswith("civitai.com"):
            need = "set CIVITAI_TOKEN"
        else:
            need = f"set DOWNLOAD_TOKENS={source.host}=<token>"
        return f"{exc}: needs a token: {need} (HF_TOKEN / CIVITAI_TOKEN / DOWNLOAD_TOKENS)"
    if isinstance(exc, HttpStatusError) and exc.status == 404:
        return f"{exc}: not found (check the URL, the revision and the file name)"
    return str(exc)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _verified_record(target: Path, models_dir: Path) -> Path:
    return models_dir / ".locks" / (target.relative_to(models_dir).as_posix().replace("/", "__") + ".sha256")


def _remember_sha256(target: Path, models_dir: Path, sha256: str) -> None:
    """Note that ``target`` (at this size and mtime) has ``sha256``, so the next run need not hash it again:
    hashing a 20 GB model on a network volume takes minutes."""
    stat = target.stat()
    record = _verified_record(target, models_dir)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{stat.st_size} {stat.st_mtime_ns} {sha256}\n", encoding="ascii")


def _present(target: Path, sha256: str | None, models_dir: Path) -> bool:
    """Whether the target is already there (and has the config's sha256, when one is given)."""
    if not target.is_file():
        return False
    if sha256 is None:
        return True
    stat = target.stat()
    if _read(_verified_record(target, models_dir)) == f"{stat.st_size} {stat.st_mtime_ns} {sha256}":
        return True  # hashed before, unchanged since
    actual = sha256_file(target)
    if actual == sha256:
        _remember_sha256(target, models_dir, actual)
        return True
    log.warning("%s exists but has sha256 %s, not the config's %s: downloading it again", target, actual, sha256)
    return False


class _Locks:
    """One lock file per target under ``<models_dir>/.locks``; flock when the filesystem has it."""

    def __init__(self, models_dir: Path, options: DownloadOptions) -> None:
        self.folder = models_dir / ".locks"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.interval = options.progress_interval_s
        self.soft = options.lock == "soft" or (options.lock == "auto" and not _flock_works(self.folder))
        if self.soft:
            log.warning(
                "%s: no flock on this filesystem: using lock files (SoftFileLock); a worker killed while holding "
                "one on another machine leaves it behind: delete %s/*.lock if nothing downloads",
                self.folder,
                self.folder,
            )

    @contextmanager
    def hold(self, target: Path, models_dir: Path) -> Iterator[None]:
        key = target.relative_to(models_dir).as_posix().replace("/", "__")
        path, owner = self.folder / f"{key}.lock", self.folder / f"{key}.owner"
        lock: BaseFileLock = SoftFileLock(path) if self.soft else FileLock(path)
        timeout = 0.0
        while True:
            try:
                lock.acquire(timeout=timeout)
                break
            except Timeout:
                holder = _read(owner) or "another process"
                log.info("%s: waiting for %s, which is downloading it", target.name, holder)
                timeout = self.interval
        try:
            owner.write_text(f"{socket.gethostname()} pid {os.getpid()}")
            yield
        finally:
            owner.unlink(missing_ok=True)
            lock.release()


def _flock_works(folder: Path) -> bool:
    fd = os.open(folder / ".flock-probe", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)  # held by a peer's probe: flock works
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class _FileProgress:
    """Bytes of one file, counted from the transfer threads."""

    def __init__(self, name: str, total: int | None, bar: tqdm[None] | None) -> None:
        self.name, self.total, self.bar = name, total, bar
        self._lock = threading.Lock()
        self.done = self.baseline = 0
        self.started = time.monotonic()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
        if self.bar is not None:
            self.bar.update(count)

    def resume(self, position: int) -> None:
        with self._lock:
            self.done = self.baseline = position
            self.started = time.monotonic()
        if self.bar is not None:
            self.bar.reset(self.total)
            self.bar.update(position)

    def rate(self) -> float:
        return (self.done - self.baseline) / max(time.monotonic() - self.started, 1e-6)

    def line(self) -> str:
        rate = self.rate()
        if self.total:
            eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 else "?"
            return (
                f"{self.name}: {100 * self.done / self.total:5.1f}% of {_mb(self.total)}, "
                f"{rate / 1e6:.1f} MB/s, ETA {eta}"
            )
        return f"{self.name}: {_mb(self.done)}, {rate / 1e6:.1f} MB/s"


class _Board:
    """The files in flight: a thread logs a line per file every interval; on a TTY, tqdm bars instead."""

    def __init__(self, options: DownloadOptions) -> None:
        self.interval = options.progress_interval_s
        self.bars = sys.stderr.isatty() if options.progress_bar is None else options.progress_bar
        self.active: list[_FileProgress] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="download-progress", daemon=True)

    def __enter__(self) -> _Board:
        if not self.bars:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @contextmanager
    def track(self, name: str, total: int | None) -> Iterator[_FileProgress]:
        bar = tqdm(total=total, desc=name, unit="B", unit_scale=True, leave=True) if self.bars else None
        progress = _FileProgress(name, total, bar)
        with self._lock:
            self.active.append(progress)
        try:
            yield progress
        finally:
            with self._lock:
                self.active.remove(progress)
            if bar is not None:
                bar.close()

    def _report(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                lines = [p.line() for p in self.active]
            for line in lines:
                log.info("%s", line)


def _mb(size: int | None) -> str:
    if size is None:
        return "? MB"
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _check_space(folder: Path, part: Path, size: int | None, name: str) -> None:
    if size is None:
        return
    have = part.stat().st_blocks * 512 if part.exists() else 0
    free = shutil.disk_usage(folder).free
    if free < size - have:
        raise DownloadError(f"disk full: {name} needs {_mb(size - have)} more and {folder} has {_mb(free)} free")


def _verify(part: Path, remote: Remote, expected: str | None) -> str | None:
    """Check the finished part's size and sha256; a mismatch deletes it (a retry starts clean)."""
    part.with_name(part.name + ".json").unlink(missing_ok=True)  # complete: nothing left to resume
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{remote.display_url}: got {size} bytes, expected {remote.size}; the partial file was deleted"
        )
    if expected is None:
        return None
    actual = sha256_file(part)
    if actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{remote.display_url}: wrong checksum: expected sha256 {expected}, got {actual}; the download was deleted"
        )
    return actual


class _Downloader:
    """One download_models call: shared options, locks and progress board."""

    def __init__(self, models_dir: Path, options: DownloadOptions, board: _Board) -> None:
        self.models_dir, self.options, self.board = models_dir, options, board
        self.locks = _Locks(models_dir, options)
        self.redact = Redactor(options.secrets)

    def run(self, model: ModelConfig) -> ModelResult:
        source: _Source | None = None
        try:
            source = _source(model, self.options)
            return self._download(source)
        except TransferError as exc:
            message = f"{source.display_url}: {_explain(exc, source)}" if source else str(exc)
        except DownloadError as exc:
            message = str(exc)
        except OSError as exc:
            url = source.display_url if source else redact_url(model.url)
            cause = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else type(exc).__name__
            message = f"{url}: {cause}: {exc.strerror or exc}"
        if not message.startswith(redact_url(model.url)):
            message = f"{redact_url(model.url)}: {message}"
        return ModelResult(model, None, "failed", self.redact(message), None, None)

    def _download(self, source: _Source) -> ModelResult:
        folder = self.models_dir / source.model.destination
        remote = None
        if source.offline_name:
            target = folder / source.offline_name
            if _present(target, source.model.sha256, self.models_dir):
                return self._present(source, target)
        else:
            remote = _resolve(source, self.options)
            target = folder / (remote.filename or urlsplit(source.model.url).path.rsplit("/", 1)[-1] or "download")
        folder.mkdir(parents=True, exist_ok=True)
        with self.locks.hold(target, self.models_dir):
            if _present(target, source.model.sha256, self.models_dir):
                return self._present(source, target)  # another worker finished it while this one waited
            return self._fetch(source, target, remote or _resolve(source, self.options))

    def _present(self, source: _Source, target: Path) -> ModelResult:
        log.info("%s: present", target)
        return ModelResult(source.model, target, "present", None, target.stat().st_size, source.model.sha256)

    def _fetch(self, source: _Source, target: Path, remote: Remote) -> ModelResult:
        expected = source.model.sha256 or remote.sha256
        if source.model.sha256 and remote.sha256 and source.model.sha256 != remote.sha256:
            raise DownloadError(
                f"{source.display_url}: wrong checksum: the config expects sha256 {source.model.sha256}, "
                f"the server's file has {remote.sha256} (not downloaded)"
            )
        part = target.with_name(target.name + ".part")
        _check_space(target.parent, part, remote.size, target.name)
        log.info("%s: downloading %s (%s) from %s", target.name, target, _mb(remote.size), source.display_url)
        started = time.monotonic()
        with self.board.track(target.name, remote.size) as progress:
            remote = fetch(
                remote,
                part,
                self.options.tuning,
                progress.add,
                lambda: _resolve(source, self.options),
                progress.resume,
            )
            fetched = progress.done - progress.baseline
        digest = _verify(part, remote, expected)
        os.replace(part, target)
        if digest:
            _remember_sha256(target, self.models_dir, digest)
        elapsed = time.monotonic() - started
        log.info(
            "%s: done, %s in %.1f s (%.1f MB/s)%s",
            target.name,
            _mb(fetched),
            elapsed,
            fetched / max(elapsed, 1e-6) / 1e6,
            ", sha256 ok" if digest else "",
        )
        return ModelResult(source.model, target, "downloaded", None, target.stat().st_size, digest)


def download_models(models: Sequence[ModelConfig], models_dir: Path, options: DownloadOptions) -> list[ModelResult]:
    """Download every model to ``models_dir / destination / name``, DOWNLOAD_CONCURRENCY files at a time.

    Never raises for one model: each result says downloaded, present or failed (with the reason).
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    with _Board(options) as board, ThreadPoolExecutor(options.concurrency, thread_name_prefix="download") as pool:
        downloader = _Downloader(models_dir, options, board)
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
        source: _Source | None = None
        try:
            source = _source(model, options)
            folder = models_dir / model.destination
            if source.offline_name and (folder / source.offline_name).is_file():
                path = folder / source.offline_name
                return PlannedDownload(model, path, "present", path.stat().st_size)
            remote = _resolve(source, options)
            name = source.offline_name or remote.filename or urlsplit(model.url).path.rsplit("/", 1)[-1]
            path = folder / name
            status: Literal["present", "download"] = "present" if path.is_file() else "download"
            return PlannedDownload(model, path, status, remote.size)
        except (DownloadError, TransferError) as exc:
            cause = _explain(exc, source) if isinstance(exc, TransferError) and source else str(exc)
            return PlannedDownload(model, None, "failed", None, redact(f"{redact_url(model.url)}: {cause}"))

    with ThreadPoolExecutor(options.concurrency) as pool:
        return list(pool.map(one, models))


def failed_required(results: Sequence[ModelResult]) -> list[ModelResult]:
    return [r for r in results if r.status == "failed" and not r.model.optional]


def format_results(results: Sequence[ModelResult]) -> str:
    """The CLI's summary: one line per model, then the counts."""
    lines = []
    for r in results:
        where = r.path or f"{r.model.destination}/{r.model.target_name}"
        detail = f"{_mb(r.size)}" if r.status != "failed" else f"{r.error}"
        optional = " (optional)" if r.model.optional else ""
        lines.append(f"{r.status:<10} {where}{optional}: {detail}")
    counts = {s: sum(r.status == s for r in results) for s in ("downloaded", "present", "failed")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines) + "\n"


def format_plan(plans: Sequence[PlannedDownload]) -> str:
    lines = []
    for p in plans:
        where = p.path or f"{p.model.destination}/{p.model.target_name}"
        detail = p.error if p.status == "failed" else _mb(p.size)
        lines.append(f"{p.status:<10} {where}: {detail}")
    return "\n".join(lines) + "\n"
