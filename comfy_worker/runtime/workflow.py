"""The API-format workflow: shape checks, overrides and the convenience fields.

Everything here is pure: a dict goes in, a new dict comes out, an ``InputError`` explains what is wrong.
Overrides are applied to a deep copy, so a failed job never leaves a half-edited workflow behind.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from comfy_worker.api_format import Workflow, check_api_format
from comfy_worker.errors import InputError
from comfy_worker.runtime.schema import JobInput, Override

__all__ = ["Workflow", "check_api_format"]

# Inputs that hold prompt text on the text-encode nodes people use (SD1.5/SDXL/SD3/Flux/HiDream/WAN...).
TEXT_FIELDS = ("text", "text_g", "text_l", "clip_l", "t5xxl", "llama", "prompt")
SEED_FIELDS = ("seed", "noise_seed")
# Sampler and guider inputs that carry the positive conditioning; followed back to the text encoder.
POSITIVE_INPUTS = ("positive", "conditioning")


def _node(workflow: Workflow, node_id: str, purpose: str) -> dict[str, Any]:
    if node_id not in workflow:
        raise InputError(
            f"{purpose}: node {node_id!r} does not exist in the workflow.",
            {"node_id": node_id, "node_ids": list(workflow)},
        )
    node: dict[str, Any] = workflow[node_id]
    return node


def _describe(workflow: Workflow, node_ids: Iterable[str]) -> list[str]:
    return [f"{nid} ({workflow[nid].get('class_type')})" for nid in node_ids]


def set_path(workflow: Workflow, override: Override) -> None:
    """Apply one override in place; the path walks dicts by key and lists by index."""
    purpose = f"override {override.node_id}.{override.field}"
    target: Any = _node(workflow, override.node_id, purpose)
    parts = override.field.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        walked = ".".join(parts[:depth]) or "the node"
        if isinstance(target, dict):
            if part not in target:
                hint = ""
                if depth == 0 and part in target.get("inputs", {}):
                    hint = f" Did you mean 'inputs.{part}'?"
                raise InputError(
                    f"{purpose}: {walked} has no field {part!r}; it has: {', '.join(map(str, target))}.{hint}",
                    {"node_id": override.node_id, "field": override.field, "available": list(target)},
                )
            if last:
                target[part] = override.value
            else:
                target = target[part]
        elif isinstance(target, list):
            if not (part.isascii() and part.isdigit()) or int(part) >= len(target):  # "²".isdigit() too
                raise InputError(
                    f"{purpose}: {walked} is a list of {len(target)} items; {part!r} is not an index in it.",
                    {"node_id": override.node_id, "field": override.field},
                )
            if last:
                target[int(part)] = override.value
            else:
                target = target[int(part)]
        else:
            raise InputError(
                f"{purpose}: {walked} is a {type(target).__name__}, so it has no field {part!r}.",
                {"node_id": override.node_id, "field": override.field},
            )


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _text_fields(node: dict[str, Any]) -> list[str]:
    inputs = node.get("inputs", {})
    return [name for name in TEXT_FIELDS if isinstance(inputs.get(name), str)]


def find_prompt_node(workflow: Workflow) -> str:
    """The positive text encoder: the only text node, or the one feeding every sampler's positive input."""
    encoders = [nid for nid, node in workflow.items() if _text_fields(node)]
    if len(encoders) == 1:
        return encoders[0]
    positive: set[str] = set()
    for node in workflow.values():
        for name in POSITIVE_INPUTS:
            link = node.get("inputs", {}).get(name)
            if _is_link(link):
                positive |= _upstream_encoders(workflow, link[0], set(encoders))
    if len(positive) == 1:
        return positive.pop()
    found = sorted(positive) or encoders
    reason = "no text encoder node (CLIPTextEncode or similar)" if not found else "several candidate nodes"
    raise _no_single_node(workflow, "prompt", "takes the prompt", reason, found, "inputs.text")


def _upstream_encoders(workflow: Workflow, start: str, encoders: set[str], limit: int = 32) -> set[str]:
    """Text encoders reached by walking conditioning links back from ``start`` (ControlNet, combine...)."""
    found: set[str] = set()
    stack: list[str] = [start]
    seen: set[str] = set()
    while stack and len(seen) < limit:
        nid = stack.pop()
        if nid in seen or nid not in workflow:
            continue
        seen.add(nid)
        if nid in encoders:
            found.add(nid)
            continue
        for name, value in workflow[nid].get("inputs", {}).items():
            if _is_link(value) and ("conditioning" in name or name in POSITIVE_INPUTS):
                stack.append(value[0])
    return found


def find_seed_node(workflow: Workflow) -> str:
    nodes = [nid for nid, node in workflow.items() if _seed_field(node)]
    if len(nodes) == 1:
        return nodes[0]
    reason = "no node has a 'seed' or 'noise_seed' number" if not nodes else "several nodes have one"
    raise _no_single_node(workflow, "seed", "takes the seed", reason, nodes, "inputs.seed")


def _seed_field(node: dict[str, Any]) -> str | None:
    inputs = node.get("inputs", {})
    for name in SEED_FIELDS:
        if isinstance(inputs.get(name), int) and not isinstance(inputs.get(name), bool):
            return name
    return None


def _has_size(node: dict[str, Any]) -> bool:
    inputs = node.get("inputs", {})
    return all(isinstance(inputs.get(k), int) and not isinstance(inputs.get(k), bool) for k in ("width", "height"))


def find_size_node(workflow: Workflow) -> str:
    """The latent-size node (EmptyLatentImage and friends), or the only node with width and height."""
    sized = [nid for nid, node in workflow.items() if _has_size(node)]
    latent = [nid for nid in sized if "latent" in workflow[nid]["class_type"].lower()]
    for candidates in (latent, sized):
        if len(candidates) == 1:
            return candidates[0]
    found = latent or sized
    reason = "no node has width and height numbers" if not found else "several nodes have them"
    raise _no_single_node(workflow, "width/height", "sets the image size", reason, found, "inputs.width", "size")


def _no_single_node(
    workflow: Workflow, field: str, role: str, reason: str, candidates: list[str], example: str, id_prefix: str = ""
) -> InputError:
    """No node, or several, for a convenience field: name the candidates, or say what to do without one."""
    id_field = f"{id_prefix or field}_node_id"
    if candidates:
        advice = f"Set {id_field} to one of: {', '.join(_describe(workflow, candidates))}."
    else:
        advice = (
            f"Leave {field} out for this workflow, or set the value on the node that {role.split()[0]} it with "
            f'overrides: [{{"node_id": "<id>", "field": "{example}", "value": ...}}].'
        )
    return InputError(f"{field}: cannot tell which node {role} ({reason}). {advice}", {"candidates": candidates})


def convenience_overrides(job: JobInput, workflow: Workflow) -> list[Override]:
    """Turn prompt/seed/width/height into explicit overrides, finding their nodes when no id is given."""
    overrides: list[Override] = []
    if job.prompt is not None:
        nid = job.prompt_node_id or find_prompt_node(workflow)
        fields = _text_fields(_node(workflow, nid, "prompt_node_id"))
        if not fields:
            raise InputError(
                f"prompt_node_id: node {nid} ({workflow[nid]['class_type']}) has no text input "
                f"({', '.join(TEXT_FIELDS)}).",
                {"node_id": nid},
            )
        overrides += [Override(node_id=nid, field=f"inputs.{name}", value=job.prompt) for name in fields]
    if job.seed is not None:
        nid = job.seed_node_id or find_seed_node(workflow)
        seed_field = _seed_field(_node(workflow, nid, "seed_node_id"))
        if seed_field is None:
            raise InputError(
                f"seed_node_id: node {nid} ({workflow[nid]['class_type']}) has no 'seed' or 'noise_seed' number.",
                {"node_id": nid},
            )
        overrides.append(Override(node_id=nid, field=f"inputs.{seed_field}", value=job.seed))
    if job.width is not None and job.height is not None:
        nid = job.size_node_id or find_size_node(workflow)
        if not _has_size(_node(workflow, nid, "size_node_id")):
            raise InputError(
                f"size_node_id: node {nid} ({workflow[nid]['class_type']}) has no width and height numbers.",
                {"node_id": nid},
            )
        overrides.append(Override(node_id=nid, field="inputs.width", value=job.width))
        overrides.append(Override(node_id=nid, field="inputs.height", value=job.height))
    return overrides


def prepare(job: JobInput) -> Workflow:
    """The workflow to queue: checked, copied, convenience fields applied, then explicit overrides."""
    workflow = copy.deepcopy(check_api_format(job.workflow))
    for override in [*convenience_overrides(job, workflow), *job.overrides]:
        set_path(workflow, override)
    return workflow
