"""Turn ComfyUI's own error payloads into readable ``WorkerError``s.

ComfyUI answers a bad prompt with HTTP 400 ``{error, node_errors}`` and a failing node with an
``execution_error`` frame; both are precise but nested. These functions keep every field and put the
essentials (node id, class type, input, message) into one line a person can act on.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from comfy_worker.errors import ExecutionError, PromptInterruptedError, WorkflowError

TRACEBACK_FRAMES = 8  # the last frames of a node's traceback kept in the result
LISTED_TYPES = 20  # unknown node types named in an error (the count says how many more)
LISTED_NODES = 10  # nodes named per unknown type
MISSING_MODEL_HINT = (
    "To use a model this worker does not have: add it under 'models:' in config.yml (installed at the next "
    "start), or bring it with the job's 'models' (input.models, see docs/job-api.md#models-by-url)."
)
MISSING_INPUT_FILE = re.compile(r"Invalid (?:image|video|audio)? ?file: (?P<name>.+)$")

# Loader inputs of ComfyUI's core nodes -> the model folder they list, to say where a missing file was looked for.
MODEL_INPUT_FOLDERS = {
    "ckpt_name": "checkpoints",
    "lora_name": "loras",
    "vae_name": "vae",
    "control_net_name": "controlnet",
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "clip_name3": "text_encoders",
    "model_name": "upscale_models",
    "style_model_name": "style_models",
    "gligen_name": "gligen",
    "hypernetwork_name": "hypernetworks",
    "config_name": "configs",
}


def node_error_lines(node_errors: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten ``node_errors`` into one record per problem."""
    records = []
    for node_id, entry in (node_errors or {}).items():
        class_type = entry.get("class_type") if isinstance(entry, dict) else None
        for err in entry.get("errors", []) if isinstance(entry, dict) else []:
            extra = err.get("extra_info") or {}
            records.append(
                {
                    "node_id": str(node_id),
                    "class_type": class_type,
                    "input_name": extra.get("input_name"),
                    "type": err.get("type"),
                    "message": err.get("message"),
                    "details": err.get("details"),
                    "received_value": extra.get("received_value"),
                }
            )
            if err.get("type") == "value_not_in_list":
                records[-1]["closest"] = _closest(extra.get("received_value"), extra.get("input_config"))
                records[-1]["model_folder"] = MODEL_INPUT_FOLDERS.get(str(extra.get("input_name")))
    return records


def missing_node_types_error(workflow: dict[str, Any], missing: set[str]) -> WorkflowError:
    """All unknown node types at once (ComfyUI names only the first), with the nodes that use them.

    One pass over the workflow, and the lists bounded: a workflow of 100 000 unknown types must get its error
    in milliseconds, not minutes of CPU holding the GIL, and an error small enough to return.
    """
    users: dict[str, list[str]] = {}
    for node_id, node in workflow.items():
        if node["class_type"] in missing:
            users.setdefault(node["class_type"], []).append(node_id)
    listed = sorted(users)[:LISTED_TYPES]
    shown = {class_type: sorted(users[class_type])[:LISTED_NODES] for class_type in listed}
    text = "; ".join(f"{class_type} (node {', '.join(ids)})" for class_type, ids in shown.items())
    if len(users) > len(listed):
        text += f"; and {len(users) - len(listed)} more"
    which = "it" if len(users) == 1 else "them"
    return WorkflowError(
        f"This worker's ComfyUI has no node type {text}. Add the custom node that provides {which} to the 'nodes' "
        f"section of config.yml (or use a workflow without {which}).",
        {"missing_node_types": listed, "missing_count": len(users), "nodes": shown},
    )


def _closest(value: Any, input_config: Any) -> list[str]:
    """The allowed values nearest a refused one (a misspelt model or file name, usually)."""
    if not isinstance(value, str) or not isinstance(input_config, list) or not input_config:
        return []
    allowed = input_config[0]
    if not isinstance(allowed, list):
        return []
    names = [str(name) for name in allowed]
    by_basename = {name.rsplit("/", 1)[-1].lower(): name for name in names}
    close = difflib.get_close_matches(value.rsplit("/", 1)[-1].lower(), list(by_basename), n=3, cutoff=0.5)
    return [by_basename[name] for name in close]


def describe_node_error(record: dict[str, Any]) -> str:
    where = f"node {record['node_id']} ({record['class_type']})"
    if record.get("input_name"):
        where += f" input '{record['input_name']}'"
    text = f"{where}: {record.get('message') or record.get('type')}"
    details = record.get("details")
    if record.get("type") == "custom_validation_failed" and "closest" in record:
        closest = ", ".join(record["closest"])
        text += f" ({details}; closest in the input folder: {closest or 'none'})"
    elif record.get("type") == "value_not_in_list":
        value = record.get("received_value")
        closest = ", ".join(record.get("closest") or [])
        if record.get("model_folder"):
            text += f" ({value!r} is not in models/{record['model_folder']}; closest: {closest or 'none'})"
        else:
            text += f" ({value!r}; closest: {closest})" if closest else f" ({value!r})"
    elif details and details != record.get("input_name"):
        text += f" ({details})"
    return text


def _message(error: dict[str, Any], records: list[dict[str, Any]]) -> str:
    if records:
        summary = "; ".join(describe_node_error(r) for r in records[:20])
    else:
        summary = " ".join(str(p) for p in (error.get("message"), error.get("details")) if p)
    message = f"ComfyUI refused the workflow: {summary}"
    if any(r.get("type") == "value_not_in_list" and r.get("model_folder") for r in records):
        message += f". {MISSING_MODEL_HINT}"
    if error.get("type") == "invalid_prompt" and "does not exist" in str(error.get("message")):
        message += (
            ". The node type is not installed in this worker: add the custom node that provides it to the "
            "'nodes' section of config.yml (or use a workflow without it)."
        )
    return message


def workflow_error(body: Any, status: int) -> WorkflowError:
    """The error for a prompt ComfyUI refused (HTTP 400 from ``POST /prompt``)."""
    if not isinstance(body, dict):
        return WorkflowError(f"ComfyUI refused the workflow (HTTP {status}): {body!r}"[:2000], {"status": status})
    raw_error = body.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {"message": str(raw_error)}
    records = node_error_lines(body.get("node_errors") or {})
    return WorkflowError(_message(error, records), {"comfyui_error": error, "node_errors": records, "status": status})


def suggest_input_files(error: WorkflowError, input_files: list[str]) -> None:
    """LoadImage and friends refused a file missing from the input folder: name the closest files there."""
    records = error.details.get("node_errors") or []
    changed = False
    for record in records:
        match = MISSING_INPUT_FILE.search(str(record.get("details") or ""))
        if record.get("type") == "custom_validation_failed" and match:
            record["closest"] = _closest(match["name"], [input_files])
            changed = True
    if changed:
        error.message = _message(error.details.get("comfyui_error") or {}, records)
        error.args = (error.message,)


def prompt_warnings(node_errors: dict[str, Any]) -> list[str]:
    """A prompt ComfyUI accepted in part: the outputs it dropped, as warnings for the result."""
    return [f"ComfyUI skipped an output branch: {describe_node_error(r)}" for r in node_error_lines(node_errors or {})]


def execution_error(data: dict[str, Any]) -> ExecutionError:
    """The error for an ``execution_error`` frame (or the same record from ``/history``)."""
    node_id = data.get("node_id")
    node_type = data.get("node_type")
    exc_type = data.get("exception_type") or "Exception"
    exc_message = str(data.get("exception_message") or "").strip()
    traceback = data.get("traceback") or []
    return ExecutionError(
        f"Node {node_id} ({node_type}) failed: {exc_type}: {exc_message}",
        {
            "node_id": node_id,
            "node_type": node_type,
            "exception_type": exc_type,
            "exception_message": exc_message,
            "traceback": traceback[-TRACEBACK_FRAMES:] if isinstance(traceback, list) else traceback,
            "executed": data.get("executed", []),
        },
    )


def interrupted_error(data: dict[str, Any]) -> PromptInterruptedError:
    node_id = data.get("node_id")
    node_type = data.get("node_type")
    where = f" at node {node_id} ({node_type})" if node_id else ""
    return PromptInterruptedError(
        f"ComfyUI interrupted the prompt{where} (someone called /interrupt, or the queue was cleared).",
        {"node_id": node_id, "node_type": node_type, "executed": data.get("executed", [])},
    )
