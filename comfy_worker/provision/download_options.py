"""What every part of a model download shares: the options (the DOWNLOAD_* variables of docs/environment.md,
read once) and the one error a failing model ends in."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import requests

from comfy_worker.fsutil import DEFAULT_LOCK_DEADLINE_S
from comfy_worker.provision.transfer import TransferTuning
from comfy_worker.settings import SettingsError, env_float, env_int

MIB = 1024 * 1024


class DownloadError(Exception):
    """One model cannot be downloaded; the message names the redacted URL and the cause."""


@dataclass(frozen=True)
class DownloadOptions:
    """How to download; ``from_env`` reads the download variables (docs/environment.md) once."""

    concurrency: int = 4
    connections: int = 8
    progress_interval_s: float = 10.0
    hf_token: str | None = field(default=None, repr=False)
    host_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    hf_endpoint: str = "https://huggingface.co"
    segment_threshold: int = 64 * MIB
    retries: int = 5
    retry_backoff_s: float = 1.0
    lock: Literal["auto", "flock", "soft"] = "auto"
    lock_timeout_s: float = DEFAULT_LOCK_DEADLINE_S  # a lock holder silent this long is given up on
    progress_bar: bool | None = None  # None: a tqdm bar when stderr is a TTY, log lines otherwise
    # For downloads a job asks for (runtime/models.py), not config.yml's: a size limit (a file whose size the
    # server does not tell is refused too), the HTTP session (the worker's SSRF guard) and progress reports.
    max_bytes: int | None = None
    session: Callable[[], requests.Session] = field(default=requests.Session, repr=False, compare=False)
    on_progress: Callable[[str, int, int | None], None] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DownloadOptions:
        """Parse the environment (a plain mapping, so tests pass dicts); raise SettingsError on bad values."""
        hosts = _host_tokens(env.get("DOWNLOAD_TOKENS", ""))
        civitai = env.get("CIVITAI_TOKEN", "").strip()
        if civitai:
            hosts.setdefault("civitai.com", civitai)
        lock = env.get("DOWNLOAD_LOCK", "auto").strip().lower() or "auto"
        if lock not in ("auto", "flock", "soft"):
            raise SettingsError(f"DOWNLOAD_LOCK={lock!r} is not one of auto, flock, soft")
        return cls(
            concurrency=env_int(env, "DOWNLOAD_CONCURRENCY", cls.concurrency, minimum=1),
            connections=env_int(env, "DOWNLOAD_CONNECTIONS", cls.connections, minimum=1),
            progress_interval_s=env_float(env, "DOWNLOAD_PROGRESS_INTERVAL", cls.progress_interval_s, minimum=0.1),
            hf_token=env.get("HF_TOKEN", "").strip() or None,
            host_tokens=hosts,
            hf_endpoint=(env.get("HF_ENDPOINT", "").strip() or cls.hf_endpoint).rstrip("/"),
            segment_threshold=int(env_float(env, "DOWNLOAD_SEGMENT_MIN_MB", 64.0, minimum=1.0) * MIB),
            retries=env_int(env, "DOWNLOAD_RETRIES", cls.retries),
            lock=lock,  # type: ignore[arg-type]
            lock_timeout_s=env_float(env, "PROVISION_LOCK_TIMEOUT", DEFAULT_LOCK_DEADLINE_S, minimum=1.0),
        )

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


def _host_tokens(raw: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for number, item in enumerate((i.strip() for i in raw.split(",")), start=1):
        if not item:
            continue
        host, sep, token = item.partition("=")
        if not sep or not host.strip() or not token.strip():
            raise SettingsError(f"DOWNLOAD_TOKENS: item {number} is not host=token")  # never echo the value
        tokens[host.strip().lower()] = token.strip()
    return tokens
