"""The intake stage in-process, without ComfyUI: where a job's input is read and its prompt prepared.

A small job is read on the event loop (a thread's hop costs it more than the work); a job with images or a
large input is read in a thread, so the loop never stalls on base64 or a long workflow.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from typing import Any

import pytest

from comfy_worker.runtime import intake
from comfy_worker.runtime.attempt import Attempt
from comfy_worker.settings import Settings

TRIVIAL = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "intake"}},
}
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()


class NodeTypes:
    """ComfyUI's ``/object_info`` as the intake asks it, without a server."""

    def object_info(self) -> dict[str, Any]:
        return {"EmptyImage": {}, "SaveImage": {}, "LoadImage": {}}


def large_workflow() -> dict[str, Any]:
    graph: dict[str, Any] = {f"{i}": {"class_type": "EmptyImage", "inputs": {"color": i}} for i in range(300)}
    return graph | TRIVIAL


def new_intake() -> intake.Intake:
    return intake.Intake(Settings.from_env({}), NodeTypes(), has_bucket=False, local_outputs=True)  # type: ignore[arg-type]


def record_threads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Record the thread each parse of a job input and each preparation of its prompt runs in."""
    seen: dict[str, list[int]] = {"parse": [], "prepare": []}
    parse, prepare = intake.parse_job_input, intake.Intake._prepare

    def parsed(*args: Any, **kwargs: Any) -> Any:
        seen["parse"].append(threading.get_ident())
        return parse(*args, **kwargs)

    def prepared(self: intake.Intake, job: Any, folder: str) -> dict[str, Any]:
        seen["prepare"].append(threading.get_ident())
        return prepare(self, job, folder)

    monkeypatch.setattr(intake, "parse_job_input", parsed)
    monkeypatch.setattr(intake.Intake, "_prepare", prepared)
    return seen


async def read_and_prompt(raw: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The loop's thread, and the prompt the intake made of ``raw``."""
    attempt = Attempt("intake-test", started=time.monotonic(), folder="jobs/intake-test")
    stage = new_intake()
    job = await stage.read(attempt, raw)
    _job, graph = await stage.prompt(attempt, job)
    return threading.get_ident(), graph


def test_a_small_job_is_read_and_prepared_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_threads(monkeypatch)
    loop_thread, graph = asyncio.run(read_and_prompt({"workflow": TRIVIAL}))
    assert seen == {"parse": [loop_thread], "prepare": [loop_thread]}
    assert graph["2"]["inputs"]["filename_prefix"] == "jobs/intake-test/intake"


@pytest.mark.parametrize(
    "raw",
    [
        {"workflow": TRIVIAL, "images": [{"name": "in.png", "image": PIXEL}]},
        {"workflow": large_workflow()},
        {"workflow": TRIVIAL | {"3": {"class_type": "EmptyImage", "inputs": {"text": "x" * 10_000}}}},
    ],
    ids=["base64 images", "a large workflow", "a long text"],
)
def test_a_job_with_images_or_a_large_input_is_read_and_prepared_in_a_thread(
    monkeypatch: pytest.MonkeyPatch, raw: dict[str, Any]
) -> None:
    seen = record_threads(monkeypatch)
    loop_thread, _graph = asyncio.run(read_and_prompt(raw))
    assert len(seen["parse"]) == len(seen["prepare"]) == 1
    assert loop_thread not in seen["parse"] + seen["prepare"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"workflow": TRIVIAL}, True),
        ({"workflow": large_workflow()}, False),
        ({"workflow": TRIVIAL, "prompt": "x" * intake.TEXT_UNIT * intake.LIGHT_BUDGET}, False),
        ({"workflow": TRIVIAL, "prompt": "a cat in a hat, " * 20}, True),
        ({"workflow": json.dumps(TRIVIAL)}, True),
        ({"workflow": json.dumps(large_workflow())}, False),
        (list(range(intake.LIGHT_BUDGET)), True),
        (list(range(intake.LIGHT_BUDGET + 1)), False),
        ("not an object", True),
    ],
)
def test_light_counts_values_and_text_by_its_length(value: Any, expected: bool) -> None:
    assert intake.light(value) is expected
