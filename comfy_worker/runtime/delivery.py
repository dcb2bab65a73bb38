"""How outputs leave the worker: base64 inside the result, or URLs to an S3-compatible bucket.

RunPod refuses results over its payload limit (about 20 MB for ``/runsync``, 10 MB for ``/run``) with an
opaque error, and base64 adds a third, so the worker measures the result first, from the files' sizes before
any byte is read: too large and no bucket means a clear error listing every output's size and what to do; a
failing bucket falls back to base64 when that fits. Uploads read the files from disk in parts; base64 is made
one output at a time, straight into the result.
"""

from __future__ import annotations

import logging
from typing import Any

from comfy_worker.errors import ResultTooLargeError, StorageError
from comfy_worker.runtime.outputs import Payload, base64_entry, entry
from comfy_worker.storage import S3Storage, Upload, render_key

log = logging.getLogger(__name__)

ENTRY_OVERHEAD = 512  # JSON keys and names around each output's data
MB = 1024 * 1024

Delivered = list[tuple[Payload, dict[str, Any]]]


def base64_bytes(payloads: list[Payload]) -> int:
    return sum(p.base64_size + ENTRY_OVERHEAD for p in payloads)


def _sizes(payloads: list[Payload]) -> list[dict[str, Any]]:
    return [{"node_id": p.file.node_id, "filename": p.filename, "size_mb": round(p.size / MB, 2)} for p in payloads]


def as_base64(payloads: list[Payload], max_result_bytes: int) -> Delivered:
    total = base64_bytes(payloads)
    if total > max_result_bytes:
        listed = "; ".join(f"node {s['node_id']} {s['filename']} {s['size_mb']} MB" for s in _sizes(payloads))
        raise ResultTooLargeError(
            f"The outputs are {total / MB:.1f} MB as base64, over this worker's result limit of "
            f"{max_result_bytes / MB:g} MB (MAX_RESULT_MB; RunPod refuses larger results: about 20 MB for /runsync "
            f"and 10 MB for /run). Outputs: {listed}. Configure an S3 bucket (BUCKET_ENDPOINT_URL, BUCKET_NAME, "
            "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY) to get URLs instead, or ask for smaller files with "
            "output.format 'webp' or 'jpeg'.",
            {"base64_mb": round(total / MB, 2), "limit_mb": max_result_bytes / MB, "outputs": _sizes(payloads)},
        )
    return [(p, base64_entry(p)) for p in payloads]


def deliver(
    payloads: list[Payload],
    mode: str,
    storage: S3Storage | None,
    max_result_bytes: int,
    key_fields: dict[str, str],
    prefix: str | None,
) -> tuple[Delivered, list[str]]:
    """The outputs as result entries, and warnings. ``mode``: base64, s3, or auto (s3 when configured)."""
    if storage is None or mode == "base64" or not payloads:
        return as_base64(payloads, max_result_bytes), []
    template = storage.settings.key_template
    uploads = [
        Upload(
            render_key(template, prefix, filename=p.filename, node_id=p.file.node_id, **key_fields), p.path, p.mime_type
        )
        for p in payloads
    ]
    try:
        urls = storage.upload_many(uploads)
    except StorageError as exc:
        total = base64_bytes(payloads)
        if total > max_result_bytes:
            raise StorageError(
                f"{exc.message}; the outputs are too large to return as base64 instead "
                f"({total / MB:.1f} MB, MAX_RESULT_MB={max_result_bytes / MB:g}).",
                exc.details | {"outputs": _sizes(payloads)},
            ) from exc
        log.warning("S3 upload failed, returning base64 instead: %s", exc.message)
        return as_base64(payloads, max_result_bytes), [f"S3 upload failed, outputs returned as base64: {exc.message}"]
    return [(p, entry(p, "s3_url", url)) for p, url in zip(payloads, urls, strict=True)], []
