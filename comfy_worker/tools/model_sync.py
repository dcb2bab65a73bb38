"""Upload a local models folder to a RunPod network volume through its S3-compatible API.

    comfy-worker-model-sync ~/ComfyUI/models --volume VOLUME_ID --datacenter EU-RO-1
    comfy-worker-model-sync ./models --volume VOLUME_ID --datacenter EU-RO-1 --dry-run

Files land under ``--prefix`` (default ``models/``), the volume folder the worker's ComfyUI reads models from.
Only what is missing or changed is sent: a different size is a change; for the same size the file's sha256
is compared with the one stored in the object's metadata at upload (``x-amz-meta-sha256``). Local hashes are
cached by (path, size, mtime), so a resync of an unchanged folder reads no file. An object without that
metadata (uploaded by another tool) and the same size is left alone and reported as unverified.

Big files go up as multipart uploads with parts sent in parallel. Each acknowledged part is written to a
journal in ``--state-dir``; an interrupted run (Ctrl-C, a lost connection, a crash) is resumed by the next
run: the same upload id is reused and only the parts not yet acknowledged are sent. The journal is used
only while the file keeps its size, mtime and hash; otherwise the upload starts over.

Credentials: ``RUNPOD_S3_ACCESS_KEY`` / ``RUNPOD_S3_SECRET_KEY`` (RunPod console, Settings > S3 API Keys)
or ``--access-key`` / ``--secret-key``. Exit codes: 0 in sync, 1 an upload failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.exceptions

from comfy_worker.fsutil import atomic_write
from comfy_worker.storage import s3_client

log = logging.getLogger("comfy_worker.tools.model_sync")

MIB = 1024 * 1024
MIN_PART = 5 * MIB  # S3's smallest part (except the last)
MAX_PARTS = 10_000
HASH_BLOCK = 8 * MIB
SHA_KEY = "sha256"  # object metadata key (sent as x-amz-meta-sha256)


class SyncError(Exception):
    """A problem the user can fix (arguments, credentials, the folder): printed without a traceback."""


@dataclass(frozen=True)
class SyncSettings:
    """Everything one sync needs, read once from flags and the environment."""

    local_dir: Path
    endpoint_url: str
    bucket: str
    region: str
    access_key: str
    secret_key: str
    prefix: str = "models/"
    part_size: int = 64 * MIB
    multipart_threshold: int = 64 * MIB
    workers: int = 4
    state_dir: Path = Path(".model_sync")
    dry_run: bool = False


def default_state_dir(env: Mapping[str, str]) -> Path:
    cache = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "comfy-worker" / "model_sync"


def normalise_prefix(prefix: str) -> str:
    """``models`` -> ``models/``; ``""`` or ``/`` -> the volume's root. No ``..`` or empty segments."""
    parts = [p for p in prefix.strip().strip("/").split("/") if p]
    if any(p in {".", ".."} for p in parts):
        raise SyncError(f"--prefix must not contain '.' or '..' segments, got {prefix!r}")
    return "/".join(parts) + "/" if parts else ""


def settings_from(args: argparse.Namespace, env: Mapping[str, str]) -> SyncSettings:
    """Flags win over the environment; every missing piece is named at once."""
    local_dir = Path(args.local_dir).expanduser()
    if not local_dir.is_dir():
        raise SyncError(f"{local_dir} is not a folder")
    datacenter = args.datacenter or env.get("RUNPOD_DATACENTER", "")
    endpoint_url = args.endpoint_url or env.get("RUNPOD_S3_ENDPOINT_URL", "")
    if not endpoint_url and datacenter:
        endpoint_url = f"https://s3api-{datacenter.lower()}.runpod.io"
    bucket = args.volume or env.get("RUNPOD_VOLUME_ID", "")
    access_key = args.access_key or env.get("RUNPOD_S3_ACCESS_KEY", "")
    secret_key = args.secret_key or env.get("RUNPOD_S3_SECRET_KEY", "")
    values = {
        "--volume (or RUNPOD_VOLUME_ID)": bucket,
        "--datacenter or --endpoint-url (or RUNPOD_DATACENTER)": endpoint_url,
        "--access-key (or RUNPOD_S3_ACCESS_KEY)": access_key,
        "--secret-key (or RUNPOD_S3_SECRET_KEY)": secret_key,
    }
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise SyncError("missing: " + "; ".join(missing))
    if args.part_size_mb < 5:
        raise SyncError(f"--part-size-mb must be at least 5 (S3's smallest part), got {args.part_size_mb}")
    if args.workers < 1:
        raise SyncError(f"--workers must be at least 1, got {args.workers}")
    part_size = args.part_size_mb * MIB
    return SyncSettings(
        local_dir=local_dir,
        endpoint_url=endpoint_url,
        bucket=bucket,
        region=args.region or datacenter or "us-east-1",
        access_key=access_key,
        secret_key=secret_key,
        prefix=normalise_prefix(args.prefix),
        part_size=part_size,
        multipart_threshold=part_size,
        workers=args.workers,
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(env),
        dry_run=args.dry_run,
    )


def _write_json_atomic(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data))


class HashCache:
    """sha256 of local files, keyed by (absolute path, size, mtime_ns): a resync reads no unchanged file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._entries: dict[str, list[Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._entries = {}

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        cached = self._entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return str(cached[2])
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
        self._entries[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
        _write_json_atomic(self.path, self._entries)
        return digest.hexdigest()


@dataclass(frozen=True)
class LocalFile:
    path: Path
    key: str
    size: int
    mtime_ns: int


def local_files(root: Path, prefix: str) -> list[LocalFile]:
    """Every file under ``root`` (links followed), hidden files and folders (``.cache``, ``.DS_Store``) skipped.

    Hugging Face caches and hand-made model folders hold dangling symlinks and symlink loops: a link that
    cannot be read is skipped with a warning, and a folder reached again through a link is not walked twice.
    """
    files = []
    seen: set[tuple[int, int]] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        here = os.stat(folder)
        if (here.st_dev, here.st_ino) in seen:
            log.warning("skipped %s: a symlink loop (the folder was listed already)", folder)
            dirs[:] = []
            continue
        seen.add((here.st_dev, here.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError as exc:
                log.warning("skipped %s: %s (a dangling symlink or a symlink loop)", path, exc.strerror or exc)
                continue
            if not path.is_file():
                continue
            key = prefix + path.relative_to(root).as_posix()
            files.append(LocalFile(path, key, stat.st_size, stat.st_mtime_ns))
    return files


@dataclass
class Journal:
    """A multipart upload in progress, on disk, so the next run can finish it instead of starting over."""

    path: Path
    upload_id: str
    size: int
    mtime_ns: int
    sha256: str
    part_size: int
    parts: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: Path) -> Journal | None:
        try:
            data = json.loads(path.read_text())
            parts = {int(n): str(etag) for n, etag in data.pop("parts").items()}
            return cls(path=path, parts=parts, **data)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def matches(self, file: LocalFile, sha256: str, part_size: int) -> bool:
        return (self.size, self.mtime_ns, self.sha256, self.part_size) == (
            file.size,
            file.mtime_ns,
            sha256,
            part_size,
        )

    def record(self, number: int, etag: str) -> None:
        """Called from the part threads once the server acknowledged a part."""
        with self._lock:
            self.parts[number] = etag
            self.save()

    def save(self) -> None:
        data = {
            "upload_id": self.upload_id,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "sha256": self.sha256,
            "part_size": self.part_size,
            "parts": {str(n): etag for n, etag in sorted(self.parts.items())},
        }
        _write_json_atomic(self.path, data)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class SyncReport:
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    bytes_sent: int = 0


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


def describe_client_error(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message') or exc}"
    return f"{type(exc).__name__}: {exc}"


class Syncer:
    """One sync of ``settings.local_dir`` to the volume; ``client`` is exposed so tests can hook its events."""

    def __init__(self, settings: SyncSettings) -> None:
        self.settings = settings
        self.client: Any = s3_client(
            endpoint_url=settings.endpoint_url,
            region=settings.region,
            access_key_id=settings.access_key,
            secret_access_key=settings.secret_key,
            parallel=max(10, settings.workers * 2),
            read_timeout_s=300,  # a 64 MB part on a slow uplink
        )
        self.hashes = HashCache(settings.state_dir / "hashes.json")

    def remote_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.settings.bucket, Prefix=self.settings.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                sizes[item["Key"]] = int(item["Size"])
        return sizes

    def remote_sha256(self, key: str) -> str | None:
        head = self.client.head_object(Bucket=self.settings.bucket, Key=key)
        value = (head.get("Metadata") or {}).get(SHA_KEY)
        return str(value) if value else None

    def run(self) -> SyncReport:
        report = SyncReport()
        files = local_files(self.settings.local_dir, self.settings.prefix)
        remote = self.remote_sizes()
        log.info(
            "%d local files (%s); %d objects under s3://%s/%s",
            len(files),
            _human(sum(f.size for f in files)),
            len(remote),
            self.settings.bucket,
            self.settings.prefix,
        )
        for file in files:
            reason = self._reason_to_upload(file, remote.get(file.key), report)
            if reason is None:
                continue
            if self.settings.dry_run:
                log.info("would upload %s (%s, %s)", file.key, _human(file.size), reason)
                report.uploaded.append(file.key)
                continue
            log.info("upload %s (%s, %s)", file.key, _human(file.size), reason)
            try:
                report.bytes_sent += self.upload(file)
                report.uploaded.append(file.key)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
                log.error("failed %s: %s", file.key, describe_client_error(exc))
                report.failed.append(file.key)
        return report

    def _reason_to_upload(self, file: LocalFile, remote_size: int | None, report: SyncReport) -> str | None:
        if remote_size is None:
            return "new"
        if remote_size != file.size:
            return f"size {_human(remote_size)} on the volume"
        remote_sha = self.remote_sha256(file.key)
        if remote_sha is None:
            log.info("unverified %s: same size, no sha256 on the volume (uploaded by another tool)", file.key)
            report.unverified.append(file.key)
            return None
        if remote_sha != self.hashes.sha256(file.path):
            return "content changed (sha256 differs)"
        report.unchanged.append(file.key)
        return None

    def upload(self, file: LocalFile) -> int:
        """Send one file; returns the bytes sent (less than its size when a multipart upload resumed)."""
        sha256 = self.hashes.sha256(file.path)
        if file.size < self.settings.multipart_threshold:
            with file.path.open("rb") as body:
                self.client.put_object(Bucket=self.settings.bucket, Key=file.key, Body=body, Metadata={SHA_KEY: sha256})
            return file.size
        try:
            return self._multipart(file, sha256)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
            log.warning("%s: the interrupted upload is gone from the volume; starting over", file.key)
            self._journal_path(file.key).unlink(missing_ok=True)
            return self._multipart(file, sha256)

    def _journal_path(self, key: str) -> Path:
        ident = f"{self.settings.endpoint_url}|{self.settings.bucket}|{key}"
        return self.settings.state_dir / "uploads" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json"

    def part_size_for(self, size: int) -> int:
        """The configured part size, raised when the file would need more than S3's 10,000 parts."""
        return max(self.settings.part_size, MIN_PART, math.ceil(size / MAX_PARTS))

    def _multipart(self, file: LocalFile, sha256: str) -> int:
        part_size = self.part_size_for(file.size)
        total = math.ceil(file.size / part_size)
        journal = Journal.load(self._journal_path(file.key))
        if journal is not None and journal.matches(file, sha256, part_size):
            log.info("%s: resuming, %d of %d parts already on the volume", file.key, len(journal.parts), total)
        else:
            if journal is not None:
                log.info("%s: the file changed since the interrupted upload; starting over", file.key)
            created = self.client.create_multipart_upload(
                Bucket=self.settings.bucket, Key=file.key, Metadata={SHA_KEY: sha256}
            )
            journal = Journal(
                self._journal_path(file.key), created["UploadId"], file.size, file.mtime_ns, sha256, part_size
            )
            journal.save()
        missing = [n for n in range(1, total + 1) if n not in journal.parts]
        progress = _Progress(file.key, total, len(journal.parts))
        with ThreadPoolExecutor(max_workers=self.settings.workers) as pool:
            futures = [pool.submit(self._send_part, file, journal, n, part_size, progress) for n in missing]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:  # the first failure (or Ctrl-C) stops the file; sent parts stay journaled
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        self.client.complete_multipart_upload(
            Bucket=self.settings.bucket,
            Key=file.key,
            UploadId=journal.upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in sorted(journal.parts.items())]},
        )
        journal.remove()
        return sum(min(part_size, file.size - (n - 1) * part_size) for n in missing)

    def _send_part(self, file: LocalFile, journal: Journal, number: int, part_size: int, progress: _Progress) -> None:
        with file.path.open("rb") as handle:
            handle.seek((number - 1) * part_size)
            data = handle.read(part_size)
        answer = self.client.upload_part(
            Bucket=self.settings.bucket, Key=file.key, UploadId=journal.upload_id, PartNumber=number, Body=data
        )
        journal.record(number, answer["ETag"])
        progress.part_done(len(data))


class _Progress:
    """``key: 12/34 parts (35%), 48.1 MB/s`` lines, at most one every 2 s (and the last one)."""

    def __init__(self, key: str, total: int, done: int) -> None:
        self.key, self.total, self.done = key, total, done
        self.started = self.last = time.monotonic()
        self.sent = 0
        self.lock = threading.Lock()

    def part_done(self, size: int) -> None:
        with self.lock:
            self.done += 1
            self.sent += size
            now = time.monotonic()
            if now - self.last < 2 and self.done < self.total:
                return
            self.last = now
            rate = self.sent / max(now - self.started, 1e-6)
            log.info(
                "  %s: %d/%d parts (%d%%), %s/s",
                self.key,
                self.done,
                self.total,
                100 * self.done // self.total,
                _human(rate),
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfy-worker-model-sync",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("local_dir", help="the local models folder (its subfolders: checkpoints, loras, ...)")
    parser.add_argument("--volume", help="network volume id = the bucket (RUNPOD_VOLUME_ID)")
    parser.add_argument("--datacenter", help="the volume's datacenter, e.g. EU-RO-1 (RUNPOD_DATACENTER)")
    parser.add_argument("--endpoint-url", help="S3 endpoint (default https://s3api-<datacenter>.runpod.io)")
    parser.add_argument("--region", help="signing region (default: the datacenter id)")
    parser.add_argument("--access-key", help="S3 access key (RUNPOD_S3_ACCESS_KEY)")
    parser.add_argument("--secret-key", help="S3 secret key (RUNPOD_S3_SECRET_KEY)")
    parser.add_argument("--prefix", default="models/", help="folder on the volume (default models/)")
    parser.add_argument("--dry-run", action="store_true", help="only list what would be uploaded")
    parser.add_argument("--workers", type=int, default=4, help="parts sent in parallel (default 4)")
    parser.add_argument("--part-size-mb", type=int, default=64, help="multipart part size (default 64, min 5)")
    parser.add_argument("--state-dir", help="hash cache and upload journals (default ~/.cache/comfy-worker/...)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        settings = settings_from(args, os.environ if env is None else env)
        report = Syncer(settings).run()
    except SyncError as exc:
        log.error("%s", exc)
        return 2
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        log.error("the volume's S3 API refused: %s", describe_client_error(exc))
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted: run the same command again to resume")
        return 130
    verb = "would upload" if settings.dry_run else "uploaded"
    log.info(
        "%s %d, unchanged %d, unverified %d, failed %d (%s sent)",
        verb,
        len(report.uploaded),
        len(report.unchanged),
        len(report.unverified),
        len(report.failed),
        _human(report.bytes_sent),
    )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
