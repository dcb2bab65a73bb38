"""Logging for provisioning's commands: one format, and no secret in any line.

Provisioning logs URLs from config.yml (nodes, models, COMFYUI_REPO) and the errors of git, pip and HTTP,
which quote them; RunPod keeps the worker's log. Every line passes through ``redact_urls`` (credentials in
URLs: ``user:token@``, ``?token=``) and the mask of secret-named environment variables.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping

from comfy_worker.redact import RedactingFilter, Redactor, redact_urls, secrets_from_env


class _SecretsAndUrls(Redactor):
    def __call__(self, text: str) -> str:
        return redact_urls(super().__call__(text))


def setup_logging(env: Mapping[str, str], secrets: Iterable[str] = ()) -> None:
    """Log to stderr at LOG_LEVEL, with env secrets, ``secrets`` and URL credentials masked."""
    values = sorted({*secrets_from_env(env), *secrets}, key=len, reverse=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(_SecretsAndUrls(values)))
    logging.basicConfig(level=env.get("LOG_LEVEL", "INFO").upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)
