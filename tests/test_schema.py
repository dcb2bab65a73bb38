"""The job input schema: every rejected input has a clear message naming the field."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from comfy_worker.errors import InputError
from comfy_worker.runtime.schema import parse_job_input

PNG_1PX = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {}}}


def parse(**fields: Any) -> Any:
    return parse_job_input({"workflow": WORKFLOW, **fields}, timeout_max=3600)


def rejected(raw: Any) -> InputError:
    with pytest.raises(InputError) as info:
        parse_job_input(raw, timeout_max=3600)
    assert info.value.error_type == "validation"
    return info.value


def test_minimal_input_has_defaults() -> None:
    job = parse()
    assert job.workflow == WORKFLOW
    assert job.images == [] and job.overrides == []
    assert job.timeout is None and job.output.include_temp is False


def test_workflow_as_json_string() -> None:
    job = parse_job_input({"workflow": '{"1": {"class_type": "X", "inputs": {}}}'}, timeout_max=10)
    assert job.workflow == {"1": {"class_type": "X", "inputs": {}}}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, "must be a JSON object"),
        ([1, 2], "must be a JSON object"),
        ({}, "workflow: Field required"),
        ({"workflow": "{not json"}, "workflow: is a string but not valid JSON"),
        ({"workflow": [1, 2]}, "workflow: Input should be a valid dictionary"),
        ({"workflow": WORKFLOW, "seed": "12"}, "seed: Input should be a valid integer"),
        ({"workflow": WORKFLOW, "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"workflow": WORKFLOW, "seed": 2**64}, "seed: Input should be less than or equal to"),
        ({"workflow": WORKFLOW, "width": 512}, "width and height must be given together"),
        ({"workflow": WORKFLOW, "width": 0, "height": 8}, "width: Input should be greater than or equal to 1"),
        ({"workflow": WORKFLOW, "width": 99999, "height": 8}, "width: Input should be less than or equal to 16384"),
        ({"workflow": WORKFLOW, "timeout": 0}, "timeout: Input should be greater than 0"),
        ({"workflow": WORKFLOW, "timeout": 7200}, "timeout: must be at most 3600 seconds (JOB_TIMEOUT_MAX)"),
        ({"workflow": WORKFLOW, "timeout": "5"}, "timeout: Input should be a valid number"),
        ({"workflow": WORKFLOW, "prompt_node_id": "6"}, "prompt_node_id is given but prompt is not"),
        ({"workflow": WORKFLOW, "bogus": 1}, "bogus: unknown field; known fields are: workflow, images"),
        ({"workflow": WORKFLOW, "output": {"zip": True}}, "output.zip: unknown field; known fields are: include_temp"),
        ({"workflow": WORKFLOW, "images": {"name": "a.png"}}, "images: Input should be a valid list"),
        ({"workflow": WORKFLOW, "images": [{"name": "a.png"}]}, "give exactly one of 'image' (base64) and 'url'"),
        (
            {"workflow": WORKFLOW, "images": [{"name": "a.png", "image": "aGk=", "url": "https://x/a.png"}]},
            "give exactly one of 'image' (base64) and 'url'",
        ),
        ({"workflow": WORKFLOW, "images": [{"name": 5, "image": PNG_1PX}]}, "images[0].name: Input should be a valid"),
        ({"workflow": WORKFLOW, "overrides": [{"node_id": "1", "value": 1}]}, "overrides[0].field: Field required"),
        ({"workflow": WORKFLOW, "overrides": [{"node_id": "1", "field": "inputs..x", "value": 1}]}, "dot path"),
    ],
)
def test_rejected_inputs_name_the_field(raw: Any, expected: str) -> None:
    error = rejected(raw)
    assert expected in error.message, error.message
    assert error.details["errors"], "the structured list of problems is missing"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../escape.png", "'..' path segments"),
        ("a/../../b.png", "'..' path segments"),
        ("/etc/passwd", "absolute path"),
        ("C:/x.png", "absolute path"),
        ("a\\b.png", "backslash"),
        ("a//b.png", "empty"),
        ("./a.png", "'.'"),
        ("", "must not be empty"),
        ("x\x00.png", "null byte"),
        ('say "cheese".png', "double quote"),
        ("two\nlines.png", "control character"),
        ("tab\there.png", "control character"),
        ("x" * 300 + ".png", "longer than 255"),
        (" a.png", "spaces"),
    ],
)
def test_image_names_that_escape_or_break_the_input_folder(name: str, expected: str) -> None:
    error = rejected({"workflow": WORKFLOW, "images": [{"name": name, "image": PNG_1PX}]})
    assert "images[0].name" in error.message
    assert expected in error.message


@pytest.mark.parametrize("payload", ["not base64!!", "QUJD=x", "====", ""])
def test_bad_base64_is_rejected(payload: str) -> None:
    error = rejected({"workflow": WORKFLOW, "images": [{"name": "a.png", "image": payload}]})
    assert "images[0]" in error.message
    assert "base64" in error.message or "empty" in error.message


def test_data_uri_and_whitespace_are_accepted() -> None:
    raw = base64.b64encode(b"hello world bytes").decode()
    wrapped = raw[:8] + "\n" + raw[8:]
    job = parse(
        images=[
            {"name": "masks/m.png", "image": f"data:image/png;base64,{raw}"},
            {"name": "b.png", "image": wrapped},
        ]
    )
    assert [i.data for i in job.images] == [b"hello world bytes", b"hello world bytes"]
    assert (job.images[0].subfolder, job.images[0].filename) == ("masks", "m.png")
    assert (job.images[1].subfolder, job.images[1].filename) == ("", "b.png")


def test_duplicate_image_names_are_rejected() -> None:
    error = rejected(
        {"workflow": WORKFLOW, "images": [{"name": "a.png", "image": PNG_1PX}, {"name": "a.png", "image": PNG_1PX}]}
    )
    assert "'a.png' appears more than once" in error.message


def test_numeric_node_ids_become_strings() -> None:
    job = parse(overrides=[{"node_id": 6, "field": "inputs.text", "value": "x"}], prompt="p", prompt_node_id=6)
    assert job.overrides[0].node_id == "6"
    assert job.prompt_node_id == "6"


def test_all_problems_are_reported_at_once() -> None:
    error = rejected({"workflow": WORKFLOW, "seed": -5, "timeout": -1, "extra": 1})
    fields = {p["field"] for p in error.details["errors"]}
    assert fields == {"seed", "timeout", "extra"}


def test_images_over_the_size_limit_are_refused_before_decoding() -> None:
    image = base64.b64encode(bytes(3000)).decode()
    with pytest.raises(InputError, match=r"images\[0\]: image 'a.png': 'image' is 0.0 MB, over INPUT_IMAGE_MAX_MB"):
        parse_job_input(
            {"workflow": WORKFLOW, "images": [{"name": "a.png", "image": image}]}, timeout_max=60, image_max_bytes=2048
        )
    parse_job_input(
        {"workflow": WORKFLOW, "images": [{"name": "a.png", "image": image}]}, timeout_max=60, image_max_bytes=4096
    )


def lora(filename: str, url: str = "https://example.test/file/10", destination: str = "loras") -> dict[str, str]:
    return {"url": url, "destination": destination, "filename": filename}


def test_one_job_may_not_name_a_model_file_twice() -> None:
    # two URLs under one name: the cache would record one URL for the other's bytes
    twice = [lora("dd.safetensors"), lora("dd.safetensors", url="https://example.test/file/20?seed=3")]
    error = rejected({"workflow": WORKFLOW, "models": twice})
    assert "models: loras/dd.safetensors appears more than once" in error.message
    parse(models=[lora("dd.safetensors"), lora("dd.safetensors", destination="checkpoints")])  # two files


@pytest.mark.parametrize(
    ("model", "field", "expected"),
    [
        (lora("a\nINFO forged log line.safetensors"), "filename", "contains a control character"),
        (lora("a\t.safetensors"), "filename", "contains a control character"),
        (lora("a.safetensors.part"), "filename", "must not end in .part or .part.json"),
        (lora("a.safetensors.part.json"), "filename", "must not end in .part or .part.json"),
        (lora("\ud800.safetensors"), "filename", "holds a lone surrogate"),
        (lora("a.safetensors", destination="loras/x\ny"), "destination", "contains a control character"),
        (lora("a.safetensors", destination="loras/\udc80"), "destination", "holds a lone surrogate"),
    ],
)
def test_model_names_that_would_break_logs_or_the_downloader_are_refused(
    model: dict[str, str], field: str, expected: str
) -> None:
    error = rejected({"workflow": WORKFLOW, "models": [model]})
    [problem] = error.details["errors"]
    assert problem["field"] == f"models[0].{field}" and expected in problem["message"], error.details


def test_an_image_name_with_a_lone_surrogate_is_refused() -> None:
    error = rejected({"workflow": WORKFLOW, "images": [{"name": "in/\ud800.png", "image": PNG_1PX}]})
    assert "images[0].name: holds a lone surrogate" in error.message
    error.message.encode("utf-8")  # the error itself is text a job result can carry


def test_an_output_prefix_under_the_s3_inputs_folder_is_refused() -> None:
    for prefix in ("inputs", "inputs/team", "./inputs/x", "/inputs"):
        error = rejected({"workflow": WORKFLOW, "output": {"s3_prefix": prefix}})
        assert "output.s3_prefix: must not start with inputs/" in error.message, prefix
    assert parse(output={"s3_prefix": "inputs-old/x"}).output.s3_prefix == "inputs-old/x"
