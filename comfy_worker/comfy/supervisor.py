"""Owns the ComfyUI process: start it (or attach to one already serving), wait until it serves, stop it.

Started as a child before ``import runpod`` so ComfyUI's boot overlaps the SDK's own import, and waited on
with a deadline that fails fast when the child exits: no job is taken before ComfyUI can run it, and a
ComfyUI that cannot start says why (exit code and the last lines of its log) instead of hanging.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_worker.comfy.install_tree import TreeLease, follow_link
from comfy_worker.errors import ComfyUnavailableError
from comfy_worker.redact import Redactor, redact_url
from comfy_worker.settings import Settings

if TYPE_CHECKING:
    from comfy_worker.comfy.client import ComfyClient

log = logging.getLogger(__name__)
comfy_log = logging.getLogger("comfyui")
# ComfyUI's lines logged at DEBUG only (kept in the log tail for errors): one per model folder at every start,
# alembic's database migration check (also at every start), and the refusal of a prompt, which the worker's
# own warning says better
CHATTY_LINES = re.compile(r"Adding extra search path |INFO +\[alembic[.\]]|invalid prompt: ")


# argparse's last line when it refuses a command line ("main.py: error: unrecognized arguments: --normalvram")
ARGPARSE_ERROR = re.compile(r"^\S+: error: (?P<reason>.+)$")
RESTART_MARK = "--- comfy-worker: restarting ComfyUI"  # in the log tail between two launches

# ComfyUI's SQLite database (0.3.64: user/comfyui.db, ".bkp" before a migration) and SQLite's side files.
DATABASE_FILES = ("*.db", "*.db-*", "*.db.bkp")
JOBS_FOLDER = "jobs"  # runtime/cleanup.py puts the jobs' own files there: never linked from the volume


def accepts(comfyui_dir: Path | None, flag: str) -> bool:
    """Whether this ComfyUI's command line has ``flag``. ComfyUI exits at once on a flag it does not know, and
    the config may pin an older release without the newer ones (--user-directory, --database-url). Its
    options are declared in comfy/cli_args.py (in main.py for one that keeps them there, like the stand-in)."""
    for name in ("comfy/cli_args.py", "main.py"):
        if comfyui_dir is not None and (comfyui_dir / name).is_file():
            with contextlib.suppress(OSError):
                return f'"{flag}"' in (comfyui_dir / name).read_text(encoding="utf-8", errors="replace")
    return False


def user_folder_args(comfyui_dir: Path | None, user_dir: Path) -> list[str]:
    """ComfyUI's user folder and its database there: 0.3.64 keeps comfyui.db in COMFYUI_DIR/user whatever
    --user-directory says, so the database is named on its own."""
    args = []
    for flag, value in (("--user-directory", str(user_dir)), ("--database-url", f"sqlite:///{user_dir}/comfyui.db")):
        if accepts(comfyui_dir, flag):
            args += [flag, value]
        else:
            log.warning("This ComfyUI has no %s option: it keeps that state in %s", flag, comfyui_dir)
    return args


def prepare_folders(settings: Settings) -> None:
    """Make the folders ComfyUI is given: it creates none of them, LoadImage's node info (so /object_info, and
    every prompt using it) fails while the input folder is missing, and --user-directory must exist.

    A worker's own folders (COMFYUI_LOCAL_STATE) start from what is on the volume: see ``_seed_user_folder``
    and ``_link_volume_inputs``.
    """
    s = settings
    for folder in (s.comfyui_input_dir, s.comfyui_output_dir, s.comfyui_temp_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    if s.comfyui_local_dir is None or s.comfyui_dir is None:
        return
    if s.comfyui_user_dir is not None and not s.comfyui_user_dir.exists():  # a restarted ComfyUI keeps its own
        _seed_user_folder(s.comfyui_dir / "user", s.comfyui_user_dir)
    if s.comfyui_input_dir is not None and s.comfyui_input_dir.is_relative_to(s.comfyui_local_dir):
        _link_volume_inputs(s.comfyui_dir / "input", s.comfyui_input_dir)  # not a folder COMFYUI_INPUT_DIR names


def _seed_user_folder(volume: Path, own: Path) -> None:
    """The worker's user folder starts as a copy of ComfyUI's on the volume, less its databases: the settings
    there (ComfyUI-Manager's network_mode, which provisioning writes; custom nodes' own) still apply, and what
    ComfyUI writes stays with this worker."""
    try:
        if volume.is_dir():
            shutil.copytree(volume, own, symlinks=True, ignore=shutil.ignore_patterns(*DATABASE_FILES))
    except (OSError, shutil.Error) as exc:
        log.warning("Could not copy all of %s into %s: %s", volume, own, exc)
    own.mkdir(parents=True, exist_ok=True)


def _link_volume_inputs(volume: Path, own: Path) -> None:
    """What the volume's input folder holds is linked into the worker's own (the jobs' folders aside), so a
    workflow still reads those files by name; what is added there later is linked at ComfyUI's next start."""
    try:
        entries = list(volume.iterdir()) if volume.is_dir() else []
    except OSError as exc:
        log.warning("Could not list %s: %s", volume, exc)
        return
    for entry in entries:
        link = own / entry.name
        if entry.name == JOBS_FOLDER or link.is_symlink() or link.exists():
            continue
        try:
            link.symlink_to(entry.resolve())
        except OSError as exc:
            log.warning("Could not link %s into %s: %s", entry, own, exc)


class ComfySupervisor:
    """Start/attach, readiness and the log tail of one ComfyUI."""

    def __init__(self, settings: Settings, redact: Redactor | None = None) -> None:
        self.settings = settings
        # the worker's: the running job's own secrets are masked in ComfyUI's lines as they come, so none stays
        # in the log tail that a later job's error reports
        self.redact = redact or Redactor(settings.secrets)
        self.process: subprocess.Popen[str] | None = None
        self.attached = False
        self.restarts = 0
        self.last_exit_code: int | None = None  # how the process the last restart replaced ended
        self.stopped = False  # stop() was called: nothing may start it again (a restart under way, say)
        self.launched_at: float | None = None  # time.monotonic() of the last launch of our ComfyUI
        self._log_tail: collections.deque[str] = collections.deque(maxlen=settings.log_tail_lines)
        self._reader: threading.Thread | None = None
        self.lease = TreeLease(settings.comfyui_tree_lease)

    def command(self) -> list[str]:
        """The ComfyUI command line: our address and folders first, then COMFYUI_ARGS (later flags win).

        Paths are made absolute here: ComfyUI runs in its own folder, where a relative COMFYUI_DIR or folder
        (meant from where the worker was started) would point elsewhere."""
        s = self.settings
        assert s.comfyui_dir is not None
        args = [s.comfyui_python, str((s.comfyui_dir / "main.py").resolve())]
        args += ["--listen", s.comfyui_listen or s.comfy_host, "--port", str(s.comfy_port), "--disable-auto-launch"]
        if s.extra_model_paths is not None and s.extra_model_paths.is_file():
            args += ["--extra-model-paths-config", str(s.extra_model_paths.resolve())]
        if s.comfyui_input_dir is not None:
            args += ["--input-directory", str(s.comfyui_input_dir.resolve())]
        if s.comfyui_output_dir is not None:
            args += ["--output-directory", str(s.comfyui_output_dir.resolve())]
        if s.comfyui_temp_dir is not None:  # ComfyUI writes temp files into <--temp-directory>/temp
            args += ["--temp-directory", str(s.comfyui_temp_dir.parent.resolve())]
        if s.comfyui_user_dir is not None:
            args += user_folder_args(s.comfyui_dir, s.comfyui_user_dir.resolve())
        if not s.comfyui_save_metadata:  # an API worker: no workflow inside every output file
            args.append("--disable-metadata")
        if "--cpu" not in s.comfyui_args and shutil.which("nvidia-smi") is None:
            args.append("--cpu")  # no NVIDIA driver here: ComfyUI would fail to start on CUDA
        return [*args, *s.comfyui_args]

    def launch_early(self) -> None:
        """Start ComfyUI before the worker's heavier imports when nothing listens on its port yet.

        Every millisecond here is added to a cold start: this runs with the standard library only (no HTTP
        client), so ComfyUI's boot begins about 0.1 s after the worker process does.
        """
        s = self.settings
        if not s.comfy_is_local or s.comfyui_dir is None or not (s.comfyui_dir / "main.py").is_file():
            return
        try:
            socket.create_connection((s.comfy_host, s.comfy_port), timeout=0.2).close()
        except OSError:
            self._launch()  # nothing there: start ours now
        # else something listens there: start_or_attach decides whether it is a ComfyUI to attach to

    def start_or_attach(self, client: ComfyClient) -> None:
        """Attach to a ComfyUI answering at COMFY_API_URL, else start one from COMFYUI_DIR (not waiting)."""
        s = self.settings
        if self.process is not None:
            return  # launch_early started it
        if client.is_ready(timeout_s=1.0):
            self.attached = True
            log.info("Attached to the ComfyUI already serving at %s", redact_url(s.comfy_api_url))
            return
        if not s.comfy_is_local:
            log.info("ComfyUI at %s is remote; waiting for it to answer", redact_url(s.comfy_api_url))
            return
        if s.comfyui_dir is None or not (s.comfyui_dir / "main.py").is_file():
            raise ComfyUnavailableError(
                f"No ComfyUI answers at {redact_url(s.comfy_api_url)} and COMFYUI_DIR "
                f"({s.comfyui_dir or 'not set'}) holds no main.py to start one.",
                {"comfy_api_url": redact_url(s.comfy_api_url), "comfyui_dir": str(s.comfyui_dir or "")},
            )
        self._launch()

    def follow_tree_link(self) -> None:
        """The next start of ComfyUI (a restart asked for by apply_config.sh) runs the volume's current install
        tree; its lease moves with it."""
        self.settings = follow_link(self.settings)
        if self.settings.comfyui_tree_lease is not None:
            self.lease.move_to(self.settings.comfyui_tree_lease)

    def _launch(self) -> None:
        self.lease.keep()
        prepare_folders(self.settings)
        command = self.command()
        log.info("Starting ComfyUI: %s", " ".join(command))
        env = dict(self.settings.comfyui_env, PYTHONUNBUFFERED="1")  # no worker secrets (settings.py)
        self.launched_at = time.monotonic()
        self.process = subprocess.Popen(
            command,
            cwd=self.settings.comfyui_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._pump_log, args=(self.process,), name="comfyui-log", daemon=True)
        self._reader.start()

    @property
    def restartable(self) -> bool:
        """Only a ComfyUI this worker started, and has not stopped for good, can be restarted by it."""
        return self.process is not None and not self.stopped

    def restart(self, client: ComfyClient) -> float:
        """Stop what is left of our ComfyUI, start a new one and wait for it; return the seconds waited."""
        if self.process is None:
            raise ComfyUnavailableError("The worker did not start this ComfyUI, so it cannot restart it.")
        if self.stopped:
            raise ComfyUnavailableError("The worker is stopping: its ComfyUI is not restarted.")
        self._terminate(grace_s=1)  # it crashed or hangs: no point in a long goodbye
        self.last_exit_code = self.process.returncode
        self.restarts += 1
        self._log_tail.append(f"{RESTART_MARK} (restart #{self.restarts}) ---")
        self._launch()
        return self.wait_ready(client)

    def _pump_log(self, process: subprocess.Popen[str]) -> None:
        """Forward ComfyUI's output to our log, prefixed, and keep the last lines for error reports."""
        assert process.stdout is not None
        with process.stdout:
            for raw in process.stdout:
                line = self.redact(raw.rstrip("\n"))
                self._log_tail.append(line)
                comfy_log.log(logging.DEBUG if CHATTY_LINES.match(line) else logging.INFO, "%s", line)

    def log_tail(self, lines: int | None = None) -> list[str]:
        tail = list(self._log_tail)
        return tail[-lines:] if lines else tail

    def alive(self) -> bool:
        """Whether the ComfyUI we started is still running (an attached one is assumed alive)."""
        return self.process is None or self.process.poll() is None

    def wait_ready(self, client: ComfyClient, timeout_s: float | None = None) -> float:
        """Block until ``/system_stats`` answers; return the seconds since our ComfyUI was launched (or since
        this call, for one we attached to). Fail fast if the child exits."""
        timeout_s = timeout_s or self.settings.startup_timeout_s
        started = time.monotonic()
        while True:
            if client.is_ready(timeout_s=2.0):
                since = self.launched_at if self.process is not None and self.launched_at is not None else started
                return time.monotonic() - since
            if self.process is not None and self.process.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=2)  # let the last lines in
                raise ComfyUnavailableError(
                    f"ComfyUI exited with code {self.process.returncode} before it was ready"
                    + (self._refused_command_line() if self.process.returncode == 2 else "."),
                    {"exit_code": self.process.returncode, "log_tail": self.log_tail(50)},
                )
            if time.monotonic() - started > timeout_s:
                raise ComfyUnavailableError(
                    f"ComfyUI did not answer {redact_url(self.settings.comfy_api_url)}/system_stats "
                    f"within {timeout_s:g}s "
                    "(COMFY_STARTUP_TIMEOUT).",
                    {"log_tail": self.log_tail(50)},
                )
            time.sleep(0.1)

    def _refused_command_line(self) -> str:
        """The end of the start-up error after exit status 2: argparse's reason when this launch of ComfyUI
        refused its command line. Releases drop options (0.38 has no --normalvram, no --disable-ipex-optimize), and
        COMFYUI_ARGS is where the worker takes flags it cannot check, so it is named."""
        for line in reversed(self.log_tail()):
            if line.startswith(RESTART_MARK):
                break  # an earlier launch's lines
            refused = ARGPARSE_ERROR.match(line)
            if refused:
                hint = f" Check COMFYUI_ARGS ({' '.join(self.settings.comfyui_args)}) against this ComfyUI's options."
                return f": it refused its command line ({refused['reason']})." + (
                    hint if self.settings.comfyui_args else ""
                )
        return "."

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the ComfyUI we started (``_terminate``), then remove this worker's own folder of ComfyUI's
        state (COMFYUI_LOCAL_STATE), unless CLEANUP_JOB_FILES=false keeps it to look at. For good: a restart
        that a background watch asks for afterwards (it sees ComfyUI gone) starts nothing."""
        self.stopped = True
        self._terminate(grace_s)
        self.lease.release()
        local = self.settings.comfyui_local_dir
        if self.process is not None and local is not None and self.settings.cleanup_job_files:
            shutil.rmtree(local, ignore_errors=True)  # links to the volume's inputs are unlinked, not followed

    def _terminate(self, grace_s: float) -> None:
        """SIGTERM the ComfyUI we started, then SIGKILL after ``grace_s``."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
