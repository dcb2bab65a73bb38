"""Secrets from the environment never reach a job result or the worker's log, ComfyUI's lines included."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from comfy_worker.redact import RedactingFilter, Redactor, redact_url, redact_urls, secrets_from_env

from .worker_process import ComfyBackend, serve_api

HF_TOKEN = "hf_TestSecretValue0123456789"
S3_SECRET = "s3-secret-Zq81kLmN0pQr"


def test_secret_values_are_found_by_variable_name() -> None:
    env = {
        "HF_TOKEN": HF_TOKEN,
        "BUCKET_SECRET_ACCESS_KEY": S3_SECRET,
        "CIVITAI_API_KEY": "civitai-abcdef",
        "JUPYTER_PASSWORD": "short",  # too short to mask safely
        "COMFY_API_URL": "http://127.0.0.1:8188",
    }
    assert set(secrets_from_env(env)) == {HF_TOKEN, S3_SECRET, "civitai-abcdef"}
    redact = Redactor(secrets_from_env(env))
    assert redact(f"GET https://hf.co/x?token={HF_TOKEN} and {S3_SECRET}") == "GET https://hf.co/x?token=*** and ***"


def test_log_filter_masks_formatted_messages() -> None:
    record = logging.LogRecord("comfyui", logging.INFO, __file__, 1, "using %s", (HF_TOKEN,), None)
    assert RedactingFilter(Redactor([HF_TOKEN])).filter(record)
    assert record.getMessage() == "using ***"


def test_secrets_printed_by_comfyui_are_masked_end_to_end(tmp_path: Path) -> None:
    with serve_api(ComfyBackend.standin(), tmp_path, HF_TOKEN=HF_TOKEN, BUCKET_SECRET_ACCESS_KEY=S3_SECRET) as worker:
        failing = {
            "1": {"class_type": "StandinFail", "inputs": {"message": f"401 for token {HF_TOKEN} / {S3_SECRET}"}},
        }
        body = worker.runsync({"workflow": failing})
        assert body["status"] == "FAILED"
        error = json.loads(body["error"])
        assert error["error_type"] == "comfyui_execution"
        assert "401 for token *** / ***" in error["message"]
        texting = {
            "1": {
                "class_type": "StandinSaveFile",
                "inputs": {"filename_prefix": "t", "kind": "text", "extension": "txt", "content": f"key={HF_TOKEN}"},
            }
        }
        done = worker.runsync({"workflow": texting})
        assert done["output"]["text"] == [{"node_id": "1", "text": "key=***"}]
        log = worker.log()
    comfy_lines = [line for line in log.splitlines() if "comfyui:" in line and "401 for token" in line]
    assert comfy_lines and all("401 for token *** / ***" in line for line in comfy_lines), comfy_lines
    assert HF_TOKEN not in log and S3_SECRET not in log
    assert HF_TOKEN not in json.dumps(body) + json.dumps(done)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://u:pw@h.io/f?token=a&X-Amz-Signature=b&api_key=c&name=keep",
            "https://***@h.io/f?token=***&X-Amz-Signature=***&api_key=***&name=keep",
        ),
        ("https://ghp_abcdef123456@github.com/o/node.git", "https://***@github.com/o/node.git"),
        ("http://127.0.0.1:8188/prompt?client_id=x", "http://127.0.0.1:8188/prompt?client_id=x"),
        ("https://h.io/a%20b?x=1&y=%2F", "https://h.io/a%20b?x=1&y=%2F"),  # nothing to hide: unchanged
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_urls_in_text() -> None:
    text = "fatal: unable to access 'https://user:tok3n@git.example/n.git/': 403; see https://x.io/?sig=abc."
    assert (
        redact_urls(text) == "fatal: unable to access 'https://***@git.example/n.git/': 403; see https://x.io/?sig=***."
    )
