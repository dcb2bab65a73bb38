"""Settings are read from a plain mapping; bad values stop the worker with the variable's name."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest

from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.runtime.app import load_settings
from comfy_worker.settings import LOG_LEVEL_ALIASES, LOG_LEVELS, Settings, SettingsError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.comfy_api_url == "http://127.0.0.1:8188"
    assert (s.comfy_host, s.comfy_port, s.comfy_ws_url) == ("127.0.0.1", 8188, "ws://127.0.0.1:8188/ws")
    assert s.comfyui_dir is None and s.comfyui_output_dir is None
    assert s.comfyui_python == sys.executable
    assert (s.job_timeout_s, s.job_timeout_max_s) == (540.0, 3600.0)  # below RunPod's 600 s execution timeout
    assert s.max_result_mb == 10.0  # what RunPod's /run accepts
    assert s.comfy_is_local


def test_folders_follow_comfyui_dir_unless_set() -> None:
    s = Settings.from_env({"COMFYUI_DIR": "/opt/ComfyUI", "COMFYUI_OUTPUT_DIR": "/data/out"})
    assert s.comfyui_input_dir == Path("/opt/ComfyUI/input")
    assert s.comfyui_output_dir == Path("/data/out")
    assert s.comfyui_temp_dir == Path("/opt/ComfyUI/temp")


def test_values_are_parsed() -> None:
    s = Settings.from_env(
        {
            "COMFY_API_URL": "https://comfy.internal:9000/",
            "COMFYUI_ARGS": "--preview-method auto --reserve-vram '1.5'",
            "JOB_TIMEOUT": "30",
            "PROGRESS_INTERVAL": "0.25",
            "LOG_LEVEL": "debug",
        }
    )
    assert s.comfy_api_url == "https://comfy.internal:9000"
    assert s.comfy_ws_url == "wss://comfy.internal:9000/ws"
    assert not s.comfy_is_local
    assert s.comfyui_args == ("--preview-method", "auto", "--reserve-vram", "1.5")
    assert (s.job_timeout_s, s.progress_interval_s, s.log_level) == (30.0, 0.25, "DEBUG")


def test_comfyui_gets_the_environment_less_the_workers_secrets() -> None:
    env = {
        "PATH": "/usr/bin",
        "CUDA_VISIBLE_DEVICES": "0",
        "HF_TOKEN": "hf_abcdefgh",
        "BUCKET_SECRET_ACCESS_KEY": "s3-secret",
        "BUCKET_NAME": "out",
        "BUCKET_ACCESS_KEY_ID": "AKIA",
        "RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take/$ID",
        "CONFIG_YML": "models: []",
        "MY_PASSWORD": "pw123456",
        "COMFYUI_PASS_ENV": "HF_TOKEN, NOT_SET",
    }
    passed = dict(Settings.from_env(env).comfyui_env)
    assert set(passed) == {"PATH", "CUDA_VISIBLE_DEVICES", "HF_TOKEN", "COMFYUI_PASS_ENV"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"COMFY_API_URL": "127.0.0.1:8188"}, "COMFY_API_URL"),
        ({"JOB_TIMEOUT": "ten"}, "JOB_TIMEOUT='ten' is not a number"),
        ({"JOB_TIMEOUT": "0"}, "must be at least 1"),
        ({"JOB_TIMEOUT": "5000"}, "above JOB_TIMEOUT_MAX"),
        ({"COMFY_LOG_TAIL_LINES": "1.5"}, "not an integer"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"COMFYUI_TEMP_DIR": "/data/tmp"}, "must end in /temp"),
        ({"COMFY_FREE_AFTER_JOB": "everything"}, "not one of none, memory, models"),
        ({"REFRESH_MIN_FREE_VRAM_GB": "-1"}, "must be at least 0"),
        ({"INPUT_IMAGE_MAX_MB": "big"}, "INPUT_IMAGE_MAX_MB='big' is not a number"),
        ({"OUTPUT_CONVERT_MAX_MEGAPIXELS": "0"}, "must be at least 0.01"),
        ({"COMFY_API_URL": "ftp://admin:pw-Secret@h"}, "ftp://\\*\\*\\*@h"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError, match=expected):
        Settings.from_env(env)


def test_comfyui_command_line() -> None:
    s = Settings.from_env(
        {
            "COMFY_API_URL": "http://127.0.0.1:8190",
            "COMFYUI_DIR": "/c",
            "COMFYUI_PYTHON": "/venv/bin/python",
            "COMFYUI_ARGS": "--cpu --listen 0.0.0.0",
            "COMFYUI_TEMP_DIR": "/scratch/temp",
        }
    )
    command = ComfySupervisor(s).command()
    assert command[command.index("--temp-directory") + 1] == "/scratch"
    assert command[:2] == ["/venv/bin/python", "/c/main.py"]
    assert command[2:8] == ["--listen", "127.0.0.1", "--port", "8190", "--disable-auto-launch", "--input-directory"]
    assert command.count("--cpu") == 1
    assert command[-3:] == ["--cpu", "--listen", "0.0.0.0"], "COMFYUI_ARGS come last so they win"
    assert "--disable-metadata" in command  # an API worker: no workflow inside every output


def test_comfyui_gets_absolute_paths_from_a_relative_comfyui_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"COMFYUI_DIR": "work/ComfyUI"})
    command = ComfySupervisor(settings).command()
    assert command[1] == str(tmp_path / "work" / "ComfyUI" / "main.py")  # ComfyUI runs in that folder
    for flag in ("--input-directory", "--output-directory"):
        assert Path(command[command.index(flag) + 1]).is_absolute()
    assert command[command.index("--temp-directory") + 1] == str(tmp_path / "work" / "ComfyUI")


def test_comfyui_saves_metadata_only_when_asked() -> None:
    s = Settings.from_env({"COMFYUI_DIR": "/c", "COMFYUI_SAVE_METADATA": "true"})
    assert "--disable-metadata" not in ComfySupervisor(s).command()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DOWNLOAD_CONCURRENCY", "0", "DOWNLOAD_CONCURRENCY='0' must be at least 1"),
        ("DOWNLOAD_CONNECTIONS", "x", "DOWNLOAD_CONNECTIONS='x' is not an integer"),
        ("DOWNLOAD_SEGMENT_MIN_MB", "0", "DOWNLOAD_SEGMENT_MIN_MB='0' must be at least 1"),
        ("DOWNLOAD_RETRIES", "-5", "DOWNLOAD_RETRIES='-5' must be at least 0"),
        ("DOWNLOAD_LOCK", "maybe", "DOWNLOAD_LOCK='maybe' is not one of auto, flock, soft"),
        ("DOWNLOAD_TOKENS", "garbage", "DOWNLOAD_TOKENS: item 1 is not host=token"),
        ("DOWNLOAD_PROGRESS_INTERVAL", "0", "DOWNLOAD_PROGRESS_INTERVAL='0' must be at least 0.1"),
        ("PROVISION_LOCK_TIMEOUT", "never", "PROVISION_LOCK_TIMEOUT='never' is not a number"),
        ("MODEL_CACHE_DIR", "/proc/nope", "MODEL_CACHE_DIR='/proc/nope' is not a folder the worker can write to"),
        ("MODEL_CACHE_DIR", "/proc/self", "MODEL_CACHE_DIR='/proc/self' is not a folder the worker can write to"),
        ("RUNPOD_LOG_LEVEL", "chatty", "RUNPOD_LOG_LEVEL='chatty' is not one of"),
    ],
)
def test_every_setting_is_read_before_the_worker_starts(name: str, value: str, expected: str, tmp_path: Path) -> None:
    """The download options were read after start-up, outside the guard that turns a bad value into a job error:
    each of these stopped the worker (a crash loop on RunPod, where start.sh always sets MODEL_CACHE_DIR)."""
    env = {"MODEL_CACHE_DIR": str(tmp_path / "cache"), name: value}
    with pytest.raises(SettingsError, match=re.escape(expected)):
        load_settings(env)


def test_the_download_settings_are_the_workers() -> None:
    env = {"DOWNLOAD_CONNECTIONS": "3", "DOWNLOAD_TOKENS": "example.org=tok-123456", "PROVISION_LOCK_TIMEOUT": "30"}
    downloads = Settings.from_env(env).downloads
    assert (downloads.connections, downloads.lock_timeout_s) == (3, 30.0)
    assert downloads.host_tokens == {"example.org": "tok-123456"}
    assert "tok-123456" not in repr(Settings.from_env(env))


def test_model_cache_dir_is_made_at_start(tmp_path: Path) -> None:
    settings = load_settings({"MODEL_CACHE_DIR": str(tmp_path / "a" / "cache")})
    assert settings.model_cache_dir is not None and settings.model_cache_dir.is_dir()
    assert list(settings.model_cache_dir.iterdir()) == [], "the write test leaves nothing behind"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SettingsError, match=r"MODEL_CACHE_DIR=.*file' is not a folder the worker can write to"):
        load_settings({"MODEL_CACHE_DIR": str(tmp_path / "file")})


@pytest.mark.parametrize("value", ["DEBUG", "info", "WARNING", "warn", "ERROR", "CRITICAL", " Warning "])
def test_every_log_level_is_one_the_runpod_sdk_takes(value: str) -> None:
    """LOG_LEVEL=WARNING was handed on as RUNPOD_LOG_LEVEL, which the SDK's logger refuses at import."""
    from runpod.serverless.modules.rp_logger import _validate_log_level

    settings = Settings.from_env({"LOG_LEVEL": value})
    assert settings.log_level in LOG_LEVELS
    assert _validate_log_level(settings.runpod_log_level) == settings.runpod_log_level
    assert logging.getLevelName(settings.log_level) != f"Level {settings.log_level}"  # logging knows it too


def test_runpod_log_level_in_loggings_names_is_understood() -> None:
    from runpod.serverless.modules.rp_logger import _validate_log_level

    for value, expected in (("WARNING", "WARN"), ("critical", "ERROR"), ("TRACE", "TRACE"), ("", "INFO")):
        settings = Settings.from_env({"RUNPOD_LOG_LEVEL": value})
        assert settings.runpod_log_level == _validate_log_level(expected)
    assert set(LOG_LEVEL_ALIASES.values()) <= set(LOG_LEVELS)
