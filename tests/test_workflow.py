"""Overrides and the convenience fields, on the example workflows users start from."""

from __future__ import annotations

import json
from typing import Any

import pytest

from comfy_worker.errors import InputError
from comfy_worker.runtime.schema import parse_job_input
from comfy_worker.runtime.workflow import check_api_format, prepare

from .conftest import EXAMPLES


def example(name: str) -> dict[str, Any]:
    workflow: dict[str, Any] = json.loads((EXAMPLES / "workflows" / name).read_text())
    return workflow


def prepared(workflow: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return prepare(parse_job_input({"workflow": workflow, **fields}, timeout_max=3600))


def refused(workflow: Any, **fields: Any) -> InputError:
    with pytest.raises(InputError) as info:
        prepared(workflow, **fields)
    return info.value


def test_prompt_seed_and_size_find_their_nodes() -> None:
    wf = example("sd15_txt2img.json")
    out = prepared(wf, prompt="a red fox", seed=7, width=768, height=640)
    assert out["6"]["inputs"]["text"] == "a red fox"  # the positive encoder, not the negative (7)
    assert out["7"]["inputs"]["text"] == wf["7"]["inputs"]["text"]
    assert out["3"]["inputs"]["seed"] == 7
    assert (out["5"]["inputs"]["width"], out["5"]["inputs"]["height"]) == (768, 640)
    assert wf["6"]["inputs"]["text"] != "a red fox", "the caller's workflow must not be modified"


def test_positive_prompt_is_traced_through_conditioning_nodes() -> None:
    wf = example("sd15_txt2img.json")
    wf["20"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["6", 0]}}
    wf["3"]["inputs"]["positive"] = ["20", 0]
    assert prepared(wf, prompt="traced")["6"]["inputs"]["text"] == "traced"


def test_sdxl_style_encoder_gets_every_text_field() -> None:
    wf = {
        "1": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "a", "text_l": "b", "clip": ["9", 1]}},
        "2": {"class_type": "SaveImage", "inputs": {}},
    }
    out = prepared(wf, prompt="both")
    assert (out["1"]["inputs"]["text_g"], out["1"]["inputs"]["text_l"]) == ("both", "both")


def test_explicit_node_ids_win() -> None:
    wf = example("sd15_txt2img.json")
    out = prepared(wf, prompt="negative now", prompt_node_id="7")
    assert out["7"]["inputs"]["text"] == "negative now"
    assert out["6"]["inputs"]["text"] == wf["6"]["inputs"]["text"]


def test_overrides_apply_after_convenience_fields() -> None:
    wf = example("sd15_txt2img.json")
    out = prepared(
        wf,
        seed=1,
        overrides=[
            {"node_id": "3", "field": "inputs.seed", "value": 99},
            {"node_id": "3", "field": "inputs.steps", "value": 4},
            {"node_id": "9", "field": "_meta.title", "value": "Out"},
            {"node_id": "3", "field": "inputs.model.0", "value": "4"},
        ],
    )
    assert out["3"]["inputs"]["seed"] == 99
    assert out["3"]["inputs"]["steps"] == 4
    assert out["9"]["_meta"]["title"] == "Out"


def test_override_on_missing_node_lists_the_nodes() -> None:
    error = refused(example("model_free.json"), overrides=[{"node_id": "42", "field": "inputs.x", "value": 1}])
    assert "node '42' does not exist" in error.message
    assert error.details["node_ids"] == ["1", "2", "3"]


def test_override_on_missing_field_lists_the_fields() -> None:
    error = refused(example("model_free.json"), overrides=[{"node_id": "1", "field": "inputs.colour", "value": 1}])
    assert "has no field 'colour'" in error.message
    assert "width, height, batch_size, color" in error.message


def test_override_without_inputs_prefix_gets_a_hint() -> None:
    error = refused(example("model_free.json"), overrides=[{"node_id": "1", "field": "color", "value": 1}])
    assert "Did you mean 'inputs.color'?" in error.message


def test_override_through_a_scalar_or_past_a_list_is_refused() -> None:
    wf = example("model_free.json")
    assert "is a int" in refused(wf, overrides=[{"node_id": "1", "field": "inputs.width.x", "value": 1}]).message
    error = refused(wf, overrides=[{"node_id": "2", "field": "inputs.image.5", "value": 1}])
    assert "not an index" in error.message


def test_ambiguous_seed_asks_for_a_node_id() -> None:
    wf = example("sd15_txt2img.json")
    wf["30"] = {"class_type": "KSampler", "inputs": {"seed": 5}}
    error = refused(wf, seed=3)
    assert "several nodes" in error.message and "seed_node_id" in error.message
    assert "3 (KSampler)" in error.message and "30 (KSampler)" in error.message


def test_noise_seed_is_found() -> None:
    wf = {
        "1": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "2": {"class_type": "SaveImage", "inputs": {}},
    }
    assert prepared(wf, seed=11)["1"]["inputs"]["noise_seed"] == 11


def test_missing_targets_fail_clearly() -> None:
    wf = example("model_free.json")
    assert "no text encoder node" in refused(wf, prompt="x").message
    assert "no node has a 'seed'" in refused(wf, seed=1).message
    wf_no_size = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}}}
    assert "no node has width and height" in refused(wf_no_size, width=8, height=8).message


def test_size_prefers_the_latent_node() -> None:
    wf = example("sd15_txt2img.json")
    wf["40"] = {"class_type": "ImageScale", "inputs": {"width": 1, "height": 1, "image": ["8", 0]}}
    assert prepared(wf, width=64, height=64)["5"]["inputs"]["width"] == 64


def test_node_ids_that_do_not_fit_the_field() -> None:
    wf = example("sd15_txt2img.json")
    assert "has no text input" in refused(wf, prompt="x", prompt_node_id="5").message
    assert "has no 'seed'" in refused(wf, seed=1, seed_node_id="6").message
    assert "has no width and height" in refused(wf, width=8, height=8, size_node_id="3").message
    assert "does not exist" in refused(wf, seed=1, seed_node_id="nope").message


@pytest.mark.parametrize(
    ("workflow", "expected"),
    [
        ({}, "workflow is empty"),
        ({"1": "EmptyImage"}, "node '1' is a str"),
        ({"1": {"inputs": {}}}, "node '1' has no 'class_type'"),
        ({"1": {"class_type": "X", "inputs": [1]}}, "'inputs' must be an object"),
    ],
)
def test_api_format_is_checked(workflow: Any, expected: str) -> None:
    with pytest.raises(InputError) as info:
        check_api_format(workflow)
    assert expected in info.value.message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"prompt": "a cat"},
            "Leave prompt out for this workflow, or set the value on the node that takes it with overrides: "
            '[{"node_id": "<id>", "field": "inputs.text"',
        ),
        ({"seed": 3}, "Leave seed out for this workflow"),
        (
            {"width": 8, "height": 8},
            "Leave width/height out for this workflow, or set the value on the node that sets it with overrides: "
            '[{"node_id": "<id>", "field": "inputs.width"',
        ),
    ],
)
def test_a_field_no_node_takes_says_what_to_do(fields: dict[str, Any], expected: str) -> None:
    workflow = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
    error = refused(workflow, **fields)
    assert expected in error.message
    assert "none found" not in error.message


def test_several_candidates_are_named() -> None:
    workflow = {
        "1": {"class_type": "KSampler", "inputs": {"seed": 1}},
        "2": {"class_type": "KSampler", "inputs": {"seed": 2}},
    }
    assert "Set seed_node_id to one of: 1 (KSampler), 2 (KSampler)." in refused(workflow, seed=5).message
