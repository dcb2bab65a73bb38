"""Keep secrets out of logs and job results.

Nobody can log in to a RunPod worker, so errors carry ComfyUI's log lines and exception messages to the
client, and a custom node that prints its API key, or an exception that quotes a URL with a token, would
leak it. Every value of an environment variable whose name says it is a secret is replaced by ``***`` in
the worker's log records (ComfyUI's forwarded lines included) and in error results.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values ("true", "1") would blank out ordinary words
MASK = "***"
# Query parameters that carry credentials: tokens, API keys, presigned URLs' signatures and credentials.
SECRET_QUERY = re.compile(r"token|key|sig|secret|auth|credential|password|policy", re.IGNORECASE)
URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()\[\]{}]*[^\s'\"<>()\[\]{}.,;:!?]")


def secrets_from_env(env: Mapping[str, str]) -> tuple[str, ...]:
    """The values to hide: those of variables named like secrets, longest first (so overlaps mask fully)."""
    values = {value for name, value in env.items() if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LENGTH}
    return tuple(sorted(values, key=len, reverse=True))


class Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(secrets)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


class RedactingFilter(logging.Filter):
    """A handler filter that masks secrets in the final message of every record."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


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
