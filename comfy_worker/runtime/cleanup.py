"""Each job's files in a folder of its own, removed once its outputs are delivered (or it ended otherwise).

Jobs share one ComfyUI (the local API runs them concurrently) and a long-lived worker's disk fills up, so:

- **Inputs** are uploaded into the job's own input subfolder (``jobs/<id>/<name>``) and the workflow's
  references to each name (``"name"``, ``"name [input]"``) are pointed there. Two jobs uploading the same name
  never see each other's file, and a file already in ComfyUI's input folder is never replaced or removed.
- **Outputs**: every ``filename_prefix`` in the workflow is moved under ``jobs/<id>/`` of the output folder,
  which also keeps a cached resubmission from pointing at a file a previous job's cleanup removed. A prefix
  that would leave that folder (``..``, ``.``), or that is not a plain string (a link from another node, a
  number set by an override), is refused: the job could not be kept apart from others.
- **Cleanup** removes the job's input and output folders whole (a half-written upload included) and the temp
  files its history lists. Another job's files, and files custom nodes write elsewhere, are never touched.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from comfy_worker.errors import InputError
from comfy_worker.fsutil import within

JOBS_FOLDER = "jobs"
DEFAULT_PREFIX = "ComfyUI"  # SaveImage's own default, for an empty filename_prefix
ANNOTATION = " [input]"  # LoadImage's way of naming the input folder explicitly


def job_folder(job_key: str) -> str:
    return f"{JOBS_FOLDER}/{job_key}"


def input_subfolder(folder: str, subfolder: str) -> str:
    """Where an image named ``subfolder/file`` is uploaded: inside the job's own input folder."""
    return f"{folder}/{subfolder}" if subfolder else folder


def isolate_inputs(workflow: dict[str, Any], names: list[str], folder: str) -> None:
    """Point every input value naming an uploaded image (``name`` or ``name [input]``) at the job's copy."""
    moved = {name: f"{folder}/{name}" for name in names}
    moved |= {name + ANNOTATION: f"{folder}/{name}{ANNOTATION}" for name in names}
    for node in workflow.values():
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            continue
        for key, value in inputs.items():
            if isinstance(value, str) and value in moved:
                inputs[key] = moved[value]


def isolate_outputs(workflow: dict[str, Any], folder: str) -> None:
    """Prefix every ``filename_prefix`` input with the job's folder (ComfyUI makes the subfolders)."""
    for node_id, node in workflow.items():
        inputs = node.get("inputs")
        if not isinstance(inputs, dict) or "filename_prefix" not in inputs:
            continue
        prefix = inputs["filename_prefix"]
        where = f"node {node_id} ({node.get('class_type')}) filename_prefix"
        if not isinstance(prefix, str):
            raise InputError(
                f"{where} is {prefix!r}, not a string: this worker keeps each job's outputs in a folder of its "
                "own, so the prefix must be a plain string (not a link from another node). Set it with an "
                "override, or set CLEANUP_JOB_FILES=false.",
                {"node_id": node_id, "field": "filename_prefix"},
            )
        parts = [part for part in prefix.split("/") if part]
        if any(part in (".", "..") for part in parts):
            raise InputError(
                f"{where} {prefix!r} has a '.' or '..' segment: outputs must stay inside the job's own folder.",
                {"node_id": node_id, "field": "filename_prefix"},
            )
        inputs["filename_prefix"] = f"{folder}/{'/'.join(parts) or DEFAULT_PREFIX}"


def remove_job_files(folders: dict[str, Path], folder: str, temp_files: list[tuple[str, str]]) -> None:
    """Best effort: a file that cannot be removed stays, and never fails the job."""
    for name in ("input", "output"):
        root = folders.get(name)
        if root is None or not (root / folder).exists():
            continue  # a job without inputs made no input folder
        if within(root, root / folder):
            shutil.rmtree(root / folder, ignore_errors=True)
    temp = folders.get("temp")
    if temp is not None:
        for subfolder, filename in temp_files:
            path = temp / subfolder / filename
            if within(temp, path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
