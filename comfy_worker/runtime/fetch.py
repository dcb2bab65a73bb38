"""Input files by URL (``images[].url``): http(s) with an SSRF guard, and ``s3://`` with the worker's bucket.

A worker that fetches whatever URL a job names could be made to read internal services: the cloud metadata
endpoint, ComfyUI itself on 127.0.0.1, anything on the private network. So every address a connection goes
to (the first one and every redirect's, checked when the socket is opened, after DNS, which also defeats
DNS rebinding) must be a public one unless INPUT_URL_ALLOWLIST names it. Downloads are capped in size and in
total time (a server sending one byte every few seconds never trips a per-read timeout, so a watchdog closes
the response at the deadline), and an HTML page (a link to a viewer, not the file) is refused with a hint.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions
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


def _guarded(base: type[HTTPConnection], allowlist: tuple[Network, ...]) -> type[HTTPConnection]:
    class Guarded(base):  # type: ignore[valid-type,misc]
        def _new_conn(self) -> socket.socket:
            address = check_address(self._dns_host, self.port, allowlist)
            return urllib3_connection.create_connection(
                (address, self.port),
                self.timeout,
                source_address=self.source_address,
                socket_options=self.socket_options,
            )

    return Guarded


def guarded_session(allowlist: tuple[Network, ...]) -> requests.Session:
    """A requests session whose every connection (redirects included) passes the same guard as input URLs:
    for models a job asks to download with the provisioning downloader (which speaks requests)."""
    session = requests.Session()
    adapter = _GuardedAdapter(allowlist)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, allowlist: tuple[Network, ...]) -> None:
        self.allowlist = allowlist
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _guarded_pools(self.allowlist)


def _guarded_pools(allowlist: tuple[Network, ...]) -> dict[str, type[HTTPConnectionPool]]:
    http_pool = type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": _guarded(HTTPConnection, allowlist)})
    https_pool = type(
        "GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": _guarded(HTTPSConnection, allowlist)}
    )
    return {"http": http_pool, "https": https_pool}


class Fetcher:
    def __init__(
        self, allowlist: tuple[Network, ...], max_bytes: int, timeout_s: float, storage: S3Storage | None
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.storage = storage
        self.allowlist = allowlist
        self._pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=timeout_s),
            retries=urllib3.Retry(total=2, redirect=5, backoff_factor=0.5, raise_on_redirect=True),
        )
        self._pool.pool_classes_by_scheme = _guarded_pools(allowlist)

    def fetch(self, url: str, field: str, deadline: float | None = None) -> bytes:
        """The file at ``url``, within INPUT_URL_TIMEOUT in all and before ``deadline`` (``time.monotonic``)."""
        scheme = urlsplit(url).scheme.lower()
        if scheme == "s3":
            return self._fetch_s3(url, field)
        if scheme not in ("http", "https"):
            raise InputError(
                f"{field}: only http, https and s3 URLs can be fetched, not {scheme or redact_url(url)!r}."
            )
        shown = redact_url(url)  # a presigned URL's signature is a credential: never in an error
        budget = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
        if budget <= 0:
            raise self._too_slow(shown, field)
        ends = time.monotonic() + budget
        try:  # fail fast on the first address; redirects are checked as their connections open
            check_url(url, self.allowlist)
            timeout = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, budget), read=budget)
            response = self._pool.request("GET", url, preload_content=False, timeout=timeout)
        except ForbiddenAddressError as exc:
            raise InputError(f"{field}: {shown} is refused: {exc}", {"url": shown}) from exc
        except urllib3.exceptions.HTTPError as exc:
            forbidden = refused_connection(exc)
            reason = forbidden or (exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc)
            verb = "is refused" if forbidden else "could not be fetched"
            if time.monotonic() >= ends:
                raise self._too_slow(shown, field) from exc
            raise InputError(f"{field}: {shown} {verb}: {redact_urls(str(reason))}", {"url": shown}) from exc
        watchdog = threading.Timer(ends - time.monotonic(), response.shutdown)
        watchdog.start()
        try:
            return self._read(response, shown, field)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if time.monotonic() >= ends:
                raise self._too_slow(shown, field) from exc
            raise InputError(f"{field}: {shown} could not be fetched: {redact_urls(str(exc))}", {"url": shown}) from exc
        finally:
            watchdog.cancel()
            response.close()  # no keep-alive: a refused body is not drained, and fetches are one-offs
            response.release_conn()

    def _too_slow(self, url: str, field: str) -> InputError:
        return InputError(
            f"{field}: {url} did not arrive within INPUT_URL_TIMEOUT ({self.timeout_s:g}s in all) or the job's "
            "remaining time.",
            {"url": url, "timeout_s": self.timeout_s},
        )

    def _read(self, response: Any, url: str, field: str) -> bytes:
        if response.status != 200:
            raise InputError(
                f"{field}: {url} answered HTTP {response.status}.", {"url": url, "status": response.status}
            )
        content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type in REFUSED_TYPES:
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

    def _fetch_s3(self, url: str, field: str) -> bytes:
        if self.storage is None:
            raise InputError(f"{field}: s3:// URLs need the worker's bucket settings (BUCKET_NAME and keys).")
        parts = urlsplit(url)
        try:
            head = self.storage.client.head_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
            if head["ContentLength"] > self.max_bytes:
                raise self._too_large(url, field, head["ContentLength"])
            body = self.storage.client.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))["Body"]
            data: bytes = body.read()
            return data
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise InputError(f"{field}: fetching {url} failed: {exc}", {"url": url}) from exc
