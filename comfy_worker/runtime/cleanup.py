"""Remove a job's files once its result is built, so a long-lived worker's disk does not fill up.

Only what is provably this job's is touched: the images it uploaded (exact paths), the job's own output
folder (every ``filename_prefix`` in the workflow is moved under ``jobs/<id>/``, which also keeps a cached
resubmission from pointing at a file a previous job's cleanup removed), and the temp files its history
lists. Another job's files, and files custom nodes write outside those places, are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOBS_FOLDER = "jobs"


def job_folder(prompt_id: str) -> str:
    return f"{JOBS_FOLDER}/{prompt_id}"


def isolate_outputs(workflow: dict[str, Any], folder: str) -> None:
    """Prefix every string ``filename_prefix`` input with the job's folder (ComfyUI makes the subfolders)."""
    for node in workflow.values():
        inputs = node.get("inputs", {})
        prefix = inputs.get("filename_prefix")
        if isinstance(prefix, str):
            inputs["filename_prefix"] = f"{folder}/{prefix.lstrip('/')}"


def _inside(root: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve()) and path.resolve() != root.resolve()


def remove_job_files(
    folders: dict[str, Path], folder: str, uploaded: list[str], temp_files: list[tuple[str, str]]
) -> None:
    """Best effort: a file that cannot be removed is logged, never fails the job."""
    output, inputs, temp = folders.get("output"), folders.get("input"), folders.get("temp")
    if output is not None and _inside(output, output / folder):
        shutil.rmtree(output / folder, ignore_errors=True)
    if inputs is not None:
        for name in uploaded:
            path = inputs / name
            if _inside(inputs, path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                _prune_empty_parents(inputs, path.parent)
    if temp is not None:
        for subfolder, filename in temp_files:
            path = temp / subfolder / filename
            if _inside(temp, path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _prune_empty_parents(root: Path, folder: Path) -> None:
    while _inside(root, folder):
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            return
        folder = folder.parent
