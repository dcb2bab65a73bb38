"""ComfyUI's WebSocket, read by one background thread and routed to the job that owns each prompt.

Why a thread and one long-lived socket: ComfyUI sends a prompt's frames only to the socket whose
``clientId`` equals the prompt's ``client_id``, and it may send the first ones before ``POST /prompt`` even
answers. So the socket is open before any job, the job picks its own ``prompt_id`` and subscribes before
queueing, and frames reach it through an ``asyncio.Queue`` without the event loop ever blocking on a read.

When the socket drops, every subscriber gets a ``DISCONNECTED`` marker, the thread reconnects with backoff
under the same ``clientId``, and subscribers get ``RECONNECTED``: frames sent in between are lost, so the job
then asks ``/history`` (the source of truth) whether its prompt finished meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import websocket

log = logging.getLogger(__name__)

DISCONNECTED = "_ws_disconnected"
RECONNECTED = "_ws_reconnected"

Frame = dict[str, Any]


class _Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Frame] = asyncio.Queue()

    def deliver(self, frame: Frame) -> None:
        with contextlib.suppress(RuntimeError):  # the job's loop is gone: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, frame)


class EventStream:
    """A self-healing WebSocket to ComfyUI's ``/ws``."""

    def __init__(
        self,
        ws_url: str,
        client_id: str,
        connect_timeout_s: float = 5.0,
        idle_ping_s: float = 10.0,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.url = f"{ws_url}?clientId={client_id}"
        self.connect_timeout_s = connect_timeout_s
        self.idle_ping_s = idle_ping_s
        self.max_backoff_s = max_backoff_s
        self._subscribers: dict[str, _Subscriber] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ws: websocket.WebSocket | None = None
        self._thread = threading.Thread(target=self._run, name="comfyui-ws", daemon=True)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def retry_now(self) -> None:
        """Reconnect at once instead of after the backoff (the supervisor knows ComfyUI is back)."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        ws = self._ws
        if ws is not None and ws.sock is not None:
            with contextlib.suppress(OSError):
                ws.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread's blocking recv
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @contextlib.contextmanager
    def subscription(self, prompt_id: str) -> Iterator[asyncio.Queue[Frame]]:
        """Receive ``prompt_id``'s frames (and connection markers) on an asyncio queue of the running loop."""
        subscriber = _Subscriber(asyncio.get_running_loop())
        with self._lock:
            self._subscribers[prompt_id] = subscriber
        try:
            yield subscriber.queue
        finally:
            with self._lock:
                self._subscribers.pop(prompt_id, None)

    def _broadcast(self, frame: Frame) -> None:
        with self._lock:
            subscribers = list(self._subscribers.values())
        for subscriber in subscribers:
            subscriber.deliver(frame)

    def _route(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            log.debug("ignoring a non-JSON text frame: %.200s", text)
            return
        data = frame.get("data") if isinstance(frame, dict) else None
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        if not isinstance(prompt_id, str):
            # not a job's frame: status, ComfyUI 0.38's assets.seed.* (sent to every socket), and whatever a
            # custom node broadcasts; an unhashable prompt_id there must not end this thread
            return
        with self._lock:
            subscriber = self._subscribers.get(prompt_id)
        if subscriber is not None:
            subscriber.deliver(frame)

    def _run(self) -> None:
        backoff = 0.1
        ever_connected = False
        while not self._stop.is_set():
            try:
                ws = websocket.create_connection(
                    self.url,
                    timeout=self.connect_timeout_s,
                    skip_utf8_validation=True,  # frames are decoded below, a bad byte replaced (its check is slow)
                    # ComfyUI directly, as its HTTP API (client), never HTTP_PROXY: websocket-client reads its
                    # no-proxy list only beside a proxy host, and with "*" there it never uses that host
                    http_proxy_host="unused",
                    http_no_proxy=["*"],
                )
            except (OSError, websocket.WebSocketException) as exc:
                log.debug("ComfyUI WebSocket connect failed (%s); retrying in %.1fs", exc, backoff)
                self._wake.wait(backoff)
                self._wake.clear()
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self._ws = ws
            backoff = 0.1
            self._connected.set()
            if ever_connected:
                log.info("ComfyUI WebSocket reconnected")
                self._broadcast({"type": RECONNECTED})
            ever_connected = True
            try:
                self._read(ws)
            except (OSError, websocket.WebSocketException) as exc:
                if not self._stop.is_set():
                    log.warning("ComfyUI WebSocket dropped: %s", exc)
            finally:
                self._connected.clear()
                self._ws = None
                with contextlib.suppress(Exception):
                    ws.shutdown()  # type: ignore[no-untyped-call]
            if not self._stop.is_set():
                self._broadcast({"type": DISCONNECTED})

    def _read(self, ws: websocket.WebSocket) -> None:
        """Read frames until the socket fails; a silent socket is pinged once, then declared stalled."""
        ws.settimeout(self.idle_ping_s)
        ping_pending = False
        while not self._stop.is_set():
            try:
                opcode, payload = ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                if ping_pending:
                    raise websocket.WebSocketException(
                        f"no frame and no pong for {2 * self.idle_ping_s:g}s: the socket is stalled"
                    ) from None
                ws.ping()
                ping_pending = True
                continue
            ping_pending = False
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self._route(payload.decode("utf-8", errors="replace"))
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                raise websocket.WebSocketConnectionClosedException("ComfyUI closed the WebSocket")
