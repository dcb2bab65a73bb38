"""What every part of a model download shares: the options (the DOWNLOAD_* variables of docs/environment.md,
read once by ``settings.DownloadSettings``, and how a download runs) and the one error a failing model ends in."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from comfy_worker.provision.transfer import TransferTuning
from comfy_worker.settings import DownloadSettings

MIB = 1024 * 1024


class DownloadError(Exception):
    """One model cannot be downloaded; the message names the redacted URL and the cause."""


@dataclass(frozen=True)
class DownloadOptions(DownloadSettings):
    """How to download: the settings (``from_env`` reads them, a SettingsError names a bad one), and how to run."""

    progress_bar: bool | None = None  # None: a tqdm bar when stderr is a TTY, log lines otherwise
    # For downloads a job asks for (runtime/models.py), not config.yml's: a size limit (a file whose size the
    # server does not tell is refused too), the HTTP session (the worker's SSRF guard) and progress reports.
    max_bytes: int | None = None
    session: Callable[[], requests.Session] = field(default=requests.Session, repr=False, compare=False)
    on_progress: Callable[[str, int, int | None], None] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, settings: DownloadSettings, **how: Any) -> DownloadOptions:
        """The options for ``settings`` (already read, e.g. the worker's), with ``how`` a download runs (which
        may override a setting, such as the progress interval)."""
        values = {item.name: getattr(settings, item.name) for item in dataclasses.fields(DownloadSettings)}
        return cls(**(values | how))

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(t for t in (self.hf_token, *self.host_tokens.values()) if t)

    @property
    def tuning(self) -> TransferTuning:
        return TransferTuning(
            self.connections, self.segment_threshold, self.retries, self.retry_backoff_s, session=self.session
        )

    def token_for(self, host: str) -> str | None:
        """The DOWNLOAD_TOKENS / CIVITAI_TOKEN token of ``host`` or of a domain it belongs to."""
        host = host.lower()
        for name, token in self.host_tokens.items():
            if host == name or host.endswith("." + name):
                return token
        return None
