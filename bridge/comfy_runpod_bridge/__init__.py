"""RunPod bridge: keep using the local ComfyUI's UI, run the graph on a RunPod endpoint (our worker).

Copy or symlink this folder into ``ComfyUI/custom_nodes/`` and start ComfyUI with ``RUNPOD_BRIDGE=1``,
``RUNPOD_ENDPOINT_ID`` and ``RUNPOD_API_KEY`` (or ``RUNPOD_BRIDGE_URL=http://127.0.0.1:8000`` for the
worker's local API). See docs/client.md.

How: ComfyUI calls every on-prompt handler with the body of ``POST /prompt`` before it validates and queues
the prompt. When the bridge is on, ``on_prompt`` replaces the graph with a single ``RunPodBridge`` output
node that carries the original API-format graph as a string. ComfyUI then queues and "executes" that one
node as usual: it sends the graph (plus the local input files it names) to the endpoint's ``/run``, polls
``/status`` and shows the worker's progress on the progress bar, cancels the remote job when Cancel is
pressed, saves the returned files into the local ``output/`` folder and returns them as the node's UI
images, so they appear in the queue/history and on the original Save nodes. ComfyUI's own files are not
touched; with ``RUNPOD_BRIDGE`` unset the handler changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

from .jobapi import OUTPUT_KINDS, safe_output_name
from .remote import (
    BridgeSettings,
    Interrupted,
    RemoteError,
    RemoteJobs,
    describe_progress,
    input_files,
    output_bytes,
    upstream,
)

log = logging.getLogger("comfy_runpod_bridge")

BRIDGE_CLASS = "RunPodBridge"
BRIDGE_NODE_ID = "runpod"


def on_prompt(json_data: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's on-prompt hook: swap the graph for the bridge node when the bridge is on."""
    settings = BridgeSettings.from_env(os.environ)
    prompt = json_data.get("prompt")
    if not settings.enabled or not isinstance(prompt, dict) or not prompt:
        return json_data
    if any(isinstance(node, dict) and node.get("class_type") == BRIDGE_CLASS for node in prompt.values()):
        return json_data  # already a bridge prompt
    targets = json_data.pop("partial_execution_targets", None)
    if targets:
        prompt = upstream(prompt, targets)
    json_data["prompt"] = {
        BRIDGE_NODE_ID: {
            "class_type": BRIDGE_CLASS,
            "inputs": {"workflow": json.dumps(prompt, sort_keys=True)},
            "_meta": {"title": "Run on RunPod"},
        }
    }
    log.info("RunPod bridge: the prompt (%d nodes) will run on %s", len(prompt), settings.base_url)
    return json_data


def _unique_path(folder: Path, name: str) -> Path:
    """The worker's file name, with a counter when the local output folder has one already."""
    base = safe_output_name(name, "output")
    stem, suffix = Path(base).stem, Path(base).suffix
    path, counter = folder / base, 1
    while path.exists():
        counter += 1
        path = folder / f"{stem}_{counter}{suffix}"
    return path


class RunPodBridge:
    """Runs the graph in ``workflow`` (API format, or UI format for the worker to convert) on the endpoint;
    ``on_prompt`` puts it in place."""

    CATEGORY = "RunPod"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ()
    DESCRIPTION = "Runs a whole workflow on a RunPod endpoint (added by the RunPod bridge; not for manual use)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"workflow": ("STRING", {"multiline": True})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def run(self, workflow: str, unique_id: str | None = None) -> dict[str, Any]:
        import comfy.model_management
        import comfy.utils
        import folder_paths
        from server import PromptServer

        settings = BridgeSettings.from_env(os.environ)
        problem = settings.problem()
        if problem:
            raise RuntimeError(problem)
        graph = json.loads(workflow)
        job = {"workflow": graph, "images": input_files(graph, folder_paths.get_input_directory())}
        server = PromptServer.instance
        bar = comfy.utils.ProgressBar(100, node_id=unique_id)
        shown: list[str] = []

        def on_update(body: dict[str, Any]) -> None:
            text, percent = describe_progress(body)
            if percent is not None:
                bar.update_absolute(int(percent), 100)
            if not shown or shown[-1] != text:
                shown.append(text)
                if unique_id is not None and hasattr(server, "send_progress_text"):
                    server.send_progress_text(text, unique_id, server.client_id)

        try:
            output = RemoteJobs(settings).run(job, on_update, comfy.model_management.processing_interrupted)
        except Interrupted:
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise
        except RemoteError as exc:
            raise RuntimeError(str(exc)) from None
        bar.update_absolute(100, 100)
        ui = self._save(output, Path(folder_paths.get_output_directory()))
        self._show_on_source_nodes(server, ui.pop("_by_node"))
        return {"ui": ui}

    @staticmethod
    def _save(output: dict[str, Any], folder: Path) -> dict[str, Any]:
        """Write every returned file into the local output folder; UI entries per kind and per source node."""
        folder.mkdir(parents=True, exist_ok=True)
        ui: dict[str, Any] = {"images": [], "audio": [], "text": [], "_by_node": {}}
        for kind in OUTPUT_KINDS:
            for entry in output.get(kind) or []:
                path = _unique_path(folder, str(entry.get("filename") or f"{kind}.bin"))
                path.write_bytes(output_bytes(entry))
                item: dict[str, Any] = {"filename": path.name, "subfolder": "", "type": "output"}
                key = "audio" if kind == "audio" else "images"
                if kind == "videos":
                    item["animated"] = True
                if kind != "files":
                    ui[key].append(item)
                    ui["_by_node"].setdefault(str(entry.get("node_id")), {}).setdefault(key, []).append(item)
                log.info("RunPod bridge: saved %s", path)
        ui["text"] = [str(t.get("text", "")) for t in output.get("text") or []]
        return {key: value for key, value in ui.items() if value or key == "_by_node"}

    @staticmethod
    def _show_on_source_nodes(server: Any, by_node: dict[str, dict[str, Any]]) -> None:
        """Tell the UI the original Save nodes produced these files, so the canvas shows them there too."""
        for node_id, ui in by_node.items():
            message = {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": server.last_prompt_id}
            server.send_sync("executed", message, server.client_id)


NODE_CLASS_MAPPINGS = {BRIDGE_CLASS: RunPodBridge}
NODE_DISPLAY_NAME_MAPPINGS = {BRIDGE_CLASS: "Run on RunPod (bridge)"}

try:
    from server import PromptServer

    PromptServer.instance.add_on_prompt_handler(on_prompt)
    _settings = BridgeSettings.from_env(os.environ)
    if _settings.enabled:
        log.info("RunPod bridge on: prompts run on %s", _settings.base_url or "(no endpoint set)")
except (ImportError, AttributeError):  # imported outside a running ComfyUI (tests, linters)
    pass
