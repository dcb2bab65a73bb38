"""Workflows as ComfyUI's *Save* writes them (the UI format), converted to the API format ComfyUI runs.

A UI workflow stores each node's widget values as a list (``widgets_values``) in the order the frontend
creates the node's widgets, and its links as a separate table. ComfyUI's frontend turns that into a prompt
when a user presses *Queue* (``graphToPrompt``); this module does the same on the server side, with the
running ComfyUI's ``/object_info`` as the catalogue of node definitions, so that a workflow people share or
save by habit runs as it would in their browser. ``tests/ui_format/`` holds the corpus the frontend itself
converted (ComfyUI's shipped templates plus one case per rule below) and ``tests/test_ui_format.py`` checks
that the two agree.

The rules, as the frontend applies them:

- Widgets come from the node definition's inputs that are widget types (INT, FLOAT, STRING, BOOLEAN, combos),
  required then optional, in ``input_order``. Seed-like inputs get an extra ``control_after_generate`` value
  after them and upload-capable combos an ``upload`` value: both take a slot in ``widgets_values`` but are
  not sent. A missing value takes the definition's default. A list value is sent as ``{"__value__": [...]}``.
- A linked input (also a widget converted to an input) takes the link. Links are followed through virtual
  nodes (Reroute), bypassed nodes (mode 4: the first input of a matching type stands in for the output) and
  subgraphs (inner nodes get ids ``<instance id>:<inner id>``); a PrimitiveNode writes its value into the
  widgets it feeds.
- Virtual nodes (Note, MarkdownNote, Reroute, PrimitiveNode) and muted nodes (mode 2) are not sent; an input
  linked to a node that is not sent is dropped.
- Text widgets with dynamic prompts lose their ``/* */`` and ``//`` comments, and ``{a|b|c}`` picks one
  option at random, as the frontend does at every *Queue*.

Stdlib only and free of the runtime, so the client and the bridge can convert on the user's machine too.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from comfy_worker.errors import InputError, WorkflowError

Workflow = dict[str, Any]

# Frontend-only nodes: they exist in the UI and are never sent to ComfyUI.
VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
MUTED, BYPASSED = 2, 4
SUBGRAPH_INPUT_NODE, SUBGRAPH_OUTPUT_NODE = -10, -20
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")


def is_ui_format(workflow: Any) -> bool:
    """A workflow saved with *Save* (``nodes`` and ``links``), not *Export (API)*."""
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and "links" in workflow


def node_types(workflow: Workflow) -> set[str]:
    """The node types a UI-format workflow needs from ComfyUI's ``/object_info``: every node's type, inside
    subgraphs and group nodes too, less the frontend's own (virtual nodes, subgraph and group-node instances)."""
    subgraphs = [d for d in (workflow.get("definitions") or {}).get("subgraphs") or [] if isinstance(d, dict)]
    groups = [g for g in ((workflow.get("extra") or {}).get("groupNodes") or {}).values() if isinstance(g, dict)]
    nodes = list(workflow.get("nodes") or [])
    for container in (*subgraphs, *groups):
        nodes += container.get("nodes") or []
    own = {str(definition.get("id")) for definition in subgraphs}
    return {
        node["type"]
        for node in nodes
        if isinstance(node, dict)
        and isinstance(node.get("type"), str)
        and node["type"] not in VIRTUAL_NODE_TYPES
        and node["type"] not in own
        and _group_name(node["type"]) is None
    }


@dataclass
class Conversion:
    """The API prompt, and what the conversion left out or rewired (reported to the user as a warning)."""

    prompt: Workflow
    dropped: list[str] = field(default_factory=list)
    rewired: list[str] = field(default_factory=list)

    def warning(self) -> str | None:
        parts = []
        if self.dropped:
            parts.append("dropped " + "; ".join(self.dropped))
        if self.rewired:
            parts.append("wired through " + "; ".join(self.rewired))
        if not parts:
            return None
        return "The workflow was converted from ComfyUI's UI format: " + ". ".join(parts) + "."


@dataclass(frozen=True)
class _Link:
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int


@dataclass
class _Graph:
    """The root graph or one subgraph definition: its nodes and links by id."""

    nodes: dict[str, dict[str, Any]]
    links: dict[int, _Link]
    definition: dict[str, Any] | None = None  # the subgraph definition (inputs, outputs), None for the root


@dataclass(frozen=True)
class _Placed:
    """A node where it runs: its graph, and the chain of subgraph instances that contains it."""

    node: dict[str, Any]
    graph: _Graph
    path: tuple[str, ...]  # instance ids from the root down to the graph holding ``node``

    @property
    def id(self) -> str:
        return ":".join((*self.path, str(self.node["id"])))


@dataclass(frozen=True)
class _Resolved:
    """What an input resolves to: an output of a node that is sent, or a value (a subgraph's widget)."""

    origin: str | None = None
    slot: int = 0
    value: Any = None


class _Converter:
    def __init__(self, workflow: Workflow, object_info: Mapping[str, Any]) -> None:
        self.object_info = object_info
        self.subgraphs: dict[str, _Graph] = {}
        for definition in (workflow.get("definitions") or {}).get("subgraphs") or []:
            self.subgraphs[str(definition["id"])] = _graph(definition, definition)
        self.root = _graph(workflow, None)
        self.group_nodes: dict[str, Any] = dict((workflow.get("extra") or {}).get("groupNodes") or {})
        self.group_graphs: dict[int, _Graph] = {}  # id(instance node dict) -> its inner graph
        self.result = Conversion(prompt={})
        self.widget_values: dict[int, dict[str, Any]] = {}  # id(node dict) -> widget name -> value
        self.instances: dict[str, _Placed] = {}  # execution id of each subgraph instance

    # -- the catalogue -----------------------------------------------------------------------------------

    def widgets(self, node_type: str) -> list[tuple[str, bool, Any]]:
        """(name, sent, default) for each widget slot of a node type, in ``widgets_values`` order."""
        definition = self.object_info[node_type]
        inputs = definition.get("input") or {}
        order = definition.get("input_order") or {}
        slots: list[tuple[str, bool, Any]] = []
        for section in ("required", "optional"):
            specs = inputs.get(section) or {}
            for name in order.get(section) or list(specs):
                spec = specs.get(name)
                if not isinstance(spec, list | tuple) or not spec:
                    continue
                kind, options = spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not (isinstance(kind, list) or kind in WIDGET_TYPES) or options.get("forceInput"):
                    continue
                slots.append((name, True, _default(kind, options)))
                control = options.get("control_after_generate")
                if control or (control is None and kind == "INT" and name in SEED_NAMES):
                    slots.append(("control_after_generate", False, "fixed"))
                if any(options.get(option) for option in UPLOAD_OPTIONS):
                    slots.append(("upload", False, None))
        return slots

    def dynamic_prompt_widgets(self, node_type: str) -> set[str]:
        inputs = self.object_info[node_type].get("input") or {}
        return {
            name
            for section in ("required", "optional")
            for name, spec in (inputs.get(section) or {}).items()
            if isinstance(spec, list | tuple)
            and len(spec) > 1
            and isinstance(spec[1], dict)
            and spec[0] == "STRING"
            and spec[1].get("dynamicPrompts")
        }

    def values_of(self, node: dict[str, Any]) -> dict[str, Any]:
        """The node's widget values by name (``widgets_values`` mapped onto the definition's widgets)."""
        key = id(node)
        if key not in self.widget_values:
            saved = node.get("widgets_values")
            values: dict[str, Any] = {}
            for index, (name, sent, default) in enumerate(self.widgets(node["type"])):
                if not sent:
                    continue
                if isinstance(saved, dict):
                    values[name] = saved.get(name, default)
                elif isinstance(saved, list) and index < len(saved):
                    values[name] = saved[index]
                else:
                    values[name] = default
            self.widget_values[key] = values
        return self.widget_values[key]

    # -- walking the graph -------------------------------------------------------------------------------

    def inner_graph(self, node: dict[str, Any]) -> _Graph | None:
        """The graph inside a subgraph instance or a (legacy) group node; None for any other node."""
        node_type = str(node.get("type"))
        if node_type in self.subgraphs:
            return self.subgraphs[node_type]
        group = _group_name(node_type)
        if group is None or group not in self.group_nodes:
            return None
        if id(node) not in self.group_graphs:
            self.group_graphs[id(node)] = self.group_graph(node, self.group_nodes[group])
        return self.group_graphs[id(node)]

    def group_graph(self, instance: dict[str, Any], definition: dict[str, Any]) -> _Graph:
        """A group node as the subgraph it amounts to: inner nodes ``<instance>:<index>``, its inputs and outputs.

        Inner inputs that are not linked inside become the instance's inputs (named by the input, or
        ``<title> <input>`` where names repeat); inner widgets not fed inside take the instance's
        ``widgets_values`` in order; outputs not used inside (or marked external) are the instance's outputs.
        """
        inner_nodes = [dict(node, id=index) for index, node in enumerate(definition.get("nodes") or [])]
        internal = {
            (link[2], link[3]): (link[0], link[1])
            for link in definition.get("links") or []
            if isinstance(link, list) and len(link) >= 4 and link[0] is not None
        }
        used_inside = {origin for origin in internal.values()}
        external = {(entry[0], entry[1]) for entry in definition.get("external") or [] if isinstance(entry, list)}
        links: dict[int, _Link] = {}
        sub_inputs: list[dict[str, Any]] = []
        outer_values = list(instance.get("widgets_values") or [])
        for node in inner_nodes:
            index = node["id"]
            slots = node.get("inputs") or []
            rewired = []
            for slot, entry in enumerate(slots):
                link_id = len(links) + 1
                if (index, slot) in internal:
                    origin, origin_slot = internal[(index, slot)]
                    links[link_id] = _Link(origin, int(origin_slot), index, slot)
                else:
                    sub_inputs.append({"name": entry.get("name"), "node": node, "linkIds": [link_id]})
                    links[link_id] = _Link(SUBGRAPH_INPUT_NODE, len(sub_inputs) - 1, index, slot)
                rewired.append(dict(entry, link=link_id))
            node["inputs"] = rewired
            if str(node.get("type")) in self.object_info:
                fed_inside = {slots[slot].get("name") for (target, slot) in internal if target == index}
                own = list(node.get("widgets_values") or [])
                values = []
                for position, (name, _sent, default) in enumerate(self.widgets(str(node["type"]))):
                    fallback = own[position] if position < len(own) else default
                    values.append(fallback if name in fed_inside or not outer_values else outer_values.pop(0))
                node["widgets_values"] = values
        names = [entry["name"] for entry in sub_inputs]
        for entry in sub_inputs:
            if names.count(entry["name"]) > 1:
                node = entry["node"]
                title = node.get("title") or self.object_info.get(str(node.get("type")), {}).get("display_name")
                entry["name"] = f"{title} {entry['name']}"
        position = 0
        for node in inner_nodes:
            count = len(self.object_info.get(str(node.get("type")), {}).get("output") or node.get("outputs") or [])
            for slot in range(count):
                if (node["id"], slot) not in used_inside or (node["id"], slot) in external:
                    links[len(links) + 1] = _Link(node["id"], slot, SUBGRAPH_OUTPUT_NODE, position)
                    position += 1
        definition_view = {"inputs": [{"name": entry["name"]} for entry in sub_inputs], "group": True}
        return _Graph({str(node["id"]): node for node in inner_nodes}, links, definition_view)

    def placed_nodes(self, graph: _Graph, path: tuple[str, ...]) -> list[_Placed]:
        """Every node of ``graph``, subgraph instances expanded in place (recursively)."""
        placed = []
        for node in graph.nodes.values():
            here = _Placed(node, graph, path)
            placed.append(here)
            inner = self.inner_graph(node)
            if inner is not None:
                if len(path) > 32:
                    raise InputError("The workflow's subgraphs nest more than 32 levels deep (a subgraph in itself?).")
                self.instances[here.id] = here
                placed += self.placed_nodes(inner, (*path, str(node["id"])))
        return placed

    def is_sent(self, placed: _Placed) -> bool:
        node = placed.node
        node_type = str(node.get("type"))
        return (
            node_type not in VIRTUAL_NODE_TYPES
            and self.inner_graph(node) is None
            and node.get("mode", 0) not in (MUTED, BYPASSED)
        )

    def resolve_input(self, placed: _Placed, slot: int, seen: set[str], kind: Any = None) -> _Resolved | None:
        marker = f"{placed.id}[I]{slot}"
        if marker in seen:
            raise InputError(f"The workflow's links loop through node {placed.id} (input {slot}).")
        seen.add(marker)
        inputs = placed.node.get("inputs") or []
        if slot >= len(inputs) or inputs[slot].get("link") is None:
            return None
        name = inputs[slot].get("name")
        link = placed.graph.links.get(int(inputs[slot]["link"]))
        if link is None:
            raise InputError(
                f"Input '{name}' of node {placed.id} uses link {inputs[slot]['link']}, which is not in the workflow's "
                "links (ComfyUI's frontend refuses it too): reconnect the input in ComfyUI and save again.",
                {"format": "ui", "node": placed.id, "input": name},
            )
        if placed.path and _same_id(link.origin_id, SUBGRAPH_INPUT_NODE):
            return self.resolve_subgraph_input(placed, link.origin_slot, seen)
        origin = placed.graph.nodes.get(str(link.origin_id))
        if origin is None:
            raise InputError(
                f"Input '{name}' of node {placed.id} is linked to node {link.origin_id}, which is not in the workflow "
                "(ComfyUI's frontend refuses it too): reconnect the input in ComfyUI and save again.",
                {"format": "ui", "node": placed.id, "input": name},
            )
        wanted = kind if kind is not None else inputs[slot].get("type")
        return self.resolve_output(_Placed(origin, placed.graph, placed.path), link.origin_slot, wanted, seen)

    def resolve_subgraph_input(self, placed: _Placed, slot: int, seen: set[str]) -> _Resolved | None:
        """A link from a subgraph's input node: continue outside, at the instance's input (or its widget)."""
        instance = self.instances[":".join(placed.path)]
        definition = placed.graph.definition or {}
        sub_inputs = definition.get("inputs") or []
        if slot >= len(sub_inputs):
            return None
        name = sub_inputs[slot].get("name")
        outer_inputs = instance.node.get("inputs") or []
        for index, outer in enumerate(outer_inputs):
            if outer.get("name") == name and outer.get("link") is not None:
                return self.resolve_input(instance, index, seen)
        if definition.get("group"):
            return None  # a group node's unlinked inputs keep the inner widget's value
        widget_inputs = [entry.get("name") for entry in sub_inputs if self.feeds_widget(placed.graph, entry)]
        saved = instance.node.get("widgets_values")
        if name in widget_inputs and isinstance(saved, list) and widget_inputs.index(name) < len(saved):
            return _Resolved(value=saved[widget_inputs.index(name)])
        return None

    def feeds_widget(self, graph: _Graph, sub_input: dict[str, Any]) -> bool:
        """Whether a subgraph input is linked inside to a widget (then the instance shows it as a widget)."""
        for link_id in sub_input.get("linkIds") or []:
            link = graph.links.get(int(link_id))
            target = graph.nodes.get(str(link.target_id)) if link else None
            if link and target:
                inputs = target.get("inputs") or []
                if link.target_slot < len(inputs) and inputs[link.target_slot].get("widget"):
                    return True
        return False

    def resolve_output(self, placed: _Placed, slot: int, kind: Any, seen: set[str]) -> _Resolved | None:
        marker = f"{placed.id}[O]{slot}"
        if marker in seen:
            raise InputError(f"The workflow's links loop through node {placed.id} (output {slot}).")
        seen.add(marker)
        node = placed.node
        node_type = str(node.get("type"))
        if node.get("mode", 0) == BYPASSED:
            index = _bypass_slot(node, slot, kind)
            self.result.rewired.append(f"bypassed node {placed.id} ({node_type})")
            return None if index < 0 else self.resolve_input(placed, index, seen)
        inner = self.inner_graph(node)
        if inner is not None:
            return self.resolve_subgraph_output(placed, inner, slot, kind, seen)
        if node_type in VIRTUAL_NODE_TYPES:
            if slot < len(node.get("inputs") or []):
                return self.resolve_input(placed, slot, seen, kind)
            return None
        return _Resolved(origin=placed.id, slot=slot)

    def resolve_subgraph_output(
        self, instance: _Placed, inner: _Graph, slot: int, kind: Any, seen: set[str]
    ) -> _Resolved | None:
        path = (*instance.path, str(instance.node["id"]))
        for link in inner.links.values():
            if _same_id(link.target_id, SUBGRAPH_OUTPUT_NODE) and link.target_slot == slot:
                origin = inner.nodes.get(str(link.origin_id))
                if origin is None:
                    return None
                return self.resolve_output(_Placed(origin, inner, path), link.origin_slot, kind, seen)
        return None

    # -- the conversion ------------------------------------------------------------------------------------

    def apply_primitives(self, placed_nodes: list[_Placed]) -> None:
        """PrimitiveNode: its value replaces the widget of every input it feeds (the frontend's applyToGraph)."""
        for placed in placed_nodes:
            node = placed.node
            if node.get("type") != "PrimitiveNode":
                continue
            saved = node.get("widgets_values")
            if not isinstance(saved, list) or not saved:
                continue
            for output in node.get("outputs") or []:
                for link_id in output.get("links") or []:
                    link = placed.graph.links.get(int(link_id))
                    target = placed.graph.nodes.get(str(link.target_id)) if link else None
                    if link is None or target is None or str(target.get("type")) not in self.object_info:
                        continue
                    inputs = target.get("inputs") or []
                    widget = inputs[link.target_slot].get("widget") if link.target_slot < len(inputs) else None
                    name = widget.get("name") if isinstance(widget, dict) else None
                    values = self.values_of(target)
                    if name in values:
                        values[name] = saved[0]

    def entry(self, placed: _Placed) -> dict[str, Any]:
        """One node of the API prompt: its widget values, then its links (a link wins over a widget)."""
        node, node_type = placed.node, str(placed.node.get("type"))
        dynamic = self.dynamic_prompt_widgets(node_type)
        inputs: dict[str, Any] = {}
        for name, value in self.values_of(node).items():
            inputs[name] = _sendable(dynamic_prompt(value) if name in dynamic and isinstance(value, str) else value)
        for index, entry in enumerate(node.get("inputs") or []):
            resolved = self.resolve_input(placed, index, set())
            if resolved is None:
                continue
            if resolved.origin is not None:
                inputs[entry["name"]] = [resolved.origin, resolved.slot]
            elif resolved.value is not None:
                inputs[entry["name"]] = _sendable(resolved.value)
        title = node.get("title") or self.object_info[node_type].get("display_name") or node_type
        return {"inputs": inputs, "class_type": node_type, "_meta": {"title": title}}

    def convert(self) -> Conversion:
        placed_nodes = self.placed_nodes(self.root, ())
        for placed in placed_nodes:
            if not isinstance(placed.node.get("type"), str) or not placed.node["type"]:
                raise InputError(f"The UI-format node {placed.id} has no 'type': save the workflow again in ComfyUI.")
        unknown: dict[str, list[str]] = {}
        for placed in placed_nodes:
            node_type = str(placed.node.get("type"))
            known = (
                node_type in self.object_info
                or node_type in VIRTUAL_NODE_TYPES
                or self.inner_graph(placed.node) is not None
            )
            if not known and placed.node.get("mode", 0) not in (MUTED,):
                unknown.setdefault(node_type, []).append(placed.id)
        if unknown:
            raise WorkflowError(
                "The workflow uses node types this worker's ComfyUI does not have: "
                + ", ".join(f"{name} (node {', '.join(ids)})" for name, ids in sorted(unknown.items()))
                + ". Add the custom nodes that provide them to config.yml.",
                {"format": "ui", "missing_node_types": sorted(unknown), "nodes": unknown},
            )
        self.apply_primitives(placed_nodes)
        prompt = self.result.prompt
        for placed in placed_nodes:
            if self.is_sent(placed):
                prompt[placed.id] = self.entry(placed)
            elif placed.node.get("mode", 0) == MUTED:
                self.result.dropped.append(f"muted node {placed.id} ({placed.node.get('type')})")
            elif placed.node.get("type") in ("Note", "MarkdownNote"):
                self.result.dropped.append(f"node {placed.id} ({placed.node.get('type')})")
        for entry in prompt.values():
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                    del entry["inputs"][name]
        self.result.rewired = sorted(set(self.result.rewired))
        return self.result


def convert(workflow: Workflow, object_info: Mapping[str, Any]) -> Conversion:
    """The API prompt ComfyUI's frontend would queue for this UI-format workflow; InputError if malformed."""
    try:
        return _Converter(workflow, object_info).convert()
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(
            f"The workflow looks like ComfyUI's UI format but could not be read ({type(exc).__name__}: {exc}). "
            "Save it again in ComfyUI, or use Workflow > Export (API).",
            {"format": "ui"},
        ) from exc


def _graph(data: Mapping[str, Any], definition: dict[str, Any] | None) -> _Graph:
    nodes = {str(node["id"]): node for node in data.get("nodes") or [] if isinstance(node, dict) and "id" in node}
    links: dict[int, _Link] = {}
    for link in data.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            link_id, origin, origin_slot, target, target_slot = link[:5]
        elif isinstance(link, dict):
            link_id, origin, origin_slot = link["id"], link["origin_id"], link["origin_slot"]
            target, target_slot = link["target_id"], link["target_slot"]
        else:
            continue
        links[int(link_id)] = _Link(origin, int(origin_slot), target, int(target_slot))
    return _Graph(nodes, links, definition)


def _group_name(node_type: str) -> str | None:
    """``workflow>Name`` (``workflow/Name`` before frontend 1.4) is an instance of group node ``Name``."""
    for prefix in ("workflow>", "workflow/"):
        if node_type.startswith(prefix):
            return node_type.removeprefix(prefix)
    return None


def _sendable(value: Any) -> Any:
    """A list value is wrapped, or ComfyUI would take it for a link (it unwraps ``__value__`` itself)."""
    return {"__value__": value} if isinstance(value, list) else value


def _same_id(value: Any, wanted: int) -> bool:
    return str(value) == str(wanted)


def _default(kind: Any, options: Mapping[str, Any]) -> Any:
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else None
    if kind == "COMBO":
        choices = options.get("options") or []
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0, "STRING": "", "BOOLEAN": False}.get(str(kind))


def _types_match(first: Any, second: Any) -> bool:
    """LiteGraph's isValidConnection: equal, a wildcard, or comma-separated lists that share a type."""
    if first in ("", "*", None, 0) or second in ("", "*", None, 0) or first == second:
        return True
    a, b = str(first).lower(), str(second).lower()
    if "," not in a and "," not in b:
        return a == b
    return bool(set(a.split(",")) & set(b.split(",")))


def _bypass_slot(node: Mapping[str, Any], slot: int, kind: Any) -> int:
    """Which input stands in for output ``slot`` of a bypassed node (-1: none), as the frontend picks it."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    output_type = outputs[slot].get("type") if slot < len(outputs) else None
    if kind in ("*", ""):
        return slot if len(inputs) > slot else 0
    same_slot = inputs[slot].get("type") if slot < len(inputs) else None
    if same_slot is not None and _types_match(same_slot, output_type) and _types_match(same_slot, kind):
        return slot
    for index, entry in enumerate(inputs):
        if entry.get("type") == kind:
            return index
    for index, entry in enumerate(inputs):
        if _types_match(entry.get("type"), output_type) and _types_match(entry.get("type"), kind):
            return index
    return -1


_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//.*")
_CHOICE = re.compile(r"\{([^{}]*)\}")


def dynamic_prompt(text: str, rng: random.Random | None = None) -> str:
    """The frontend's dynamic prompts: comments removed, ``{a|b|c}`` replaced by one option (innermost first)."""
    rng = rng or random.Random()  # noqa: S311 - prompt variety, not security
    text = _COMMENTS.sub("", text)
    while True:
        replaced = _CHOICE.sub(lambda match: rng.choice(match.group(1).split("|")), text)
        if replaced == text:
            return text
        text = replaced
