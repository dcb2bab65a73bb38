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
from comfy_worker.settings import SettingsError, log_level


class _SecretsAndUrls(Redactor):
    def __call__(self, text: str) -> str:
        return redact_urls(super().__call__(text))


def setup_logging(env: Mapping[str, str], secrets: Iterable[str] = ()) -> None:
    """Log to stderr at LOG_LEVEL, with env secrets, ``secrets`` and URL credentials masked.

    A LOG_LEVEL the worker refuses (the same parser, ``settings.log_level``) is said and logged at INFO:
    provisioning must still run and write its status, and the worker names the variable in every job.
    """
    values = sorted({*secrets_from_env(env), *secrets}, key=len, reverse=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(_SecretsAndUrls(values)))
    try:
        level, problem = log_level(env), None
    except SettingsError as exc:
        level, problem = "INFO", exc
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
    if problem is not None:
        logging.getLogger("comfy_worker.provision").error("%s: provisioning logs at INFO", problem)
