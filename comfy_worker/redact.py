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

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values ("true", "1") would blank out ordinary words
MASK = "***"


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
