"""Input files by URL (``images[].url``): http(s) with an SSRF guard, and ``s3://`` with the worker's bucket.

A worker that fetches whatever URL a job names could be made to read internal services: the cloud metadata
endpoint, ComfyUI itself on 127.0.0.1, anything on the private network. So every address a connection goes
to (the first one and every redirect's, checked when the socket is opened, after DNS, which also defeats
DNS rebinding) must be a public one unless INPUT_URL_ALLOWLIST names it. Downloads are capped in size and in
total time (a server sending one byte every few seconds, headers included, never trips a per-read timeout,
so a watchdog shuts the fetch's sockets at the deadline), and an HTML page (a link to a viewer, not the file)
is refused with a hint. ``s3://`` reads only where the operator lets jobs read (``storage``), with a
presigned GET that runs under the same deadline.

The job's ``Stop`` (its deadline or its end) ends its fetches and model downloads at once: it shuts every
socket they opened, so no thread keeps reading for a job that is over.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import connection as urllib3_connection

from comfy_worker.errors import InputError
from comfy_worker.provision.transfer import RefusedConnection, refused_connection
from comfy_worker.redact import redact_url, redact_urls
from comfy_worker.storage import S3Storage

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
REFUSED_TYPES = ("text/html", "application/xhtml+xml")
CONNECT_TIMEOUT_S = 10.0


class ForbiddenAddressError(RefusedConnection):
    """A URL resolved to an address the worker may not reach."""


class Stop(threading.Event):
    """The end of a job's work: its deadline passed, or the job ended (done, failed, cancelled).

    Its input fetches and model downloads watch it, and register what must happen then: their sockets shut
    (a blocked read returns at once, not at a timeout), pins that arrive late released. ``on_set`` runs a
    callback at once when the stop is already set, so nothing registered late is forgotten.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def on_set(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def set(self) -> None:
        with self._lock:
            super().set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            with contextlib.suppress(OSError):
                callback()


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address


def embedded_ipv4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, which a network may route to: IPv4-mapped
    (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), NAT64 (``64:ff9b::a.b.c.d``), 6to4 (``2002:AABB:CCDD::``)
    and Teredo. ``64:ff9b::7f00:1`` is "global" to ``ipaddress`` but may reach 127.0.0.1 through a NAT64 gateway."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    if address in NAT64 or int(address) >> 32 == 0:  # NAT64, or IPv4-compatible (::a.b.c.d)
        found.append(low32)
    return [item for item in found if item is not None]


def _allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, allowlist: tuple[Network, ...]) -> bool:
    return address.is_global or any(address in network for network in allowlist)


def check_address(host: str, port: int, allowlist: tuple[Network, ...]) -> str:
    """Resolve ``host`` and return an address that is public or allow-listed; raise otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ForbiddenAddressError(f"cannot resolve {host}: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not all(_allowed(form, allowlist) for form in (address, *embedded_ipv4(address))):
            raise ForbiddenAddressError(
                f"{host} resolves to {address}, a private, loopback, link-local or reserved address "
                "(refused; INPUT_URL_ALLOWLIST can allow it)"
            )
    return str(infos[0][4][0])


def check_url(url: str, allowlist: tuple[Network, ...]) -> None:
    """``check_address`` for an http(s) URL's host and port: the first connection's check, made up front so a
    refusal reads as one (later connections, redirects, are checked as they open)."""
    parts = urlsplit(url)
    check_address(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), allowlist)


def _shut(*sockets: socket.socket | None) -> None:
    for sock in sockets:
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)


def _connection(
    base: type[HTTPConnection], allowlist: tuple[Network, ...] | None, stop: Stop | None
) -> type[HTTPConnection]:
    """``base`` whose sockets pass the guard (``allowlist``; None: the worker's own bucket, not guarded) and
    are shut when ``stop`` is set (the raw socket, and the TLS one that wraps it once it exists)."""

    class Connection(base):  # type: ignore[valid-type,misc]
        def _new_conn(self) -> socket.socket:
            if stop is not None and stop.is_set():
                raise ConnectionAbortedError("stopped: the job ended or ran out of time")
            host = self._dns_host if allowlist is None else check_address(self._dns_host, self.port, allowlist)
            sock = urllib3_connection.create_connection(
                (host, self.port),
                self.timeout,
                source_address=self.source_address,
                socket_options=self.socket_options,
            )
            if stop is not None:
                stop.on_set(lambda: _shut(sock, getattr(self, "sock", None)))
            return sock

    return Connection


def guarded_session(allowlist: tuple[Network, ...], stop: Stop | None = None) -> requests.Session:
    """A requests session whose every connection (redirects included) passes the same guard as input URLs,
    and is shut when ``stop`` is set: for the models a job asks to download with the provisioning downloader
    (which speaks requests)."""
    session = requests.Session()
    adapter = _GuardedAdapter(allowlist, stop)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, allowlist: tuple[Network, ...], stop: Stop | None) -> None:
        self.allowlist = allowlist
        self.stop = stop
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pools(self.allowlist, self.stop)


def _pools(allowlist: tuple[Network, ...] | None, stop: Stop | None) -> dict[str, type[HTTPConnectionPool]]:
    return {
        "http": type(
            "GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": _connection(HTTPConnection, allowlist, stop)}
        ),
        "https": type(
            "GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": _connection(HTTPSConnection, allowlist, stop)}
        ),
    }


class Fetcher:
    def __init__(
        self, allowlist: tuple[Network, ...], max_bytes: int, timeout_s: float, storage: S3Storage | None
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.storage = storage
        self.allowlist = allowlist

    def fetch(self, url: str, field: str, deadline: float | None = None, stop: Stop | None = None) -> bytes:
        """The file at ``url``, within INPUT_URL_TIMEOUT in all and before ``deadline`` (``time.monotonic``);
        given up at once when ``stop`` is set (the job ended)."""
        scheme = urlsplit(url).scheme.lower()
        if scheme == "s3":
            return self._fetch_s3(url, field, deadline, stop)
        if scheme not in ("http", "https"):
            raise InputError(
                f"{field}: only http, https and s3 URLs can be fetched, not {scheme or redact_url(url)!r}."
            )
        shown = redact_url(url)  # a presigned URL's signature is a credential: never in an error
        try:  # fail fast on the first address; redirects are checked as their connections open
            check_url(url, self.allowlist)
        except ForbiddenAddressError as exc:
            raise InputError(f"{field}: {shown} is refused: {exc}", {"url": shown}) from exc
        response = self._get(url, shown, field, deadline, stop, self.allowlist)
        return self._body(response, shown, field, refuse_pages=True)

    def _get(
        self,
        url: str,
        shown: str,
        field: str,
        deadline: float | None,
        stop: Stop | None,
        allowlist: tuple[Network, ...] | None,
    ) -> _Response:
        """GET ``url`` with its own connections (guarded by ``allowlist``; None: the worker's bucket, which
        may be private, without redirects), all shut at the deadline or when ``stop`` is set."""
        budget = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
        if budget <= 0:
            raise self._too_slow(shown, field)
        ends = time.monotonic() + budget
        own = Stop()  # this fetch's: set at its deadline, by the job's stop, and when it is done
        if stop is not None:
            stop.on_set(own.set)
        watchdog = threading.Timer(budget, own.set)
        watchdog.daemon = True
        watchdog.start()
        pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, budget), read=budget),
            retries=urllib3.Retry(total=2, redirect=5, backoff_factor=0.5, raise_on_redirect=True),
        )
        pool.pool_classes_by_scheme = _pools(allowlist, own)
        try:
            response = pool.request("GET", url, preload_content=False, redirect=allowlist is not None)
        except urllib3.exceptions.HTTPError as exc:
            watchdog.cancel()
            own.set()
            pool.clear()
            forbidden = refused_connection(exc)
            if forbidden is None and time.monotonic() >= ends:
                raise self._too_slow(shown, field) from exc
            reason = forbidden or (exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc)
            verb = "is refused" if forbidden else "could not be fetched"
            raise InputError(f"{field}: {shown} {verb}: {redact_urls(str(reason))}", {"url": shown}) from exc
        return _Response(response, pool, own, watchdog, ends)

    def _body(self, response: _Response, shown: str, field: str, refuse_pages: bool) -> bytes:
        try:
            data = self._read(response.raw, shown, field, refuse_pages)
            if response.stop.is_set():  # its sockets were shut (the deadline): what came is not the whole file
                raise ConnectionAbortedError("cut off")
            return data
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if response.stop.is_set() or time.monotonic() >= response.ends:
                raise self._too_slow(shown, field) from exc
            raise InputError(f"{field}: {shown} could not be fetched: {redact_urls(str(exc))}", {"url": shown}) from exc
        finally:
            response.close()

    def _too_slow(self, url: str, field: str) -> InputError:
        return InputError(
            f"{field}: {url} did not arrive within INPUT_URL_TIMEOUT ({self.timeout_s:g}s in all) or the job's "
            "remaining time.",
            {"url": url, "timeout_s": self.timeout_s},
        )

    def _read(self, response: Any, url: str, field: str, refuse_pages: bool) -> bytes:
        if response.status != 200:
            raise InputError(
                f"{field}: {url} answered HTTP {response.status}.", {"url": url, "status": response.status}
            )
        content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if refuse_pages and content_type in REFUSED_TYPES:
            raise InputError(
                f"{field}: {url} is a web page ({content_type}), not a file: use the file's direct download link.",
                {"url": url, "content_type": content_type},
            )
        try:
            declared = int(response.headers.get("Content-Length") or 0)
        except ValueError:
            declared = 0  # a broken header: the bytes read below are counted anyway
        if declared > self.max_bytes:
            raise self._too_large(url, field, declared)
        chunks, size = [], 0
        for chunk in response.stream(1024 * 1024):
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(url, field, size)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, url: str, field: str, size: int) -> InputError:
        return InputError(
            f"{field}: {url} is larger than INPUT_URL_MAX_MB ({self.max_bytes / 1024 / 1024:g} MB).",
            {"url": url, "bytes": size},
        )

    def _fetch_s3(self, url: str, field: str, deadline: float | None, stop: Stop | None) -> bytes:
        """An object where the operator lets jobs read (``S3Storage.readable``), by a presigned GET: the bucket
        is the worker's own endpoint (not guarded, never redirected) and the read runs under the job's deadline.
        Anything unreadable (not allowed, no such bucket or key, access denied) is one message, which says
        nothing about what exists."""
        if self.storage is None:
            raise InputError(f"{field}: s3:// URLs need the worker's bucket settings (BUCKET_NAME and keys).")
        parts = urlsplit(url)
        bucket, key = parts.netloc, parts.path.removeprefix("/")
        shown = redact_url(url)
        unreadable = InputError(
            f"{field}: {shown} cannot be read: jobs may read s3:// objects only under "
            f"{', '.join(self.storage.readable_locations())} (INPUT_S3_ALLOWLIST), and only ones that exist.",
            {"url": shown},
        )
        if parts.query or parts.fragment or not self.storage.readable(bucket, key):
            raise unreadable
        response = self._get(self.storage.presigned_get(bucket, key), shown, field, deadline, stop, None)
        if response.raw.status in (301, 307, 400, 403, 404):  # another region, a bad name, denied, missing
            response.close()
            raise unreadable
        return self._body(response, shown, field, refuse_pages=False)


class _Response:
    """One fetch's response with what it holds: its pool, its stop and the watchdog; ``close`` ends them."""

    def __init__(self, raw: Any, pool: urllib3.PoolManager, stop: Stop, watchdog: threading.Timer, ends: float):
        self.raw, self.pool, self.stop, self.watchdog, self.ends = raw, pool, stop, watchdog, ends

    def close(self) -> None:
        self.watchdog.cancel()
        self.raw.close()  # no keep-alive: a refused body is not drained, and fetches are one-offs
        self.raw.release_conn()
        self.stop.set()
        self.pool.clear()
