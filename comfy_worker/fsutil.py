"""Files on a shared, often network, volume: one atomic write and one lock, for every program.

Why one of each: workers are killed at any moment (scale-down, time-outs) and several share one volume, so a
reader must never see half a file, and a waiter must never wait forever.

* ``atomic_write`` writes to a temporary name unique to the process and thread, beside the target, flushes
  it to the disk (``fsync``), renames it onto the target and syncs the folder, so after a crash the target
  is the old file or the new one, whole. The temporary is removed when anything fails.
* ``within`` tells whether a path, links resolved, lies inside one of ComfyUI's folders: outputs are read
  and job files removed only there, whatever names a workflow or ComfyUI reports.
* ``hold_lock`` holds a lock file (flock, or a plain lock file where the filesystem has no flock) and, while
  it holds it, keeps ``<lock>.owner`` saying who holds it and touches it as a sign of life. A waiter logs
  whom it waits for, and gives up with ``LockTimeout``, naming the holder and the file to delete, once the
  holder has shown no sign of life (its owner file unchanged) for ``deadline_s`` of waiting: a stale lock
  (a worker killed on another machine, a hung process) no longer blocks a start forever, and a long but
  live holder (a 20 GB download) is still waited for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@functools.cache
def _real_folder(root: Path) -> str:
    """``root`` resolved, once per process: it is asked for every output and every job's files. Should the
    folder move meanwhile, paths there no longer look inside it, so nothing is read or removed."""
    return os.path.join(os.path.realpath(root), "")  # with a trailing "/": "/a/" is no prefix of "/ab/x"


def within(root: Path, path: Path) -> str | None:
    """``path`` with its links resolved, when that lies inside ``root`` (never ``root`` itself), else None."""
    real = os.path.realpath(path)
    return real if real.startswith(_real_folder(root)) else None


LOCK_LOG_INTERVAL_S = 15.0
DEFAULT_LOCK_DEADLINE_S = 600.0  # PROVISION_LOCK_TIMEOUT's default: ten minutes without a sign of life


class LockTimeout(Exception):
    """A lock's holder showed no sign of life for the deadline; the message names it and what to do."""


def atomic_write(path: Path, content: str | bytes | Iterable[bytes]) -> None:
    """Replace ``path`` with ``content`` (text is UTF-8) so that readers see the old file or the new one, whole.

    An iterable of byte chunks is streamed (a download); the folder is created when missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    if isinstance(content, str):
        content = content.encode()
    chunks: Iterable[bytes] = [content] if isinstance(content, bytes) else content
    try:
        with temporary.open("wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable; filesystems that cannot sync a folder are left as they are."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def owner_file(lock: Path) -> Path:
    return lock.with_name(lock.name + ".owner")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, ValueError):
        return None


def _last_sign_of_life(owner: Path) -> int | None:
    """The owner file's mtime (the holder's clock, only compared for a change), or None when there is none."""
    try:
        return owner.stat().st_mtime_ns
    except OSError:
        return None


@contextlib.contextmanager
def hold_lock(
    path: Path,
    *,
    what: str,
    deadline_s: float,
    soft: bool = False,
    log_every_s: float = LOCK_LOG_INTERVAL_S,
) -> Iterator[None]:
    """Hold the lock file ``path`` for ``what`` (words for the log: "provisioning this volume").

    While another process holds it, log whom we wait for every ``log_every_s``; raise ``LockTimeout`` when the
    holder has shown no sign of life (its owner file untouched) for ``deadline_s``. ``soft``: a plain lock
    file (filelock's SoftFileLock) for filesystems without flock; it survives a killed holder, which the
    deadline then catches.
    """
    from filelock import FileLock, SoftFileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = SoftFileLock(str(path)) if soft else FileLock(str(path))
    owner = owner_file(path)
    started = alive_at = time.monotonic()
    seen = _last_sign_of_life(owner)
    while True:
        try:
            lock.acquire(timeout=max(0.0, min(log_every_s, alive_at + deadline_s - time.monotonic())))
            break
        except Timeout:
            now, touched = time.monotonic(), _last_sign_of_life(owner)
            if touched != seen:  # compared, not subtracted: the holder may be a machine with another clock
                seen, alive_at = touched, now
            holder = _read(owner) or "another process (it wrote no owner file)"
            if now - alive_at >= deadline_s:
                raise LockTimeout(
                    f"gave up waiting for {what} after {now - started:.0f} s: the lock {path} is held by {holder}, "
                    f"which has shown no sign of life for {now - alive_at:.0f} s. If that process is gone "
                    f"(a worker killed on another machine), delete {path} and {owner.name}."
                ) from None
            log.info("Waiting for %s: held by %s (%.0f s so far)", what, holder, now - started)
    stop = threading.Event()
    heartbeat = threading.Thread(target=_heartbeat, args=(owner, stop, min(deadline_s / 4, 60.0)), daemon=True)
    try:
        atomic_write(owner, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
        heartbeat.start()
        yield
    finally:
        stop.set()
        if heartbeat.is_alive():
            heartbeat.join()
        owner.unlink(missing_ok=True)
        lock.release()


def _heartbeat(owner: Path, stop: threading.Event, every_s: float) -> None:
    """Touch the owner file while the lock is held: the waiters' sign that the holder is alive."""
    while not stop.wait(every_s):
        with contextlib.suppress(OSError):
            os.utime(owner)


def flock_works(folder: Path) -> bool:
    """Whether ``folder``'s filesystem has working flock (some network filesystems do not)."""
    fd = os.open(folder / ".flock-probe", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)  # held by a peer's probe: flock works
    finally:
        os.close(fd)
