"""The end-of-run checks (``tests/session_checks.py``) fed what they must catch: a lost process, a pid file
written by a process of this run and by another, a changed folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from . import session_checks
from .processes import stopped_on_exit


def wait_for(condition: object, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_lost_grandchild_is_found_and_killed(tmp_path: Path) -> None:
    """A double fork: the child exits at once and its own child, re-parented away from it, sleeps on."""
    pid_file = tmp_path / "grandchild.pid"
    subprocess.run(["sh", "-c", f"sleep 600 & echo $! > {pid_file}"], check=True, timeout=60)
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), "the grandchild's pid")
    grandchild = int(pid_file.read_text())
    try:
        found = session_checks.leftovers(os.getpid(), os.environ[session_checks.MARKER])
        assert grandchild in [proc.pid for proc in found]
        [proc] = [proc for proc in found if proc.pid == grandchild]
        assert proc.cmdline == "sleep 600" and proc.state != "Z"
        assert session_checks.kill_and_reap([proc]) == []
        assert grandchild not in [p.pid for p in session_checks.leftovers(os.getpid(), "no such marker")]
    finally:
        session_checks.kill_and_reap([p for p in session_checks.leftovers(os.getpid(), "-") if p.pid == grandchild])


def test_the_pid_file_watch_tells_this_runs_writers_from_others(tmp_path: Path) -> None:
    pid_file = tmp_path / "comfy-worker.pid"
    watch = session_checks.PidFileWatch(pid_file, os.environ[session_checks.MARKER], lambda: "the test")
    watch.start()
    write = [
        sys.executable,
        "-c",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)",
    ]
    foreign_env = {k: v for k, v in os.environ.items() if k != session_checks.MARKER}
    try:
        for env in (os.environ.copy(), foreign_env):
            before = len(watch.changes)
            with stopped_on_exit(subprocess.Popen(write, env=env, start_new_session=True), grace_s=0) as writer:
                wait_for(lambda: len(watch.changes) > before, "the watch to see the write")  # noqa: B023
                assert watch.changes[-1][0] == str(writer.pid)
    finally:
        watch.stop()
    assert [(ours, during) for _, _, ours, during in watch.changes] == [(True, "the test"), (False, "the test")]


def test_a_changed_folder_is_told_from_an_unchanged_one(tmp_path: Path) -> None:
    folder = tmp_path / "workspace"
    assert session_checks.fingerprint(folder) is None
    folder.mkdir()
    (folder / "ComfyUI").mkdir()
    before = session_checks.fingerprint(folder)
    assert session_checks.fingerprint(folder) == before
    (folder / "ComfyUI" / "main.py").write_text("x")
    after = session_checks.fingerprint(folder)
    assert after != before
    assert session_checks.describe_change(before, after) == "changed: ComfyUI, ComfyUI/main.py"
    assert session_checks.describe_change(None, after) == "created"
