"""UI-format workflows converted as ComfyUI's own frontend converts them (``comfy_worker.ui_format``).

The corpus in ``tests/ui_format/`` was converted by the frontend itself (``regenerate.py``: ComfyUI 0.3.64 with
frontend 1.27.10 in headless Chromium): the templates ComfyUI ships and one hand-made case per rule. Two
differences are normalised because ComfyUI does not act on them: ``_meta.title`` of a node without a title of
its own (the frontend shows its translated display name; ComfyUI ignores ``_meta``), and inputs a node's
definition does not declare (widgets the frontend adds for its own use, such as Preview3D's ``image``;
ComfyUI passes a node only the inputs it declares). Everything else must be identical.
"""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from comfy_worker.errors import InputError, WorkflowError
from comfy_worker.ui_format import convert, dynamic_prompt, is_ui_format, node_types

CORPUS = Path(__file__).parent / "ui_format"


@cache
def object_info() -> dict[str, Any]:
    return dict(json.loads((CORPUS / "object_info.json").read_text(encoding="utf-8")))


def source_of(expected: Path) -> dict[str, Any]:
    folder, name = expected.name.removesuffix(".refused.txt").removesuffix(".json").split("__", 1)
    return dict(json.loads((CORPUS / folder / f"{name}.json").read_text(encoding="utf-8")))


def declared_inputs(node_type: str) -> set[str]:
    inputs = object_info()[node_type].get("input") or {}
    return {name for section in ("required", "optional", "hidden") for name in inputs.get(section) or {}}


def normalised(prompt: dict[str, Any], workflow: dict[str, Any]) -> dict[str, Any]:
    titled = {str(node["id"]) for node in workflow["nodes"] if node.get("title")}
    result = {}
    for node_id, entry in prompt.items():
        declared = declared_inputs(entry["class_type"])
        result[node_id] = {
            "class_type": entry["class_type"],
            "inputs": {name: value for name, value in entry["inputs"].items() if name in declared},
            "_meta": entry["_meta"] if node_id in titled else None,
        }
    return result


def unknown_types(workflow: dict[str, Any]) -> set[str]:
    nodes = list(workflow["nodes"])
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    for definition in subgraphs:
        nodes += definition["nodes"]
    groups = (workflow.get("extra") or {}).get("groupNodes") or {}
    for group in groups.values():
        nodes += group["nodes"]
    ids = {definition["id"] for definition in subgraphs} | {f"workflow>{name}" for name in groups}
    virtual = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
    return {
        node["type"]
        for node in nodes
        if node["type"] not in object_info() and node["type"] not in virtual | ids and node.get("mode") != 2
    }


EXPECTED = sorted((CORPUS / "expected").glob("*.json"))


def test_the_corpus_is_there() -> None:
    templates = [path for path in EXPECTED if path.name.startswith("templates__")]
    cases = [path for path in EXPECTED if path.name.startswith("cases__")]
    assert len(templates) >= 150, "tests/ui_format/expected lost its templates: run regenerate.py"
    assert len(cases) >= 7
    assert len(object_info()) > 400


@pytest.mark.parametrize("expected", EXPECTED, ids=lambda path: path.stem)
def test_converts_as_the_frontend_does(expected: Path) -> None:
    workflow = source_of(expected)
    assert is_ui_format(workflow)
    missing = unknown_types(workflow)
    if missing:
        # The recorded ComfyUI lacks these (its audio nodes need torchaudio; some templates need custom
        # nodes): the worker refuses the workflow, naming each, before ComfyUI sees it.
        with pytest.raises(WorkflowError) as caught:
            convert(workflow, object_info())
        assert set(caught.value.details["missing_node_types"]) == missing
        return
    frontend = json.loads(expected.read_text(encoding="utf-8"))
    ours = convert(workflow, object_info()).prompt
    assert normalised(ours, workflow) == normalised(frontend, workflow)
    assert set(ours) == set(frontend)


@pytest.mark.parametrize("refused", sorted((CORPUS / "expected").glob("*.refused.txt")), ids=lambda path: path.stem)
def test_refuses_what_the_frontend_refuses(refused: Path) -> None:
    with pytest.raises(InputError) as caught:
        convert(source_of(refused), object_info())
    assert "not in the workflow" in caught.value.message


def test_the_normalisation_still_sees_a_real_difference() -> None:
    expected = CORPUS / "expected" / "cases__bypass_and_linked_widgets.json"
    workflow = source_of(expected)
    frontend = json.loads(expected.read_text(encoding="utf-8"))
    ours = convert(workflow, object_info()).prompt
    ours["1"]["inputs"]["width"] = 65
    assert normalised(ours, workflow) != normalised(frontend, workflow)


def case(name: str) -> dict[str, Any]:
    return dict(json.loads((CORPUS / "cases" / f"{name}.json").read_text(encoding="utf-8")))


def test_the_warning_names_what_was_dropped_and_rewired() -> None:
    conversion = convert(case("primitive_reroute_note_muted"), object_info())
    warning = conversion.warning() or ""
    assert "muted node 5 (SaveImage)" in warning
    assert "node 6 (Note)" in warning and "node 7 (MarkdownNote)" in warning
    bypass = convert(case("bypass_and_linked_widgets"), object_info()).warning() or ""
    assert "bypassed node 2 (ImageInvert)" in bypass


def test_an_api_prompt_is_not_ui_format() -> None:
    assert not is_ui_format({"1": {"class_type": "EmptyImage", "inputs": {}}})
    assert not is_ui_format([])


def test_unknown_custom_nodes_are_listed() -> None:
    workflow = case("bypass_and_linked_widgets")
    workflow["nodes"][0]["type"] = "MyCustomNode"
    workflow["nodes"][2]["type"] = "OtherPack"
    with pytest.raises(WorkflowError) as caught:
        convert(workflow, object_info())
    assert caught.value.details["missing_node_types"] == ["MyCustomNode", "OtherPack"]
    assert "MyCustomNode (node 1)" in caught.value.message


def test_a_malformed_ui_workflow_is_an_input_error() -> None:
    workflow = case("bypass_chain")
    workflow["links"][0] = [1, 1, "zero", 2, 0, "IMAGE"]
    with pytest.raises(InputError):
        convert(workflow, object_info())


def test_a_link_loop_is_refused() -> None:
    workflow = case("bypass_chain")  # 2 and 3 are bypassed: feed 2 from 3 and 3 from 2
    workflow["links"][0] = [1, 3, 0, 2, 0, "IMAGE"]
    with pytest.raises(InputError, match="loop"):
        convert(workflow, object_info())


def test_dynamic_prompts_choose_and_strip_comments() -> None:
    rng = random.Random(3)
    results = {dynamic_prompt("a {red|blue|green} fox /* hidden */ // gone", rng) for _ in range(30)}
    assert results == {"a red fox  ", "a blue fox  ", "a green fox  "}
    assert dynamic_prompt("{a|{b|b}}", random.Random(0)) in {"a", "b"}


def test_node_types_are_what_comfyui_must_know() -> None:
    assert node_types(case("nested_subgraphs")) == {
        "EmptyImage",
        "ImageInvert",
        "ImageBlur",
        "SaveImage",
        "PrimitiveInt",
    }
    assert node_types(case("group_node")) == {"EmptyImage", "ImageInvert", "ImageBlur", "RandomNoise", "SaveImage"}
    assert node_types(case("primitive_reroute_note_muted")) == {"EmptyImage", "SaveImage"}
