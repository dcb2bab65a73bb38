"""Every environment variable the worker reads, in one place, parsed once.

``Settings.from_env`` takes the environment as a plain mapping so tests pass dicts instead of patching
``os.environ``. The README's env-var table mirrors this module: change both together.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self, TypeVar
from urllib.parse import urlsplit

from comfy_worker.fsutil import DEFAULT_LOCK_DEADLINE_S
from comfy_worker.redact import SECRET_NAME, redact_url, secrets_from_env


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    access_key_id: str
    secret_access_key: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    key_template: str = "{job_id}/{filename}"
    presign_expiry_s: int = 86400
    public_url: str | None = None
    # (bucket, key prefix ending in "/" or empty) where s3:// inputs may read: INPUT_S3_ALLOWLIST, by default
    # the bucket's inputs/ folder, where outputs never go (output.s3_prefix may not start with inputs/)
    readable: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:  # never print the secret
        return f"S3Settings(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r}, region={self.region!r})"


N = TypeVar("N", int, float)
# COMFY_FREE_AFTER_JOB -> the body of ComfyUI's POST /free
FREE_MODES: dict[str, dict[str, bool]] = {
    "none": {},
    "memory": {"free_memory": True},
    "models": {"unload_models": True, "free_memory": True},
}


# The worker's own variables that ComfyUI has no use for (bucket keys, RunPod's job URLs, the config that may
# hold tokens); together with every secret-named one they are kept from ComfyUI, where any custom node could
# read them. COMFYUI_PASS_ENV names the ones to pass anyway (HF_TOKEN for a node that downloads gated models).
WORKER_ONLY_PREFIXES = ("BUCKET_", "RUNPOD_", "S3_", "INPUT_URL_", "CONFIG_YML", "JUPYTER_", "DOWNLOAD_TOKENS")


def comfyui_environment(env: Mapping[str, str], passed: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """ComfyUI's environment: the worker's, less its secrets and its own settings, plus COMFYUI_PASS_ENV."""
    return tuple(
        (name, value)
        for name, value in env.items()
        if name in passed or not (SECRET_NAME.search(name) or name.startswith(WORKER_ONLY_PREFIXES))
    )


class SettingsError(ValueError):
    """An environment variable holds a value the worker cannot use."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true or false)")


def _number(env: Mapping[str, str], name: str, default: N, minimum: N, parse: Callable[[str], N]) -> N:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        kind = "an integer" if parse is int else "a number"
        raise SettingsError(f"{name}={raw!r} is not {kind}") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    return _number(env, name, default, minimum, float)


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    return _number(env, name, default, minimum, int)


def _networks(env: Mapping[str, str], name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in env.get(name, "").replace(" ", "").split(","):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise SettingsError(f"{name}: {item!r} is not an IP address or CIDR range") from None
    return tuple(networks)


def _path(env: Mapping[str, str], name: str, default: Path | None) -> Path | None:
    raw = env.get(name, "").strip()
    return Path(raw).expanduser() if raw else default


# LOG_LEVEL's values (logging's names, and WARN, the runpod SDK's) -> the name the runpod SDK's own logger takes
# for RUNPOD_LOG_LEVEL: it knows NOTSET, TRACE, DEBUG, INFO, WARN and ERROR, and refuses anything else at import.
LOG_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR", "CRITICAL": "ERROR"}
LOG_LEVEL_ALIASES = {"WARN": "WARNING"}
RUNPOD_LOG_LEVELS = ("NOTSET", "TRACE", "DEBUG", "INFO", "WARN", "ERROR")


def log_level(env: Mapping[str, str]) -> str:
    """LOG_LEVEL as ``logging`` names it: the one parser, for the worker and for provisioning."""
    raw = env.get("LOG_LEVEL", "").strip() or "INFO"
    level = LOG_LEVEL_ALIASES.get(raw.upper(), raw.upper())
    if level not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL={raw!r} is not one of DEBUG, INFO, WARNING (or WARN), ERROR, CRITICAL")
    return level


def runpod_log_level(env: Mapping[str, str], level: str) -> str:
    """The runpod SDK's level: RUNPOD_LOG_LEVEL (logging's names are understood too), else LOG_LEVEL's."""
    raw = env.get("RUNPOD_LOG_LEVEL", "").strip() or LOG_LEVELS[level]
    name = LOG_LEVEL_ALIASES.get(raw.upper(), raw.upper())
    sdk_name = LOG_LEVELS.get(name, name)
    if sdk_name not in RUNPOD_LOG_LEVELS:
        raise SettingsError(
            f"RUNPOD_LOG_LEVEL={raw!r} is not one of {', '.join(RUNPOD_LOG_LEVELS)} (nor DEBUG, INFO, WARNING, "
            "ERROR, CRITICAL)"
        )
    return sdk_name


@dataclass(frozen=True)
class DownloadSettings:
    """The model downloads' variables (docs/environment.md), for provisioning and for the models jobs bring.

    ``provision.download_options.DownloadOptions`` adds how a download runs (its HTTP session, progress, size
    limit) to these."""

    concurrency: int = 4
    connections: int = 8
    progress_interval_s: float = 10.0
    hf_token: str | None = field(default=None, repr=False)
    host_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    hf_endpoint: str = "https://huggingface.co"
    segment_threshold: int = 64 * 1024 * 1024
    retries: int = 5
    retry_backoff_s: float = 1.0
    lock: Literal["auto", "flock", "soft"] = "auto"
    lock_timeout_s: float = DEFAULT_LOCK_DEADLINE_S  # a lock holder silent this long is given up on

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Self:
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
            segment_threshold=int(env_float(env, "DOWNLOAD_SEGMENT_MIN_MB", 64.0, minimum=1.0) * 1024 * 1024),
            retries=env_int(env, "DOWNLOAD_RETRIES", cls.retries),
            lock=lock,  # type: ignore[arg-type]
            lock_timeout_s=env_float(env, "PROVISION_LOCK_TIMEOUT", DEFAULT_LOCK_DEADLINE_S, minimum=1.0),
        )


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


@dataclass(frozen=True)
class Settings:
    """The worker's configuration; see the README's "Environment variables" table."""

    comfy_api_url: str = "http://127.0.0.1:8188"
    comfyui_dir: Path | None = None
    comfyui_python: str = sys.executable
    comfyui_args: tuple[str, ...] = ()
    comfyui_input_dir: Path | None = None
    comfyui_output_dir: Path | None = None
    comfyui_temp_dir: Path | None = None
    comfyui_user_dir: Path | None = None  # None: ComfyUI's own (COMFYUI_DIR/user), passed only when local
    comfyui_local_dir: Path | None = None  # this worker's own folder for ComfyUI's state (local_state_dir)
    comfyui_tree_link: Path | None = None  # $WORKSPACE/ComfyUI, the link to the current install tree
    comfyui_tree_lease: Path | None = None  # this worker's lease on the install tree it runs (refreshed)
    comfyui_listen: str | None = None
    comfyui_save_metadata: bool = False
    extra_model_paths: Path | None = None
    provision_status: Path | None = None
    startup_timeout_s: float = 300.0
    job_timeout_s: float = 540.0  # below RunPod's default execution timeout (600 s): the worker reports it
    job_timeout_max_s: float = 3600.0
    job_concurrency: int = 3  # jobs held at once: the next one's inputs and prompt are ready as one ends
    interrupt_grace_s: float = 10.0
    restart_attempts: int = 3
    progress_interval_s: float = 1.0
    log_tail_lines: int = 200
    log_level: str = "INFO"
    runpod_log_level: str = "INFO"
    warmup_workflow: Path | None = None
    free_after_job: str = "none"
    cleanup_job_files: bool = True
    max_result_mb: float = 10.0  # what RunPod accepts on /run (20 MB on /runsync)
    input_url_allowlist: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    input_url_max_mb: float = 100.0
    input_url_timeout_s: float = 60.0
    input_image_max_mb: float = 100.0
    output_convert_max_megapixels: float = 80.0  # under Pillow's own 89.5 MP warning
    model_cache_dir: Path | None = None  # None: jobs cannot bring models by URL
    model_cache_max_gb: float = 50.0
    model_url_max_gb: float = 20.0
    s3: S3Settings | None = None
    downloads: DownloadSettings = field(default_factory=DownloadSettings, repr=False)
    refresh_min_free_ram_gb: float = 0.0
    refresh_min_free_vram_gb: float = 0.0
    comfy_org_api_key: str | None = field(default=None, repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)
    comfyui_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``env`` (default ``os.environ``); raise SettingsError on bad values."""
        env = os.environ if env is None else env
        url = env.get("COMFY_API_URL", cls.comfy_api_url).strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(
                f"COMFY_API_URL={redact_url(url)!r} must be an http(s) URL such as http://127.0.0.1:8188"
            )
        comfyui_dir = _path(env, "COMFYUI_DIR", None)
        local_dir = local_state_dir(env) if comfyui_dir else None
        tree_link = _path(env, "COMFYUI_TREE_LINK", None) if comfyui_dir else None

        def folder(name: str, sub: str) -> Path | None:
            # an install tree's folders are links to the volume's: through the link they stay valid after
            # the worker moves to another tree
            base = local_dir or tree_link or comfyui_dir
            return _path(env, name, base / sub if base else None)

        temp_dir = folder("COMFYUI_TEMP_DIR", "temp")
        if temp_dir is not None and temp_dir.name != "temp":
            raise SettingsError(
                f"COMFYUI_TEMP_DIR={str(temp_dir)!r} must end in /temp: ComfyUI always keeps temp files in a "
                "folder named temp inside the directory it is given"
            )
        free_after_job = env.get("COMFY_FREE_AFTER_JOB", cls.free_after_job).strip().lower() or cls.free_after_job
        if free_after_job not in FREE_MODES:
            raise SettingsError(f"COMFY_FREE_AFTER_JOB={free_after_job!r} is not one of {', '.join(FREE_MODES)}")
        job_timeout = env_float(env, "JOB_TIMEOUT", cls.job_timeout_s, minimum=1.0)
        job_timeout_max = env_float(env, "JOB_TIMEOUT_MAX", cls.job_timeout_max_s, minimum=1.0)
        if job_timeout > job_timeout_max:
            raise SettingsError(f"JOB_TIMEOUT={job_timeout:g} is above JOB_TIMEOUT_MAX={job_timeout_max:g}")
        level = log_level(env)
        return cls(
            comfy_api_url=url,
            comfyui_dir=comfyui_dir,
            comfyui_python=env.get("COMFYUI_PYTHON", "").strip() or sys.executable,
            comfyui_args=tuple(shlex.split(env.get("COMFYUI_ARGS", ""))),
            comfyui_input_dir=folder("COMFYUI_INPUT_DIR", "input"),
            comfyui_output_dir=folder("COMFYUI_OUTPUT_DIR", "output"),
            comfyui_temp_dir=temp_dir,
            comfyui_user_dir=local_dir / "user" if local_dir else None,
            comfyui_local_dir=local_dir,
            comfyui_tree_link=tree_link,
            comfyui_tree_lease=_path(env, "COMFYUI_TREE_LEASE", None) if tree_link else None,
            comfyui_listen=env.get("COMFYUI_LISTEN", "").strip() or None,
            comfyui_save_metadata=_bool(env, "COMFYUI_SAVE_METADATA", cls.comfyui_save_metadata),
            extra_model_paths=_path(env, "COMFYUI_EXTRA_MODEL_PATHS", None),
            provision_status=_path(env, "PROVISION_STATUS", None),
            startup_timeout_s=env_float(env, "COMFY_STARTUP_TIMEOUT", cls.startup_timeout_s, minimum=1.0),
            job_timeout_s=job_timeout,
            job_timeout_max_s=job_timeout_max,
            job_concurrency=env_int(env, "JOB_CONCURRENCY", cls.job_concurrency, minimum=1),
            interrupt_grace_s=env_float(env, "INTERRUPT_GRACE", cls.interrupt_grace_s),
            restart_attempts=env_int(env, "COMFY_RESTART_ATTEMPTS", cls.restart_attempts, minimum=1),
            progress_interval_s=env_float(env, "PROGRESS_INTERVAL", cls.progress_interval_s),
            log_tail_lines=env_int(env, "COMFY_LOG_TAIL_LINES", cls.log_tail_lines, minimum=1),
            log_level=level,
            runpod_log_level=runpod_log_level(env, level),
            warmup_workflow=_path(env, "WARMUP_WORKFLOW", None),
            free_after_job=free_after_job,
            cleanup_job_files=_bool(env, "CLEANUP_JOB_FILES", cls.cleanup_job_files),
            max_result_mb=env_float(env, "MAX_RESULT_MB", cls.max_result_mb, minimum=0.1),
            input_url_allowlist=_networks(env, "INPUT_URL_ALLOWLIST"),
            input_url_max_mb=env_float(env, "INPUT_URL_MAX_MB", cls.input_url_max_mb, minimum=0.001),
            input_url_timeout_s=env_float(env, "INPUT_URL_TIMEOUT", cls.input_url_timeout_s, minimum=1.0),
            input_image_max_mb=env_float(env, "INPUT_IMAGE_MAX_MB", cls.input_image_max_mb, minimum=0.001),
            output_convert_max_megapixels=env_float(
                env, "OUTPUT_CONVERT_MAX_MEGAPIXELS", cls.output_convert_max_megapixels, minimum=0.01
            ),
            model_cache_dir=_path(env, "MODEL_CACHE_DIR", None),
            model_cache_max_gb=env_float(env, "MODEL_CACHE_MAX_GB", cls.model_cache_max_gb, minimum=1e-6),
            model_url_max_gb=env_float(env, "MODEL_URL_MAX_GB", cls.model_url_max_gb, minimum=1e-6),
            s3=s3_from_env(env),
            downloads=DownloadSettings.from_env(env),
            refresh_min_free_ram_gb=env_float(env, "REFRESH_MIN_FREE_RAM_GB", cls.refresh_min_free_ram_gb),
            refresh_min_free_vram_gb=env_float(env, "REFRESH_MIN_FREE_VRAM_GB", cls.refresh_min_free_vram_gb),
            comfy_org_api_key=env.get("COMFY_ORG_API_KEY", "").strip() or None,
            secrets=secrets_from_env(env),
            comfyui_env=comfyui_environment(
                env, frozenset(name for name in env.get("COMFYUI_PASS_ENV", "").replace(" ", "").split(",") if name)
            ),
        )

    @property
    def comfy_host(self) -> str:
        return urlsplit(self.comfy_api_url).hostname or "127.0.0.1"

    @property
    def comfy_port(self) -> int:
        parts = urlsplit(self.comfy_api_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def comfy_ws_url(self) -> str:
        parts = urlsplit(self.comfy_api_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/ws"

    @property
    def comfy_is_local(self) -> bool:
        """Whether ComfyUI runs on this machine, so the worker may start it and read its files."""
        return self.comfy_host in ("127.0.0.1", "localhost", "::1")


def local_state_dir(env: Mapping[str, str]) -> Path | None:
    """This worker process's own folder for ComfyUI's input, output, temp and user folders, or None.

    On by default on serverless (RunPod sets RUNPOD_WEBHOOK_GET_JOB there only), where every worker of an
    endpoint starts ComfyUI from the same checkout on the shared volume: a ComfyUI empties its temp folder
    when it starts and exits, so a worker scaling up or down would take the PreviewImage files of every job
    running beside it, and all would share one SQLite database over the network. The pod id and the process
    id keep two workers apart, on one machine or on one COMFYUI_LOCAL_DIR.
    """
    serverless = bool(env.get("RUNPOD_WEBHOOK_GET_JOB", "").strip())
    if not _bool(env, "COMFYUI_LOCAL_STATE", serverless):
        return None
    parent = _path(env, "COMFYUI_LOCAL_DIR", None) or Path(tempfile.gettempdir())
    pod = re.sub(r"[^A-Za-z0-9_.-]", "_", env.get("RUNPOD_POD_ID", "").strip())
    return parent / "-".join(["comfy-worker", *([pod] if pod else []), str(os.getpid())])


_AWS_VHOST = re.compile(r"^(?P<bucket>[a-z0-9][a-z0-9.-]*)\.s3[.-](?:(?P<region>[a-z0-9-]+)\.)?amazonaws\.com$")
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600
KEY_FIELDS = {"job_id": "j", "prompt_id": "p", "filename": "f.png", "node_id": "9"}


def s3_from_env(env: Mapping[str, str]) -> S3Settings | None:
    """The bucket for outputs, or None when none is configured.

    ``BUCKET_ENDPOINT_URL`` alone in runpod-workers/worker-comfyui's style (``https://BUCKET.s3.REGION.
    amazonaws.com``) is understood too: the bucket and region come from the host name.
    """
    endpoint = env.get("BUCKET_ENDPOINT_URL", "").strip().rstrip("/") or None
    bucket = env.get("BUCKET_NAME", "").strip()
    if not endpoint and not bucket:
        return None
    region = env.get("BUCKET_REGION", "").strip()
    if endpoint and not bucket:
        match = _AWS_VHOST.match(urlsplit(endpoint).hostname or "")
        if match is None:
            raise SettingsError(
                "BUCKET_NAME is required unless BUCKET_ENDPOINT_URL is https://BUCKET.s3.REGION.amazonaws.com"
            )
        bucket, region = match["bucket"], region or match["region"] or "us-east-1"
        endpoint = None  # boto3 finds AWS's endpoint from the region
    missing = [name for name in ("BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY") if not env.get(name, "").strip()]
    if missing:
        raise SettingsError(f"S3 output needs {' and '.join(missing)} (BUCKET_NAME or BUCKET_ENDPOINT_URL is set)")
    template = env.get("S3_KEY_TEMPLATE", "").strip() or S3Settings.key_template
    try:
        template.format(**KEY_FIELDS)
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join("{" + name + "}" for name in KEY_FIELDS)
        raise SettingsError(f"S3_KEY_TEMPLATE={template!r} uses an unknown field {exc}; known: {known}") from None
    expiry = env_int(env, "S3_URL_EXPIRY", S3Settings.presign_expiry_s, minimum=1)
    if expiry > MAX_PRESIGN_EXPIRY_S:
        raise SettingsError(f"S3_URL_EXPIRY={expiry} is over {MAX_PRESIGN_EXPIRY_S} s (7 days), S3's own limit")
    return S3Settings(
        bucket=bucket,
        access_key_id=env["BUCKET_ACCESS_KEY_ID"].strip(),
        secret_access_key=env["BUCKET_SECRET_ACCESS_KEY"].strip(),
        endpoint_url=endpoint,
        region=region or "us-east-1",
        key_template=template,
        presign_expiry_s=expiry,
        public_url=env.get("BUCKET_PUBLIC_URL", "").strip() or None,
        readable=_s3_locations(env.get("INPUT_S3_ALLOWLIST", ""), bucket),
    )


INPUT_PREFIX = "inputs/"  # where s3:// inputs are read by default, in the output bucket


def _s3_locations(raw: str, bucket: str) -> tuple[tuple[str, str], ...]:
    """INPUT_S3_ALLOWLIST's ``bucket`` or ``bucket/folder`` entries; empty: the output bucket's inputs/."""
    locations = []
    for number, item in enumerate((i.strip() for i in raw.split(",")), start=1):
        if not item:
            continue
        name, _, prefix = item.removeprefix("s3://").partition("/")
        prefix = prefix.strip("/")
        if not name or (prefix and any(part in ("", ".", "..") for part in prefix.split("/"))):
            raise SettingsError(f"INPUT_S3_ALLOWLIST: item {number} ({item!r}) is not bucket or bucket/folder")
        locations.append((name, f"{prefix}/" if prefix else ""))
    return tuple(locations) or ((bucket, INPUT_PREFIX),)
