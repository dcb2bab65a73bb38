"""What a failed job reports about the worker, since nobody can log in to look.

Gathered only when a job fails, best effort (a diagnostic that cannot be read is left out, never raised):
ComfyUI's state and version, its last log lines, free disk and memory (RAM, and VRAM as ComfyUI reports
it), and for errors about files the model folders ComfyUI sees with their files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.comfy.supervisor import ComfySupervisor
from comfy_worker.errors import WorkerError
from comfy_worker.runtime.cleanup import JOBS_FOLDER

LOG_LINES = 40
FILES_PER_FOLDER = 50
GIB = 1024**3


def _gib(value: Any) -> float | None:
    return round(value / GIB, 2) if isinstance(value, int | float) else None


def memory_available() -> dict[str, float | None]:
    """RAM from /proc/meminfo (Linux, which is where RunPod workers run)."""
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0]) * 1024
    return {"ram_total_gb": _gib(fields.get("MemTotal")), "ram_available_gb": _gib(fields.get("MemAvailable"))}


def disk_free(folders: dict[str, Path]) -> dict[str, float]:
    free = {}
    for name, folder in folders.items():
        with contextlib.suppress(OSError):
            free[f"{name}_dir_free_gb"] = round(shutil.disk_usage(folder).free / GIB, 2)
    return free


def comfyui_state(supervisor: ComfySupervisor | None, recovering: bool, client: ComfyClient) -> dict[str, Any]:
    state: dict[str, Any] = {"url": client.display_url}
    if supervisor is None or supervisor.attached:
        state["state"] = "attached" if supervisor else "remote"
    elif recovering:
        state["state"] = "restarting"
    elif supervisor.process is not None and supervisor.process.poll() is not None:
        state["state"] = f"exited ({supervisor.process.returncode})"
    else:
        state["state"] = "running" if supervisor.process is not None else "not started"
    if supervisor is not None:
        state["restarts"] = supervisor.restarts
    if recovering:
        return state  # it is being restarted: asking it would only wait for a timeout
    with contextlib.suppress(WorkerError, ValueError):
        stats = client.system_stats(timeout_s=2.0)
        state["version"] = stats.get("system", {}).get("comfyui_version")
        state["devices"] = [
            {
                "name": d.get("name"),
                "vram_total_gb": _gib(d.get("vram_total")),
                "vram_free_gb": _gib(d.get("vram_free")),
            }
            for d in stats.get("devices", [])
        ]
    return state


def model_folders(client: ComfyClient) -> dict[str, list[str]]:
    """Each model folder ComfyUI knows with (up to FILES_PER_FOLDER of) its files; empty folders left out."""
    listing: dict[str, list[str]] = {}
    with contextlib.suppress(WorkerError, ValueError):
        for folder in client.model_folder_names():
            files = client.model_files(folder)
            if files:
                listing[folder] = files[:FILES_PER_FOLDER] + (
                    [f"... {len(files) - FILES_PER_FOLDER} more"] if len(files) > FILES_PER_FOLDER else []
                )
    return listing


def input_files(folder: Path) -> list[str]:
    """Files in ComfyUI's input folder, as LoadImage names them (``sub/name.png``); not the jobs' own folders,
    whose names are none of another job's business."""
    with contextlib.suppress(OSError):
        names = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
        return sorted(str(name) for name in names if name.parts[0] != JOBS_FOLDER)
    return []


def provisioning_problems(status_file: Path | None) -> dict[str, Any] | None:
    """What start.sh's provisioning could not install (status.json), or None when it all went well."""
    if status_file is None:
        return None
    try:
        status = json.loads(status_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or (status.get("ok") and not status.get("optional_failed")):
        return None
    keys = ("ok", "failed", "optional_failed", "config_source", "config_sha256", "finished_at")
    return {key: status[key] for key in keys if key in status}


def provisioning_field(problems: dict[str, Any] | None) -> dict[str, Any]:
    """The result's ``provisioning`` entry when the last provisioning run did not all go well, else nothing.

    ``status`` is ``failed`` when a required item failed, config.yml itself included (the worker then runs
    what an earlier run installed, or nothing), and ``optional_failed`` when only optional models did; ``error``
    names the first failure, ``failed`` and ``optional_failed`` list them all (status.json's own words).
    """
    if problems is None:
        return {}
    failed, optional = problems.get("failed") or [], problems.get("optional_failed") or []
    first = (failed or optional or [{"kind": "provisioning", "name": "", "error": "failed"}])[0]
    return {
        "provisioning": {
            "status": "failed" if failed or not problems.get("ok") else "optional_failed",
            "error": _failure(first),
            "failed": failed,
            "optional_failed": optional,
        }
    }


def provisioning_warnings(problems: dict[str, Any] | None) -> list[str]:
    """A line per failed item for the result's warnings; a config.yml that could not be used says what that
    means for the job."""
    if problems is None:
        return []
    warnings = []
    for item in (problems.get("failed") or []) + (problems.get("optional_failed") or []):
        if item.get("kind") == "config":
            warnings.append(
                f"Provisioning: config.yml could not be used, so this worker runs what an earlier provisioning "
                f"installed (fix config.yml and restart): {item.get('error')}"
            )
        else:
            warnings.append(f"Provisioning: {item.get('kind')} {item.get('name')} failed: {item.get('error')}")
    return warnings


def provisioning_banner(problems: dict[str, Any] | None) -> list[str]:
    """The lines the worker logs last before it takes jobs when provisioning failed: where an operator looks
    first, since the worker still serves (on an earlier install) and jobs only carry it in their results."""
    entry = provisioning_field(problems).get("provisioning")
    if entry is None or entry["status"] != "failed":
        return []
    config = any(item.get("kind") == "config" for item in entry["failed"])
    return [
        "!" * 78,
        f"PROVISIONING FAILED: {entry['error']}",
        *(f"  also: {_failure(item)}" for item in entry["failed"][1:]),
        "This worker serves jobs with what an earlier provisioning installed"
        + (" (config.yml was not applied)." if config else ", less what failed above."),
        "Every job's result says so in 'provisioning'. Fix it and restart the worker.",
        "!" * 78,
    ]


def _failure(item: dict[str, Any]) -> str:
    """``model loras/x.safetensors: HTTP 404``; ``config.yml: ...`` for the config itself."""
    parts = [item.get("name")] if item.get("kind") == "config" else [item.get("kind"), item.get("name")]
    return f"{' '.join(str(part) for part in parts if part)}: {item.get('error')}"


def is_file_error(error: WorkerError) -> bool:
    """An error about a missing or misnamed model or input file."""
    records = error.details.get("node_errors") or []
    return any(r.get("type") in ("value_not_in_list", "custom_validation_failed") for r in records) or (
        "FileNotFoundError" in str(error.details.get("exception_type", ""))
    )


def collect(
    error: WorkerError,
    client: ComfyClient,
    supervisor: ComfySupervisor | None,
    folders: dict[str, Path],
    recovering: bool,
    provisioning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    diagnostics: dict[str, Any] = {
        "comfyui": comfyui_state(supervisor, recovering, client),
        "system": memory_available() | disk_free(folders),
    }
    if provisioning is not None:
        diagnostics["provisioning"] = provisioning
    if supervisor is not None and supervisor.log_tail():
        diagnostics["comfyui_log_tail"] = supervisor.log_tail(LOG_LINES)
    if is_file_error(error):
        diagnostics["model_folders"] = model_folders(client)
        if "input" in folders:
            diagnostics["input_files"] = input_files(folders["input"])[:FILES_PER_FOLDER]
    return diagnostics
