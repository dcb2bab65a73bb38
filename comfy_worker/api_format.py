"""What an API-format workflow looks like: the check both the worker and the client run before sending one.

A shared leaf (stdlib only) so that the user's tools can refuse a UI export on the laptop without importing
the worker's runtime (pydantic, the job schema).
"""

from __future__ import annotations

from typing import Any

from comfy_worker.errors import InputError

Workflow = dict[str, Any]


def check_api_format(workflow: Any) -> Workflow:
    """Refuse what ComfyUI would refuse less clearly: empty graphs, nodes without class_type (a UI-format
    workflow is converted before it gets here, see ``ui_format``)."""
    if not isinstance(workflow, dict):
        raise InputError("workflow must be a JSON object of node id -> {class_type, inputs}.")
    if not workflow:
        raise InputError("workflow is empty: it needs at least one node and an output node such as SaveImage.")
    problems = []
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            problems.append(f"node {node_id!r} is a {type(node).__name__}, not an object")
        elif not isinstance(node.get("class_type"), str) or not node["class_type"]:
            problems.append(f"node {node_id!r} has no 'class_type' string")
        elif not isinstance(node.get("inputs", {}), dict):
            problems.append(f"node {node_id!r} ({node['class_type']}): 'inputs' must be an object")
    if problems:
        raise InputError(
            "workflow is not in ComfyUI's API format: " + "; ".join(problems[:20]),
            {"problems": problems},
        )
    return workflow
