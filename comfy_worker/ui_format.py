"""Workflows as ComfyUI's *Save* writes them (the UI format), converted to the API format ComfyUI runs.

A UI workflow stores each node's widget values as a list (``widgets_values``) in the order the frontend
creates the node's widgets, and its links as a separate table. ComfyUI's frontend turns that into a prompt
when a user presses *Queue* (``graphToPrompt``); this module does the same on the server side, with the
running ComfyUI's ``/object_info`` as the catalogue of node definitions, so that a workflow people share or
save by habit runs as it would in their browser. ``tests/ui_format/`` holds the corpus the frontend itself
converted (ComfyUI's shipped templates, newer ones, and one case per rule below), by the frontend ComfyUI 0.3.64
ships (1.27.10) and by the newest (1.58.1), and ``tests/test_ui_format.py`` checks that the worker agrees; where
the two frontends differ, the worker does as 1.58.1 does (but for the ids of legacy group nodes).

The rules, as the frontend applies them:

- Widgets come from the node definition's inputs that are widget types (INT, FLOAT, STRING, BOOLEAN, combos),
  required then optional, in ``input_order``. Seed-like inputs get an extra ``control_after_generate`` value
  after them and upload-capable combos an ``upload`` value: both take a slot in ``widgets_values`` but are
  not sent. A missing value takes the definition's default. A list value is sent as ``{"__value__": [...]}``.
- A linked input (also a widget converted to an input) takes the link. Links are followed through virtual
  nodes (Reroute), bypassed nodes (mode 4: the first input of a matching type stands in for the output) and
  subgraphs (inner nodes get ids ``<instance id>:<inner id>``); a PrimitiveNode writes its value into the
  widgets it feeds.
- An inner node whose id a root node or a node of an earlier subgraph definition already has is renumbered, as
  the frontend does when it loads the workflow; of two subgraph definitions with one id, the first counts.
- Virtual nodes (Note, MarkdownNote, Reroute, PrimitiveNode), muted nodes (mode 2) and every node inside a muted
  or bypassed subgraph instance of the root graph are not sent; an input linked to a node that is not sent is
  dropped.
- Text widgets with dynamic prompts lose their ``/* */`` and ``//`` comments, and ``{a|b|c}`` picks one
  option at random, as the frontend does at every *Queue*.

Node ids must stay apart: two nodes that would get the same id in the API prompt (a duplicate id, or a root
id such as ``3:1`` that equals a subgraph's inner node) are refused, where the frontend keeps one of them.

The work is bounded and linear, as it runs inside a job (``convert`` takes the job's deadline and stops at
it): links are followed iteratively and each one once, however long a chain of Reroutes or bypassed nodes;
a dynamic-prompt text is parsed in one pass; and the expansion of subgraphs, whose size doubles with each
level where a subgraph holds two instances of the next, stops at ``MAX_EXPANDED_NODES``.

Stdlib only and free of the runtime, so the client and the bridge can convert on the user's machine too.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from comfy_worker.errors import InputError, JobTimeoutError, WorkflowError

Workflow = dict[str, Any]

# Frontend-only nodes: they exist in the UI and are never sent to ComfyUI.
VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
MUTED, BYPASSED = 2, 4
SUBGRAPH_INPUT_NODE, SUBGRAPH_OUTPUT_NODE = -10, -20
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")
MAX_SUBGRAPH_DEPTH = 32
# Nodes once subgraphs and group nodes are expanded (each instance counts its inner nodes). The largest template
# ComfyUI 0.3.64 ships expands to 80 and large shared workflows have a few thousand: 100,000 leaves room for
# any real workflow (a 50,000-node chain converts in about two seconds) while subgraphs that each hold two
# instances of the next (2**depth nodes from a few KB: depth 21 took 2.1 GB) are refused after a bounded amount
# of work, before they exhaust the job's time or the worker's memory.
MAX_EXPANDED_NODES = 100_000


def is_ui_format(workflow: Any) -> bool:
    """A workflow saved with *Save* (``nodes`` and ``links``), not *Export (API)*."""
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and "links" in workflow


def node_types(workflow: Workflow) -> set[str]:
    """The node types a UI-format workflow needs from ComfyUI's ``/object_info``: every node's type, inside
    subgraphs and group nodes too, less the frontend's own (virtual nodes, subgraph and group-node instances).
    Malformed parts are skipped here: ``convert`` refuses them with a clear error."""
    subgraphs = [d for d in _list(_dict(workflow.get("definitions")).get("subgraphs")) if isinstance(d, dict)]
    groups = [g for g in _dict(_dict(workflow.get("extra")).get("groupNodes")).values() if isinstance(g, dict)]
    nodes = list(_list(workflow.get("nodes")))
    for container in (*subgraphs, *groups):
        nodes += _list(container.get("nodes"))
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
    """The root graph or one subgraph definition: its nodes (in file order, and by id) and links by id."""

    node_list: list[dict[str, Any]]
    links: dict[int, _Link]
    definition: dict[str, Any] | None = None  # the subgraph definition (inputs, outputs), None for the root
    nodes: dict[str, dict[str, Any]] = field(init=False)
    outputs: dict[int, _Link] = field(init=False)  # the link into each slot of a subgraph's output node
    widget_inputs: dict[Any, int] | None = None  # subgraph inputs that feed a widget inside (found once)

    def __post_init__(self) -> None:
        self.nodes = {}
        for node in self.node_list:
            self.nodes.setdefault(str(node["id"]), node)  # a duplicate id is refused before links are followed
        self.outputs = {}
        for link in self.links.values():
            if _same_id(link.target_id, SUBGRAPH_OUTPUT_NODE):
                self.outputs.setdefault(link.target_slot, link)


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


@dataclass(frozen=True)
class _Step:
    """One step of following a link back: into an input of a node, or out of an output of a node."""

    into_input: bool
    placed: _Placed
    slot: int
    kind: Any = None  # the type the consumer wants (picks a bypassed node's input), None: the input's own


class _Converter:
    def __init__(self, workflow: Workflow, object_info: Mapping[str, Any], deadline: float | None) -> None:
        self.object_info = object_info
        self.deadline = deadline
        self.subgraphs: dict[str, _Graph] = {}
        definitions = _first_of_each_id((workflow.get("definitions") or {}).get("subgraphs") or [])
        for definition, renumbered in zip(definitions, _renumbered_inner_nodes(workflow, definitions), strict=True):
            self.subgraphs[str(definition["id"])] = _graph(definition, definition, renumbered)
        self.root = _graph(workflow, None, {})
        self.group_nodes: dict[str, Any] = dict((workflow.get("extra") or {}).get("groupNodes") or {})
        self.group_graphs: dict[int, _Graph] = {}  # id(instance node dict) -> its inner graph
        self.result = Conversion(prompt={})
        self.widget_values: dict[int, dict[str, Any]] = {}  # id(node dict) -> widget name -> value
        self.widget_slots: dict[str, list[tuple[str, bool, Any]]] = {}  # node type -> its widgets
        self.instances: dict[str, _Placed] = {}  # execution id of each subgraph instance
        self.linked_inputs: dict[int, dict[Any, int]] = {}  # id(instance node dict) -> input name -> index
        self.resolved: dict[tuple[bool, str, int, str], _Resolved | None] = {}  # each step followed once
        self.bypass_scans: dict[tuple[int, str, str], int] = {}

    def check_time(self) -> None:
        """Called in every loop whose length the workflow decides: a job's conversion ends with the job."""
        _check_deadline(self.deadline)

    # -- the catalogue -----------------------------------------------------------------------------------

    def widgets(self, node_type: str) -> list[tuple[str, bool, Any]]:
        """(name, sent, default) for each widget slot of a node type, in ``widgets_values`` order."""
        if node_type in self.widget_slots:
            return self.widget_slots[node_type]
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
        self.widget_slots[node_type] = slots
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
        fed_slots: dict[Any, list[Any]] = {}
        for target, slot in internal:
            fed_slots.setdefault(target, []).append(slot)
        used_inside = set(internal.values())
        external = {(entry[0], entry[1]) for entry in definition.get("external") or [] if isinstance(entry, list)}
        links: dict[int, _Link] = {}
        sub_inputs: list[dict[str, Any]] = []
        outer_values = iter(list(instance.get("widgets_values") or []))
        outer_left = len(instance.get("widgets_values") or [])
        for node in inner_nodes:
            self.check_time()
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
                fed_inside = {slots[slot].get("name") for slot in fed_slots.get(index, [])}
                own = list(node.get("widgets_values") or [])
                values = []
                for position, (name, _sent, default) in enumerate(self.widgets(str(node["type"]))):
                    fallback = own[position] if position < len(own) else default
                    if name in fed_inside or not outer_left:
                        values.append(fallback)
                    else:
                        values.append(next(outer_values))
                        outer_left -= 1
                node["widgets_values"] = values
        repeated = Counter(entry["name"] for entry in sub_inputs)
        for entry in sub_inputs:
            if repeated[entry["name"]] > 1:
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
        return _Graph(inner_nodes, links, definition_view)

    def placed_nodes(self) -> list[_Placed]:
        """Every node, subgraph and group-node instances expanded in place (depth first, each instance's inner
        nodes after it), iteratively: at most ``MAX_EXPANDED_NODES``, and no two with the same id."""
        placed: list[_Placed] = []
        types: dict[str, list[str]] = {}  # execution id -> the types of the nodes that have it
        stack: list[tuple[_Graph, tuple[str, ...], Iterator[dict[str, Any]]]] = [
            (self.root, (), iter(self.root.node_list))
        ]
        while stack:
            graph, path, nodes = stack[-1]
            node = next(nodes, None)
            if node is None:
                stack.pop()
                continue
            self.check_time()
            here = _Placed(node, graph, path)
            placed.append(here)
            if len(placed) > MAX_EXPANDED_NODES:
                raise InputError(
                    f"The workflow has more than {MAX_EXPANDED_NODES:,} nodes once its subgraphs and group nodes are "
                    "expanded (each instance counts the nodes inside it), the most the worker converts "
                    "(MAX_EXPANDED_NODES): no real workflow comes near it. Do subgraphs hold instances of one "
                    "another many levels deep?",
                    {"format": "ui", "max_expanded_nodes": MAX_EXPANDED_NODES},
                )
            types.setdefault(here.id, []).append(str(node.get("type")))
            inner = self.inner_graph(node)
            if inner is not None:
                if len(path) > MAX_SUBGRAPH_DEPTH:
                    raise InputError(
                        f"The workflow's subgraphs nest more than {MAX_SUBGRAPH_DEPTH} levels deep "
                        "(a subgraph in itself?).",
                        {"format": "ui", "node": here.id},
                    )
                self.instances[here.id] = here
                stack.append((inner, (*path, str(node["id"])), iter(inner.node_list)))
        duplicates = {node_id: kinds for node_id, kinds in types.items() if len(kinds) > 1}
        if duplicates:
            named = list(duplicates.items())[:20]
            raise InputError(
                "Several nodes of the workflow have the same id in the API prompt, where one would replace the "
                "other: "
                + "; ".join(f"{node_id} ({', '.join(kinds)})" for node_id, kinds in named)
                + (f" and {len(duplicates) - len(named)} more" if len(duplicates) > len(named) else "")
                + ". Give each node an id of its own in the file (and its links too); an id of the form "
                "'<a>:<b>' is the id of node <b> inside subgraph instance <a>.",
                {"format": "ui", "duplicate_node_ids": dict(named), "duplicate_count": len(duplicates)},
            )
        return placed

    def is_sent(self, placed: _Placed) -> bool:
        node = placed.node
        node_type = str(node.get("type"))
        return (
            node_type not in VIRTUAL_NODE_TYPES
            and self.inner_graph(node) is None
            and node.get("mode", 0) not in (MUTED, BYPASSED)
            and not self.in_switched_off_instance(placed)
        )

    def in_switched_off_instance(self, placed: _Placed) -> bool:
        """Whether the node is inside a subgraph (or group node) instance of the root graph that is muted or
        bypassed: the frontend (1.58) sends none of its nodes, at any depth. An instance muted or bypassed inside
        another subgraph does not switch off its inner nodes (the frontend looks only at the root's)."""
        return bool(placed.path) and self.instances[placed.path[0]].node.get("mode", 0) in (MUTED, BYPASSED)

    def resolve_input(self, placed: _Placed, slot: int) -> _Resolved | None:
        """What input ``slot`` of a node takes: links followed back one step at a time, in a loop (a chain of a
        thousand Reroutes is a thousand steps, not a thousand frames), each step's answer kept (inputs that
        share a chain follow it once), and a step seen twice on one way is a loop."""
        step: _Step | _Resolved | None = _Step(True, placed, slot)
        walked: list[tuple[bool, str, int, str]] = []
        on_the_way: set[tuple[bool, str, int]] = set()
        while isinstance(step, _Step):
            self.check_time()
            key = (step.into_input, step.placed.id, step.slot, repr(step.kind))
            if key in self.resolved:
                step = self.resolved[key]
                break
            if key[:3] in on_the_way:
                where = "input" if step.into_input else "output"
                raise InputError(
                    f"The workflow's links loop through node {key[1]} ({where} {step.slot}).",
                    {"format": "ui", "node": key[1]},
                )
            on_the_way.add(key[:3])
            walked.append(key)
            step = self.from_input(step) if step.into_input else self.from_output(step)
        for key in walked:
            self.resolved[key] = step
        return step

    def from_input(self, step: _Step) -> _Step | _Resolved | None:
        """Into an input: on to the output its link comes from (or out of the subgraph it is in)."""
        placed, slot = step.placed, step.slot
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
            return self.from_subgraph_input(placed, link.origin_slot)
        origin = placed.graph.nodes.get(str(link.origin_id))
        if origin is None:
            raise InputError(
                f"Input '{name}' of node {placed.id} is linked to node {link.origin_id}, which is not in the workflow "
                "(ComfyUI's frontend refuses it too): reconnect the input in ComfyUI and save again.",
                {"format": "ui", "node": placed.id, "input": name},
            )
        wanted = step.kind if step.kind is not None else inputs[slot].get("type")
        return _Step(False, _Placed(origin, placed.graph, placed.path), link.origin_slot, wanted)

    def from_subgraph_input(self, placed: _Placed, slot: int) -> _Step | _Resolved | None:
        """A link from a subgraph's input node: continue outside, at the instance's input (or its widget)."""
        instance = self.instances[":".join(placed.path)]
        definition = placed.graph.definition or {}
        sub_inputs = definition.get("inputs") or []
        if slot >= len(sub_inputs):
            return None
        name = sub_inputs[slot].get("name")
        index = self.linked_inputs_of(instance.node).get(name)
        if index is not None:
            return _Step(True, instance, index)
        if definition.get("group"):
            return None  # a group node's unlinked inputs keep the inner widget's value
        position = self.widget_inputs_of(placed.graph).get(name)
        saved = instance.node.get("widgets_values")
        if position is not None and isinstance(saved, list) and position < len(saved):
            return _Resolved(value=saved[position])
        return None

    def linked_inputs_of(self, node: dict[str, Any]) -> dict[Any, int]:
        """A subgraph instance's linked inputs by name (the first of each name), found once per instance."""
        if id(node) not in self.linked_inputs:
            found: dict[Any, int] = {}
            for index, outer in enumerate(node.get("inputs") or []):
                if outer.get("link") is not None:
                    found.setdefault(outer.get("name"), index)
            self.linked_inputs[id(node)] = found
        return self.linked_inputs[id(node)]

    def widget_inputs_of(self, graph: _Graph) -> dict[Any, int]:
        """The subgraph's inputs linked inside to a widget (the instance shows them as its widgets, in this
        order), by name: where each one's value is in the instance's ``widgets_values``."""
        if graph.widget_inputs is None:
            graph.widget_inputs = {}
            position = 0
            for entry in (graph.definition or {}).get("inputs") or []:
                if self.feeds_widget(graph, entry):
                    graph.widget_inputs.setdefault(entry.get("name"), position)
                    position += 1
        return graph.widget_inputs

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

    def from_output(self, step: _Step) -> _Step | _Resolved | None:
        """Out of an output: a node that is sent is the answer; others pass the link on (or end it)."""
        placed, slot, kind = step.placed, step.slot, step.kind
        node = placed.node
        node_type = str(node.get("type"))
        if node.get("mode", 0) == BYPASSED:
            index = self.bypass_slot(node, slot, kind)
            self.result.rewired.append(f"bypassed node {placed.id} ({node_type})")
            return None if index < 0 else _Step(True, placed, index)
        inner = self.inner_graph(node)
        if inner is not None:
            link = inner.outputs.get(slot)
            origin = inner.nodes.get(str(link.origin_id)) if link else None
            if link is None or origin is None:
                return None
            return _Step(False, _Placed(origin, inner, (*placed.path, str(node["id"]))), link.origin_slot, kind)
        if node_type in VIRTUAL_NODE_TYPES:
            return _Step(True, placed, slot, kind) if slot < len(node.get("inputs") or []) else None
        return _Resolved(origin=placed.id, slot=slot)

    def bypass_slot(self, node: dict[str, Any], slot: int, kind: Any) -> int:
        """Which input stands in for output ``slot`` of a bypassed node (-1: none), as the frontend picks it."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        output_type = outputs[slot].get("type") if slot < len(outputs) else None
        if kind in ("*", ""):
            return slot if len(inputs) > slot else 0
        same_slot = inputs[slot].get("type") if slot < len(inputs) else None
        if same_slot is not None and _types_match(same_slot, output_type) and _types_match(same_slot, kind):
            return slot
        key = (id(node), repr(output_type), repr(kind))
        if key not in self.bypass_scans:  # the same for all the outputs of one type: the inputs are scanned once
            self.bypass_scans[key] = _first_matching_input(inputs, output_type, kind)
        return self.bypass_scans[key]

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
                    self.check_time()
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
            text = isinstance(value, str) and name in dynamic
            inputs[name] = _sendable(dynamic_prompt(value, deadline=self.deadline) if text else value)
        for index, entry in enumerate(node.get("inputs") or []):
            resolved = self.resolve_input(placed, index)
            if resolved is None:
                continue
            if resolved.origin is not None:
                inputs[entry["name"]] = [resolved.origin, resolved.slot]
            elif resolved.value is not None:
                inputs[entry["name"]] = _sendable(resolved.value)
        title = node.get("title") or self.object_info[node_type].get("display_name") or node_type
        return {"inputs": inputs, "class_type": node_type, "_meta": {"title": title}}

    def convert(self) -> Conversion:
        placed_nodes = self.placed_nodes()
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
            if not known and placed.node.get("mode", 0) not in (MUTED,) and not self.in_switched_off_instance(placed):
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
            self.check_time()
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


def convert(workflow: Workflow, object_info: Mapping[str, Any], deadline: float | None = None) -> Conversion:
    """The API prompt ComfyUI's frontend would queue for this UI-format workflow; InputError if malformed.

    ``deadline`` (``time.monotonic()``): past it, the conversion stops with ``JobTimeoutError`` (a job's own
    deadline, so that a conversion in a thread, which nothing can kill, ends with its job).
    """
    try:
        return _Converter(workflow, object_info, deadline).convert()
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(
            f"The workflow looks like ComfyUI's UI format but could not be read ({type(exc).__name__}: {exc}). "
            "Save it again in ComfyUI, or use Workflow > Export (API).",
            {"format": "ui"},
        ) from exc


def _graph(data: Mapping[str, Any], definition: dict[str, Any] | None, renumbered: Mapping[str, int]) -> _Graph:
    """A graph of the workflow, its nodes' ids (and its links' ends) renumbered as ``renumbered`` says."""
    nodes = [node for node in data.get("nodes") or [] if isinstance(node, dict) and "id" in node]
    nodes = [dict(node, id=renumbered[str(node["id"])]) if str(node["id"]) in renumbered else node for node in nodes]
    links: dict[int, _Link] = {}
    for link in data.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            link_id, origin, origin_slot, target, target_slot = link[:5]
        elif isinstance(link, dict):
            link_id, origin, origin_slot = link["id"], link["origin_id"], link["origin_slot"]
            target, target_slot = link["target_id"], link["target_slot"]
        else:
            continue
        origin, target = renumbered.get(str(origin), origin), renumbered.get(str(target), target)
        links[int(link_id)] = _Link(origin, int(origin_slot), target, int(target_slot))
    return _Graph(nodes, links, definition)


def _first_of_each_id(definitions: list[Any]) -> list[dict[str, Any]]:
    """The subgraph definitions, the first of each id only (the frontend ignores a later one with the same id)."""
    seen: set[str] = set()
    kept = []
    for definition in definitions:
        if isinstance(definition, dict) and str(definition["id"]) not in seen:
            seen.add(str(definition["id"]))
            kept.append(definition)
    return kept


def _renumbered_inner_nodes(workflow: Workflow, definitions: list[dict[str, Any]]) -> list[dict[str, int]]:
    """For each subgraph definition, the new ids of the inner nodes that the frontend renumbers on load.

    Frontend 1.58 makes node ids unique across the root graph and all subgraph definitions when it loads a
    workflow (earlier ones, 1.27 among them, keep them as saved): definition by definition, in the file's
    order, an inner node whose id a root node or a node of an earlier definition already has gets the next
    free id after the workflow's ``last_node_id`` (and after every id seen so far), as a new node would. The
    execution id of an inner node (``<instance>:<inner>``) carries the new id, and so do overrides. Where two
    nodes of one definition share an id, that definition is left as it is: the conversion refuses it."""
    taken = {str(node.get("id")) for node in _list(workflow.get("nodes")) if isinstance(node, dict)}
    numbers = {number for number in map(_integer_id, taken) if number is not None}
    last = workflow.get("last_node_id")
    if "last_node_id" not in workflow and workflow.get("version") != 0.4:
        last = _dict(workflow.get("state")).get("lastNodeId")
    last = max(last, 0) if isinstance(last, int) and not isinstance(last, bool) else 0
    renumbering = []
    for definition in definitions:
        ids = [str(node.get("id")) for node in _list(definition.get("nodes")) if isinstance(node, dict)]
        renumbered: dict[str, int] = {}
        for saved in ids if len(set(ids)) == len(ids) else []:
            node_id = saved
            if saved in taken:
                last += 1
                while last in numbers:
                    last += 1
                renumbered[saved] = last
                node_id = str(last)
            taken.add(node_id)
            number = _integer_id(node_id)
            if number is not None:
                numbers.add(number)
                last = max(last, number)
        renumbering.append(renumbered)
    return renumbering


def _integer_id(node_id: str) -> int | None:
    """The id as a number where it is one written plainly ("7", not "07" or "3:1"), as the frontend tells them."""
    return int(node_id) if re.fullmatch(r"-?[1-9][0-9]*|0", node_id) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


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


def _first_matching_input(inputs: list[dict[str, Any]], output_type: Any, kind: Any) -> int:
    """A bypassed node's first input of the wanted type, else the first that matches it and the output's."""
    for index, entry in enumerate(inputs):
        if entry.get("type") == kind:
            return index
    for index, entry in enumerate(inputs):
        if _types_match(entry.get("type"), output_type) and _types_match(entry.get("type"), kind):
            return index
    return -1


_SPECIAL = re.compile(r"[\\{}|]")
_LINE_END = re.compile("[\n\r\u2028\u2029]")  # where JavaScript's '.' stops
_ESCAPED = re.compile(r"\\([{}|])")
_Choice = list[list[Any]]  # a {a|b|c} block: its options, each a list of text and nested blocks


def dynamic_prompt(text: str, rng: random.Random | None = None, *, deadline: float | None = None) -> str:
    """The frontend's dynamic prompts (its ``processDynamicPrompt``): comments removed, then each ``{a|b|c}``
    replaced by one of its options, chosen at random, nested blocks inside the chosen option in turn; ``\\{``,
    ``\\|`` and ``\\}`` stand for the characters themselves, a block left open runs to the end of the text, and a
    ``}`` or ``|`` outside any block is text.

    The frontend parses a block again at every level of nesting (work that grows with the square of the depth);
    here the text is read once into a tree of blocks, then only the chosen options are walked, both in loops:
    linear in the text's length, however deep it nests. The result is the frontend's (``tests/test_ui_format.py``
    compares the two) but where the frontend unescapes once per level and this once in all, for a literal
    backslash (``\\\\``) written just before ``{``, ``|`` or ``}``, and for a backslash that ends the text, which
    stays one (the frontend writes ``\\undefined``).
    """
    rng = rng or random.Random()  # noqa: S311 - prompt variety, not security
    text = _strip_comments(text, deadline)
    top: list[Any] = []
    blocks: list[_Choice] = []  # the blocks open at this point, innermost last
    current = top
    position = steps = 0
    while (found := _SPECIAL.search(text, position)) is not None:
        steps += 1
        _check_deadline(deadline, steps)
        if found.start() > position:
            current.append(text[position : found.start()])
        char, position = found.group(), found.end()
        if char == "\\":
            current.append(text[found.start() : position + 1])  # kept with its backslash, unescaped at the end
            position += 1
        elif char == "{":
            block: _Choice = [[]]
            current.append(block)
            blocks.append(block)
            current = block[-1]
        elif not blocks:
            current.append(char)
        elif char == "|":
            blocks[-1].append([])
            current = blocks[-1][-1]
        else:
            blocks.pop()
            current = blocks[-1][-1] if blocks else top
    current.append(text[position:])
    chosen: list[str] = []
    walking: list[Iterator[Any]] = [iter(top)]
    while walking:
        piece = next(walking[-1], None)
        if piece is None:
            walking.pop()
        elif isinstance(piece, str):
            chosen.append(piece)
        else:
            steps += 1
            _check_deadline(deadline, steps)
            walking.append(iter(rng.choice(piece)))
    return _ESCAPED.sub(r"\1", "".join(chosen))


def _strip_comments(text: str, deadline: float | None) -> str:
    """The frontend's ``text.replace(/\\/\\*[\\s\\S]*?\\*\\/|\\/\\/.*/g, "")`` in one pass: a ``/*`` with no
    ``*/`` after it stays (and so does every later one: none has a ``*/`` after it either), and a ``//`` runs to
    the end of its line."""
    kept: list[str] = []
    position = search = steps = 0
    closed = True  # whether a "*/" may still come
    while (start := text.find("/", search)) != -1:
        steps += 1
        _check_deadline(deadline, steps)
        following = text[start + 1 : start + 2]
        end = -1
        if following == "*" and closed:
            end = text.find("*/", start + 2)
            closed = end != -1
            end = end + 2 if closed else -1
        elif following == "/":
            line_end = _LINE_END.search(text, start + 2)
            end = line_end.start() if line_end else len(text)
        if end == -1:
            search = start + 1
            continue
        kept.append(text[position:start])
        position = search = end
    kept.append(text[position:])
    return "".join(kept)


def _check_deadline(deadline: float | None, count: int = 0) -> None:
    """Past the deadline, stop; ``count``: look only at every 4096th step of a loop over a text."""
    if deadline is not None and count % 4096 == 0 and time.monotonic() > deadline:
        raise JobTimeoutError("The UI-format conversion ran past the job's deadline.", {"format": "ui"})
