"""The endpoint side of the bridge: its settings, the job it sends and how it reports back, over the standard
library only, because this package runs inside the user's ComfyUI, whose Python has neither ``requests``
nor ``comfy_worker`` installed. The job API itself is ``jobapi`` (shared with comfy-worker-client, see its
docstring). Nothing here imports ComfyUI, so it is testable on its own.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .jobapi import RUNPOD_API_BASE, JobAPI, JobAPIError, output_chunks

TRUE = frozenset({"1", "true", "yes", "on"})


class RemoteError(Exception):
    """The endpoint failed the job or could not be reached; the message is what the UI shows."""


class Interrupted(Exception):
    """The user pressed Cancel in the UI; the remote job was cancelled."""


@dataclass(frozen=True)
class BridgeSettings:
    """Read from the environment at each prompt, so the bridge needs no settings file."""

    enabled: bool
    base_url: str
    api_key: str | None
    poll_s: float = 1.0
    max_wait_s: float = 3600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BridgeSettings:
        url = env.get("RUNPOD_BRIDGE_URL", "").strip().rstrip("/")
        endpoint_id = env.get("RUNPOD_ENDPOINT_ID", "").strip()
        if not url and endpoint_id:
            url = f"{RUNPOD_API_BASE}/{endpoint_id}"
        return cls(
            enabled=env.get("RUNPOD_BRIDGE", "").strip().lower() in TRUE,
            base_url=url,
            api_key=env.get("RUNPOD_API_KEY", "").strip() or None,
            poll_s=float(env.get("RUNPOD_BRIDGE_POLL", "1") or 1),
            max_wait_s=float(env.get("RUNPOD_BRIDGE_MAX_WAIT", "3600") or 3600),
        )

    def problem(self) -> str | None:
        """Why jobs cannot be sent, or None."""
        if not self.base_url:
            return "set RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY (or RUNPOD_BRIDGE_URL) for the RunPod bridge"
        if not self.base_url.startswith(("http://", "https://")):
            return f"RUNPOD_BRIDGE_URL must start with http:// or https://, got {self.base_url!r}"
        if self.base_url.startswith(RUNPOD_API_BASE) and not self.api_key:
            return "set RUNPOD_API_KEY for the RunPod bridge"
        return None


class RemoteJobs:
    """One endpoint, through ``jobapi.JobAPI``; errors become ``RemoteError`` (what the UI shows)."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.api = JobAPI(settings.base_url, settings.api_key, status_timeout_s=settings.max_wait_s)

    def run(
        self,
        job: dict[str, Any],
        on_update: Callable[[dict[str, Any]], None],
        interrupted: Callable[[], bool],
    ) -> dict[str, Any]:
        """Submit, poll until final, return the worker's output; cancel when the UI interrupts or time runs out."""
        try:
            body = self.api.submit(job)
            job_id = str(body.get("id") or "")
            if not job_id:
                raise RemoteError(f"the endpoint did not return a job id: {body}")
            try:
                body = self.api.wait(
                    body,
                    poll_s=self.settings.poll_s,
                    max_wait_s=self.settings.max_wait_s,
                    on_update=on_update,
                    interrupted=interrupted,
                )
            except InterruptedError:
                self.api.cancel(job_id)
                raise Interrupted(job_id) from None
            except TimeoutError:
                self.api.cancel(job_id)
                raise RemoteError(
                    f"job {job_id} not finished after {self.settings.max_wait_s:g} s: cancelled"
                ) from None
        except JobAPIError as exc:
            raise RemoteError(str(exc)) from exc
        if body.get("status") != "COMPLETED" or not isinstance(body.get("output"), dict):
            raise RemoteError(describe_failure(job_id, body))
        output: dict[str, Any] = body["output"]
        return output


def describe_failure(job_id: str, body: Mapping[str, Any]) -> str:
    """The worker's structured error (a JSON string: error_type, message, details) as a few lines."""
    raw = body.get("error")
    try:
        error = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        error = raw
    head = f"RunPod job {job_id} {body.get('status')}"
    if not isinstance(error, dict):
        return f"{head}: {error if error else '(no error message)'}"
    lines = [f"{head}: {error.get('error_type', 'error')}: {error.get('message') or error.get('error_message')}"]
    details = error.get("details")
    if not isinstance(details, dict):
        details = {}
    for item in details.get("node_errors") or []:
        if isinstance(item, dict):
            lines.append(f"node {item.get('node_id')} ({item.get('class_type')}): {item.get('message')}")
    return "\n".join(lines)


def describe_progress(body: Mapping[str, Any]) -> tuple[str, float | None]:
    """A status line and a percentage (when the worker sent one) for the UI."""
    status = str(body.get("status"))
    output = body.get("output")
    if not isinstance(output, dict):
        return (f"RunPod: {status} {output}" if output else f"RunPod: {status}"), None
    text = f"RunPod: {status}"
    if output.get("class_type"):
        text += f" {output['class_type']}"
    if output.get("steps"):
        text += f" step {output.get('step')}/{output['steps']}"
    percent = output.get("percent")
    return text, float(percent) if isinstance(percent, int | float) else None


def output_bytes(entry: Mapping[str, Any]) -> bytes:
    """An output's bytes: base64, or an http(s) URL fetched without the API key (never ``file://``)."""
    try:
        return b"".join(output_chunks(entry))
    except JobAPIError as exc:
        raise RemoteError(str(exc)) from exc


def _safe_input_name(value: str) -> str | None:
    """A LoadImage-style value (``photo.png``, ``sub/photo.png [input]``) that can name an input file."""
    name = value.removesuffix(" [input]").strip()
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or name.startswith("/") or any(p in {".", ".."} for p in parts):
        return None
    return name


def _string_values(graph: Mapping[str, Any]) -> Iterator[Any]:
    """Every input value of an API-format graph, or every widget value of a UI-format one (subgraphs too)."""
    if isinstance(graph.get("nodes"), list):  # the UI format (the worker converts it)
        nodes = list(graph["nodes"])
        for definition in (graph.get("definitions") or {}).get("subgraphs") or []:
            if isinstance(definition, dict):
                nodes += definition.get("nodes") or []
        for node in nodes:
            values = node.get("widgets_values") if isinstance(node, dict) else None
            yield from values.values() if isinstance(values, dict) else values or []
        return
    for node in graph.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        yield from (inputs or {}).values()


def input_files(graph: Mapping[str, Any], input_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Every local input file the graph names (any string input that is a file in ComfyUI's input folder:
    LoadImage, LoadImageMask, LoadVideo, LoadAudio...), ready for the job's ``images`` list. The graph may
    be in the API format or in the UI format."""
    root = Path(input_dir)
    found: dict[str, Path] = {}
    for value in _string_values(graph):
        name = _safe_input_name(value) if isinstance(value, str) and len(value) < 256 else None
        if name and name not in found and (root / name).is_file():
            found[name] = root / name
    return [{"name": name, "image": base64.b64encode(path.read_bytes()).decode()} for name, path in found.items()]


def upstream(graph: Mapping[str, Any], targets: Iterable[str]) -> dict[str, Any]:
    """The part of the graph the targets need (ComfyUI's "run selected output nodes")."""
    keep: set[str] = set()
    stack = [str(t) for t in targets if str(t) in graph]
    while stack:
        node_id = stack.pop()
        if node_id in keep:
            continue
        keep.add(node_id)
        for value in (graph[node_id].get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph:
                stack.append(str(value[0]))
    return {node_id: node for node_id, node in graph.items() if node_id in keep}
