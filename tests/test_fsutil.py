"""The shared file helpers: atomic writes and the one lock with a deadline (comfy_worker/fsutil.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfy_worker.fsutil import LockTimeout, atomic_write, hold_lock, owner_file


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    atomic_write(target, iter([b"th", b"ree"]))
    assert target.read_text() == "three"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_failing_write_keeps_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write(target, b"old")

    def chunks() -> Iterator[bytes]:
        yield b"new, half"
        raise OSError("connection lost")

    with pytest.raises(OSError, match="connection lost"):
        atomic_write(target, chunks())
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_stale_soft_lock_fails_with_the_holder_named(tmp_path: Path) -> None:
    """A worker killed on another machine leaves its lock file; the waiter gives up and says what to delete."""
    lock = tmp_path / "model.lock"
    lock.write_text("")
    owner_file(lock).write_text("other-host pid 4242 since 01:00:00")
    with pytest.raises(LockTimeout) as caught, hold_lock(lock, what="downloading model", deadline_s=0.5, soft=True):
        pytest.fail("the stale lock was taken")
    message = str(caught.value)
    assert "other-host pid 4242" in message
    assert str(lock) in message
    assert "no sign of life" in message


def test_a_hung_holder_of_a_flock_is_given_up_on(tmp_path: Path) -> None:
    """flock is released when a process dies, but not when it hangs: the deadline catches that too."""
    lock = tmp_path / "provision.lock"
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "open(sys.argv[2] + '.owner', 'w').write('hung-host pid 99')\n"
            "open(sys.argv[3], 'w').close()\n"
            "time.sleep(600)\n",
            str(lock),
            str(lock),
            str(ready),
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120  # a Python start on a loaded machine
        while not ready.exists():
            assert holder.poll() is None, "the lock holder exited early"
            assert time.monotonic() < deadline, "the lock holder did not start"
            time.sleep(0.05)
        with pytest.raises(LockTimeout, match="hung-host pid 99"), hold_lock(lock, what="provisioning", deadline_s=0.5):
            pytest.fail("a held flock was taken")
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def test_the_lock_is_taken_and_its_owner_file_removed(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with hold_lock(lock, what="testing", deadline_s=5):
        assert f"pid {os.getpid()}" in owner_file(lock).read_text()
    assert not owner_file(lock).exists()
    soft = tmp_path / "soft.lock"
    with hold_lock(soft, what="testing again", deadline_s=5, soft=True):
        assert soft.exists()
    assert not soft.exists()
