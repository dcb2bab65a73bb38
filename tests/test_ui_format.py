"""UI-format workflows converted as ComfyUI's own frontend converts them (``comfy_worker.ui_format``).

The corpus in ``tests/ui_format/`` was converted by the frontend itself (``regenerate.py``: ComfyUI 0.3.64 serving
a frontend in headless Chromium), by two versions of it: 1.27.10, the one ComfyUI 0.3.64 ships (``expected/``),
on the templates ComfyUI 0.3.64 ships (``templates/``: ``comfyui_workflow_templates`` 0.1.95) and one hand-made
case per rule (``cases/``); and 1.58.1, the newest on the package index (``expected-1.58.1/``), on the same and
on the 112 templates of ``comfyui_workflow_templates`` 0.11.97 that use only node types ComfyUI 0.3.64 has
(``templates-0.11.97/``; of its 644 UI workflows, 214 with subgraphs): users save with newer frontends than the
one ComfyUI ships. Where the two frontends differ, the converter follows 1.58.1: the inner nodes of a muted or
bypassed subgraph instance are not sent, subgraph node ids are made unique on load, and the first of two subgraph
definitions with one id is used; but it keeps 1.27.10's numbering of legacy group nodes.

Three differences are normalised because ComfyUI does not act on them: ``_meta.title`` of a node without a title
of its own (the frontend shows its translated display name; ComfyUI ignores ``_meta``), the other ``_meta`` fields
(1.58.1 copies ``cnr_id``, ``aux_id`` and ``ver``, the node pack and version a node was saved with, from its
properties), and inputs a node's definition does not declare (widgets the frontend adds for its own use, such as
Preview3D's ``image``; ComfyUI passes a node only the inputs it declares). Everything else must be identical but
the differences listed in ``KNOWN``, each with its reason, which must be exactly as listed.

How the converter compares (identical: after that normalisation; a template with node types ComfyUI 0.3.64
lacks is refused before any conversion, naming them, and counts as such):

=========================  =======================================================================================
frontend 1.27.10           templates 0.1.95: 159 of 159 identical (134 byte for byte), 13 refused for missing node
                           types. Cases: 7 of 10 identical, 1 refused as the frontend refuses it, 2 known
                           differences where 1.58.1 changed what the frontend sends and the worker follows 1.58.1
frontend 1.58.1            templates 0.11.97: 110 of 112 identical (15 byte for byte), 2 known differences (saved
                           with newer node definitions). Templates 0.1.95: 159 of 159 identical (62 byte for
                           byte), 13 refused as above. Cases: 8 of 10 identical, 1 refused as the frontend refuses
                           it, 1 known difference (the numbering of a legacy group node)
=========================  =======================================================================================

Before the converter followed 1.58.1, 105 of the 112 templates 0.11.97 were identical: in 3 it sent the nodes of
a bypassed subgraph instance (``flux1_dev_uso_reference_image_gen``, ``image_flux.1_fill_dev_OneReward``,
``image_qwen_image_instantx_inpainting_controlnet``), in 2 it kept inner node ids the frontend renumbers
(``image_newbieimage_exp0_1-t2i``, ``templates-photo_to_product_vid``).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from comfy_worker.errors import InputError, JobTimeoutError, WorkflowError
from comfy_worker.ui_format import convert, dynamic_prompt, is_ui_format, node_types

CORPUS = Path(__file__).parent / "ui_format"
# Each frontend's prompts, and the corpus folders it converted (a file there without a result fails the test).
FRONTENDS = {
    "1.27.10": ("expected", ("cases", "templates")),
    "1.58.1": ("expected-1.58.1", ("cases", "templates", "templates-0.11.97")),
}


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
            "_meta": {"title": entry["_meta"]["title"]} if node_id in titled else None,
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


@dataclass(frozen=True)
class Known:
    """A listed difference between the converter and one frontend on one file: why, which of the worker's node
    ids the frontend numbers otherwise (``renamed``), and then exactly which (node, input) pairs differ
    (``("<node>", "*")``: a node only one side sends)."""

    why: str
    renamed: Mapping[str, str] = field(default_factory=dict)
    differs: frozenset[tuple[str, str]] = frozenset()


NEWER_DEFINITIONS = (
    "saved with node definitions newer than ComfyUI 0.3.64's: the subgraph links its 'sampling' input to a widget "
    "of ModelSamplingAuraFlow that 0.3.64 lacks. The frontend then shows one promoted widget fewer on the instance "
    "and takes its saved values one place early (ckpt_name 4096, steps 'flow'; ComfyUI would refuse the prompt); "
    "the worker matches each saved value to the input it was saved for, drops 'sampling' (0.3.64 has no such "
    "input) and leaves the instance's other values in place"
)
SWITCHED_OFF = (
    "1.27.10 sends the inner nodes of a bypassed or muted subgraph instance (so their SaveImage runs) and feeds "
    "the muted instance's consumer from inside it; 1.58.1 sends none of them, as the worker does"
)
KNOWN = {
    ("1.58.1", "templates-0.11.97__3d_hunyuan3d-v2.1"): Known(
        NEWER_DEFINITIONS,
        differs=frozenset(
            {("19:1", "ckpt_name"), ("19:4", "resolution"), ("19:9", "algorithm"), ("19:9", "threshold")}
            | {("19:7", name) for name in ("steps", "cfg", "sampler_name", "scheduler")}
        ),
    ),
    ("1.58.1", "templates-0.11.97__3d_hunyuan3d_image_to_model"): Known(
        NEWER_DEFINITIONS,
        differs=frozenset(
            {("91:54", "ckpt_name"), ("91:66", "resolution"), ("91:81", "algorithm"), ("91:81", "threshold")}
            | {("91:3", name) for name in ("seed", "steps", "cfg", "sampler_name", "scheduler")}
        ),
    ),
    ("1.58.1", "cases__group_node"): Known(
        "1.58.1 turns a legacy group node into a subgraph when it loads the workflow: the instance and its inner "
        "nodes get new ids (6 becomes 10, its nodes 0, 1, 2 become 7, 8, 9). The worker keeps 1.27.10's "
        "numbering, which the group node's own file shows, since it cannot match both; the prompt is the same",
        renamed={"6:0": "10:7", "6:1": "10:8", "6:2": "10:9"},
    ),
    ("1.27.10", "cases__subgraph_instance_modes"): Known(
        SWITCHED_OFF,
        differs=frozenset({("10:31", "*"), ("10:32", "*"), ("11:31", "*"), ("11:32", "*"), ("21", "images")}),
    ),
    ("1.27.10", "cases__subgraph_id_collisions"): Known(
        "1.27.10 keeps inner node ids as saved and uses the last of two subgraph definitions with one id; 1.58.1 "
        "renumbers inner nodes whose id a root node or an earlier definition has (2:1 becomes 2:9 and 2:8 2:10: "
        "after last_node_id 7 and the unused definition's 8; 3:2 becomes 3:11) and uses the first definition "
        "(its blur of 4, not 9)",
        renamed={"2:9": "2:1", "2:10": "2:8", "3:11": "3:12"},
        differs=frozenset({("3:12", "blur_radius"), ("3:12", "sigma")}),
    ),
}


def renamed(prompt: dict[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The prompt with node ids renamed, in its keys and in the links of its inputs."""
    result = {}
    for node_id, entry in prompt.items():
        inputs = {
            name: [names.get(value[0], value[0]), value[1]] if isinstance(value, list) else value
            for name, value in entry["inputs"].items()
        }
        result[names.get(node_id, node_id)] = dict(entry, inputs=inputs)
    return result


def differences(ours: dict[str, Any], frontend: dict[str, Any]) -> set[tuple[str, str]]:
    """(node, input) pairs whose values differ between two normalised prompts; (node, "*") for a node only one of
    them has, or whose class or title differs."""
    found = set()
    for node_id in set(ours) | set(frontend):
        mine, theirs = ours.get(node_id), frontend.get(node_id)
        if (
            mine is None
            or theirs is None
            or (mine["class_type"], mine["_meta"]) != (theirs["class_type"], theirs["_meta"])
        ):
            found.add((node_id, "*"))
            continue
        for name in set(mine["inputs"]) | set(theirs["inputs"]):
            if mine["inputs"].get(name, KeyError) != theirs["inputs"].get(name, KeyError):
                found.add((node_id, name))
    return found


EXPECTED = [
    (version, path) for version, (folder, _) in FRONTENDS.items() for path in sorted((CORPUS / folder).glob("*.json"))
]
REFUSED = [
    (version, path)
    for version, (folder, _) in FRONTENDS.items()
    for path in sorted((CORPUS / folder).glob("*.refused.txt"))
]


def test_the_corpus_is_there() -> None:
    for version, folder in (("1.27.10", "templates__"), ("1.58.1", "templates__"), ("1.58.1", "templates-0.11.97__")):
        templates = [path for known, path in EXPECTED if known == version and path.name.startswith(folder)]
        assert len(templates) >= 110, f"frontend {version} lost its {folder} results: run regenerate.py"
    for version in FRONTENDS:
        assert len([path for known, path in EXPECTED if known == version and path.name.startswith("cases__")]) >= 9
    assert len(object_info()) > 400


@pytest.mark.parametrize("version", FRONTENDS)
def test_every_file_has_the_frontends_result(version: str) -> None:
    # A workflow the frontend could not convert (regenerate.py logs it) would otherwise be left out unseen.
    folder, sources = FRONTENDS[version]
    results = {path.name.removesuffix(".refused.txt").removesuffix(".json") for path in (CORPUS / folder).iterdir()}
    files = {f"{source}__{path.stem}" for source in sources for path in (CORPUS / source).glob("*.json")}
    assert results == files


def test_each_known_difference_names_a_result() -> None:
    results = {(version, path.stem) for version, path in EXPECTED}
    assert set(KNOWN) <= results


@pytest.mark.parametrize(("version", "expected"), EXPECTED, ids=lambda value: str(getattr(value, "stem", value)))
def test_converts_as_the_frontend_does(version: str, expected: Path) -> None:
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
    known = KNOWN.get((version, expected.stem), Known("none"))
    ours = renamed(convert(workflow, object_info()).prompt, known.renamed)
    assert differences(normalised(ours, workflow), normalised(frontend, workflow)) == known.differs, known.why


@pytest.mark.parametrize(("version", "refused"), REFUSED, ids=lambda value: str(getattr(value, "stem", value)))
def test_refuses_what_the_frontend_refuses(version: str, refused: Path) -> None:
    with pytest.raises(InputError) as caught:
        convert(source_of(refused), object_info())
    assert "not in the workflow" in caught.value.message


def test_the_normalisation_still_sees_a_real_difference() -> None:
    expected = CORPUS / "expected" / "cases__bypass_and_linked_widgets.json"
    workflow = source_of(expected)
    frontend = json.loads(expected.read_text(encoding="utf-8"))
    ours = convert(workflow, object_info()).prompt
    ours["1"]["inputs"]["width"] = 65
    assert differences(normalised(ours, workflow), normalised(frontend, workflow)) == {("1", "width")}
    del ours["1"]
    assert differences(normalised(ours, workflow), normalised(frontend, workflow)) == {("1", "*")}


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


# -- adversarial workflows: bounded, linear work, and ids that would collide -------------------------------------


def ui_node(
    node_id: Any, node_type: str, inputs: tuple[Any, ...] | list[Any] = (), widgets: Any = (), mode: int = 0
) -> dict[str, Any]:
    """A UI-format node; ``inputs`` are (name, type, link id) triples."""
    return {
        "id": node_id,
        "type": node_type,
        "mode": mode,
        "inputs": [{"name": name, "type": kind, "link": link} for name, kind, link in inputs],
        "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}],
        "widgets_values": list(widgets),
    }


def chain(middle: str, length: int, mode: int = 0) -> dict[str, Any]:
    """EmptyImage, then ``length`` nodes of type ``middle`` one after the other, then SaveImage."""
    nodes = [ui_node(1, "EmptyImage", widgets=[8, 8, 1, 0])]
    links = []
    for index in range(2, length + 3):
        node_type = "SaveImage" if index == length + 2 else middle
        name = "images" if node_type == "SaveImage" else ("" if middle == "Reroute" else "image")
        widgets = ["chain"] if node_type == "SaveImage" else []
        node_mode = mode if index < length + 2 else 0
        nodes.append(ui_node(index, node_type, [(name, "IMAGE", index - 1)], widgets, node_mode))
        links.append([index - 1, index - 1, 0, index, 0, "IMAGE"])
    return {"nodes": nodes, "links": links}


@pytest.mark.parametrize(("middle", "mode"), [("Reroute", 0), ("ImageInvert", 4), ("ImageInvert", 0)])
def test_a_long_chain_converts_without_recursion(middle: str, mode: int) -> None:
    # about 1,000 Reroutes gave RecursionError (an "internal" error): links are followed iteratively now
    length = 50_000
    prompt = convert(chain(middle, length, mode), object_info()).prompt
    save = prompt[str(length + 2)]
    if middle == "ImageInvert" and mode == 0:
        assert len(prompt) == length + 2
        assert save["inputs"]["images"] == [str(length + 1), 0]
    else:  # Reroutes and bypassed nodes are wired through: SaveImage takes EmptyImage's image
        assert set(prompt) == {"1", str(length + 2)}
        assert save["inputs"]["images"] == ["1", 0]


def test_many_consumers_of_a_long_reroute_chain_resolve_it_once() -> None:
    workflow = chain("Reroute", 20_000)
    end = workflow["nodes"][-1]
    for extra in range(1, 2_001):  # 2,000 more SaveImage nodes on the chain's last Reroute
        node_id = 100_000 + extra
        link_id = 100_000 + extra
        workflow["nodes"].append(ui_node(node_id, "SaveImage", [("images", "IMAGE", link_id)], [str(extra)]))
        workflow["links"].append([link_id, end["id"] - 1, 0, node_id, 0, "IMAGE"])
    prompt = convert(workflow, object_info()).prompt
    assert len(prompt) == 2_002
    assert {entry["inputs"]["images"][0] for node_id, entry in prompt.items() if node_id != "1"} == {"1"}


def doubling_subgraphs(depth: int) -> dict[str, Any]:
    """Subgraph k holds two instances of subgraph k+1; the last holds an EmptyImage: 2**depth leaves."""
    definitions = []
    for level in range(depth + 1):
        inner = [ui_node(1, "EmptyImage", widgets=[8, 8, 1, 0])]
        if level < depth:
            inner = [ui_node(1, f"sg-{level + 1}"), ui_node(2, f"sg-{level + 1}")]
        definitions.append({"id": f"sg-{level}", "name": f"level {level}", "nodes": inner, "links": [], "inputs": []})
    return {"nodes": [ui_node(1, "sg-0")], "links": [], "definitions": {"subgraphs": definitions}}


def test_the_expanded_node_count_is_bounded() -> None:
    # depth 21 was a 7 KB request that took 32.7 s and 2.1 GB: refused once the expansion passes the limit
    assert len(convert(doubling_subgraphs(10), object_info()).prompt) == 2**10
    with pytest.raises(InputError) as caught:
        convert(doubling_subgraphs(17), object_info())  # 2**17 leaves
    assert "100,000" in caught.value.message and "MAX_EXPANDED_NODES" in caught.value.message
    assert caught.value.details == {"format": "ui", "max_expanded_nodes": 100_000}


def test_a_subgraph_inside_itself_is_refused() -> None:
    workflow = doubling_subgraphs(0)
    workflow["definitions"]["subgraphs"][0]["nodes"] = [ui_node(1, "sg-0")]
    with pytest.raises(InputError, match="nest more than 32 levels"):
        convert(workflow, object_info())


def test_a_deep_dynamic_prompt_is_linear_work() -> None:
    # 30,000 '{' then 30,000 '}' took 10.75 s (each pass removed one level); one pass now, at any depth
    assert dynamic_prompt("{" * 100_000 + "}" * 100_000) == ""
    assert dynamic_prompt("{a|" * 100_000 + "b" + "}" * 100_000, random.Random(1)) in {"a", "b"}
    assert dynamic_prompt("/*a" * 100_000) == "/*a" * 100_000  # comments never closed are kept, as in JS
    assert dynamic_prompt("a/*x*/b/*" + "*" * 100_000) == "ab/*" + "*" * 100_000


def test_dynamic_prompts_parse_as_the_frontend_does() -> None:
    # the frontend's processDynamicPrompt: escapes, a block left open runs to the end, a stray '}' or '|' stays
    assert dynamic_prompt(r"a \{b\|c\} d") == "a {b|c} d"
    assert dynamic_prompt("x {only", random.Random(0)) == "x only"
    assert dynamic_prompt("a } b | c") == "a } b | c"
    assert dynamic_prompt("{a|b|}", random.Random(5)) in {"a", "b", ""}
    assert dynamic_prompt("line // gone\r\nkept") == "line \r\nkept"  # JS's '.' stops at \r too


JS_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//[^\n\r\u2028\u2029]*")  # the frontend's, with JavaScript's '.'


def frontend_dynamic_prompt(text: str, rng: random.Random) -> str:
    """The frontend's processDynamicPrompt (utils/formatUtil.ts of 1.27.10), line by line: recursive, and it
    parses each block again at every level."""
    text = JS_COMMENTS.sub("", text)
    position, result = 0, ""

    def escape() -> str:
        nonlocal position
        position += 1
        return "\\" + text[position - 1]

    def block() -> str:
        nonlocal position
        options, choice, depth = [], "", 0
        while position < len(text):
            char = text[position]
            position += 1
            if char == "\\":
                choice += escape()
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                if not depth:
                    break
                depth -= 1
            elif char == "|" and not depth:
                options.append(choice)
                choice = ""
                continue
            choice += char
        options.append(choice)
        return frontend_dynamic_prompt(rng.choice(options), rng)

    while position < len(text):
        char = text[position]
        position += 1
        result += escape() if char == "\\" else block() if char == "{" else char
    return re.sub(r"\\([{}|])", r"\1", result)


def test_dynamic_prompts_match_the_frontends_own_code() -> None:
    texts = random.Random(7)
    compared = 0
    while compared < 3_000:
        text = "".join(texts.choice("ab{}|/*\n\r\\") for _ in range(texts.randrange(14)))
        if "\\\\" in text or JS_COMMENTS.sub("", text).endswith("\\"):
            continue  # the two documented differences: a literal backslash before {|}; a trailing backslash
        seed = texts.randrange(1 << 30)
        assert dynamic_prompt(text, random.Random(seed)) == frontend_dynamic_prompt(text, random.Random(seed)), text
        compared += 1


def test_the_conversion_stops_at_its_deadline() -> None:
    with pytest.raises(JobTimeoutError):
        convert(chain("ImageInvert", 1_000), object_info(), deadline=time.monotonic())
    assert convert(chain("ImageInvert", 10), object_info(), deadline=time.monotonic() + 3600).prompt


def test_a_malformed_container_is_not_an_internal_error() -> None:
    # node_types runs before the conversion (to know what to ask ComfyUI): it raised AttributeError ("internal")
    for broken in ({"definitions": ["x"]}, {"extra": ["x"]}, {"extra": {"groupNodes": ["x"]}}):
        workflow = {"nodes": [ui_node(1, "EmptyImage")], "links": [], **broken}
        assert node_types(workflow) == {"EmptyImage"}
        with contextlib.suppress(InputError):  # the conversion may refuse it, with a clear error
            convert(workflow, object_info())


def saves(*ids: Any) -> dict[str, Any]:
    nodes = [ui_node(1, "EmptyImage", widgets=[8, 8, 1, 0])]
    links = []
    for index, node_id in enumerate(ids, start=1):
        nodes.append(ui_node(node_id, "SaveImage", [("images", "IMAGE", index)], [f"save{index}"]))
        links.append([index, 1, 0, node_id, 0, "IMAGE"])
    return {"nodes": nodes, "links": links}


def test_duplicate_node_ids_are_refused_not_overwritten() -> None:
    # three SaveImage nodes, two of them with id 3: the frontend's prompt keeps one of the two (graphToPrompt
    # keys its output by id); the worker refuses, naming the id
    with pytest.raises(InputError) as caught:
        convert(saves(2, 3, 3), object_info())
    assert "3 (SaveImage, SaveImage)" in caught.value.message
    assert caught.value.details["duplicate_node_ids"] == {"3": ["SaveImage", "SaveImage"]}
    with pytest.raises(InputError) as caught:
        convert(saves(1), object_info())  # SaveImage 1 beside EmptyImage 1
    assert caught.value.details["duplicate_node_ids"] == {"1": ["EmptyImage", "SaveImage"]}
    with pytest.raises(InputError) as caught:
        convert(saves(2, "2"), object_info())  # 2 and "2" are the same id in the API prompt
    assert caught.value.details["duplicate_node_ids"] == {"2": ["SaveImage", "SaveImage"]}


def test_a_root_id_that_equals_an_inner_id_is_refused() -> None:
    workflow = doubling_subgraphs(0)  # instance 3 of sg-0 holds EmptyImage 1: its id is "3:1"
    workflow["nodes"][0]["id"] = 3
    workflow["nodes"].append(ui_node("3:1", "EmptyImage", widgets=[16, 16, 1, 0]))
    with pytest.raises(InputError) as caught:
        convert(workflow, object_info())
    assert "3:1" in caught.value.details["duplicate_node_ids"]
    inner = doubling_subgraphs(0)
    inner["definitions"]["subgraphs"][0]["nodes"].append(ui_node(1, "ImageInvert"))
    with pytest.raises(InputError) as caught:
        convert(inner, object_info())
    assert caught.value.details["duplicate_node_ids"] == {"1:1": ["EmptyImage", "ImageInvert"]}


def test_a_switched_off_instance_needs_none_of_its_node_types() -> None:
    # frontend 1.58 sends nothing of a muted or bypassed instance of the root graph: nothing in it must exist
    for mode in (2, 4):
        workflow = doubling_subgraphs(1)  # instance 10 of sg-0 holds instances 1 and 2 of sg-1, each an EmptyImage
        workflow["nodes"][0].update(id=10, mode=mode)
        workflow["definitions"]["subgraphs"][1]["nodes"].append(ui_node(5, "SomeCustomNode"))
        assert convert(workflow, object_info()).prompt == {}
    workflow["nodes"][0]["mode"] = 0
    with pytest.raises(WorkflowError) as caught:
        convert(workflow, object_info())
    assert caught.value.details["nodes"] == {"SomeCustomNode": ["10:1:5", "10:2:5"]}


def test_inner_node_ids_are_renumbered_from_the_first_free_one() -> None:
    # without last_node_id the frontend counts on from the highest id it has seen in the definitions so far (7,
    # in sg-1), skipping the root's (8): sg-0's ImageInvert 1, whose id root node 1 has, becomes 9
    workflow = doubling_subgraphs(1)
    workflow["definitions"]["subgraphs"].reverse()  # sg-1 first: EmptyImage 1 -> ["7", 1]
    workflow["definitions"]["subgraphs"][0]["nodes"] = [ui_node(7, "EmptyImage", widgets=[8, 8, 1, 0])]
    workflow["definitions"]["subgraphs"][1]["nodes"].append(ui_node(1, "ImageInvert"))
    workflow["definitions"]["subgraphs"][1]["nodes"].pop(0)
    workflow["nodes"].append(ui_node(8, "SaveImage", widgets=["x"]))
    assert sorted(convert(workflow, object_info()).prompt) == ["1:2:7", "1:9", "8"]


@pytest.mark.parametrize("name", ["model_free", "sd15_txt2img"])
def test_the_ui_format_examples_are_twins_of_the_api_ones(name: str) -> None:
    workflows = Path(__file__).parent.parent / "examples" / "workflows"
    ui = json.loads((workflows / f"{name}_ui.json").read_text(encoding="utf-8"))
    api = json.loads((workflows / f"{name}.json").read_text(encoding="utf-8"))
    assert is_ui_format(ui)
    assert convert(ui, object_info()).prompt == api
