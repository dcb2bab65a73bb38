"""Prompt checking, job queue and job running of the stand-in ComfyUI.

The observable contract (validation error bodies, WebSocket events and their order, history entries, which
nodes a resubmitted prompt re-runs) is the one recorded from ComfyUI 0.3.64; the machinery is the stand-in's
own. Where the real server iterates a set (output order, ``executed``, ``current_outputs``) the stand-in uses
prompt order; clients must not depend on either.
"""

from __future__ import annotations

import copy
import heapq
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from standin_assets import Assets, registered, seed_paused, seed_rescan
from standin_nodes import BaseNode, InterruptProcessingError, NodeClass, NodeEnv, NodeRegistry, OutOfMemoryError

log = logging.getLogger("standin.execution")

HISTORY_LIMIT = 10000
# Extra-data keys that never reach the history.
SECRET_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
OOM_HINT = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
)

# Binary WebSocket event numbers of the protocol.
PREVIEW_IMAGE = 1
UNENCODED_PREVIEW_IMAGE = 2
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4

# Converters applied (and written back into the prompt) to constant inputs of these types.
CONVERTERS: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
# Hidden V1 inputs the runner fills in; each takes (prompt, node id, extra data).
HIDDEN_VALUES: dict[str, Callable[[Any, str, Mapping[str, Any]], Any]] = {
    "PROMPT": lambda prompt, node_id, extra: prompt if prompt is not None else {},
    "DYNPROMPT": lambda prompt, node_id, extra: None,
    "EXTRA_PNGINFO": lambda prompt, node_id, extra: extra.get("extra_pnginfo"),
    "UNIQUE_ID": lambda prompt, node_id, extra: node_id,
    "AUTH_TOKEN_COMFY_ORG": lambda prompt, node_id, extra: extra.get("auth_token_comfy_org"),
    "API_KEY_COMFY_ORG": lambda prompt, node_id, extra: extra.get("api_key_comfy_org"),
}


class Hub(Protocol):
    """What the runner needs from the server: a way to send events and who is listening."""

    current_client: str | None
    current_node: str | None
    assets: Assets | None  # the 0.38 flavour's assets system (standin_assets), else None

    def publish(self, event: str | int, data: Any, sid: str | None = None) -> None: ...

    def broadcast_status(self) -> None: ...

    def wants_preview_metadata(self, sid: str | None) -> bool: ...


class StopRequest:
    """``POST /interrupt`` raises this flag; the running node trips over it at its next check."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def check(self) -> None:
        if self._event.is_set():
            self._event.clear()
            raise InterruptProcessingError()


class Spec(NamedTuple):
    """One declared input: its type (a name or a combo list), its group and its options dict."""

    kind: Any
    group: str
    options: dict[str, Any]


def find_spec(declared: Mapping[str, Any], name: str) -> Spec | None:
    for group in ("required", "optional", "hidden"):
        entries = declared.get(group) or {}
        if name in entries:
            entry = entries[name]
            if isinstance(entry, str):  # hidden V1 inputs are bare type names
                return Spec(entry, group, {})
            return Spec(entry[0], group, entry[1] if len(entry) > 1 else {})
    return None


def is_link(value: Any) -> bool:
    return (
        isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], (int, float))
    )


def type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def kinds_compatible(produced: Any, wanted: Any) -> bool:
    """A link is fine when the types are equal, either is ``*``, or comma lists share a member."""
    if produced == wanted or "*" in (produced, wanted):
        return True
    if isinstance(produced, str) and isinstance(wanted, str):
        return not {p.strip() for p in produced.split(",")}.isdisjoint(w.strip() for w in wanted.split(","))
    return False


def problem(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def node_arguments(
    node_class: NodeClass,
    declared: Mapping[str, Any],
    node_id: str,
    inputs: Mapping[str, Any],
    produced: Callable[[str], list[Any] | None] | None = None,
    prompt: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, list[Any]]:
    """Each argument as a list of per-call values; links without a produced value give ``[None]``."""
    args: dict[str, list[Any]] = {}
    for name, value in inputs.items():
        spec = find_spec(declared, name)
        if is_link(value) and not (spec and spec.options.get("rawLink", False)):
            source = produced(value[0]) if produced is not None else None
            args[name] = source[value[1]] if source is not None and value[1] < len(source) else [None]
        elif spec is not None:
            args[name] = [value]
    if not node_class.is_v3:
        for name, kind in (declared.get("hidden") or {}).items():
            if kind in HIDDEN_VALUES:
                args[name] = [HIDDEN_VALUES[kind](prompt, node_id, extra or {})]
    return args


def call_per_item(
    fn: Callable[..., Any],
    args: Mapping[str, list[Any]],
    whole_lists: bool = False,
    before: Callable[[], None] = lambda: None,
) -> list[Any]:
    """Call ``fn`` once per item of the longest argument list (shorter lists repeat their last item)."""
    if whole_lists:
        before()
        return [fn(**args)]
    calls = max((len(values) for values in args.values()), default=1)
    results = []
    for i in range(calls):
        before()
        results.append(fn(**{name: values[min(i, len(values) - 1)] for name, values in args.items()}))
    return results


# ---------------------------------------------------------------------------------------------------------------
# Validation.
class PromptChecker:
    """Checks one submitted prompt; each node is checked once, its verdict kept in ``verdicts``."""

    def __init__(self, registry: NodeRegistry, env: NodeEnv, prompt: Any) -> None:
        self.registry = registry
        self.env = env
        self.prompt = prompt
        self.verdicts: dict[str, tuple[bool, list[dict[str, Any]]]] = {}

    def run(self, targets: Any) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        """(ok, error, outputs to run, node_errors) as ``POST /prompt`` reports them."""
        outputs: list[str] = []
        for node_id in self.prompt:
            node = self.prompt[node_id]
            if "class_type" not in node:
                message = "Cannot execute because a node is missing the class_type property."
                return False, problem("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
            node_class = self.registry.get(node["class_type"])
            if node_class is None:
                message = f"Cannot execute because node {node['class_type']} does not exist."
                return False, problem("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
            if node_class.output_node and (targets is None or node_id in targets):
                outputs.append(node_id)
        if not outputs:
            return False, problem("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

        runnable: list[str] = []
        summary: list[str] = []
        node_errors: dict[str, Any] = {}
        for output in outputs:
            ok, reasons = self._check_output(output)
            if ok:
                runnable.append(output)
                continue
            summary += [f"{r['message']}: {r['details']}" for r in reasons]
            # The real server's log lines, word for word (execution.py's validate_prompt)
            log.error("Failed to validate prompt for output %s:", output)
            if reasons:
                log.error("* (prompt):")
                for reason in reasons:
                    log.error("  - %s: %s", reason["message"], reason["details"])
            # Like the real server, every failed node known so far is charged to this output.
            for node_id, (node_ok, errors) in self.verdicts.items():
                if node_ok or not errors:
                    continue
                if node_id not in node_errors:
                    class_type = self.prompt[node_id]["class_type"]
                    node_errors[node_id] = {"errors": errors, "dependent_outputs": [], "class_type": class_type}
                    log.error("* %s %s:", class_type, node_id)
                    for reason in errors:
                        log.error("  - %s: %s", reason["message"], reason["details"])
                node_errors[node_id]["dependent_outputs"].append(output)
            log.error("Output will be ignored")
        if not runnable:
            error = problem("prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(summary))
            return False, error, [], node_errors
        return True, None, runnable, node_errors

    def _check_output(self, node_id: str) -> tuple[bool, list[dict[str, Any]]]:
        try:
            return self.check_node(node_id)
        except Exception as exc:
            reason = problem(
                "exception_during_validation",
                "Exception when validating node",
                str(exc),
                exception_type=type_name(exc),
                traceback=traceback.format_tb(exc.__traceback__),
            )
            self.verdicts[node_id] = (False, [reason])
            return False, [reason]

    def check_node(self, node_id: str) -> tuple[bool, list[dict[str, Any]]]:
        if node_id in self.verdicts:
            return self.verdicts[node_id]
        node = self.prompt[node_id]
        inputs = node["inputs"]
        node_class = self.registry.get(node["class_type"])
        if node_class is None:
            raise KeyError(node["class_type"])
        declared = self.registry.input_types(node_class.name)
        custom = node_class.impl.VALIDATE_INPUT_NAMES
        names = dict.fromkeys([*declared.get("required", {}), *declared.get("optional", {})])
        errors: list[dict[str, Any]] = []
        upstream_ok = True
        for name in names:
            spec = find_spec(declared, name)
            assert spec is not None
            if name not in inputs:
                if spec.group == "required":
                    errors.append(problem("required_input_missing", "Required input is missing", name, input_name=name))
                continue
            if isinstance(inputs[name], list):
                error, linked_ok = self._check_link(name, inputs[name], spec)
                upstream_ok = upstream_ok and linked_ok
            else:
                error = self._check_constant(name, inputs, spec, name in custom)
            if error is not None:
                errors.append(error)
        if custom:
            errors += self._custom_checks(node_class, declared, node_id, inputs, custom)
        verdict = (not errors and upstream_ok, errors)
        self.verdicts[node_id] = verdict
        return verdict

    def _check_link(self, name: str, link: list[Any], spec: Spec) -> tuple[dict[str, Any] | None, bool]:
        config = (spec.kind, spec.options)
        if len(link) != 2:
            message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            details = {"input_name": name, "input_config": config, "received_value": link}
            return problem("bad_linked_input", message, name, **details), True
        source_id, slot = link
        source_class = self.registry.get(self.prompt[source_id]["class_type"])
        if source_class is None:
            raise KeyError(self.prompt[source_id]["class_type"])
        produced = source_class.return_types[slot]
        if not kinds_compatible(produced, spec.kind):
            return problem(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                f"{name}, received_type({produced}) mismatch input_type({spec.kind})",
                input_name=name,
                input_config=config,
                received_type=produced,
                linked_node=link,
            ), True
        try:
            return None, self.check_node(source_id)[0]
        except Exception as exc:
            reason = problem(
                "exception_during_inner_validation",
                "Exception when validating inner node",
                str(exc),
                input_name=name,
                input_config=config,
                exception_message=str(exc),
                exception_type=type_name(exc),
                traceback=traceback.format_tb(exc.__traceback__),
                linked_node=link,
            )
            self.verdicts[source_id] = (False, [reason])
            return None, False

    @staticmethod
    def _check_constant(name: str, inputs: dict[str, Any], spec: Spec, custom: bool) -> dict[str, Any] | None:
        """Unwrap/convert the value in place, then apply min, max and combo checks (unless custom-checked)."""
        value = inputs[name]
        config = (spec.kind, spec.options)
        try:
            if isinstance(value, dict) and "__value__" in value:
                value = inputs[name] = value["__value__"]
            if isinstance(spec.kind, str) and spec.kind in CONVERTERS:
                value = inputs[name] = CONVERTERS[spec.kind](value)
        except Exception as exc:
            return problem(
                "invalid_input_type",
                f"Failed to convert an input value to a {spec.kind} value",
                f"{name}, {value}, {exc}",
                input_name=name,
                input_config=config,
                received_value=value,
                exception_message=str(exc),
            )
        if custom:
            return None
        low, high = spec.options.get("min"), spec.options.get("max")
        if "min" in spec.options and value < low:
            return problem(
                "value_smaller_than_min",
                f"Value {value} smaller than min of {low}",
                name,
                input_name=name,
                input_config=config,
                received_value=value,
            )
        if "max" in spec.options and value > high:
            return problem(
                "value_bigger_than_max",
                f"Value {value} bigger than max of {high}",
                name,
                input_name=name,
                input_config=config,
                received_value=value,
            )
        if isinstance(spec.kind, list) and value not in spec.kind:
            long_list = len(spec.kind) > 20
            shown = f"(list of length {len(spec.kind)})" if long_list else str(spec.kind)
            return problem(
                "value_not_in_list",
                "Value not in list",
                f"{name}: '{value}' not in {shown}",
                input_name=name,
                input_config=None if long_list else config,
                received_value=value,
            )
        return None

    def _custom_checks(
        self, node_class: NodeClass, declared: Mapping[str, Any], node_id: str, inputs: Any, names: tuple[str, ...]
    ) -> list[dict[str, Any]]:
        args = node_arguments(node_class, declared, node_id, inputs)
        chosen = {name: values for name, values in args.items() if name in names}
        impl = node_class.impl
        outcomes = call_per_item(lambda **kw: impl.VALIDATE_INPUTS(self.env, **kw), chosen)
        failures = []
        for name in chosen:
            for outcome in outcomes:
                if outcome is True:
                    continue
                details = name if outcome is False else f"{name} - {outcome}"
                message = "Custom validation failed for node"
                failures.append(problem("custom_validation_failed", message, details, input_name=name))
        return failures


def check_prompt(
    registry: NodeRegistry, env: NodeEnv, prompt: Any, targets: Any
) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    return PromptChecker(registry, env, prompt).run(targets)


# ---------------------------------------------------------------------------------------------------------------
# Caching.
class _NeverEqual:
    """Stands for a value that must never produce a cache hit."""


def freeze(value: Any) -> Hashable:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((str(k), freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(freeze(v) for v in value))
    return _NeverEqual()


class ResultCache:
    """Values stored under a per-prompt key of each node.

    ``limit=None`` keeps only what the current prompt uses; a number keeps up to that many entries, dropping the
    ones unused for the most prompts first (``--cache-lru``).
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.entries: dict[Hashable, Any] = {}
        self.keys: dict[str, Hashable] = {}
        self.prompt_count = 0
        self.dropped_before = 0
        self.last_used: dict[Hashable, int] = {}

    def start_prompt(self, keys: dict[str, Hashable]) -> None:
        self.keys = keys
        self.prompt_count += 1
        for key in keys.values():
            self.last_used[key] = self.prompt_count
        if self.limit is None:
            wanted = set(keys.values())
            self.entries = {k: v for k, v in self.entries.items() if k in wanted}
            return
        while len(self.entries) > self.limit and self.dropped_before < self.prompt_count:
            self.dropped_before += 1
            stale = [k for k in self.entries if self.last_used.get(k, 0) < self.dropped_before]
            for key in stale:
                del self.entries[key]
                self.last_used.pop(key, None)

    def get(self, node_id: str) -> Any:
        return self.entries.get(self.keys.get(node_id))

    def put(self, node_id: str, value: Any) -> None:
        key = self.keys.get(node_id)
        self.last_used[key] = self.prompt_count
        self.entries[key] = value


class Caches:
    """Node outputs, ui results (both keyed by input signature) and node instances (keyed by id and class)."""

    def __init__(self, mode: str, lru_size: int) -> None:
        self.mode = mode
        limit = lru_size if mode == "lru" else None
        self.outputs = ResultCache(limit)
        self.ui = ResultCache(limit)
        self.instances = ResultCache()

    def start_prompt(self, registry: NodeRegistry, env: NodeEnv, prompt: dict[str, Any]) -> None:
        if self.mode == "none":
            for cache in (self.outputs, self.ui, self.instances):
                cache.entries.clear()
        signatures = Signatures(registry, env, prompt)
        keys = {node_id: signatures.of(node_id) for node_id in prompt}
        self.outputs.start_prompt(keys)
        self.ui.start_prompt(dict(keys))
        self.instances.start_prompt({node_id: (node_id, node["class_type"]) for node_id, node in prompt.items()})


class Signatures:
    """A node's cache key: class, ``IS_CHANGED`` answer, constants, and the keys of what it links to."""

    def __init__(self, registry: NodeRegistry, env: NodeEnv, prompt: dict[str, Any]) -> None:
        self.registry = registry
        self.env = env
        self.prompt = prompt
        self.known: dict[str, Hashable] = {}

    def of(self, node_id: str) -> Hashable:
        if node_id in self.known:
            return self.known[node_id]
        node = self.prompt.get(node_id)
        if node is None:
            return _NeverEqual()
        node_class = self.registry.get(node["class_type"])
        assert node_class is not None
        parts: list[Hashable] = [node["class_type"], freeze(self._change_token(node_id, node, node_class))]
        hidden = (node_class.info.get("input", {}).get("hidden") or {}).values()
        if node_class.impl.NOT_IDEMPOTENT or "UNIQUE_ID" in hidden:
            parts.append(node_id)
        for name in sorted(node["inputs"]):
            value = node["inputs"][name]
            parts.append((name, ("link", self.of(value[0]), value[1]) if is_link(value) else freeze(value)))
        self.known[node_id] = tuple(parts)
        return self.known[node_id]

    def _change_token(self, node_id: str, node: dict[str, Any], node_class: NodeClass) -> Any:
        """``IS_CHANGED``'s answer, remembered in the node dict (a client may also supply it there)."""
        if not node_class.impl.HAS_IS_CHANGED:
            return False
        if "is_changed" not in node:
            args = node_arguments(node_class, node_class.info.get("input", {}), node_id, node["inputs"])
            try:
                fn = node_class.impl.IS_CHANGED
                node["is_changed"] = call_per_item(lambda **kw: fn(self.env, **kw), args)
            except Exception as exc:
                log.warning("IS_CHANGED of %s failed: %s", node_id, exc)
                node["is_changed"] = math.nan
        return node["is_changed"]


# ---------------------------------------------------------------------------------------------------------------
# Ordering.
class Scheduler:
    """Which node runs next: a node is ready when none of its uncached, non-lazy sources is still waiting."""

    def __init__(self, registry: NodeRegistry, prompt: dict[str, Any], is_cached: Callable[[str], bool]) -> None:
        self.registry = registry
        self.prompt = prompt
        self.is_cached = is_cached
        self.waiting_on: dict[str, set[str]] = {}  # in discovery order
        self.feeds: dict[str, set[str]] = {}

    def _class(self, node_id: str) -> NodeClass:
        node_class = self.registry.get(self.prompt[node_id]["class_type"])
        assert node_class is not None
        return node_class

    def want(self, node_id: str) -> None:
        """Schedule a node and, depth first (last input first), every uncached source it needs."""
        todo = [node_id]
        while todo:
            current = todo.pop()
            if current in self.waiting_on:
                continue
            self.waiting_on[current] = set()
            declared = self._class(current).info.get("input", {})
            for name, value in self.prompt[current]["inputs"].items():
                spec = find_spec(declared, name)
                if not is_link(value) or (spec and spec.options.get("lazy")) or self.is_cached(value[0]):
                    continue
                todo.append(value[0])
                self.waiting_on[current].add(value[0])
                self.feeds.setdefault(value[0], set()).add(current)

    def done(self) -> bool:
        return not self.waiting_on

    def next(self) -> str | None:
        """Prefer output nodes, then their direct feeders, then feeders of feeders (quicker visible results)."""
        ready = [n for n, sources in self.waiting_on.items() if not sources]
        if not ready:
            return None

        def is_output(node_id: str) -> bool:
            return self._class(node_id).output_node

        def rank(node_id: str) -> int:
            fed = self.feeds.get(node_id, set())
            if is_output(node_id):
                return 0
            if any(is_output(n) for n in fed):
                return 1
            if any(is_output(m) for n in fed for m in self.feeds.get(n, set())):
                return 2
            return 3

        return min(ready, key=rank)

    def finish(self, node_id: str) -> None:
        del self.waiting_on[node_id]
        for target in self.feeds.pop(node_id, ()):
            if target in self.waiting_on:
                self.waiting_on[target].discard(node_id)


# ---------------------------------------------------------------------------------------------------------------
# Running.
class ProgressBoard:
    """Per-node progress of the running prompt, sent whole as a ``progress_state`` event on every change."""

    def __init__(self, hub: Hub, prompt_id: str) -> None:
        self.hub = hub
        self.prompt_id = prompt_id
        self.nodes: dict[str, tuple[str, float, float]] = {}
        self.activities: dict[str, str] = {}

    def _ids(self, node_id: str) -> dict[str, Any]:
        return {
            "node_id": node_id,
            "prompt_id": self.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }

    def set(self, node_id: str, state: str, value: float, maximum: float, activity: str | None = None) -> None:
        """``activity`` (0.38 flavour): what the running node spends its time on, until its next change."""
        self.nodes[node_id] = (state, value, maximum)
        if activity is None:
            self.activities.pop(node_id, None)
        else:
            self.activities[node_id] = activity
        shown = {nid: {"value": v, "max": m, "state": s, **self._ids(nid)} for nid, (s, v, m) in self.nodes.items()}
        for nid, doing in self.activities.items():
            shown[nid]["activity"] = doing
        self.hub.publish("progress_state", {"prompt_id": self.prompt_id, "nodes": shown}, self.hub.current_client)

    def finish(self, node_id: str) -> None:
        maximum = self.nodes[node_id][2] if node_id in self.nodes else 1
        self.set(node_id, "finished", maximum, maximum)

    def preview_with_metadata(self, node_id: str, preview: Any) -> None:
        self.hub.publish(PREVIEW_IMAGE_WITH_METADATA, (preview, self._ids(node_id)), self.hub.current_client)


class NodeFailure(Exception):
    """A node could not run; ``report`` holds what the error event says about it."""

    def __init__(self, node_id: str, report: dict[str, Any], cause: BaseException) -> None:
        super().__init__(node_id)
        self.node_id = node_id
        self.report = report
        self.cause = cause


@dataclass
class Outcome:
    """What one prompt left behind: its status for the history, and the ui outputs."""

    success: bool = True
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Runs prompts one at a time against the node caches."""

    def __init__(
        self, hub: Hub, registry: NodeRegistry, env: NodeEnv, stop: StopRequest, cache_mode: str, lru: int
    ) -> None:
        self.hub = hub
        self.registry = registry
        self.env = env
        self.stop = stop
        self.cache_mode = cache_mode
        self.lru = lru
        self.caches = Caches(cache_mode, lru)

    def forget(self) -> None:
        """``POST /free`` with ``free_memory``: drop every cached result and node instance."""
        self.caches = Caches(self.cache_mode, self.lru)

    def run(self, prompt_id: str, prompt: dict[str, Any], extra: dict[str, Any], targets: list[str]) -> Outcome:
        outcome = Outcome()
        hub = self.hub

        def emit(event: str, data: dict[str, Any], always: bool = False) -> None:
            data = {**data, "timestamp": int(time.time() * 1000)}
            outcome.messages.append((event, data))
            if hub.current_client is not None or always:
                hub.publish(event, data, hub.current_client)

        self.stop.clear()
        hub.current_client = extra.get("client_id")
        emit("execution_start", {"prompt_id": prompt_id})
        if hub.assets is not None:
            seed_paused(hub)
        self.caches.start_prompt(self.registry, self.env, prompt)
        cached = [node_id for node_id in prompt if self.caches.outputs.get(node_id) is not None]
        emit("execution_cached", {"nodes": cached, "prompt_id": prompt_id})

        board = ProgressBoard(hub, prompt_id)
        scheduler = Scheduler(self.registry, prompt, lambda n: self.caches.outputs.get(n) is not None)
        for target in targets:
            scheduler.want(target)
        executed: list[str] = []
        try:
            while not scheduler.done():
                node_id = scheduler.next()
                if node_id is None:  # validation rejects cycles, so this is a stand-in bug
                    raise RuntimeError("no runnable node left: dependency cycle")
                if self._run_node(prompt_id, prompt, node_id, extra, board):
                    executed.append(node_id)
                scheduler.finish(node_id)
        except NodeFailure as failure:
            outcome.success = False
            base = {
                "prompt_id": prompt_id,
                "node_id": failure.node_id,
                "node_type": prompt[failure.node_id]["class_type"],
                "executed": list(executed),
            }
            if isinstance(failure.cause, InterruptProcessingError):
                emit("execution_interrupted", base, always=True)
            else:
                emit("execution_error", {**base, **failure.report, "current_outputs": list(prompt)})
        else:
            emit("execution_success", {"prompt_id": prompt_id})

        for node_id in prompt:
            shown = self.caches.ui.get(node_id)
            if shown is not None:
                outcome.outputs[node_id] = self._enriched(shown["output"])
                outcome.meta[node_id] = shown["meta"]
        hub.current_node = None
        return outcome

    def _enriched(self, ui: Any) -> Any:
        """A node's ui output as sent and kept: with asset ids in the 0.38 flavour."""
        return ui if self.hub.assets is None else self.hub.assets.enrich(ui)

    def _run_node(
        self, prompt_id: str, prompt: dict[str, Any], node_id: str, extra: dict[str, Any], board: ProgressBoard
    ) -> bool:
        """Run one node, or replay it from the cache (False); raises ``NodeFailure``."""
        hub = self.hub
        client = hub.current_client
        node = prompt[node_id]
        node_class = self.registry.get(node["class_type"])
        assert node_class is not None
        if self.caches.outputs.get(node_id) is not None:
            if client is not None:
                output = self._enriched((self.caches.ui.get(node_id) or {}).get("output"))
                replay = {"node": node_id, "display_node": node_id, "output": output, "prompt_id": prompt_id}
                hub.publish("executed", replay, client)
            board.finish(node_id)
            return False

        args: dict[str, list[Any]] | None = None
        try:
            board.set(node_id, "running", 0.0, 1.0, "loading" if hub.assets is not None else None)
            declared = node_class.info.get("input", {})
            args = node_arguments(node_class, declared, node_id, node["inputs"], self.caches.outputs.get, prompt, extra)
            if client is not None:
                hub.current_node = node_id
                hub.publish("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}, client)
            instance = self.caches.instances.get(node_id)
            if instance is None:
                instance = node_class.impl(self.env)
                self.caches.instances.put(node_id, instance)
            assert isinstance(instance, BaseNode)
            self.env.progress_hook = self._progress_reporter(prompt_id, node_id, board)
            returned = call_per_item(
                getattr(instance, instance.FUNCTION), args, instance.INPUT_IS_LIST, self.stop.check
            )
            values, ui = split_returns(returned, node_class)
            if ui:
                meta = {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
                self.caches.ui.put(node_id, {"meta": meta, "output": ui})
                if client is not None:
                    shown_ui = self._enriched(ui)
                    executed = {"node": node_id, "display_node": node_id, "output": shown_ui, "prompt_id": prompt_id}
                    hub.publish("executed", executed, client)
            self.caches.outputs.put(node_id, values)
        except InterruptProcessingError as exc:
            log.info("Processing interrupted")
            raise NodeFailure(node_id, {}, exc) from exc
        except Exception as exc:
            log.exception("Node %s (%s) failed", node_id, node["class_type"])
            shown_args = {} if args is None else {k: [plain(v) for v in vs] for k, vs in args.items()}
            report = {
                "exception_message": f"{exc}\n{OOM_HINT if isinstance(exc, OutOfMemoryError) else ''}",
                "exception_type": type_name(exc),
                "traceback": traceback.format_tb(exc.__traceback__),
                "current_inputs": shown_args,
            }
            raise NodeFailure(node_id, report, exc) from exc
        finally:
            self.env.progress_hook = lambda value, total, preview: None
        board.finish(node_id)
        return True

    def _progress_reporter(self, prompt_id: str, node_id: str, board: ProgressBoard) -> Callable[..., None]:
        hub = self.hub

        def report(value: float, total: float, preview: Any) -> None:
            self.stop.check()
            client = hub.current_client
            board.set(node_id, "running", value, total)
            with_metadata = hub.wants_preview_metadata(client)
            if preview is not None and with_metadata:
                board.preview_with_metadata(node_id, preview)
            hub.publish("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id}, client)
            if preview is not None and not with_metadata:
                hub.publish(UNENCODED_PREVIEW_IMAGE, preview, client)

        return report


def plain(value: Any) -> Any:
    """How an argument shows in an error event: JSON scalars as they are, anything else as ``str()``."""
    return value if value is None or isinstance(value, (int, float, bool, str)) else str(value)


def split_returns(returned: list[Any], node_class: NodeClass) -> tuple[list[Any], dict[str, Any]]:
    """Per-slot output lists and the merged ui dict from the values of each call."""
    results = [r["result"] if isinstance(r, dict) else r for r in returned if not isinstance(r, dict) or "result" in r]
    uis = [r["ui"] for r in returned if isinstance(r, dict) and "ui" in r]
    values: list[Any] = []
    if results:
        as_lists = list(node_class.output_is_list) or [False] * len(results[0])
        for slot, flat in zip(range(len(results[0])), as_lists, strict=False):
            column = [r[slot] for r in results]
            values.append([item for part in column for item in part] if flat else column)
    ui = {key: [item for u in uis for item in u[key]] for key in uis[0]} if uis else {}
    return values, ui


# ---------------------------------------------------------------------------------------------------------------
# The queue.
@dataclass(order=True)
class Job:
    """A queued prompt; jobs run by ascending ``number`` (negative for ``front``), then prompt id."""

    number: float
    prompt_id: str
    prompt: dict[str, Any] = field(compare=False)
    extra: dict[str, Any] = field(compare=False)
    targets: list[str] = field(compare=False)

    def as_json(self) -> list[Any]:
        """The five-element list ``/queue`` and ``/history`` show."""
        return [self.number, self.prompt_id, self.prompt, self.extra, self.targets]


class JobQueue:
    """Pending jobs, the running one, finished ones (history) and requests for the worker; thread-safe."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._lock = threading.Condition(threading.RLock())
        self._pending: list[Job] = []  # a heap: /queue shows it in heap order, like the real server
        self._running: dict[int, list[Any]] = {}
        self._started = 0
        self._history: dict[str, dict[str, Any]] = {}
        self._requests: dict[str, Any] = {}

    def add(self, job: Job) -> None:
        with self._lock:
            heapq.heappush(self._pending, job)
            self.hub.broadcast_status()
            self._lock.notify()

    def take(self, timeout: float) -> tuple[int, Job] | None:
        """The next job (now marked running), or None when requests arrived or the wait timed out."""
        with self._lock:
            if not self._pending:
                self._lock.wait(timeout)
                if not self._pending:
                    return None
            job = heapq.heappop(self._pending)
            ticket = self._started
            self._started += 1
            self._running[ticket] = copy.deepcopy(job.as_json())
            self.hub.broadcast_status()
            return ticket, job

    def finish(self, ticket: int, outcome: Outcome) -> None:
        with self._lock:
            shown = self._running.pop(ticket)
            for key in SECRET_KEYS:
                shown[3].pop(key, None)
            if len(self._history) > HISTORY_LIMIT:
                del self._history[next(iter(self._history))]
            status = {
                "status_str": "success" if outcome.success else "error",
                "completed": outcome.success,
                "messages": copy.deepcopy(outcome.messages),
            }
            entry = {"prompt": shown, "outputs": outcome.outputs, "status": status, "meta": outcome.meta}
            self._history[shown[1]] = entry
            self.hub.broadcast_status()

    def snapshot(self) -> tuple[list[list[Any]], list[list[Any]]]:
        with self._lock:
            return list(self._running.values()), [job.as_json() for job in self._pending]

    def remaining(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._running)

    def is_running(self, prompt_id: str) -> bool:
        with self._lock:
            return any(item[1] == prompt_id for item in self._running.values())

    def clear(self) -> None:
        with self._lock:
            self._pending = []
            self.hub.broadcast_status()

    def cancel(self, prompt_id: str) -> bool:
        """Drop the first pending job with this id (whether there was one); emptying the queue sends one extra
        status event."""
        with self._lock:
            for index, job in enumerate(self._pending):
                if job.prompt_id == prompt_id:
                    self._pending.pop(index)
                    heapq.heapify(self._pending)
                    if not self._pending:
                        self.hub.broadcast_status()
                    self.hub.broadcast_status()
                    return True
            return False

    def interrupt_if_running(self, prompt_id: str, stop: StopRequest) -> bool:
        """Interrupt ``prompt_id`` only while it is the one running (0.38's cancel): never the next prompt."""
        with self._lock:
            if not self.is_running(prompt_id):
                return False
            stop.request()
            return True

    def history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        with self._lock:
            if prompt_id is not None:
                return {prompt_id: copy.deepcopy(self._history[prompt_id])} if prompt_id in self._history else {}
            if offset < 0 and max_items is not None:
                offset = len(self._history) - max_items
            chosen = list(self._history.items())[max(offset, 0) :]
            if max_items is not None:
                chosen = chosen[: max(max_items, 1)]
            return dict(chosen)

    def forget_history(self, prompt_id: str | None = None) -> None:
        with self._lock:
            if prompt_id is None:
                self._history.clear()
            else:
                self._history.pop(prompt_id, None)

    def request(self, name: str, value: Any) -> None:
        """Ask the worker to do something between jobs (``free_memory``, ``unload_models``)."""
        with self._lock:
            self._requests[name] = value
            self._lock.notify()

    def take_requests(self) -> dict[str, Any]:
        with self._lock:
            requests, self._requests = self._requests, {}
            return requests


def work_forever(queue: JobQueue, runner: Runner, hub: Hub) -> None:
    """The worker thread: run jobs one by one, record them, and end each with ``executing: null``."""
    while True:
        taken = queue.take(timeout=1000.0)
        if taken is not None:
            ticket, job = taken
            started = time.perf_counter()
            try:
                outcome = runner.run(job.prompt_id, job.prompt, job.extra, job.targets)
            except Exception:  # keep serving even if the stand-in itself has a bug
                log.exception("Stand-in runner crashed on prompt %s", job.prompt_id)
                outcome = Outcome(success=False)
            queue.finish(ticket, outcome)
            if hub.assets is not None:
                seed_rescan(hub, hub.assets, created=registered(outcome.outputs))
            if hub.current_client is not None:
                hub.publish("executing", {"node": None, "prompt_id": job.prompt_id}, hub.current_client)
            log.info("Prompt executed in %.2f seconds", time.perf_counter() - started)
        if queue.take_requests().get("free_memory", False):
            runner.forget()
