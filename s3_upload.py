"""Upload files to the worker's output bucket and print their URLs: a check of the S3 settings.

    BUCKET_NAME=... BUCKET_ACCESS_KEY_ID=... BUCKET_SECRET_ACCESS_KEY=... python s3_upload.py out.png [more...]

Uses exactly what jobs use (``comfy_worker.storage`` and the same environment variables, see docs/environment.md),
so a bucket that works here works for ``output.delivery``. Keys follow S3_KEY_TEMPLATE with job_id
``s3-upload-check`` unless ``--key-prefix`` is given.
"""

from __future__ import annotations

import argparse
import logging
import mimetypes
import sys
from pathlib import Path

from comfy_worker.errors import StorageError
from comfy_worker.settings import Settings, SettingsError
from comfy_worker.storage import S3Storage, Upload, render_key

log = logging.getLogger("s3_upload")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--key-prefix", help="prefix for the keys (like a job's output.s3_prefix)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = Settings.from_env().s3
    except SettingsError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    if settings is None:
        log.error("no bucket configured: set BUCKET_NAME (or BUCKET_ENDPOINT_URL) and the access keys")
        return 2
    storage = S3Storage(settings)
    uploads = []
    for path in args.files:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        key = render_key(
            settings.key_template,
            args.key_prefix,
            job_id="s3-upload-check",
            prompt_id="-",
            filename=path.name,
            node_id="-",
        )
        uploads.append(Upload(key, path, content_type))  # read from disk in parts
    try:
        urls = storage.upload_many(uploads)
    except StorageError as exc:
        log.error("%s", exc.message)
        return 1
    for upload, url in zip(uploads, urls, strict=True):
        log.info("%s -> %s", upload.key, url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
