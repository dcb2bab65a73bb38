"""Processes a test starts, each in a process group of its own, so that stopping one stops all it started.

A worker starts ComfyUI, ``start.sh`` the provisioning, the worker and Jupyter: a signal to the first process
alone leaves the others running when it dies, is killed or ignores the signal. So every
process a test starts is a session leader (``start_new_session=True``), and ``stop_group`` asks the leader to
stop, then kills whatever is left of its group. ``tests/conftest.py`` fails the run when anything survives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P", bound="subprocess.Popen[Any]")

STOP_GRACE_S = 15.0  # a loaded machine: the worker stops its ComfyUI before it exits
KILL_WAIT_S = 30.0  # after SIGKILL, only the kernel is left to wait for


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group ``pgid`` (none left is fine)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _group(pgid: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of each process in the group ``pgid``, zombies included."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:
            members.append((int(stat.parent.name), int(fields[1])))
    return members


def reap_group(pgid: int, timeout_s: float = KILL_WAIT_S) -> None:
    """Wait until the killed group ``pgid`` is gone, reaping the members that were re-parented to us (the test
    run is their subreaper, ``tests/conftest.py``): nobody else would, and they would stay zombies."""
    deadline = time.monotonic() + timeout_s
    while members := _group(pgid):
        for pid, parent in members:
            if parent == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            log.warning("process group %s still has %s after SIGKILL", pgid, members)
            return
        time.sleep(0.05)


def stop_group(
    process: subprocess.Popen[Any], first_signal: int | None = signal.SIGTERM, grace_s: float = STOP_GRACE_S
) -> int:
    """Send ``first_signal`` to the leader (None: it was asked already) and give it ``grace_s`` to exit (0: kill
    at once), then SIGKILL the whole group, what the leader left behind as well, reap the leader and close its
    pipes. Returns its exit status.

    ``process`` must have been started with ``start_new_session=True``: its pid is its group's id."""
    if process.poll() is None and grace_s > 0:
        if first_signal is not None:
            process.send_signal(first_signal)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "pid %s still running %.0f s after being asked to stop: killing its group", process.pid, grace_s
            )
    kill_group(process.pid)
    process.wait(timeout=KILL_WAIT_S)
    reap_group(process.pid)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    return process.returncode


@contextlib.contextmanager
def stopped_on_exit(
    process: P, first_signal: int | None = signal.SIGTERM, grace_s: float = STOP_GRACE_S
) -> Iterator[P]:
    """``with stopped_on_exit(subprocess.Popen(..., start_new_session=True)) as p:``: ``stop_group`` on every
    way out of the block, a failed assertion included."""
    try:
        yield process
    finally:
        stop_group(process, first_signal, grace_s)
