"""Settings are read from a plain mapping; bad values stop the worker with the variable's name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.settings import Settings, SettingsError


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
