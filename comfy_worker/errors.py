"""The worker's one error tree.

Pure code raises one of these; ``job.run`` (the edge) turns it into the job's result. Every error carries an
``error_type`` a client can branch on, a human message, and ``details`` that explain it without a login to
the worker::

    WorkerError
    ├── InputError             error_type "validation": the job input is malformed
    ├── WorkflowError          error_type "workflow_validation": ComfyUI refused the prompt (HTTP 400)
    ├── ExecutionError         error_type "comfyui_execution": a node raised while running
    ├── PromptInterruptedError error_type "interrupted": ComfyUI interrupted the prompt
    ├── JobTimeoutError        error_type "timeout": the job ran past its time limit
    ├── ComfyUnavailableError  error_type "comfyui_unavailable": ComfyUI did not start or does not answer
    ├── ComfyCrashedError      error_type "comfyui_crashed": the ComfyUI process died during the job
    ├── OutputError            error_type "output": an output ComfyUI reported could not be read
    ├── ResultTooLargeError    error_type "result_too_large": base64 outputs would exceed RunPod's limit
    └── StorageError           error_type "storage": uploading outputs to S3 failed
"""

from __future__ import annotations

import json
from typing import Any


class WorkerError(Exception):
    """Base of every error the worker reports in a job result."""

    error_type = "internal"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error_type": self.error_type, "message": self.message, "details": self.details}


class ConfigurationError(WorkerError):
    """An environment variable holds a value the worker cannot use: every job reports it until it is fixed."""

    error_type = "configuration"


class InputError(WorkerError):
    error_type = "validation"


class WorkflowError(WorkerError):
    error_type = "workflow_validation"


class ExecutionError(WorkerError):
    error_type = "comfyui_execution"


class PromptInterruptedError(WorkerError):
    error_type = "interrupted"


class JobTimeoutError(WorkerError):
    error_type = "timeout"


class ComfyUnavailableError(WorkerError):
    error_type = "comfyui_unavailable"


class ComfyCrashedError(WorkerError):
    error_type = "comfyui_crashed"
    generation: int | None = None  # which start of ComfyUI died (its supervisor's restart count), when known


class OutputError(WorkerError):
    error_type = "output"


class ResultTooLargeError(WorkerError):
    error_type = "result_too_large"


class StorageError(WorkerError):
    error_type = "storage"


def json_text(payload: dict[str, Any]) -> str:
    """The job result's ``error`` string.

    The runpod SDK requires ``error`` to be a string (a dict makes the local API answer HTTP 500), and the
    platform shows only ``error`` for a FAILED job, so the structured error travels as JSON text.
    """
    return json.dumps(payload, ensure_ascii=False, default=str)


def field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as people write it: ``images[0].name``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
