"""Shared fixtures: isolation from the developer's environment, and paths to the recorded material.

The run as a whole is checked at its end (``pytest_sessionfinish``): it fails when a process it started is
still alive (each is listed, then killed), when it created or changed the files a real worker on this machine
uses (``/tmp/comfy-worker.pid``, the repository's ``./workspace``), or when a tier named in
``TEST_REQUIRE_TIERS`` had a skip. The summary names each tier that had skips, with the reasons.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import session_checks
from .s3_server import SKIP_REASON as S3_SKIP_REASON
from .worker_process import WORKER_ENV_PREFIXES

REPO = Path(__file__).resolve().parents[1]
# Recordings of a real ComfyUI 0.3.64 (see the README there): the stand-in's contract and its node list.
TRANSCRIPTS = REPO / "tests" / "comfyui_transcripts"
EXAMPLES = REPO / "examples"
# What a real worker on this machine uses, which no test may touch: start.sh's default WORKER_PID_FILE (read by
# apply_config.sh; watched, since other test runs on the machine may write it too) and the default WORKSPACE of
# this checkout (compared with how it was at the start).
REAL_PID_FILE = Path("/tmp/comfy-worker.pid")
REAL_WORKSPACE = REPO / "workspace"
# The tiers a skip is counted in, by marker (the first that a test carries); S3 tests are known by their skip.
TIERS = ("image", "comfyui", "s3", "slow")
OPTIONAL = "optional:"  # a skip whose reason starts so is allowed in a tier of TEST_REQUIRE_TIERS


@dataclass
class RunState:
    marker: str
    subreaper: bool
    pid_dir: str
    workspace: object  # session_checks.fingerprint of REAL_WORKSPACE at the start
    pid_file: session_checks.PidFileWatch
    current: str = "the start of the run"  # the test running now, for the pid file's watch
    skips: dict[str, list[str]] = field(default_factory=dict)  # tier -> the reason of each skip
    deselected: dict[str, int] = field(default_factory=dict)  # tier -> count
    problems: list[str] = field(default_factory=list)  # what failed the run, printed in the summary
    notes: list[str] = field(default_factory=list)  # printed in the summary too, failing nothing


_RUN: list[RunState] = []  # this session's, set in pytest_configure


def pytest_configure() -> None:
    marker = session_checks.new_marker()
    os.environ[session_checks.MARKER] = marker  # every process started from here on carries it
    # A fallback for what runs before the per-test fixture below (module-scoped fixtures): never the real file.
    pid_dir = tempfile.mkdtemp(prefix="comfy-worker-tests-")
    os.environ["WORKER_PID_FILE"] = str(Path(pid_dir) / "comfy-worker.pid")
    subreaper = sys.platform == "linux" and session_checks.become_subreaper()
    # A run started in the background of a non-interactive shell inherits SIGINT ignored, and an ignored signal
    # stays ignored across exec: the tests' Ctrl-C of start.sh, the client and ComfyUI would do nothing (bash
    # cannot even trap it). A handler of our own is reset to the default in every child.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    state = RunState(
        marker,
        subreaper,
        pid_dir,
        session_checks.fingerprint(REAL_WORKSPACE),
        session_checks.PidFileWatch(REAL_PID_FILE, marker, lambda: state.current),
    )
    state.pid_file.start()
    _RUN[:] = [state]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(WORKER_ENV_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    # The runpod SDK's start-up checks otherwise open a connection to a public DNS server.
    monkeypatch.setenv("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    monkeypatch.setenv("RUNPOD_SKIP_GPU_CHECK", "true")
    # start.sh writes it, apply_config.sh signals the pid in it: the test's own, never a real worker's.
    monkeypatch.setenv("WORKER_PID_FILE", str(tmp_path / "comfy-worker.pid"))


def load_transcript(name: str) -> dict[str, Any]:
    """A recorded transcript; a missing one fails the test (the recordings are part of the repository)."""
    data: dict[str, Any] = json.loads((TRANSCRIPTS / name).read_text())
    return data


def recorded_history(name: str) -> list[dict[str, Any]]:
    """Every ``/history/{id}`` entry a transcript recorded, in order."""
    entries = []
    for event in load_transcript(name)["events"]:
        if event["kind"] == "http_response" and event["path"].startswith("/history/") and event["status"] == 200:
            body = event["body"]["json"]
            entries.extend(body.values())
    return entries


# --- the run's end: tiers, leftovers, the real worker's files -------------------------------------------------


def _tier(keywords: Any, reason: str) -> str:
    for tier in TIERS:
        if tier in keywords:
            return tier
    return "s3" if reason == S3_SKIP_REASON else "default"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    state = _state()
    if state is not None:
        state.skips.setdefault(_tier(report.keywords, reason), []).append(reason)


def pytest_deselected(items: list[pytest.Item]) -> None:
    state = _state()
    for item in items:
        tier = _tier(item.keywords, "")
        if state is not None and tier != "default":
            state.deselected[tier] = state.deselected.get(tier, 0) + 1


def _state() -> RunState | None:
    return _RUN[0] if _RUN else None


def required_tiers(value: str) -> list[str]:
    """``TEST_REQUIRE_TIERS=comfyui,image``: the tiers in which a skip fails the run."""
    return [name.strip() for name in value.split(",") if name.strip()]


def _check_required_tiers(state: RunState) -> None:
    for tier in required_tiers(os.environ.get("TEST_REQUIRE_TIERS", "")):
        if tier not in TIERS:
            state.problems.append(f"TEST_REQUIRE_TIERS names {tier!r}, which is no tier (tiers: {', '.join(TIERS)})")
            continue
        refused = [reason for reason in state.skips.get(tier, []) if not reason.startswith(OPTIONAL)]
        if refused:
            state.problems.append(
                f"TEST_REQUIRE_TIERS requires the {tier} tier, but {len(refused)} of its tests were skipped: "
                + "; ".join(sorted(set(refused)))
            )


def _check_processes(state: RunState) -> None:
    found: dict[int, session_checks.Proc] = {}
    survivors: list[session_checks.Proc] = []
    for _ in range(5):  # again: what is killed may have started a child between the scan and the kill
        leftovers = [proc for proc in session_checks.leftovers(os.getpid(), state.marker) if proc.pid not in found]
        if not leftovers:
            break
        found |= {proc.pid: proc for proc in leftovers}
        survivors = session_checks.kill_and_reap(leftovers)
    alive = [proc for proc in found.values() if proc.state != "Z"]
    zombies = [proc for proc in found.values() if proc.state == "Z"]
    if zombies:  # dead already: orphans (a git's child, say) that exited after their parent, reaped now
        state.notes.append(f"{len(zombies)} orphan(s) had exited unreaped: " + "; ".join(p.describe() for p in zombies))
    if not alive:
        return
    lines = [f"  {proc.describe()}" for proc in alive]
    if survivors:
        lines.append(f"  still there after SIGKILL: {', '.join(str(proc.pid) for proc in survivors)}")
    state.problems.append(
        f"{len(alive)} process(es) the tests started outlived them (killed now):\n" + "\n".join(lines)
    )


def pytest_runtest_logstart(nodeid: str) -> None:
    state = _state()
    if state is not None:
        state.current = nodeid


def _check_real_worker_files(state: RunState) -> None:
    state.current = "the end of the run (fixtures' teardown)"
    state.pid_file.stop()
    for content, cmdline, ours, during in state.pid_file.changes:
        writer = f"pid {content} ({cmdline or 'gone'})"
        if ours:
            state.problems.append(
                f"{REAL_PID_FILE} was written during {during} by {writer}, a process of this run: a test must set "
                "WORKER_PID_FILE to a file of its own"
            )
        else:
            state.notes.append(f"{REAL_PID_FILE} was written during {during} by {writer}, not of this run")
    after = session_checks.fingerprint(REAL_WORKSPACE)
    if after != state.workspace:
        state.problems.append(
            f"{REAL_WORKSPACE} was {session_checks.describe_change(state.workspace, after)} during the run: a "
            "test used the checkout's default WORKSPACE instead of a folder of its own"
        )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every fixture is torn down: fail the run on a leftover process, a touched real-worker file or a
    skip in a required tier."""
    state = _state()
    if state is None:
        return
    _check_processes(state)
    _check_real_worker_files(state)
    _check_required_tiers(state)
    shutil.rmtree(state.pid_dir, ignore_errors=True)
    if state.problems and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The image tier's image sizes and start-up figures, each tier that had skips (how many, why), and what
    failed the run as a whole."""
    from .docker_image import FIGURES, SIZES
    from .figures import FIGURES as HOST_FIGURES

    for line in SIZES:
        terminalreporter.write_line(f"image size: {line}")
    for line in FIGURES:
        terminalreporter.write_line(f"image tier: {line}")
    for tier, line in HOST_FIGURES:
        terminalreporter.write_line(f"{tier} tier: {line}")
    state = _state()
    if state is None:
        return
    for tier in (*TIERS, "default"):
        skips = state.skips.get(tier, [])
        deselected = state.deselected.get(tier, 0)
        if not skips and not deselected:
            continue
        parts = []
        if skips:
            parts.append(f"{len(skips)} skipped ({'; '.join(sorted(set(skips)))})")
        if deselected:
            parts.append(f"{deselected} deselected")
        terminalreporter.write_line(f"{tier} tier: {', '.join(parts)}", yellow=True)
    if not state.subreaper:
        state.notes.append("not a child subreaper here: leftover processes are found by their MARKER only")
    for note in state.notes:
        terminalreporter.write_line(f"leak check: {note}")
    for problem in state.problems:
        terminalreporter.write_line(f"RUN FAILED: {problem}", red=True, bold=True)
