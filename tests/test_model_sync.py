"""``comfy-worker-model-sync`` against s3rver on loopback: the first sync uploads everything, a resync
sends nothing, a changed file goes up again, and an interrupted multipart upload resumes with only the parts
the server had not acknowledged.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from comfy_worker.tools import model_sync
from comfy_worker.tools.model_sync import MIB, Syncer, SyncError, SyncSettings, local_files, normalise_prefix

from .s3_server import ACCESS_KEY, SECRET_KEY, S3Server, run_s3rver
from .worker_process import REPO

VOLUME = "vol0abc123"


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with run_s3rver(tmp_path / "s3", bucket=VOLUME) as server:
        yield server


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    (root / "loras" / "sdxl").mkdir(parents=True)
    (root / "checkpoints" / "big.safetensors").write_bytes(os.urandom(12 * MIB + 123))  # 3 parts of 5 MiB
    (root / "loras" / "sdxl" / "style.safetensors").write_bytes(os.urandom(2000))
    (root / "vae.pt").write_bytes(b"vae weights")
    (root / ".DS_Store").write_bytes(b"finder junk")
    (root / ".cache").mkdir()
    (root / ".cache" / "partial.bin").write_bytes(b"skip me")
    return root


def settings(s3: S3Server, models: Path, tmp_path: Path, **changes: Any) -> SyncSettings:
    values: dict[str, Any] = {
        "local_dir": models,
        "endpoint_url": s3.endpoint_url,
        "bucket": s3.bucket,
        "region": "EU-RO-1",
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "part_size": 5 * MIB,
        "multipart_threshold": 5 * MIB,
        "workers": 2,
        "state_dir": tmp_path / "state",
    }
    return SyncSettings(**(values | changes))


class Calls:
    """Counts the S3 operations a ``Syncer`` makes, through botocore's own event hooks."""

    def __init__(self, syncer: Syncer, fail_after_parts: int | None = None) -> None:
        self.counts: dict[str, int] = {}
        self.fail_after_parts = fail_after_parts
        syncer.client.meta.events.register("before-call.s3", self._before)
        syncer.client.meta.events.register("after-call.s3.UploadPart", self._after_part)

    def _before(self, model: Any, **kwargs: Any) -> None:
        self.counts[model.name] = self.counts.get(model.name, 0) + 1

    def _after_part(self, **kwargs: Any) -> None:
        if self.fail_after_parts is not None and self.counts.get("UploadPart", 0) >= self.fail_after_parts:
            raise ConnectionAbortedError("simulated: the connection dropped")

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)


def objects(s3: S3Server) -> dict[str, bytes]:
    client = boto3.client(
        "s3", endpoint_url=s3.endpoint_url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
    )
    listed = client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read() for o in listed}


def expected(models: Path) -> dict[str, bytes]:
    return {
        "models/checkpoints/big.safetensors": (models / "checkpoints" / "big.safetensors").read_bytes(),
        "models/loras/sdxl/style.safetensors": (models / "loras" / "sdxl" / "style.safetensors").read_bytes(),
        "models/vae.pt": (models / "vae.pt").read_bytes(),
    }


def test_first_sync_uploads_everything_and_resync_is_a_no_op(s3: S3Server, models: Path, tmp_path: Path) -> None:
    syncer = Syncer(settings(s3, models, tmp_path))
    calls = Calls(syncer)
    report = syncer.run()
    assert sorted(report.uploaded) == sorted(expected(models)) and report.failed == []
    assert objects(s3) == expected(models)
    assert (calls["UploadPart"], calls["CreateMultipartUpload"], calls["PutObject"]) == (3, 1, 2)
    sha = hashlib.sha256(expected(models)["models/checkpoints/big.safetensors"]).hexdigest()
    head = syncer.client.head_object(Bucket=s3.bucket, Key="models/checkpoints/big.safetensors")
    assert head["Metadata"] == {"sha256": sha}

    again = Syncer(settings(s3, models, tmp_path))
    calls = Calls(again)
    report = again.run()
    assert report.uploaded == [] and sorted(report.unchanged) == sorted(expected(models))
    assert calls["PutObject"] == calls["UploadPart"] == calls["CreateMultipartUpload"] == 0


def test_a_changed_file_is_uploaded_again(s3: S3Server, models: Path, tmp_path: Path) -> None:
    Syncer(settings(s3, models, tmp_path)).run()
    vae = models / "vae.pt"
    vae.write_bytes(b"VAE WEIGHTS")  # same size: only the checksum tells
    os.utime(vae, ns=(vae.stat().st_atime_ns, vae.stat().st_mtime_ns + 5_000_000_000))
    (models / "loras" / "sdxl" / "style.safetensors").write_bytes(b"smaller now")
    syncer = Syncer(settings(s3, models, tmp_path))
    calls = Calls(syncer)
    report = syncer.run()
    assert sorted(report.uploaded) == ["models/loras/sdxl/style.safetensors", "models/vae.pt"]
    assert calls["PutObject"] == 2 and calls["UploadPart"] == 0
    assert objects(s3) == expected(models)


def test_the_hash_cache_spares_reading_unchanged_files(s3: S3Server, models: Path, tmp_path: Path) -> None:
    Syncer(settings(s3, models, tmp_path)).run()
    vae = models / "vae.pt"
    stat = vae.stat()
    vae.write_bytes(b"VAE WEIGHTS")  # same size, and the mtime put back: the cache cannot tell
    os.utime(vae, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    report = Syncer(settings(s3, models, tmp_path)).run()
    assert "models/vae.pt" in report.unchanged, "the cached hash was used: the file was not read again"
    (tmp_path / "state" / "hashes.json").unlink()
    report = Syncer(settings(s3, models, tmp_path)).run()
    assert report.uploaded == ["models/vae.pt"], "without the cache the file is hashed and found changed"


def test_interrupted_multipart_upload_resumes_with_the_missing_parts(
    s3: S3Server, models: Path, tmp_path: Path
) -> None:
    big = models / "checkpoints" / "big.safetensors"
    big.write_bytes(os.urandom(23 * MIB))  # 5 parts
    first = Syncer(settings(s3, models, tmp_path, workers=1))
    calls = Calls(first, fail_after_parts=3)
    report = first.run()
    assert report.failed == ["models/checkpoints/big.safetensors"]
    # the 3rd answer is lost; a 4th part may have started before the failure stopped the file (lost as well)
    assert calls["UploadPart"] in {3, 4} and calls["CompleteMultipartUpload"] == 0
    assert "models/checkpoints/big.safetensors" not in objects(s3)
    [journal_path] = (tmp_path / "state" / "uploads").iterdir()
    journal = model_sync.Journal.load(journal_path)
    assert journal is not None and sorted(journal.parts) == [1, 2]

    second = Syncer(settings(s3, models, tmp_path, workers=3))
    calls = Calls(second)
    report = second.run()
    # parts 1 and 2 were acknowledged and journaled; part 3 reached the server but its answer was lost
    assert calls["CreateMultipartUpload"] == 0, "the interrupted upload is continued, not restarted"
    assert calls["UploadPart"] == 3
    assert calls["CompleteMultipartUpload"] == 1
    assert report.uploaded == ["models/checkpoints/big.safetensors"]
    assert objects(s3)["models/checkpoints/big.safetensors"] == big.read_bytes()
    assert not list((tmp_path / "state" / "uploads").iterdir()), "the journal is removed once complete"


def test_a_file_changed_since_the_interruption_starts_over(s3: S3Server, models: Path, tmp_path: Path) -> None:
    big = models / "checkpoints" / "big.safetensors"
    first = Syncer(settings(s3, models, tmp_path, workers=1))
    Calls(first, fail_after_parts=1)
    first.run()
    big.write_bytes(os.urandom(11 * MIB))
    second = Syncer(settings(s3, models, tmp_path))
    calls = Calls(second)
    second.run()
    assert calls["CreateMultipartUpload"] == 1 and calls["UploadPart"] == 3
    assert objects(s3)["models/checkpoints/big.safetensors"] == big.read_bytes()


def test_cli_dry_run_then_sync(s3: S3Server, models: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")} | {
        "RUNPOD_S3_ACCESS_KEY": ACCESS_KEY,
        "RUNPOD_S3_SECRET_KEY": SECRET_KEY,
        "RUNPOD_VOLUME_ID": s3.bucket,
    }
    command = [sys.executable, "-m", "comfy_worker.tools.model_sync", str(models), "--endpoint-url", s3.endpoint_url]
    command += ["--part-size-mb", "5", "--state-dir", str(tmp_path / "state")]
    dry = subprocess.run([*command, "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert dry.returncode == 0, dry.stderr
    assert "would upload models/checkpoints/big.safetensors (12.0 MB, new)" in dry.stderr
    assert "would upload 3, unchanged 0" in dry.stderr
    assert objects(s3) == {}
    real = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert real.returncode == 0, real.stderr
    assert "checkpoints/big.safetensors: 3/3 parts (100%)" in real.stderr
    assert "uploaded 3, unchanged 0, unverified 0, failed 0" in real.stderr
    assert objects(s3) == expected(models)


def test_cli_wrong_credentials_fail_clearly(s3: S3Server, models: Path, tmp_path: Path) -> None:
    code = model_sync.main(
        [
            *(str(models), "--endpoint-url", s3.endpoint_url, "--volume", s3.bucket, "--state-dir", str(tmp_path)),
            *("--access-key", "NOT-A-KEY", "--secret-key", "nope"),
        ],
        env={},
    )
    assert code == 1


def test_settings_are_checked(models: Path) -> None:
    def parse(*args: str, env: dict[str, str] | None = None) -> model_sync.SyncSettings:
        parsed: argparse.Namespace = model_sync.build_parser().parse_args([str(models), *args])
        return model_sync.settings_from(parsed, env or {})

    with pytest.raises(SyncError, match=r"missing: --volume .*; --datacenter or --endpoint-url .*; --access-key"):
        parse()
    full = parse(
        "--datacenter",
        "EU-RO-1",
        env={"RUNPOD_VOLUME_ID": "v1", "RUNPOD_S3_ACCESS_KEY": "a", "RUNPOD_S3_SECRET_KEY": "s"},
    )
    assert (full.endpoint_url, full.region, full.bucket, full.prefix) == (
        "https://s3api-eu-ro-1.runpod.io",
        "EU-RO-1",
        "v1",
        "models/",
    )
    with pytest.raises(SyncError, match="is not a folder"):
        model_sync.settings_from(model_sync.build_parser().parse_args([str(models / "vae.pt")]), {})
    with pytest.raises(SyncError, match="at least 5"):
        parse(
            "--part-size-mb",
            "1",
            env={"RUNPOD_VOLUME_ID": "v", "RUNPOD_DATACENTER": "X"}
            | {
                "RUNPOD_S3_ACCESS_KEY": "a",
                "RUNPOD_S3_SECRET_KEY": "s",
            },
        )
    assert normalise_prefix("/models") == "models/" and normalise_prefix("") == ""
    with pytest.raises(SyncError, match=r"'\.\.'"):
        normalise_prefix("models/../etc")


def test_dangling_symlinks_and_symlink_loops_are_skipped_not_fatal(
    models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hugging Face cache folders hold symlinks into blobs/; a dangling one or a loop used to crash the sync."""
    (models / "loras" / "gone.safetensors").symlink_to(models / "nowhere.safetensors")
    (models / "loras" / "self.safetensors").symlink_to(models / "loras" / "self.safetensors")
    (models / "loras" / "sdxl" / "up").symlink_to(models / "loras")  # a folder loop
    (models / "linked.pt").symlink_to(models / "vae.pt")
    with caplog.at_level(logging.WARNING):
        files = local_files(models, "models/")
    keys = [f.key for f in files]
    assert sorted(keys) == sorted([*expected(models), "models/linked.pt"])
    assert "gone.safetensors" in caplog.text and "self.safetensors" in caplog.text
    assert "symlink loop" in caplog.text
