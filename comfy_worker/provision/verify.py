"""Is a model file what the config asks for: size and sha256, checked once and remembered.

Hashing a 20 GB model on a network volume takes minutes, so a verified digest is recorded with the file's
size and mtime in ``<models_dir>/.locks/`` and not computed again until the file changes.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from comfy_worker.fsutil import atomic_write
from comfy_worker.provision.download_options import MIB, DownloadError
from comfy_worker.provision.progress import mb
from comfy_worker.provision.transfer import Remote

log = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def verified_record(target: Path, models_dir: Path) -> Path:
    return models_dir / ".locks" / (target.relative_to(models_dir).as_posix().replace("/", "__") + ".sha256")


def remember_sha256(target: Path, models_dir: Path, sha256: str) -> None:
    """Note that ``target`` (at this size and mtime) has ``sha256``, so the next run need not hash it again."""
    stat = target.stat()
    atomic_write(verified_record(target, models_dir), f"{stat.st_size} {stat.st_mtime_ns} {sha256}\n")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def wrong_sha256(target: Path, sha256: str | None, models_dir: Path, remember: bool = True) -> str | None:
    """The digest of an existing ``target`` when it is not the config's ``sha256``; None when it matches (or
    no digest is asked for). ``remember=False`` (the dry run) writes no record."""
    if sha256 is None:
        return None
    stat = target.stat()
    if _read(verified_record(target, models_dir)) == f"{stat.st_size} {stat.st_mtime_ns} {sha256}":
        return None  # hashed before, unchanged since
    actual = sha256_file(target)
    if actual != sha256:
        return actual
    if remember:
        remember_sha256(target, models_dir, actual)
    return None


def present(target: Path, sha256: str | None, models_dir: Path) -> bool:
    """Whether the target is already there (with the config's sha256, when one is given)."""
    if not target.is_file():
        return False
    actual = wrong_sha256(target, sha256, models_dir)
    if actual is None:
        return True
    log.warning("%s exists but has sha256 %s, not the config's %s: downloading it again", target, actual, sha256)
    return False


def check_space(folder: Path, part: Path, size: int | None, name: str) -> None:
    if size is None:
        return
    have = part.stat().st_blocks * 512 if part.exists() else 0
    free = shutil.disk_usage(folder).free
    if free < size - have:
        raise DownloadError(f"disk full: {name} needs {mb(size - have)} more and {folder} has {mb(free)} free")


def check_part(part: Path, remote: Remote, expected: str | None) -> str | None:
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
