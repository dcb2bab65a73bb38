"""ComfyUI's recorded error payloads become readable errors that keep every field."""

from __future__ import annotations

from typing import Any

import pytest

from comfy_worker.comfy.errors import (
    execution_error,
    interrupted_error,
    missing_node_types_error,
    prompt_warnings,
    suggest_input_files,
    workflow_error,
)

from .conftest import load_transcript


def responses(name: str, status: int) -> dict[str, Any]:
    """Recorded POST /prompt bodies with ``status``, keyed by the transcript's note."""
    found = {}
    events = load_transcript(name)["events"]
    for i, request in enumerate(events):
        if request["kind"] != "http_request" or request["path"] != "/prompt":
            continue
        response = next(e for e in events[i + 1 :] if e["kind"] == "http_response" and e["path"] == "/prompt")
        if response["status"] == status and "json" in response["body"]:
            found[request.get("note", str(request["seq"]))] = response["body"]["json"]
    return found


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("c1_missing_required_input", "node 2 (SaveImage) input 'images': Required input is missing"),
        ("c2_invalid_input_type_string_for_int", "node 1 (EmptyImage) input 'width': Failed to convert"),
        ("c3_value_bigger_than_max", "node 1 (EmptyImage) input 'width': Value 99999 bigger than max of 16384"),
        ("c4_value_smaller_than_min", "input 'batch_size': Value 0 smaller than min of 1"),
        ("c5_return_type_mismatch_latent_into_image", "received_type(LATENT) mismatch input_type(IMAGE)"),
        ("c6_link_to_missing_node", "node 2 (SaveImage): Exception when validating node ('99')"),
        ("c7_no_output_nodes", "Prompt has no outputs"),
        (
            "c8_combo_value_not_in_list",
            "node 2 (ImageScale) input 'upscale_method': Value not in list ('bogus')",
        ),
        ("c9_loadimage_missing_file_custom_validation", "Invalid image file: does_not_exist.png"),
        ("c12_no_prompt_key", "No prompt provided"),
    ],
)
def test_recorded_validation_errors_read_well(note: str, expected: str) -> None:
    body = responses("c_validation_errors.json", 400)[note]
    error = workflow_error(body, 400)
    assert error.error_type == "workflow_validation"
    assert error.message.startswith("ComfyUI refused the workflow: ")
    assert expected in error.message, error.message
    assert error.details["comfyui_error"] == body["error"]
    assert len(error.details["node_errors"]) == sum(len(e["errors"]) for e in body["node_errors"].values())


def test_unknown_node_type_points_to_config_yml() -> None:
    bodies = responses("d_unknown_class_type.json", 400)
    error = workflow_error(bodies["d1_unknown_class_linked"], 400)
    assert "NoSuchNodeXYZ does not exist" in error.message
    assert "config.yml" in error.message
    missing_class = workflow_error(bodies["d3_missing_class_type"], 400)
    assert "missing the class_type property" in missing_class.message
    assert "config.yml" not in missing_class.message


def test_half_valid_prompt_becomes_warnings() -> None:
    body = responses("c_validation_errors.json", 200)["c11_partial_valid_two_outputs"]
    assert prompt_warnings(body["node_errors"]) == [
        "ComfyUI skipped an output branch: node 3 (SaveImage) input 'images': Required input is missing"
    ]


def test_non_json_refusal_is_still_an_error() -> None:
    error = workflow_error("500 Internal Server Error", 400)
    assert "HTTP 400" in error.message


def test_recorded_execution_errors() -> None:
    frames = [
        e["data"]["data"]
        for e in load_transcript("e_execution_errors.json")["events"]
        if e["kind"] == "ws_recv" and e.get("data", {}).get("type") == "execution_error"
    ]
    assert len(frames) == 2
    first = execution_error(frames[0])
    assert first.error_type == "comfyui_execution"
    assert first.message.startswith("Node 1 (LoadImage) failed: PIL.UnidentifiedImageError: cannot identify image")
    assert first.details["node_id"] == "1" and first.details["node_type"] == "LoadImage"
    assert first.details["traceback"] and len(first.details["traceback"]) <= 8
    second = execution_error(frames[1])
    assert "Node 1 (EmptyImage) failed: RuntimeError:" in second.message
    assert "can't allocate memory" in second.message


def test_interrupted_names_the_node() -> None:
    error = interrupted_error({"prompt_id": "p", "node_id": "4", "node_type": "KSampler", "executed": ["1"]})
    assert error.error_type == "interrupted"
    assert "at node 4 (KSampler)" in error.message


def test_a_misspelt_model_name_gets_the_closest_files() -> None:
    body = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
        "node_errors": {
            "4": {
                "class_type": "CheckpointLoaderSimple",
                "errors": [
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": "ckpt_name: 'sd_xl_base.safetensors' not in [...]",
                        "extra_info": {
                            "input_name": "ckpt_name",
                            "input_config": [["v1-5-pruned-emaonly.safetensors", "xl/sd_xl_base_1.0.safetensors"], {}],
                            "received_value": "sd_xl_base.safetensors",
                        },
                    }
                ],
            }
        },
    }
    error = workflow_error(body, 400)
    assert (
        "node 4 (CheckpointLoaderSimple) input 'ckpt_name': Value not in list "
        "('sd_xl_base.safetensors' is not in models/checkpoints; closest: xl/sd_xl_base_1.0.safetensors)"
    ) in error.message
    assert error.details["node_errors"][0]["closest"] == ["xl/sd_xl_base_1.0.safetensors"]
    assert error.details["node_errors"][0]["model_folder"] == "checkpoints"
    # and how to get a model the worker does not have, once
    assert error.message.endswith(
        "closest: xl/sd_xl_base_1.0.safetensors). To use a model this worker does not have: add it under 'models:' "
        "in config.yml (installed at the next start), or bring it with the job's 'models' (input.models, see "
        "docs/job-api.md#models-by-url)."
    ), error.message


def test_every_missing_node_type_in_one_error() -> None:
    workflow = {
        "1": {"class_type": "VHS_LoadVideo", "inputs": {}},
        "2": {"class_type": "SaveImage", "inputs": {}},
        "3": {"class_type": "IPAdapterApply", "inputs": {}},
        "4": {"class_type": "VHS_LoadVideo", "inputs": {}},
    }
    error = missing_node_types_error(workflow, {"VHS_LoadVideo", "IPAdapterApply"})
    assert error.error_type == "workflow_validation"
    assert "no node type IPAdapterApply (node 3); VHS_LoadVideo (node 1, 4)" in error.message
    assert "config.yml" in error.message
    assert error.details["missing_node_types"] == ["IPAdapterApply", "VHS_LoadVideo"]


def test_a_hundred_thousand_missing_node_types_make_one_short_error() -> None:
    workflow = {str(i): {"class_type": f"Missing{i:06d}", "inputs": {}} for i in range(100_000)}
    error = missing_node_types_error(workflow, {node["class_type"] for node in workflow.values()})
    assert "Missing000000 (node 0); Missing000001 (node 1);" in error.message
    assert "; and 99980 more." in error.message and len(error.message) < 2000
    assert error.details["missing_count"] == 100_000 and len(error.details["missing_node_types"]) == 20


def test_a_missing_input_image_gets_the_closest_files() -> None:
    error = workflow_error(
        responses("c_validation_errors.json", 400)["c9_loadimage_missing_file_custom_validation"], 400
    )
    suggest_input_files(error, ["does_not_exists.png", "masks/cat.png"])
    assert (
        "node 1 (LoadImage) input 'image': Custom validation failed for node (image - Invalid image file: "
        "does_not_exist.png; closest in the input folder: does_not_exists.png)"
    ) in error.message
    assert str(error) == error.message
    suggest_input_files(error, [])
    assert "closest in the input folder: none" in error.message
