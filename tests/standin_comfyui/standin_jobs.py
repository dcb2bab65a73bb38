"""The jobs API of ComfyUI 0.38 (``/api/jobs``), over the stand-in's queue and history (0.38 flavour only).

What it answers, as read in 0.38's server.py and comfy_execution/jobs.py (the code is the stand-in's own):
a job is a queue or history entry seen as ``{id, status, priority, create_time, ...}`` with ``status`` one of
pending, in_progress, completed, failed, cancelled (an error that was an interrupt); ``None`` fields are left
out. The list can be filtered by status and workflow id, sorted by creation time or execution duration and
paged; one job by id also carries its outputs, its status messages and its workflow. A cancel interrupts a
running job (only while it is still the one running) or drops a pending one; a finished or unknown id is a
no-op answered ``{"cancelled": false}``.
"""

from __future__ import annotations

import uuid
from typing import Any

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "pending", "in_progress", "completed", "failed", "cancelled"
STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
PREVIEWABLE = ("images", "video", "audio", "3d", "text")
THREE_D = (".obj", ".fbx", ".gltf", ".glb", ".usdz")
TEXT_FILES = (".txt", ".md", ".json")


def is_job_id(value: Any) -> bool:
    """A client-chosen id must be a UUID written the canonical way (lowercase, hyphenated): 0.38 stores and
    matches ids verbatim, so it refuses any other spelling instead of rewriting it."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _pruned(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _metadata(extra: dict[str, Any]) -> tuple[Any, Any]:
    """(create_time, workflow_id): the workflow id is the UI's, inside extra_pnginfo."""
    pnginfo = extra.get("extra_pnginfo") or {}
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    return extra.get("create_time"), workflow.get("id") if isinstance(workflow, dict) else None


def queued_job(item: list[Any], status: str, with_workflow: bool = False) -> dict[str, Any]:
    number, prompt_id, prompt, extra, _ = item
    create_time, workflow_id = _metadata(extra)
    job = _pruned(
        {
            "id": prompt_id,
            "status": status,
            "priority": number,
            "create_time": create_time,
            "outputs_count": 0,
            "previewable_outputs_count": 0,
            "workflow_id": workflow_id,
        }
    )
    if with_workflow:
        job["workflow"] = {"prompt": prompt, "extra_data": extra}
    return job


def _previewable(media: str, item: dict[str, Any]) -> bool:
    name = str(item.get("filename", "")).lower()
    kind = str(item.get("format", ""))
    return media in PREVIEWABLE or kind.startswith(("video/", "audio/")) or name.endswith(THREE_D + TEXT_FILES)


def _summary(outputs: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
    """(outputs counted, previewable ones, the preview): a saved visual file first, then any visual file, then
    a text file, then a text; plain texts are shown but not counted."""
    count = previewable = 0
    found: dict[str, dict[str, Any]] = {}
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media, items in node_outputs.items():
            if media == "animated" or not isinstance(items, list):
                continue
            for raw in items:
                item = raw
                if isinstance(raw, str) and raw.lower().endswith(THREE_D):
                    item = {"filename": raw, "type": "output", "subfolder": "", "mediaType": "3d"}
                if not isinstance(item, dict):
                    if media == "text" and isinstance(item, str):
                        found.setdefault("text", {"content": item[:1024], "nodeId": node_id, "mediaType": media})
                    continue
                count += 1
                if not _previewable(media, item):
                    continue
                previewable += 1
                shown = {"mediaType": media, **item, "nodeId": node_id}
                name = str(item.get("filename", "")).lower()
                slot = "text_file" if media == "text" or name.endswith(TEXT_FILES) else "visual"
                if slot == "visual" and item.get("type") == "output":
                    slot = "saved"
                found.setdefault(slot, shown)
    preview = next((found[slot] for slot in ("saved", "visual", "text_file", "text") if slot in found), None)
    return count, previewable, preview


def finished_job(prompt_id: str, entry: dict[str, Any], with_outputs: bool = False) -> dict[str, Any]:
    number, _, prompt, extra, _ = entry["prompt"]
    create_time, workflow_id = _metadata(extra)
    status_info = entry.get("status") or {}
    started = ended = error = None
    interrupted = False
    for message in status_info.get("messages") or []:
        if not (isinstance(message, (list, tuple)) and len(message) >= 2 and isinstance(message[1], dict)):
            continue
        name, data = message[0], message[1]
        if name == "execution_start":
            started = data.get("timestamp")
        elif name in ("execution_success", "execution_error", "execution_interrupted"):
            ended = data.get("timestamp")
            error = data if name == "execution_error" else error
            interrupted = interrupted or name == "execution_interrupted"
    status = COMPLETED
    if status_info.get("status_str") == "error":
        status = CANCELLED if interrupted else FAILED
    outputs = entry.get("outputs") or {}
    count, previewable, preview = _summary(outputs)
    job = _pruned(
        {
            "id": prompt_id,
            "status": status,
            "priority": number,
            "create_time": create_time,
            "execution_start_time": started,
            "execution_end_time": ended,
            "execution_error": error,
            "outputs_count": count,
            "previewable_outputs_count": previewable,
            "preview_output": preview,
            "workflow_id": workflow_id,
        }
    )
    if with_outputs:
        workflow = {"prompt": prompt, "extra_data": extra}
        job |= {"outputs": outputs, "execution_status": status_info, "workflow": workflow}
    return job


def one_job(
    prompt_id: str, running: list[list[Any]], pending: list[list[Any]], history: dict[str, Any]
) -> dict[str, Any] | None:
    if prompt_id in history:
        return finished_job(prompt_id, history[prompt_id], with_outputs=True)
    for items, status in ((running, IN_PROGRESS), (pending, PENDING)):
        for item in items:
            if item[1] == prompt_id:
                return queued_job(item, status, with_workflow=True)
    return None


def list_jobs(
    query: dict[str, str], running: list[list[Any]], pending: list[list[Any]], history: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``GET /api/jobs`` with its query parameters checked as 0.38 checks them."""
    wanted: list[str] = list(STATUSES)
    if query.get("status"):
        wanted = [s.strip().lower() for s in query["status"].split(",") if s.strip()]
        invalid = [s for s in wanted if s not in STATUSES]
        if invalid:
            message = f"Invalid status value(s): {', '.join(invalid)}. Valid values: {', '.join(STATUSES)}"
            return 400, {"error": message}
    sort_by = query.get("sort_by", "created_at").lower()
    sort_order = query.get("sort_order", "desc").lower()
    if sort_by not in ("created_at", "execution_duration"):
        return 400, {"error": "sort_by must be 'created_at' or 'execution_duration'"}
    if sort_order not in ("asc", "desc"):
        return 400, {"error": "sort_order must be 'asc' or 'desc'"}
    limit: int | None = None
    if "limit" in query:
        try:
            limit = int(query["limit"])
        except ValueError:
            return 400, {"error": "limit must be an integer"}
        if limit <= 0:
            return 400, {"error": "limit must be a positive integer"}
    offset = 0
    if "offset" in query:
        try:
            offset = max(int(query["offset"]), 0)
        except ValueError:
            return 400, {"error": "offset must be an integer"}

    jobs = [queued_job(item, IN_PROGRESS) for item in running] if IN_PROGRESS in wanted else []
    jobs += [queued_job(item, PENDING) for item in pending] if PENDING in wanted else []
    jobs += [job for job in (finished_job(pid, entry) for pid, entry in history.items()) if job["status"] in wanted]
    if query.get("workflow_id"):
        jobs = [job for job in jobs if job.get("workflow_id") == query["workflow_id"]]

    def duration(job: dict[str, Any]) -> Any:
        start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
        return end - start if start and end else 0

    key = duration if sort_by == "execution_duration" else (lambda job: job.get("create_time", 0))
    jobs.sort(key=key, reverse=sort_order == "desc")
    total = len(jobs)
    page = jobs[offset:]
    page = page[:limit] if limit is not None else page
    pagination = {"offset": offset, "limit": limit, "total": total, "has_more": offset + len(page) < total}
    return 200, {"jobs": page, "pagination": pagination}
