"""Where a model's bytes come from: its URL understood (a Hugging Face file or a plain URL) and the server
asked about the file (size, version, Range support, name) before anything is written.

Hugging Face URLs use huggingface_hub for what it does well (URL parsing, ``HF_ENDPOINT``, auth headers, file
metadata) but not for the bytes (see ``downloads``): the Remote points at the resolve URL pinned to the
commit. Other URLs get one ``GET bytes=0-0`` probe, which signed (GET-only) redirect targets accept too.
"""

from __future__ import annotations

import email.message
import re
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from huggingface_hub import get_hf_file_metadata, hf_hub_url, parse_hf_uri
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # lazily exported

from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.download_options import DownloadError, DownloadOptions
from comfy_worker.provision.transfer import (
    Cancelled,
    HttpStatusError,
    Remote,
    RetryableError,
    TransferError,
    refused_connection,
)
from comfy_worker.redact import redact_url

HF_HOSTS = frozenset({"huggingface.co", "hf.co", "www.huggingface.co"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Source:
    """A model's URL understood offline: Hub file or plain URL, the file name when it is known without asking."""

    model: ModelConfig
    display_url: str
    hf_repo: tuple[str, str, str | None, str] | None  # (repo_id, repo_type, revision, path_in_repo)
    offline_name: str | None

    @property
    def host(self) -> str:
        return (urlsplit(self.model.url).hostname or "").lower()


def source_of(model: ModelConfig, options: DownloadOptions) -> Source:
    display = redact_url(model.url)
    parts = urlsplit(model.url)
    hf_repo = None
    name = model.filename
    if (parts.hostname or "").lower() in HF_HOSTS or _origin(model.url) == _origin(options.hf_endpoint):
        try:
            uri = parse_hf_uri(model.url, endpoint=options.hf_endpoint)
        except ValueError:  # its message quotes the whole URL, query included: not repeated here
            raise DownloadError(f"{display}: not a Hugging Face file URL (expected .../resolve/<rev>/<file>)") from None
        if uri.type == "bucket" or not uri.path_in_repo:
            raise DownloadError(f"{display}: not a Hugging Face file URL (expected .../resolve/<revision>/<file>)")
        hf_repo = (uri.id, uri.type, uri.revision, uri.path_in_repo)
        name = name or uri.path_in_repo.rsplit("/", 1)[-1]
    else:
        last = parts.path.rsplit("/", 1)[-1]
        if name is None and "." in last.strip("."):
            name = last  # 'model.safetensors' yes; Civitai's '/api/download/models/12345' needs Content-Disposition
    return Source(model, display, hf_repo, name)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def resolve(source: Source, options: DownloadOptions, cancelled: threading.Event | None = None) -> Remote:
    """Ask the server about the file (size, version, ranges, name), retrying connection errors and 5xx, until
    ``cancelled`` is set (a job's deadline or end: its session's sockets are shut then, which ends a probe)."""
    cancelled = cancelled or threading.Event()
    for attempt in range(options.retries + 1):
        try:
            return _hf_remote(source, options) if source.hf_repo else _probe(source, options)
        except RetryableError as exc:
            if cancelled.is_set():
                break
            if attempt == options.retries:
                raise DownloadError(f"{source.display_url}: {exc} (gave up after {options.retries} retries)") from None
            if cancelled.wait(min(options.retry_backoff_s * 2**attempt, 30.0)):
                break
    raise Cancelled("stopped: the download was cancelled (the job ended or ran out of time)")


def _hf_remote(source: Source, options: DownloadOptions) -> Remote:
    assert source.hf_repo is not None
    repo_id, repo_type, revision, path = source.hf_repo
    token: str | bool = options.hf_token or False  # False: never a token file from this machine's cache

    def url_at(rev: str | None) -> str:
        return hf_hub_url(repo_id, path, repo_type=repo_type, revision=rev, endpoint=options.hf_endpoint)

    try:
        meta = get_hf_file_metadata(url_at(revision), token=token, endpoint=options.hf_endpoint)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (429,) or status >= 500:
            raise RetryableError(f"HTTP {status} from the Hub") from None
        raise HttpStatusError(status, f"HTTP {status} from the Hub") from None
    except OSError as exc:
        raise RetryableError(f"cannot reach the Hub: {type(exc).__name__}") from None
    except Exception as exc:  # httpx2's transport errors are not OSErrors
        if type(exc).__module__.startswith("httpx"):
            raise RetryableError(f"cannot reach the Hub: {type(exc).__name__}") from None
        raise
    etag = (meta.etag or "").lower()
    return Remote(
        url=url_at(meta.commit_hash or revision),  # pinned: a push to 'main' mid-download changes nothing
        display_url=source.display_url,
        headers=build_hf_headers(token=token),
        size=meta.size,
        ranges=True,
        validator=meta.etag,
        if_range=False,  # the CDN's ETag is not the Hub's; the commit pins the content instead
        filename=None,
        sha256=etag if _SHA256.match(etag) else None,
    )


def _auth_headers(source: Source, options: DownloadOptions) -> dict[str, str]:
    token = options.token_for(source.host)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _probe(source: Source, options: DownloadOptions) -> Remote:
    """GET bytes 0-0: size (Content-Range), Range support, validator and name in one request that signed
    (GET-only) redirect targets accept too, unlike HEAD."""
    headers = _auth_headers(source, options)
    try:
        with (
            options.session() as session,
            session.get(
                source.model.url,
                headers={**headers, "Range": "bytes=0-0", "Accept-Encoding": "identity"},
                stream=True,
                timeout=(15, 60),
            ) as response,
        ):
            return _remote_from_probe(source, headers, response)
    except (requests.ConnectionError, requests.Timeout) as exc:
        refused = refused_connection(exc)  # a redirect to an address the session's guard refuses: final
        if refused is not None:
            raise TransferError(f"refused to connect: {refused}") from None
        raise RetryableError(f"connection error: {type(exc).__name__}") from None


def _remote_from_probe(source: Source, headers: dict[str, str], response: requests.Response) -> Remote:
    status = response.status_code
    if status in (408, 425, 429) or status >= 500:
        raise RetryableError(f"HTTP {status}")
    if status not in (200, 206, 416):
        raise HttpStatusError(status, f"HTTP {status} {response.reason or ''}".strip())
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    if status == 206 and total.isdigit():
        size: int | None = int(total)
    elif status == 416:
        size = int(total) if total.isdigit() else 0
    else:
        length = response.headers.get("Content-Length", "")
        size = int(length) if length.isdigit() else None
    etag = response.headers.get("ETag")
    validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
    return Remote(
        url=source.model.url,
        display_url=source.display_url,
        headers=headers,
        size=size,
        ranges=status == 206 and size is not None,
        validator=validator,
        filename=_disposition_name(response),
    )


def _disposition_name(response: requests.Response) -> str | None:
    """The file name from Content-Disposition (Civitai's download API), reduced to a plain name."""
    for candidate in (response, *reversed(response.history)):
        value = candidate.headers.get("Content-Disposition")
        if value:
            message = email.message.Message()
            message["Content-Disposition"] = value
            name = (message.get_filename() or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
            if name and name not in (".", "..") and "\x00" not in name:
                return name
    return None


def explain(exc: TransferError, source: Source) -> str:
    """The cause in words a user can act on."""
    if isinstance(exc, HttpStatusError) and exc.status in (401, 403):
        if source.hf_repo:
            need = "set HF_TOKEN (and accept the model's licence on its page if it is gated)"
        elif source.host.endswith("civitai.com"):
            need = "set CIVITAI_TOKEN"
        else:
            need = f"set DOWNLOAD_TOKENS={source.host}=<token>"
        return f"{exc}: needs a token: {need} (HF_TOKEN / CIVITAI_TOKEN / DOWNLOAD_TOKENS)"
    if isinstance(exc, HttpStatusError) and exc.status == 404:
        return f"{exc}: not found (check the URL, the revision and the file name)"
    return str(exc)
