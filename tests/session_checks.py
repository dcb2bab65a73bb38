"""What the whole test run must leave as it found it: no process of its own alive, the files a real worker on
the same machine uses untouched. ``tests/conftest.py`` runs these checks at the end of the session.

Processes: the pytest process becomes a child subreaper (Linux), so what a test started and lost, double
forks included, is re-parented to it and found among its descendants in ``/proc``; and every process started
from it carries ``MARKER`` in its environment, which finds the ones that went elsewhere (another subreaper, a
new session under init). The Docker engine and its containers are left alone: ``.ci/run`` starts the engine,
and ``tests/docker_image.py`` stops the one it starts itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .worker_process import WORKER_ENV_PREFIXES

# Not a worker variable (none of WORKER_ENV_PREFIXES, which child environments are stripped of), no secret word.
MARKER = "CW_TEST_SESSION"
assert not MARKER.startswith(WORKER_ENV_PREFIXES)
PR_SET_CHILD_SUBREAPER = 36
ENGINE_COMMANDS = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "docker-proxy", "runc")
PROC = Path("/proc")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str  # "Z" for a zombie: exited, never waited for
    comm: str
    cmdline: str  # empty once it is exiting
    started: int  # clock ticks after boot: with the pid, which process this is (pids are reused)

    def describe(self) -> str:
        zombie = " (zombie: exited, not reaped)" if self.state == "Z" else ""
        return f"pid {self.pid} (parent {self.ppid}){zombie}: {self.cmdline or f'[{self.comm}]'}"


def new_marker() -> str:
    """A value no other test run on this machine has."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); False where that is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _read(pid: int) -> Proc | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:  # gone meanwhile, or not ours to read
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()  # from the state on: stat(5)'s field 3 is fields[0]
    cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return Proc(pid, int(fields[1]), fields[0], comm, cmdline, int(fields[19]))


def _has_marker(pid: int, marker: str) -> bool:
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER}={marker}".encode() in environ.split(b"\0")


def _all() -> dict[int, Proc]:
    procs = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (proc := _read(int(entry.name))) is not None:
            procs[proc.pid] = proc
    return procs


def leftovers(root: int, marker: str) -> list[Proc]:
    """The processes still there that ``root`` (this pytest) started: its descendants and every process with
    ``marker`` in its environment, with their descendants; the Docker engine's processes and theirs excepted."""
    procs = _all()
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)

    def subtree(pid: int) -> set[int]:
        found, todo = set(), [pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    engine = set()
    for proc in procs.values():
        if proc.comm.startswith(ENGINE_COMMANDS):
            engine |= {proc.pid} | subtree(proc.pid)
    ours = subtree(root)
    for pid in procs:
        if pid != root and pid not in ours and _has_marker(pid, marker):
            ours |= {pid} | subtree(pid)
    return [procs[pid] for pid in sorted(ours - engine - {root, os.getpid()})]


def kill_and_reap(procs: list[Proc], timeout_s: float = 30.0) -> list[Proc]:
    """SIGKILL each, reap the ones that are (or became) our children; return those still there after
    ``timeout_s``."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = []
        for proc in procs:
            with contextlib.suppress(ChildProcessError):  # ours (a zombie, or re-parented to us): reap it
                os.waitpid(proc.pid, os.WNOHANG)
            current = _read(proc.pid)
            if current is None or current.started != proc.started:
                continue  # gone (its pid maybe taken by another)
            # Still exiting, or a zombie of ours that the next waitpid takes; someone else's zombie is dead for
            # our purpose.
            if current.state != "Z" or current.ppid == os.getpid():
                remaining.append(current)
        if not remaining or time.monotonic() > deadline:
            return remaining
        time.sleep(0.1)


# --- files a real worker on this machine uses ------------------------------------------------------------------


class PidFileWatch:
    """Watches a pid file (start.sh writes its pid there, and the worker it becomes keeps that pid) and tells
    each write by a process of this run from one by another test run on the machine: the writer carries MARKER.

    ``changes`` gets (pid, command line or "", whether it was ours, what ``where()`` said) for each new content."""

    def __init__(self, path: Path, marker: str, where: Callable[[], str], interval_s: float = 0.05) -> None:
        self.path = path
        self.marker = marker
        self.where = where
        self.interval_s = interval_s
        self.changes: list[tuple[str, str, bool, str]] = []
        self._seen = self._stat()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pid-file-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._check()

    def _stat(self) -> tuple[int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._check()

    def _check(self) -> None:
        now = self._stat()
        if now == self._seen or now is None:
            self._seen = now
            return
        self._seen = now
        try:
            text = self.path.read_text(errors="replace").strip()
        except OSError:
            return
        pid = int(text) if text.isdigit() else 0
        proc = _read(pid) if pid else None
        ours = pid > 0 and _has_marker(pid, self.marker)
        self.changes.append((text[:40], proc.cmdline if proc else "", ours, self.where()))


def fingerprint(path: Path) -> object:
    """What would show that ``path`` was created, deleted or changed: a file's mtime, size and hash; a
    folder's entries (relative path, kind, size, mtime), not following links."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    if not path.is_dir() or path.is_symlink():
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        return ("file", info.st_mtime_ns, info.st_size, digest)
    entries = [(".", "dir", 0, info.st_mtime_ns)]
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            full = Path(folder, name)
            entry = full.lstat()
            is_dir = full.is_dir() and not full.is_symlink()
            entries.append(
                (
                    str(full.relative_to(path)),
                    "dir" if is_dir else "file",
                    0 if is_dir else entry.st_size,
                    entry.st_mtime_ns,
                )
            )
    return ("dir", sorted(entries))


def describe_change(before: object, after: object) -> str:
    """``created``, ``deleted``, or ``changed`` (with a folder's changed entries)."""
    if before is None:
        return "created"
    if after is None:
        return "deleted"
    if isinstance(before, tuple) and isinstance(after, tuple) and before[0] == after[0] == "dir":
        names = sorted({entry[0] for entry in set(before[1]) ^ set(after[1])})
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        return "changed: " + ", ".join(names[:10]) + more
    return "changed"
