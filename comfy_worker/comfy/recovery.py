"""Restarting the ComfyUI this worker started: one owner for the restart's state.

A ComfyUI that died or hung is restarted in a background thread, so the failing job's result is not held up,
and the next jobs wait for it. The state lives here and nowhere else:

- one restart at a time; every job that needs ComfyUI waits for the one under way;
- a waiter never shares anything it could break: it polls a ``threading.Event`` from its own coroutine, so
  cancelling one job (RunPod's cancel, a timeout) leaves the restart and the other waiters alone;
- the restart thread always answers: whatever an attempt raises (``ComfyUnavailableError``, an ``OSError``
  from Popen or mkdir, ``TimeoutExpired`` from stopping the old process) counts as a failed attempt, and after
  the last one the failure is kept, so no waiter can hang on a restart that died;
- a waiter gives up at its own deadline (the job's timeout);
- a restart asked for while jobs run (SIGHUP from apply_config.sh) waits until the last one is done.
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
    """Restarts of one supervised ComfyUI, and the jobs that wait for them."""

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
        self._done: threading.Event | None = None  # set when the restart under way has ended
        self._active_jobs = 0
        self._pending = False

    @property
    def restarting(self) -> bool:
        done = self._done
        return done is not None and not done.is_set()

    def start(self) -> bool:
        """Restart the ComfyUI we own in the background (joining one under way); False if we cannot."""
        supervisor = self.supervisor
        if supervisor is None or not supervisor.restartable:
            return False
        with self._lock:
            if self.restarting:
                return True
            done = self._done = threading.Event()
        threading.Thread(target=self._run, args=(supervisor, done), name="comfyui-restart", daemon=True).start()
        return True

    def _run(self, supervisor: ComfySupervisor, done: threading.Event) -> None:
        try:
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
        finally:
            done.set()

    async def wait(self, deadline: float, timeout_s: float) -> None:
        """Before a job: restart a ComfyUI found dead, then wait for a restart under way until ``deadline``.

        Raises the kept ``ComfyUnavailableError`` when the restart failed, ``JobTimeoutError`` when the job's
        time ran out first. Cancelling the caller cancels only its own wait.
        """
        if self.failed is not None:
            raise self.failed  # every attempt failed: the worker waits to be replaced, it does not try again
        if self.supervisor is not None and not self.supervisor.alive() and not self.restarting:
            self.start()
        done = self._done
        while done is not None and not done.is_set():
            if time.monotonic() >= deadline:
                raise JobTimeoutError(
                    f"The job ran past its timeout of {timeout_s:g}s while waiting for ComfyUI to restart.",
                    {"timeout_s": timeout_s, "node_id": None, "node": None},
                )
            await asyncio.sleep(POLL_S)
        if self.failed is not None:
            raise self.failed

    def job_started(self) -> None:
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
        if self.start():
            log.info("Restarting ComfyUI to load the changed custom nodes")
        else:
            log.warning("ComfyUI restart requested, but this worker did not start ComfyUI: restart it yourself")
