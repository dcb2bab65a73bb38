"""Secrets from the environment never reach a job result or the worker's log, ComfyUI's lines included."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import sys
from pathlib import Path

import pytest

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.errors import ComfyUnavailableError, InputError
from comfy_worker.redact import RedactingFilter, RedactingStream, Redactor, redact_url, redact_urls, secrets_from_env
from comfy_worker.runtime.app import build_worker
from comfy_worker.runtime.fetch import Fetcher

from .worker_process import ComfyBackend, close_worker, free_port, serve_api, worker_settings

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


QUOTED_SECRET = 'q"uo\\te-Secret9'  # JSON and repr escape it: masking the encoded text would miss it


def test_the_whole_result_is_masked_successes_included(tmp_path: Path) -> None:
    with serve_api(ComfyBackend.standin(), tmp_path, HF_TOKEN=HF_TOKEN, QUOTED_API_KEY=QUOTED_SECRET) as worker:
        workflow = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"out_{HF_TOKEN}"}},
            # an invalid branch: ComfyUI runs the valid one and names the bad value, which the worker warns about
            "3": {"class_type": "LoadImage", "inputs": {"image": f"{HF_TOKEN}.png"}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "skipped"}},
        }
        done = worker.runsync({"workflow": workflow})
        failing = {"1": {"class_type": "StandinFail", "inputs": {"message": f"bad key {QUOTED_SECRET}"}}}
        failed = worker.runsync({"workflow": failing})
        log = worker.log()
    assert done["status"] == "COMPLETED", done
    output = done["output"]
    assert output["images"][0]["filename"].startswith("out_***_"), output["images"][0]
    assert any("***" in warning for warning in output["warnings"]), output["warnings"]
    assert HF_TOKEN not in json.dumps(done)
    error = json.loads(failed["error"])
    assert "bad key ***" in error["message"], error["message"]
    for text in (failed["error"], json.dumps(failed), log):
        assert QUOTED_SECRET not in text and json.dumps(QUOTED_SECRET)[1:-1] not in text
    assert HF_TOKEN not in log


def test_tracebacks_in_the_log_are_masked() -> None:
    try:
        raise RuntimeError(f"failed with {HF_TOKEN} at https://u:pw@h.io/x?sig=abc")
    except RuntimeError:
        record = logging.LogRecord("comfy_worker", logging.ERROR, __file__, 1, "unexpected", None, sys.exc_info())
    RedactingFilter(Redactor([HF_TOKEN])).filter(record)
    text = logging.Formatter().format(record)
    assert "RuntimeError: failed with *** at https://***@h.io/x?sig=***" in text
    assert HF_TOKEN not in text and "pw@" not in text


def test_printed_lines_are_masked() -> None:
    buffer = io.StringIO()
    stream = RedactingStream(buffer, Redactor([QUOTED_SECRET]))
    stream.write(json.dumps({"output": f"x {QUOTED_SECRET}"}) + "\n")  # how the runpod SDK prints its lines
    stream.flush()
    assert buffer.getvalue() == '{"output": "x ***"}\n'


def test_comfyui_credentials_and_url_signatures_stay_out_of_errors() -> None:
    port = free_port()
    client = ComfyClient(f"http://admin:pw-Secret77@127.0.0.1:{port}", client_id="c")
    with pytest.raises(ComfyUnavailableError) as info:
        client.queue()
    assert "pw-Secret77" not in json.dumps(info.value.to_dict()), info.value.message
    fetcher = Fetcher((ipaddress.ip_network("127.0.0.1/32"),), 1000, 5, None)
    with pytest.raises(InputError) as refused:
        fetcher.fetch(f"http://127.0.0.1:{port}/in.png?X-Amz-Signature=sig-Secret88&x=1", "images[0].url")
    assert "sig-Secret88" not in json.dumps(refused.value.to_dict()), refused.value.message


def test_comfyui_gets_no_worker_secrets(tmp_path: Path) -> None:
    settings = worker_settings(
        ComfyBackend.standin(),
        tmp_path,
        free_port(),
        HF_TOKEN=HF_TOKEN,
        BUCKET_SECRET_ACCESS_KEY=S3_SECRET,
        SOME_SERVICE_PASSWORD="service-pw-123",
        COMFYUI_PASS_ENV="SOME_SERVICE_PASSWORD",
    )
    worker = build_worker(settings)
    try:
        assert worker.supervisor is not None and worker.supervisor.process is not None
        environ = Path(f"/proc/{worker.supervisor.process.pid}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
        assert "PATH" in names
        assert not names & {"HF_TOKEN", "BUCKET_SECRET_ACCESS_KEY"}, names
        assert "SOME_SERVICE_PASSWORD" in names, "COMFYUI_PASS_ENV passes what it names"
    finally:
        close_worker(worker)


JOB_SECRET = "jobkey_SECRETVALUE_9876"  # a job's comfy_org_api_key, not shaped like a Comfy.org key


def test_a_jobs_own_key_is_masked_in_the_log_while_it_runs(tmp_path: Path) -> None:
    """The result was masked, but the worker's WARNING read ``Invalid image file: jobkey_SECRETVALUE_9876.png``,
    and ComfyUI's own line kept it in the log tail that a later job's error carries."""
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": f"{JOB_SECRET}.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    with serve_api(ComfyBackend.standin(), tmp_path, LOG_LEVEL="DEBUG") as worker:
        failed = worker.runsync({"workflow": workflow, "comfy_org_api_key": JOB_SECRET})
        later = worker.runsync({"workflow": {"1": {"class_type": "StandinFail", "inputs": {"message": "later"}}}})
        log = worker.log()
    assert failed["status"] == "FAILED" and later["status"] == "FAILED", (failed, later)
    assert JOB_SECRET not in json.dumps(failed) + json.dumps(later)
    warning = [line for line in log.splitlines() if "WARNING comfy_worker" in line and "workflow_validation" in line]
    assert warning and "Invalid image file: ***.png" in warning[0], warning
    comfy_lines = [line for line in log.splitlines() if "comfyui:" in line and "Invalid image file" in line]
    assert comfy_lines and all("Invalid image file: ***.png" in line for line in comfy_lines), comfy_lines
    tail = json.loads(str(later["error"]))["diagnostics"]["comfyui_log_tail"]
    assert any("Invalid image file: ***.png" in line for line in tail), tail
    assert JOB_SECRET not in log


def test_a_held_secret_is_masked_until_it_is_released() -> None:
    redact = Redactor([HF_TOKEN])
    secrets: list[str] = []
    release = redact.hold(secrets)
    secrets.append(JOB_SECRET)  # the job's key is known once its input is parsed
    assert redact(f"{JOB_SECRET} {HF_TOKEN} {json.dumps(JOB_SECRET)}") == '*** *** "***"'
    release()
    assert redact(f"{JOB_SECRET} {HF_TOKEN}") == f"{JOB_SECRET} ***", "another job's lines are not blanked"
    assert redact.hold(["short"]) and redact("short") == "short"  # too short to mask without blanking words
