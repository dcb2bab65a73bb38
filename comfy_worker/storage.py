"""S3-compatible storage for outputs: AWS S3, Cloudflare R2, MinIO, a RunPod network volume's S3 API.

One interface (``upload_many``) behind which boto3 does the work: multipart for big files (its transfer
manager, which reads a file on disk one part at a time, so memory does not grow with the files), retries with
backoff on transient errors (botocore's standard retry mode), several files in parallel. URLs are presigned GET
URLs, or plain ones under ``BUCKET_PUBLIC_URL`` for a public bucket. Credentials come from
the settings and are never logged or returned.

Jobs read ``s3://`` inputs with the same credentials, which may reach much more than a job should see (other
buckets, other jobs' outputs): ``readable`` allows only the locations of INPUT_S3_ALLOWLIST (by default the
bucket's ``inputs/`` folder), and the read itself is a presigned GET that the fetcher runs under the job's
deadline (``runtime.fetch``), so no botocore timeout or retry outlasts the job.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from comfy_worker.errors import StorageError
from comfy_worker.settings import S3Settings

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 16 * 1024 * 1024
MAX_PARALLEL_UPLOADS = 8
PARTS_IN_FLIGHT = 2  # per file: with MAX_PARALLEL_UPLOADS files, at most 16 connections, each part read lazily
_SAFE_KEY_PART = re.compile(r"[^A-Za-z0-9._/-]+")
READ_URL_EXPIRY_S = 300  # a presigned GET for one input: used at once


@dataclass(frozen=True)
class Upload:
    """One object to upload: a file on disk (read one part at a time) or bytes already in memory."""

    key: str
    source: Path | bytes
    content_type: str


def sanitize_prefix(prefix: str) -> str:
    """A per-request key prefix made safe: no traversal, no odd characters, no leading slash."""
    parts = [_SAFE_KEY_PART.sub("-", part) for part in prefix.split("/")]
    return "/".join(part for part in parts if part not in ("", ".", ".."))[:200]


def render_key(template: str, prefix: str | None, **fields: str) -> str:
    key = template.format(**fields).lstrip("/")
    clean = sanitize_prefix(prefix) if prefix else ""
    return f"{clean}/{key}" if clean else key


def s3_client(
    *,
    endpoint_url: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    parallel: int = 10,
    read_timeout_s: float = 60,
) -> Any:
    """The one boto3 S3 client, for the worker's output bucket and for model sync to a network volume.

    Both want the same things: SigV4 (R2, MinIO and RunPod's S3 API require it), botocore's standard retries
    with backoff, path-style addressing for custom endpoints (they do not serve bucket subdomains) and a
    connection timeout. What differs is a parameter: how many connections run in parallel (model sync sends
    parts in parallel) and how long one read may take (a 64 MB part on a slow uplink).
    """
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        region_name=region,
        config=botocore.config.Config(
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": 5},
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            connect_timeout=10,
            read_timeout=read_timeout_s,
            max_pool_connections=parallel,
        ),
    )


class S3Storage:
    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.client: Any = s3_client(
            endpoint_url=settings.endpoint_url,
            region=settings.region,
            access_key_id=settings.access_key_id,
            secret_access_key=settings.secret_access_key,
            parallel=MAX_PARALLEL_UPLOADS * PARTS_IN_FLIGHT,
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_THRESHOLD,
            max_concurrency=PARTS_IN_FLIGHT,
            use_threads=True,
        )

    def url_for(self, key: str) -> str:
        if self.settings.public_url:
            return f"{self.settings.public_url.rstrip('/')}/{key}"
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.settings.bucket, "Key": key},
            ExpiresIn=self.settings.presign_expiry_s,
        )
        return url

    def upload(self, item: Upload) -> str:
        try:
            extra = {"ContentType": item.content_type}
            if isinstance(item.source, Path):
                self.client.upload_file(
                    str(item.source), self.settings.bucket, item.key, ExtraArgs=extra, Config=self._transfer
                )
            else:
                self.client.upload_fileobj(
                    io.BytesIO(item.source), self.settings.bucket, item.key, ExtraArgs=extra, Config=self._transfer
                )
        except (  # upload_file wraps a refused upload in boto3's S3UploadFailedError
            boto3.exceptions.Boto3Error,
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
            OSError,
        ) as exc:
            raise StorageError(
                f"Uploading {item.key} to bucket {self.settings.bucket} failed: {exc}",
                {"key": item.key, "bucket": self.settings.bucket, "endpoint_url": self.settings.endpoint_url},
            ) from exc
        return self.url_for(item.key)

    def readable(self, bucket: str, key: str) -> bool:
        """Whether a job may read ``s3://bucket/key``: under an allowed location, and a plain key (no empty,
        '.' or '..' segment that an HTTP client or an S3-compatible server could resolve to another key)."""
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") for part in parts) or any(ord(c) < 32 for c in key):
            return False
        return any(bucket == name and key.startswith(prefix) for name, prefix in self.settings.readable)

    def readable_locations(self) -> list[str]:
        return [f"s3://{name}/{prefix}" for name, prefix in self.settings.readable]

    def presigned_get(self, bucket: str, key: str) -> str:
        """A short-lived GET URL for one object (computed locally: no request is made)."""
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=READ_URL_EXPIRY_S
        )
        return url

    def upload_many(self, items: list[Upload]) -> list[str]:
        """Upload in parallel; the first failure is raised once the others have finished."""
        if len(items) <= 1:
            return [self.upload(item) for item in items]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_UPLOADS, len(items))) as pool:
            return list(pool.map(self.upload, items))
