"""Keep secrets out of logs and job results.

Nobody can log in to a RunPod worker, so errors carry ComfyUI's log lines and exception messages to the
client, and a custom node that prints its API key, or an exception that quotes a URL with a token, would
leak it. Every value of an environment variable whose name says it is a secret is replaced by ``***``:

- in whole job results, errors and successes alike (``Redactor.deep``, before JSON encoding, so a secret
  holding ``"`` or ``\\`` is found as it is; its JSON- and repr-escaped forms are masked too, for text that
  was encoded elsewhere, such as ComfyUI's ``Value not in list ('hf_...')``);
- in the worker's log records, tracebacks included (``RedactingFilter``), and in everything printed to
  stdout/stderr, where the runpod SDK writes its own lines (``RedactingStream``).

A job's own secrets (its ``comfy_org_api_key``) are masked in its result, and in every log line while it runs
(``Redactor.hold``): the worker's, the SDK's and ComfyUI's, whose lines the worker relays and keeps for errors.

URLs lose their credentials (``redact_url``, the one URL redactor) wherever they reach a log line or an error.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values ("true", "1") would blank out ordinary words
MASK = "***"
# Keys recognisable by their shape, masked wherever they appear, also when no variable holds them (a job's own
# Comfy.org API key reaches the runpod SDK's debug lines before the worker sees the job).
KEY_SHAPES = re.compile(r"\bcomfyui-[A-Za-z0-9]{20,}")
# Query parameters that carry credentials: tokens, API keys, presigned URLs' signatures and credentials.
SECRET_QUERY = re.compile(r"token|key|sig|secret|auth|credential|password|policy", re.IGNORECASE)
URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()\[\]{}]*[^\s'\"<>()\[\]{}.,;:!?]")


def secrets_from_env(env: Mapping[str, str]) -> tuple[str, ...]:
    """The values to hide: those of variables named like secrets, longest first (so overlaps mask fully)."""
    values = {value for name, value in env.items() if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LENGTH}
    return tuple(sorted(values, key=len, reverse=True))


def _escaped_forms(secret: str) -> set[str]:
    """The secret as it reads inside JSON text (ASCII or not) and inside a Python repr."""
    return {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], repr(secret)[1:-1]}


class Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = _forms(secrets)
        self._held: dict[int, list[str]] = {}  # running jobs' own secrets, read at every call
        self._keys = itertools.count()
        self._lock = threading.Lock()

    def __call__(self, text: str) -> str:
        for secret in self._current():
            if secret in text:
                text = text.replace(secret, MASK)
        return KEY_SHAPES.sub(MASK, text)

    def hold(self, secrets: list[str]) -> Callable[[], None]:
        """Mask ``secrets`` too (the list as it is at each call: a job adds its key once it is parsed) until the
        returned function is called: a running job's own, in every line logged meanwhile, from any thread."""
        with self._lock:
            key = next(self._keys)
            self._held[key] = secrets

        def release() -> None:
            with self._lock:
                self._held.pop(key, None)

        return release

    def _current(self) -> tuple[str, ...]:
        with self._lock:
            held = [secret for secrets in self._held.values() for secret in secrets if len(secret) >= MIN_SECRET_LENGTH]
        if not held:
            return self.secrets
        return tuple(sorted({*self.secrets, *_forms(held)}, key=len, reverse=True))

    def adding(self, secrets: Iterable[str]) -> Redactor:
        """This redactor with more secrets (a job's own API key, for that job's result)."""
        extra = [secret for secret in secrets if len(secret) >= MIN_SECRET_LENGTH]
        return Redactor((*self.secrets, *extra)) if extra else self

    def deep(self, value: Any, urls: bool = False) -> Any:
        """``value`` (JSON-like: dicts, lists, strings) with every string masked, keys included; ``urls``
        also strips credentials from the URLs in it (for errors: a success's S3 URLs must stay usable)."""
        if isinstance(value, str):
            text = self(value)
            return redact_urls(text) if urls else text
        if isinstance(value, dict):
            return {self.deep(key, urls): self.deep(item, urls) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.deep(item, urls) for item in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.deep(str(value), urls)  # what JSON encoding would write with default=str


def _forms(secrets: Iterable[str]) -> tuple[str, ...]:
    """Every form of every secret, longest first (so overlaps mask fully)."""
    forms = {form for secret in secrets for form in _escaped_forms(secret)}
    return tuple(sorted(forms, key=len, reverse=True))


class RedactingFilter(logging.Filter):
    """A handler filter that masks secrets and URL credentials in every record, its traceback included."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def _clean(self, text: str) -> str:
        return redact_urls(self.redact(text))

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self._clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
            record.exc_info = None  # the formatter uses exc_text as it is
        if record.stack_info:
            record.stack_info = self._clean(record.stack_info)
        return True


class RedactingStream:
    """A text stream that masks secrets in everything written through it (``sys.stdout``/``sys.stderr``).

    The runpod SDK prints its log lines (DEBUG ones with a job's input and output) instead of using
    ``logging``; each line is one ``write``, so a secret is never split across two.
    """

    def __init__(self, stream: TextIO, redact: Redactor) -> None:
        self._stream = stream
        self._redact = redact

    def write(self, text: str) -> int:
        self._stream.write(self._redact(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding...: the wrapped stream's
        return getattr(self._stream, name)


def redact_url(url: str) -> str:
    """The URL without credentials: userinfo (``user:token@``, ``token@``) and token-like query values masked.

    The one URL redactor: config.yml's node and model URLs, COMFY_API_URL, input URLs and presigned URLs all
    pass through it before they reach a log line, a job result or a file on the volume. A URL with nothing to
    hide comes back unchanged (not re-encoded).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(SECRET_QUERY.search(key) for key, _ in pairs):
        query = urlencode([(key, MASK if SECRET_QUERY.search(key) else value) for key, value in pairs], safe="*/")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls(text: str) -> str:
    """``text`` with every URL in it passed through ``redact_url`` (git and HTTP errors quote URLs)."""
    return URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
