"""S3 delivery against a real S3-compatible server (s3rver) on loopback: uploads, presigned URLs fetched
back byte for byte, key templates, multipart, bad credentials, expiry, a server that dies mid-upload, and
the worker's delivery modes end to end.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from PIL import Image

from comfy_worker.errors import InputError, StorageError
from comfy_worker.runtime.fetch import Fetcher
from comfy_worker.settings import S3Settings, Settings, SettingsError
from comfy_worker.storage import S3Storage, Upload, render_key, sanitize_prefix

from .s3_server import ACCESS_KEY, SECRET_KEY, S3Server, run_s3rver
from .worker_process import REPO, TIMEOUT_MARGIN_S, ComfyBackend, serve_api


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with run_s3rver(tmp_path / "s3") as server:
        yield server


def storage_for(server: S3Server, **changes: object) -> S3Storage:
    settings = Settings.from_env(server.env()).s3
    assert settings is not None
    fields = {**settings.__dict__, **changes}
    return S3Storage(S3Settings(**fields))  # type: ignore[arg-type]


def client_for(server: S3Server) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def listed_keys(server: S3Server) -> dict[str, int]:
    contents = client_for(server).list_objects_v2(Bucket=server.bucket).get("Contents", [])
    return {o["Key"]: o["Size"] for o in contents}


def test_upload_and_fetch_back_through_presigned_urls(s3: S3Server) -> None:
    storage = storage_for(s3)
    items = [Upload(f"job-1/out_{i}.png", os.urandom(1000 + i), "image/png") for i in range(3)]
    urls = storage.upload_many(items)
    for item, url in zip(items, urls, strict=True):
        assert "X-Amz-Signature=" in url and url.startswith(s3.endpoint_url)
        response = requests.get(url, timeout=10)
        assert response.status_code == 200
        assert response.content == item.source
        assert response.headers["Content-Type"] == "image/png"


def test_key_templates_and_prefixes(s3: S3Server) -> None:
    assert sanitize_prefix("../../etc//x y/./z") == "etc/x-y/z"
    assert render_key("{job_id}/{node_id}_{filename}", "team a/..", job_id="j1", filename="a.png", node_id="9") == (
        "team-a/j1/9_a.png"
    )
    storage = storage_for(s3, public_url="https://cdn.example.test/outputs")
    [url] = storage.upload_many([Upload("k/plain.txt", b"hi", "text/plain")])
    assert url == "https://cdn.example.test/outputs/k/plain.txt"
    assert listed_keys(s3) == {"k/plain.txt": 2}


def test_large_file_goes_multipart_from_disk(s3: S3Server, tmp_path: Path) -> None:
    """An output file is uploaded in parts read from the file (never whole in memory), bit for bit."""
    path = tmp_path / "blob.bin"
    with path.open("wb") as sink:
        for _ in range(25):
            sink.write(os.urandom(4 * 1024 * 1024))
    storage = storage_for(s3)
    parts: list[int] = []
    storage.client.meta.events.register("before-call.s3.UploadPart", lambda **kwargs: parts.append(1))
    [url] = storage.upload_many([Upload("big/blob.bin", path, "application/octet-stream")])
    assert listed_keys(s3)["big/blob.bin"] == path.stat().st_size
    assert len(parts) == 7, "100 MB in 16 MB parts"
    with requests.get(url, timeout=60, stream=True) as response:
        fetched = hashlib.sha256()
        for chunk in response.iter_content(1024 * 1024):
            fetched.update(chunk)
    assert fetched.digest() == hashlib.sha256(path.read_bytes()).digest()


def test_wrong_credentials_are_a_storage_error(s3: S3Server) -> None:
    # s3rver checks the access key id (it does not verify SigV4 signatures themselves)
    storage = storage_for(s3, access_key_id="NOT-A-KEY", secret_access_key="not-the-secret")
    with pytest.raises(StorageError) as info:
        storage.upload_many([Upload("x.png", b"x", "image/png")])
    assert "InvalidAccessKeyId" in info.value.message
    assert info.value.details["bucket"] == s3.bucket
    assert "not-the-secret" not in info.value.message and "not-the-secret" not in json.dumps(info.value.details)


def test_presigned_urls_expire(s3: S3Server) -> None:
    storage = storage_for(s3, presign_expiry_s=1)
    [url] = storage.upload_many([Upload("short.txt", b"soon gone", "text/plain")])
    assert requests.get(url, timeout=10).status_code == 200
    time.sleep(2.2)
    assert requests.get(url, timeout=10).status_code == 403


def test_server_dying_mid_upload_is_a_storage_error(tmp_path: Path) -> None:
    with run_s3rver(tmp_path / "s3") as server:
        storage = storage_for(server)
        threading.Timer(0.3, server.process.kill).start()
        started = time.monotonic()
        with pytest.raises(StorageError, match="failed"):
            storage.upload_many(
                [Upload(f"dying/{i}.bin", os.urandom(40 * 1024 * 1024), "application/octet-stream") for i in range(3)]
            )
        assert time.monotonic() - started < 60


def test_s3_settings_from_the_environment() -> None:
    assert Settings.from_env({}).s3 is None
    aws = Settings.from_env(
        {
            "BUCKET_ENDPOINT_URL": "https://my-bucket.s3.eu-west-1.amazonaws.com",
            "BUCKET_ACCESS_KEY_ID": "AKIA",
            "BUCKET_SECRET_ACCESS_KEY": "secret",
        }
    ).s3
    assert aws is not None and (aws.bucket, aws.region, aws.endpoint_url) == ("my-bucket", "eu-west-1", None)
    assert "secret" not in repr(aws)
    with pytest.raises(SettingsError, match="BUCKET_SECRET_ACCESS_KEY"):
        Settings.from_env({"BUCKET_NAME": "b", "BUCKET_ACCESS_KEY_ID": "k"})
    with pytest.raises(SettingsError, match="BUCKET_NAME is required"):
        Settings.from_env({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9000", "BUCKET_ACCESS_KEY_ID": "k"})
    with pytest.raises(SettingsError, match="unknown field 'date'"):
        Settings.from_env(
            {
                "BUCKET_NAME": "b",
                "BUCKET_ACCESS_KEY_ID": "k",
                "BUCKET_SECRET_ACCESS_KEY": "s",
                "S3_KEY_TEMPLATE": "{date}/{filename}",
            }
        )
    with pytest.raises(SettingsError, match="7 days"):
        Settings.from_env(
            {
                "BUCKET_NAME": "b",
                "BUCKET_ACCESS_KEY_ID": "k",
                "BUCKET_SECRET_ACCESS_KEY": "s",
                "S3_URL_EXPIRY": "999999",
            }
        )


def s3_fetcher(env: dict[str, str]) -> Fetcher:
    settings = Settings.from_env(env).s3
    assert settings is not None
    return Fetcher((), 10**6, 10, S3Storage(settings))


def test_s3_inputs_are_read_only_where_the_operator_allows(s3: S3Server) -> None:
    client = client_for(s3)
    client.create_bucket(Bucket="private")
    client.put_object(Bucket="private", Key="tenantA/secret.png", Body=b"tenant A's secret")
    client.put_object(Bucket=s3.bucket, Key="job-2/out.png", Body=b"another job's output")
    client.put_object(Bucket=s3.bucket, Key="inputs/cat.png", Body=b"an input")
    fetcher = s3_fetcher(s3.env())  # by default: the output bucket's inputs/ folder, where no output goes
    assert fetcher.fetch(f"s3://{s3.bucket}/inputs/cat.png", "images[0].url") == b"an input"
    messages = set()
    for url in (
        "s3://private/tenantA/secret.png",  # another bucket the credentials reach
        f"s3://{s3.bucket}/job-2/out.png",  # another job's output
        "s3://nonexistent/x.png",  # no such bucket
        f"s3://{s3.bucket}/inputs/missing.png",  # no such key
        f"s3://{s3.bucket}/inputs/../job-2/out.png",  # a key an HTTP client or a server may resolve elsewhere
        f"s3://{s3.bucket}/inputs//cat.png",
    ):
        with pytest.raises(InputError) as refused:
            fetcher.fetch(url, "images[0].url")
        messages.add(refused.value.message.replace(url, "<url>"))
    assert len(messages) == 1, messages  # forbidden, missing or no bucket: one message, nothing about existence
    [message] = messages
    assert f"s3://{s3.bucket}/inputs/" in message and "INPUT_S3_ALLOWLIST" in message, message
    allowing = s3_fetcher(s3.env(INPUT_S3_ALLOWLIST="private/tenantA"))
    assert allowing.fetch("s3://private/tenantA/secret.png", "f") == b"tenant A's secret"
    with pytest.raises(InputError, match="cannot be read"):  # the allowlist replaces the default
        allowing.fetch(f"s3://{s3.bucket}/inputs/cat.png", "f")


def test_the_s3_input_allowlist_is_parsed() -> None:
    base = {"BUCKET_NAME": "outputs", "BUCKET_ACCESS_KEY_ID": "k", "BUCKET_SECRET_ACCESS_KEY": "s"}
    assert S3Storage(S3Settings("outputs", "k")).readable("outputs", "inputs/a.png") is False  # nothing listed
    default = Settings.from_env(base).s3
    assert default is not None and default.readable == (("outputs", "inputs/"),)
    listed = Settings.from_env({**base, "INPUT_S3_ALLOWLIST": "s3://uploads/team/a/, media, outputs/in"}).s3
    assert listed is not None and listed.readable == (("uploads", "team/a/"), ("media", ""), ("outputs", "in/"))
    storage = S3Storage(listed)
    assert storage.readable("outputs", "in/x.png") and not storage.readable("outputs", "inputs/x.png")
    assert storage.readable("media", "any/key.png") and not storage.readable("media", "a/./b.png")
    for wrong in ("/prefix", "bucket/../other", "bucket/a//b"):
        with pytest.raises(SettingsError, match="INPUT_S3_ALLOWLIST: item 1"):
            Settings.from_env({**base, "INPUT_S3_ALLOWLIST": wrong})


def test_an_s3_read_ends_at_the_jobs_deadline() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connections queue up; nothing ever answers
        env = {
            "BUCKET_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "BUCKET_NAME": "outputs",
            "BUCKET_ACCESS_KEY_ID": "k",
            "BUCKET_SECRET_ACCESS_KEY": "s",
        }
        settings = Settings.from_env(env).s3
        assert settings is not None
        fetcher = Fetcher((), 10**6, 60, S3Storage(settings))
        started = time.monotonic()
        with pytest.raises(InputError, match="did not arrive within INPUT_URL_TIMEOUT"):
            fetcher.fetch("s3://outputs/inputs/x.png", "images[0].url", deadline=time.monotonic() + 1)
        assert time.monotonic() - started < 1 + TIMEOUT_MARGIN_S, "botocore's own timeouts and retries outlast it"


GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 0x00FF00}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "s3job"}},
}


def test_worker_delivers_through_s3(s3: S3Server, tmp_path: Path) -> None:
    with serve_api(
        ComfyBackend.standin(), tmp_path / "w", **s3.env(S3_KEY_TEMPLATE="{job_id}/{node_id}/{filename}")
    ) as worker:
        body = worker.runsync({"workflow": GRAPH, "output": {"s3_prefix": "tenant-7", "format": "webp"}})
        assert body["status"] == "COMPLETED", body
        images = body["output"]["images"]
        assert [i["type"] for i in images] == ["s3_url", "s3_url"]
        for image in images:
            response = requests.get(image["data"], timeout=10)
            assert response.status_code == 200 and response.headers["Content-Type"] == "image/webp"
            with Image.open(io.BytesIO(response.content)) as picture:
                assert picture.format == "WEBP" and picture.size == (32, 32)
            assert len(response.content) == image["size_bytes"]
        keys = listed_keys(s3)
        assert all(key.startswith(f"tenant-7/{body['id']}/2/s3job_") and key.endswith(".webp") for key in keys), keys
        forced = worker.runsync({"workflow": GRAPH, "output": {"delivery": "base64"}})
        assert [i["type"] for i in forced["output"]["images"]] == ["base64", "base64"]
        assert SECRET_KEY * 2 not in worker.log()


def test_failing_bucket_falls_back_to_base64(s3: S3Server, tmp_path: Path) -> None:
    env = s3.env(BUCKET_ACCESS_KEY_ID="UNKNOWN-KEY", BUCKET_SECRET_ACCESS_KEY="wrong-secret-value")
    with serve_api(ComfyBackend.standin(), tmp_path / "w", **env) as worker:
        body = worker.runsync({"workflow": GRAPH})
    assert body["status"] == "COMPLETED", body
    output = body["output"]
    assert [i["type"] for i in output["images"]] == ["base64", "base64"]
    assert Image.open(io.BytesIO(base64.b64decode(output["images"][0]["data"]))).size == (32, 32)
    assert any("S3 upload failed, outputs returned as base64" in w for w in output["warnings"])
    assert "wrong-secret-value" not in json.dumps(body) and "wrong-secret-value" not in worker.log()


def test_s3_delivery_without_a_bucket_is_refused(tmp_path: Path) -> None:
    with serve_api(ComfyBackend.standin(), tmp_path) as worker:
        body = worker.runsync({"workflow": GRAPH, "output": {"delivery": "s3"}})
    assert body["status"] == "FAILED"
    error = json.loads(body["error"])
    assert error["error_type"] == "validation" and "has no bucket" in error["message"]


def test_s3_upload_cli(s3: S3Server, tmp_path: Path) -> None:
    sample = tmp_path / "check.png"
    sample.write_bytes(b"\x89PNG fake")
    env = {**os.environ, **s3.env()}
    done = subprocess.run(
        [sys.executable, str(REPO / "s3_upload.py"), str(sample), "--key-prefix", "ci"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    key, url = done.stderr.strip().split(" -> ")
    assert key == "ci/s3-upload-check/check.png"
    assert requests.get(url, timeout=10).content == b"\x89PNG fake"
    missing = subprocess.run(
        [sys.executable, str(REPO / "s3_upload.py"), str(sample)],
        env={k: v for k, v in env.items() if not k.startswith("BUCKET_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2 and "no bucket configured" in missing.stderr
