"""Getting ComfyUI back to a clean state between jobs, in the background: one owner for that state.

A ComfyUI that died or hung is restarted in a background thread, and a timed-out prompt that ComfyUI was
asked to interrupt gets INTERRUPT_GRACE to end (then ComfyUI is restarted), so the failing job's result is not
held up; the next jobs wait for that work instead. The state lives here and nowhere else:

- one piece of background work at a time (a watch or a restart); every job that needs ComfyUI waits for it;
- a waiter never shares anything it could break: it polls a ``threading.Event`` from its own coroutine, so
  cancelling one job (RunPod's cancel, a timeout) leaves the restart and the other waiters alone;
- the restart thread always answers: whatever an attempt raises (``ComfyUnavailableError``, an ``OSError``
  from Popen or mkdir, ``TimeoutExpired`` from stopping the old process) counts as a failed attempt, and after
  the last one the failure is kept, so no waiter can hang on a restart that died;
- a waiter gives up at its own deadline (the job's timeout);
- one death of ComfyUI is one restart, however many jobs in flight saw it die;
- a restart asked for while jobs run (SIGHUP from apply_config.sh) waits until the last one is done, and
  jobs that come meanwhile wait for it (with several jobs at once there might never be a last one).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.events import EventStream
from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.errors import ComfyUnavailableError, JobTimeoutError, WorkerError

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a waiting job looks at the restart


class Recovery:
    """The background work that gets one ComfyUI clean between jobs (restarts, letting an interrupted prompt
    end), and the jobs that wait for it."""

    def __init__(
        self,
        supervisor: ComfySupervisor | None,
        client: ComfyClient,
        events: EventStream,
        attempts: int,
        on_restarted: Callable[[], None] = lambda: None,
    ) -> None:
        self.supervisor = supervisor
        self.client = client
        self.events = events
        self.attempts = attempts
        self.on_restarted = on_restarted
        self.failed: ComfyUnavailableError | None = None  # every attempt of the last restart failed
        self._lock = threading.Lock()
        self._done: threading.Event | None = None  # set when the background work under way has ended
        self.restarting = False  # a restart is asked for or under way (ComfyUI cannot answer now)
        self._restart_asked = False
        self._restarted_for: object | None = None  # the ComfyUI process (Popen) last restarted for
        self._active_jobs = 0
        self._pending = False

    def _busy(self) -> bool:
        done = self._done
        return done is not None and not done.is_set()

    def _in_background(self, work: Callable[[], None], name: str) -> None:
        """Run ``work``, then any restart asked for meanwhile, in one thread; nothing if one runs already
        (it will do the restart). ``_done`` is set under the lock, so a restart asked for is never lost."""
        with self._lock:
            if self._busy():
                return
            done = self._done = threading.Event()

        def run() -> None:
            try:
                work()
                while True:
                    with self._lock:
                        if not self._restart_asked:
                            done.set()
                            return
                    self._restart()
            finally:
                done.set()

        threading.Thread(target=run, name=name, daemon=True).start()

    def start(self) -> bool:
        """Restart the ComfyUI we own in the background (after the work under way); False if we cannot."""
        supervisor = self.supervisor
        if supervisor is None or not supervisor.restartable:
            return False
        with self._lock:
            self._restart_asked = self.restarting = True  # "restarting" at once, for the failing job's report
        self._in_background(lambda: None, "comfyui-restart")
        return True

    def restart_crashed(self, process: object | None) -> bool:
        """Restart ComfyUI after a job saw it die; the other jobs that saw the same death add nothing.

        ``process`` is the one seen dead (the supervisor's Popen then): a restart already asked for it, or one
        that replaced it, serves every job. Told by the process itself, not a count, because a restart
        counts itself before it replaces the process. None: restart in any case. False if we cannot.
        """
        supervisor = self.supervisor
        if supervisor is None or not supervisor.restartable:
            return False
        if process is not None:
            with self._lock:
                if process is not supervisor.process or process is self._restarted_for:
                    return True
                self._restarted_for = process
        return self.start()

    def comfy_down(self) -> bool:
        """Whether the ComfyUI we own is dead or being restarted (a failed call then waits for ``wait``)."""
        supervisor = self.supervisor
        return self.restarting or (supervisor is not None and supervisor.restartable and not supervisor.alive())

    def settle(self, prompt_running: Callable[[], bool], grace_s: float) -> None:
        """A timed-out or cancelled prompt was interrupted: give it ``grace_s`` to end, in the background, and
        restart the ComfyUI we own if it does not (one long node can ignore an interrupt for minutes). The next
        job waits for this."""
        self._in_background(lambda: self._watch(prompt_running, grace_s), "comfyui-settle")

    def _watch(self, prompt_running: Callable[[], bool], grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if self.supervisor is not None and not self.supervisor.alive():
                break  # it died meanwhile: restart now, not at the end of the grace
            if not prompt_running():
                return
            time.sleep(POLL_S * 5)
        else:
            log.warning("an interrupted prompt still runs %gs after its interrupt", grace_s)
        self.start()  # queued: run() does it next (False, and nothing done, for a ComfyUI we did not start)

    def _restart(self) -> None:
        supervisor = self.supervisor
        assert supervisor is not None  # only start() asks, and only for a supervisor that can restart
        with self._lock:
            self._restart_asked = False
            self._restarted_for = supervisor.process  # a job that saw this one die, while it is replaced, adds nothing
        try:
            self._attempts(supervisor)
        finally:
            with self._lock:
                self.restarting = self._restart_asked

    def _attempts(self, supervisor: ComfySupervisor) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                waited = supervisor.restart(self.client)
            except Exception as exc:  # any failure is a failed attempt: the waiters must get an answer
                message = exc.message if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
                log.error("ComfyUI restart %d/%d failed: %s", attempt, self.attempts, message)
                if attempt == self.attempts:
                    details = exc.details if isinstance(exc, WorkerError) else {}
                    self.failed = ComfyUnavailableError(
                        f"ComfyUI stopped and could not be restarted ({self.attempts} attempts): {message}",
                        details | {"log_tail": supervisor.log_tail(50)},
                    )
                continue
            log.info("ComfyUI restarted and ready in %.1fs", waited)
            self.failed = None
            self.on_restarted()
            self.events.retry_now()
            self.events.wait_connected(timeout_s=10)
            return

    async def wait(self, deadline: float, timeout_s: float, *, new_job: bool = False) -> None:
        """Before a job: restart a ComfyUI found dead, then wait for the work under way until ``deadline``.

        Raises the kept ``ComfyUnavailableError`` when the restart failed, ``JobTimeoutError`` when the job's
        time ran out first. Cancelling the caller cancels only its own wait. A ``new_job`` (not yet
        ``job_started``) also waits for a restart for changed nodes, which waits for the jobs in flight: they
        must not wait for it in turn.
        """
        if self.failed is not None:
            raise self.failed  # every attempt failed: the worker waits to be replaced, it does not try again
        if self.supervisor is not None and not self.supervisor.alive() and not self._busy():
            self.restart_crashed(self.supervisor.process)
        while (new_job and self._pending) or self._busy():
            if time.monotonic() >= deadline:
                raise JobTimeoutError(
                    f"The job ran past its timeout of {timeout_s:g}s while waiting for ComfyUI to be ready "
                    "(a restart, or a previous job's prompt that had to stop).",
                    {"timeout_s": timeout_s, "node_id": None, "node": None},
                )
            await asyncio.sleep(POLL_S)
        if self.failed is not None:
            raise self.failed

    def job_started(self) -> None:
        """Called once a job is past ``wait``: a restart for changed nodes waits for it to end."""
        self._active_jobs += 1

    def job_finished(self) -> None:
        """Called on the job loop's thread when a job ends: a restart asked for meanwhile happens now."""
        self._active_jobs -= 1
        if self._pending and not self._active_jobs:
            self._restart_for_new_nodes()

    def request_restart(self) -> None:
        """Restart ComfyUI so it loads changed custom nodes (apply_config.sh); a running job finishes first.

        Called from the SIGHUP handler, which runs on the same (main) thread as the job loop.
        """
        if self._active_jobs:
            log.info("ComfyUI restart requested: it happens once the running job is done")
            self._pending = True
        else:
            self._restart_for_new_nodes()

    def _restart_for_new_nodes(self) -> None:
        self._pending = False
        if self.supervisor is not None:
            self.supervisor.follow_tree_link()
        if self.start():
            log.info("Restarting ComfyUI to load the changed custom nodes")
        else:
            log.warning("ComfyUI restart requested, but this worker did not start ComfyUI: restart it yourself")
