"""Contract test: the stand-in ComfyUI must behave like the real ComfyUI 0.3.64 recorded in tests/comfyui_transcripts.

Every scenario replays the requests of one recorded transcript against a live server and compares what comes
back with the recording: HTTP status codes, content types and JSON bodies, the type sequence and the content
of the WebSocket frames, history entries and output files. What legitimately varies between two runs is
normalised first (prompt and client ids, timestamps, prompt numbers, traceback lines, the random name part of
PreviewImage files, absolute paths, the order of sets). A mismatch fails with a unified diff.

Each scenario runs against the stand-in, and against a real ComfyUI checkout when ``COMFYUI_DIR`` (and
``COMFYUI_PYTHON``) are set; those parameters carry the ``comfyui`` marker and are skipped otherwise::

    .venv/bin/python -m pytest tests/test_standin_contract.py
    COMFYUI_DIR=/work/ComfyUI COMFYUI_PYTHON=/work/comfy-venv/bin/python .venv/bin/python -m pytest \\
        tests/test_standin_contract.py
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from PIL import Image

from tests.comfy_servers import ComfyServer, run_real_comfyui, run_standin
from tests.conftest import TRANSCRIPTS

# Read at import time: the shared conftest clears these variables for every test.
REAL_COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
REAL_COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON")

JOB_TIMEOUT = 120.0
TEMP_NAME = re.compile(r"ComfyUI_temp_[a-z]{5}_")
# Lists the real server builds from a set: their order is arbitrary.
SET_LIKE_KEYS = {"executed", "current_outputs", "dependent_outputs"}
JOB_PROGRESS_TYPES = {"progress_state", "executing", "progress"}


# ---------------------------------------------------------------------------------------------------------------
# Recordings.
@dataclass
class Frame:
    """One WebSocket frame: ``type`` is the JSON type, or ``binary:N`` with the decoded header in ``data``."""

    type: str
    data: Any
    # The image of a preview frame (not compared with the recordings, which only kept its first bytes).
    image: bytes = b""

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "data": self.data}


def decode_binary(payload: bytes) -> Frame:
    """Decode a binary frame the way the transcripts describe them."""
    (event,) = struct.unpack(">I", payload[:4])
    info: dict[str, Any] = {}
    if event == 3:
        (length,) = struct.unpack(">I", payload[4:8])
        info["decoded_text_event"] = {
            "node_id": payload[8 : 8 + length].decode(),
            "text": payload[8 + length :].decode(),
        }
    elif event == 4:
        (length,) = struct.unpack(">I", payload[4:8])
        info["decoded_metadata"] = json.loads(payload[8 : 8 + length])
        info["image_first8_hex"] = payload[8 + length : 16 + length].hex()
        return Frame(f"binary:{event}", info, payload[8 + length :])
    elif event == 1:
        (info["image_format_u32"],) = struct.unpack(">I", payload[4:8])
        return Frame(f"binary:{event}", info, payload[8:])
    return Frame(f"binary:{event}", info)


def recorded_frame(event: dict[str, Any]) -> Frame:
    if event["frame"] == "text":
        return Frame(event["data"]["type"], event["data"]["data"])
    keys = ("decoded_text_event", "decoded_metadata", "image_first8_hex", "image_format_u32")
    return Frame(f"binary:{event['event_type_be_u32']}", {k: event[k] for k in keys if k in event})


class Transcript:
    """One recorded session: ``{name, client_id, notes, events}``."""

    def __init__(self, name: str) -> None:
        data = json.loads((TRANSCRIPTS / name).read_text())  # a missing recording fails the test
        self.name: str = data["name"]
        self.client_id: str = data["client_id"]
        self.notes: dict[str, Any] = data["notes"]
        self.events: list[dict[str, Any]] = data["events"]

    def exchanges(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(request, response) pairs in order (the harness sent one request at a time)."""
        pairs = []
        pending = None
        for event in self.events:
            if event["kind"] == "http_request":
                pending = event
            elif event["kind"] == "http_response":
                assert pending is not None and pending["path"] == event["path"]
                pairs.append((pending, event))
                pending = None
        return pairs

    def frames(self, after_seq: int = -1, until_seq: int | None = None) -> list[tuple[int, Frame]]:
        return [
            (e["seq"], recorded_frame(e))
            for e in self.events
            if e["kind"] == "ws_recv" and e["seq"] > after_seq and (until_seq is None or e["seq"] <= until_seq)
        ]

    def job_frames(self, request_seq: int, prompt_id: str) -> list[Frame]:
        """Frames from a POST /prompt to the ``executing: null`` that ends that prompt."""
        out = []
        for _, frame in self.frames(after_seq=request_seq):
            out.append(frame)
            if is_job_end(frame, prompt_id):
                return out
        raise AssertionError(f"{self.name}: no executing-null frame for {prompt_id}")

    def request(self, seq: int) -> dict[str, Any]:
        return next(e for e in self.events if e["seq"] == seq)


def is_job_end(frame: Frame, prompt_id: str) -> bool:
    return frame.type == "executing" and frame.data.get("node") is None and frame.data.get("prompt_id") == prompt_id


# ---------------------------------------------------------------------------------------------------------------
# Normalisation and readable comparison.
def traceback_shape(value: Any) -> Any:
    """Traceback lines differ between any two installations; keep only their shape."""
    if isinstance(value, list) and value and all(isinstance(s, str) and s.startswith('  File "') for s in value):
        return "<traceback>"
    return value


def is_queue_item(obj: Any) -> bool:
    """``[number, prompt_id, prompt, extra_data, outputs_to_execute]`` as in /queue and history entries."""
    return (
        isinstance(obj, list)
        and len(obj) == 5
        and isinstance(obj[0], (int, float))
        and not isinstance(obj[0], bool)
        and isinstance(obj[1], str)
        and isinstance(obj[2], dict)
        and isinstance(obj[3], dict)
        and isinstance(obj[4], list)
    )


@dataclass
class Canon:
    """Rewrites live and recorded JSON into one comparable form."""

    labels: dict[str, str] = field(default_factory=dict)
    substrings: list[tuple[str, str]] = field(default_factory=list)
    # Prompt graphs that legitimately differ (the stand-in runs a slow stand-in node instead of ImageBlur).
    prompt_labels: dict[str, str] = field(default_factory=dict)

    def alias(self, label: str, *values: str) -> None:
        for value in values:
            self.labels[value] = label

    def path(self, label: str, *prefixes: str | Path) -> None:
        for prefix in prefixes:
            self.substrings.append((str(prefix), label))
        self.substrings.sort(key=lambda pair: -len(pair[0]))

    def prompt(self, label: str, *prompts: dict[str, Any]) -> None:
        for prompt in prompts:
            self.prompt_labels[json.dumps(prompt, sort_keys=True)] = label

    def text(self, value: str) -> str:
        if value in self.labels:
            return self.labels[value]
        for prefix, label in self.substrings:
            value = value.replace(prefix, label)
        return TEMP_NAME.sub("ComfyUI_temp_<random>_", value)

    def __call__(self, obj: Any, key: str | None = None) -> Any:
        if key == "timestamp" and isinstance(obj, (int, float)):
            return "<timestamp>"
        if key == "number" and isinstance(obj, (int, float)):
            return "<number>"
        if key == "traceback":
            return traceback_shape(obj)
        if isinstance(obj, dict):
            prompt_label = self.prompt_labels.get(json.dumps(obj, sort_keys=True))
            if prompt_label is not None:
                return prompt_label
            return {self.text(k): self(v, k) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            if is_queue_item(list(obj)):
                outputs = sorted(self(x) for x in obj[4])
                return ["<number>", self(obj[1]), self(obj[2]), self(obj[3]), outputs]
            items = [self(v) for v in obj]
            if key in SET_LIKE_KEYS:
                items.sort(key=lambda item: json.dumps(item, sort_keys=True))
            return items
        if isinstance(obj, str):
            return self.text(obj)
        return obj


def assert_same(what: str, live: Any, recorded: Any) -> None:
    """Fail with a unified diff (recorded -> live) when the two differ."""
    if live == recorded:
        return
    before = json.dumps(recorded, indent=1, sort_keys=True, default=repr).splitlines()
    after = json.dumps(live, indent=1, sort_keys=True, default=repr).splitlines()
    diff = "\n".join(difflib.unified_diff(before, after, "recorded", "live", lineterm="", n=4))
    pytest.fail(f"{what}: the live server differs from the recording\n{diff}", pytrace=False)


def frame_types(frames: list[Frame]) -> list[str]:
    return [f.type for f in frames]


def frames_json(frames: list[Frame], canon: Canon) -> list[Any]:
    return [canon(f.as_dict()) for f in frames]


def check_interrupted_job_skeleton(what: str, frames: list[Frame], ends_with_executing: bool) -> None:
    """An interrupted job: start frames, per-node progress frames, then the interrupt and the end frames.

    Which node the interrupt lands on depends on timing and on the node type, so only the skeleton is fixed.
    """
    types = [t for t in frame_types(frames) if t != "status"]
    head = ["execution_start", "execution_cached"] if ends_with_executing else []
    tail = ["execution_interrupted", "executing"] if ends_with_executing else ["execution_interrupted"]
    middle = types[len(head) : len(types) - len(tail)]
    ok = (
        types[: len(head)] == head
        and types[len(types) - len(tail) :] == tail
        and all(t in JOB_PROGRESS_TYPES or t.startswith("binary:") for t in middle)
    )
    assert ok, f"{what}: unexpected frame sequence for an interrupted job: {frame_types(frames)}"
    assert frames[-1 if ends_with_executing else -2].type in ("executing", "execution_interrupted")
    statuses = [f for f in frames if f.type == "status"]
    assert statuses and statuses[-1].data["status"]["exec_info"]["queue_remaining"] == 0, frame_types(frames)


def check_interrupt_invariants(what: str, frames: list[Frame], prompt: dict[str, Any]) -> dict[str, Any]:
    """The interrupted node was running, ``executed`` lists exactly the finished nodes, ``node_type`` matches."""
    index = next(i for i, f in enumerate(frames) if f.type == "execution_interrupted")
    data = frames[index].data
    states = [f.data["nodes"] for f in frames[:index] if f.type == "progress_state"]
    assert states, f"{what}: no progress_state before execution_interrupted"
    last = states[-1]
    finished = {node for node, state in last.items() if state["state"] == "finished"}
    assert set(data["executed"]) == finished, f"{what}: executed {data['executed']} but finished {finished}"
    assert last[data["node_id"]]["state"] == "running", f"{what}: interrupted node was not running: {last}"
    assert data["node_type"] == prompt[data["node_id"]]["class_type"]
    return data


def normalise_interrupt(obj: Any) -> Any:
    """Replace the timing-dependent fields of execution_interrupted (frame data or history message)."""
    obj = copy.deepcopy(obj)

    def fix(data: dict[str, Any]) -> None:
        data.update(node_id="<interrupted node>", node_type="<its class>", executed="<finished nodes>")

    if isinstance(obj, dict) and "status" in obj and isinstance(obj["status"], dict):
        for event, data in obj["status"].get("messages", []):
            if event == "execution_interrupted":
                fix(data)
    elif isinstance(obj, dict):
        fix(obj)
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Live server access.
class WsReader:
    """A WebSocket client that records every frame on a background thread."""

    def __init__(self, url: str, first_message: dict[str, Any] | None = None) -> None:
        self.ws = websocket.create_connection(url, timeout=30)
        if first_message is not None:
            self.ws.send(json.dumps(first_message))
        self.frames: list[Frame] = []
        self.closed_reason: str | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True, name=f"ws-reader {url}")
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                opcode, data = self.ws.recv_data()
            except Exception as exc:
                with self._cond:
                    self.closed_reason = repr(exc)
                    self._cond.notify_all()
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                message = json.loads(data.decode())
                frame = Frame(message["type"], message["data"])
            elif opcode == websocket.ABNF.OPCODE_BINARY:
                frame = decode_binary(data)
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                with self._cond:
                    self.closed_reason = "close frame"
                    self._cond.notify_all()
                return
            else:
                continue
            with self._cond:
                self.frames.append(frame)
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.frames)

    def wait_for(
        self, predicate: Callable[[Frame], bool], start: int = 0, timeout: float = JOB_TIMEOUT, what: str = "a frame"
    ) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.frames):
                    if predicate(self.frames[index]):
                        return index
                    index += 1
                remaining = deadline - time.monotonic()
                if self.closed_reason is not None or remaining <= 0:
                    reason = self.closed_reason or f"timed out after {timeout:.0f} s"
                    pytest.fail(f"waiting for {what}: {reason}; frames: {frame_types(self.frames[start:])}")
                self._cond.wait(remaining)

    def wait_job_end(self, prompt_id: str, start: int = 0, timeout: float = JOB_TIMEOUT) -> list[Frame]:
        end = self.wait_for(lambda f: is_job_end(f, prompt_id), start, timeout, f"the end of {prompt_id}")
        with self._cond:
            return self.frames[start : end + 1]

    def settle(self, at_least: int = 0, quiet: float = 0.1, timeout: float = 10.0) -> list[Frame]:
        """Wait for ``at_least`` frames, then until none arrived for ``quiet`` seconds; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.frames) < at_least and self.closed_reason is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = -1
            while count != len(self.frames):
                count = len(self.frames)
                self._cond.wait(quiet)
            return list(self.frames)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.abort()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.ws.shutdown()


class Live:
    """A running server plus the clients a scenario opened on it."""

    def __init__(self, server: ComfyServer, kind: str) -> None:
        self.server = server
        self.kind = kind
        self.http = requests.Session()
        self.readers: list[WsReader] = []

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.http.request(method, self.server.url + path, timeout=60, **kwargs)

    def ws(self, client_id: str | None = None, first_message: dict[str, Any] | None = None) -> WsReader:
        reader = WsReader(self.server.ws_url(client_id), first_message)
        self.readers.append(reader)
        reader.wait_for(lambda f: f.type == "status", what="the first status frame", timeout=10)
        if first_message is not None and first_message.get("type") == "feature_flags":
            reader.wait_for(lambda f: f.type == "feature_flags", what="feature_flags", timeout=10)
        return reader

    def post_prompt(self, body: dict[str, Any]) -> str:
        response = self.request("POST", "/prompt", json=body)
        assert response.status_code == 200, response.text
        prompt_id: str = response.json()["prompt_id"]
        return prompt_id

    def wait_history(self, prompt_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.request("GET", f"/history/{prompt_id}").json()
            if prompt_id in body:
                entry: dict[str, Any] = body[prompt_id]
                return entry
            if time.monotonic() > deadline:
                pytest.fail(f"{prompt_id} never reached the history")
            time.sleep(0.05)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.http.close()


@pytest.fixture(params=["standin", pytest.param("real", marks=pytest.mark.comfyui)])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "real" and not REAL_COMFYUI_DIR:
        pytest.skip(
            "contract run against a real ComfyUI needs COMFYUI_DIR=<checkout> (and COMFYUI_PYTHON=<its python>)"
        )
    param: str = request.param
    return param


@pytest.fixture
def start(kind: str, tmp_path: Path) -> Iterator[Callable[..., Live]]:
    """Factory: ``start(extra_args=(), prepare=None)`` starts a fresh server of this kind under tmp_path."""
    with contextlib.ExitStack() as stack:
        count = 0

        def _start(extra_args: tuple[str, ...] = (), prepare: Callable[[Path], None] | None = None) -> Live:
            nonlocal count
            count += 1
            base = tmp_path / f"comfy{count}"
            base.mkdir()
            if prepare is not None:
                prepare(base)
            if kind == "standin":
                server = stack.enter_context(run_standin(base, extra_args=extra_args))
            else:
                server = stack.enter_context(
                    run_real_comfyui(
                        base, extra_args=extra_args, comfyui_dir=REAL_COMFYUI_DIR, python=REAL_COMFYUI_PYTHON
                    )
                )
            live = Live(server, kind)
            stack.callback(live.close)
            return live

        yield _start


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The replayer.
@dataclass
class Replay:
    """Replays a transcript's requests in order and compares every answer and every job's frames."""

    live: Live
    tx: Transcript
    reader: WsReader
    client_id: str
    canon: Canon = field(default_factory=Canon)
    # Uploaded files by the sha256 the recording noted (the recording kept hashes, not bytes).
    uploads: dict[str, bytes] = field(default_factory=dict)
    # Whether a binary answer must match the recording byte for byte.
    exact_binary: Callable[[str], bool] = lambda path: True
    prompt_ids: dict[str, str] = field(default_factory=dict)
    temp_names: dict[str, str] = field(default_factory=dict)
    number_offsets: dict[str, float] = field(default_factory=dict)
    json_posts: int = 0

    def __post_init__(self) -> None:
        self.canon.alias("<client>", self.tx.client_id, self.client_id)
        self.canon.path("<input>", "/comfyui/input", self.live.server.input_dir)

    def rewrite(self, value: Any) -> Any:
        """Recorded ids and file names -> live ones, anywhere in a request."""
        if isinstance(value, dict):
            return {self.rewrite(k): self.rewrite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.rewrite(v) for v in value]
        if isinstance(value, str):
            if value == self.tx.client_id:
                return self.client_id
            for recorded, live in {**self.prompt_ids, **self.temp_names}.items():
                value = value.replace(recorded, live)
            return value
        return value

    def run(self) -> None:
        for request, response in self.tx.exchanges():
            self.exchange(request, response)

    def exchange(self, request: dict[str, Any], recorded: dict[str, Any]) -> requests.Response:
        method, path = request["method"], self.rewrite(request["path"])
        what = f"{self.tx.name} #{request['seq']} {method} {request['path']} {request.get('note', '')}".strip()
        kwargs: dict[str, Any] = {}
        if "json" in request:
            kwargs["json"] = self.rewrite(request["json"])
        elif "raw_body" in request:
            kwargs["data"] = request["raw_body"].encode()
        if "form_fields" in request:
            kwargs["data"] = dict(request["form_fields"])
        if "files" in request:
            kwargs["files"] = {
                name: (f["filename"], self.uploads[f["sha256"]], f["content_type"])
                for name, f in request["files"].items()
            }
        mark = self.reader.mark()
        response = self.live.request(method, path, **kwargs)
        assert_same(
            f"{what}: status and content type",
            {"status": response.status_code, "content_type": response.headers.get("Content-Type")},
            {"status": recorded["status"], "content_type": recorded["content_type"]},
        )
        body = recorded["body"]
        if "json" in body:
            live_json = response.json()
            if method == "POST" and request["path"] == "/prompt":
                if "json" in request:
                    self.json_posts += 1
                if response.status_code == 200:
                    self.prompt_posted(what, request, live_json, body["json"], mark)
            assert_same(what, self.canon(live_json), self.canon(body["json"]))
        elif "text" in body:
            assert_same(what, response.text, body["text"])
        elif "binary" in body:
            self.check_binary(what, path, response.content, body["binary"])
        return response

    def prompt_posted(
        self, what: str, request: dict[str, Any], live: dict[str, Any], recorded: dict[str, Any], mark: int
    ) -> None:
        live_id, recorded_id = live["prompt_id"], recorded["prompt_id"]
        label = f"<prompt {len(self.prompt_ids) + 1}>"
        self.prompt_ids[recorded_id] = live_id
        self.canon.alias(label, recorded_id, live_id)
        # Every POST /prompt with a JSON body takes the next number, valid or not.
        for side, number in (("live", live["number"]), ("recorded", recorded["number"])):
            offset = number - self.json_posts
            assert self.number_offsets.setdefault(side, offset) == offset, f"{what}: {side} number {number} out of step"
        if request["json"].get("client_id") is None:
            return
        live_frames = self.reader.wait_job_end(live_id, start=mark)
        recorded_frames = self.tx.job_frames(request["seq"], recorded_id)
        self.learn_temp_names(recorded_frames, live_frames)
        assert_same(f"{what}: frame types", frame_types(live_frames), frame_types(recorded_frames))
        assert_same(f"{what}: frames", frames_json(live_frames, self.canon), frames_json(recorded_frames, self.canon))

    def learn_temp_names(self, recorded: list[Frame], live: list[Frame]) -> None:
        found_recorded = TEMP_NAME.findall(json.dumps([f.data for f in recorded if f.type == "executed"]))
        found_live = TEMP_NAME.findall(json.dumps([f.data for f in live if f.type == "executed"]))
        for old, new in zip(dict.fromkeys(found_recorded), dict.fromkeys(found_live), strict=False):
            self.temp_names[old] = new

    def check_binary(self, what: str, path: str, data: bytes, recorded: dict[str, Any]) -> None:
        if recorded["sha256"] in self.uploads:
            assert sha256(data) == sha256(self.uploads[recorded["sha256"]]), f"{what}: not the uploaded bytes"
        elif self.exact_binary(path):
            assert_same(
                f"{what}: body",
                {"length": len(data), "sha256": sha256(data)},
                {"length": recorded["length"], "sha256": recorded["sha256"]},
            )
        else:
            assert data[:8].hex() == recorded["first8_hex"], f"{what}: body starts {data[:8].hex()}"

    def check_whole_session(self) -> None:
        """The type sequence of every frame the socket received, start to end."""
        recorded = frame_types([f for _, f in self.tx.frames()])
        live = frame_types(self.reader.settle(at_least=len(recorded)))
        assert_same(f"{self.tx.name}: WebSocket frame types", live, recorded)


def replay(live: Live, name: str, first_message: dict[str, Any] | None = None, **options: Any) -> Replay:
    tx = Transcript(name)
    client_id = uuid.uuid4().hex
    reader = live.ws(client_id, first_message)
    session = Replay(live, tx, reader, client_id, **options)
    initial = frames_json(reader.frames[:1], session.canon)
    assert_same(f"{name}: first frame", initial, frames_json([f for _, f in tx.frames()][:1], session.canon))
    return session


# ---------------------------------------------------------------------------------------------------------------
# Scenarios replayed from the recordings.
def test_a_plain_job(start: Callable[..., Live]) -> None:
    """EmptyImage -> SaveImage: frames, history, and the PNG byte for byte (it embeds only the prompt)."""
    live = start()
    session = replay(live, "a_emptyimage_saveimage.json")
    session.run()
    session.check_whole_session()
    assert (live.server.output_dir / "a_empty_00001_.png").is_file()


def test_a2_feature_flags_text_frames_preview(start: Callable[..., Live]) -> None:
    """feature_flags negotiation, a binary TEXT frame from GetImageSize, PreviewImage in the temp folder."""
    live = start()
    first = {"type": "feature_flags", "data": {"supports_preview_metadata": True, "harness": "x"}}
    session = replay(live, "a2_feature_flags_and_binary_text.json", first_message=first)
    flags = [f for f in session.reader.frames if f.type == "feature_flags"]
    assert_same(
        "feature_flags answer", flags[0].data, {"supports_preview_metadata": True, "max_upload_size": 104857600}
    )
    session.run()
    session.check_whole_session()
    temp_files = sorted(p.name for p in live.server.temp_dir.iterdir())
    assert len(temp_files) == 2 and all(TEMP_NAME.match(name) for name in temp_files), temp_files


def test_b_uploads_loadimage_invert(start: Callable[..., Live]) -> None:
    """Upload rules (overwrite, rename, dedup, subfolder, traversal, temp) and LoadImage -> ImageInvert."""
    live = start()
    first_upload, other_upload = png_bytes((10, 200, 30)), png_bytes((200, 100, 70), (9, 7))
    uploads = {
        "22655536460cfbae54a3d8835a6ff62d467ed18fd0a02012fb63b8dcb5d7a930": first_upload,
        "46f52a339b0788b57a27ea0af9155b9c2843cbfc2a8559fb6bcedaf2f0caa4c3": other_upload,
    }
    derived = ("b_invert_", "ComfyUI_temp_")
    session = replay(
        live,
        "b_upload_loadimage_invert.json",
        uploads=uploads,
        exact_binary=lambda path: not any(d in path for d in derived),
    )
    session.run()
    session.check_whole_session()
    assert (live.server.input_dir / "harness" / "harness_upload.png").read_bytes() == first_upload
    assert (live.server.input_dir / "harness" / "harness_upload (1).png").read_bytes() == other_upload
    assert (live.server.temp_dir / "harness_temp.png").read_bytes() == first_upload
    with Image.open(live.server.output_dir / "b_invert_00001_.png") as img:
        assert img.size == (8, 8)
        inverted = img.convert("RGB").getpixel((0, 0))
        prompt = json.loads(img.text["prompt"])  # type: ignore[attr-defined]
    assert all(abs(v - (255 - c)) <= 1 for v, c in zip(inverted, (10, 200, 30), strict=True)), inverted
    assert prompt["2"]["class_type"] == "ImageInvert"


def test_c_validation_errors(start: Callable[..., Live]) -> None:
    """All 13 recorded validation cases: exact 400 bodies, the half-valid prompt, no_prompt, malformed JSON."""
    live = start()
    session = replay(live, "c_validation_errors.json")
    session.run()
    session.check_whole_session()
    assert sorted(p.name for p in live.server.output_dir.iterdir()) == ["c11_ok_00001_.png"]


def test_d_unknown_class_type(start: Callable[..., Live]) -> None:
    live = start()
    session = replay(live, "d_unknown_class_type.json")
    session.run()
    session.check_whole_session()


def test_e_execution_errors(start: Callable[..., Live]) -> None:
    """A corrupt upload (PIL.UnidentifiedImageError) and an impossible allocation (RuntimeError)."""
    live = start()
    corrupt = b"not an image at all, whatever its name says".ljust(92, b".")
    session = replay(
        live,
        "e_execution_errors.json",
        uploads={"837c029925818000dc348069918f694d39f65deedab30856a208901bf29bfe23": corrupt},
    )
    session.run()
    session.check_whole_session()
    assert list(live.server.output_dir.iterdir()) == []


def test_f_cache_hits(start: Callable[..., Live]) -> None:
    """A resubmitted prompt executes nothing and repeats the old output; a changed prefix re-runs SaveImage only."""
    live = start()
    session = replay(live, "f_cache_hits.json")
    session.run()
    session.check_whole_session()
    assert sorted(p.name for p in live.server.output_dir.iterdir()) == [
        "f_cache_00001_.png",
        "f_cache_changed_00001_.png",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Slow jobs: the recordings use ImageBlur chains that take seconds on a CPU; the stand-in's ImageBlur is fast,
# so its runs use StandinSleep in the same places (same node ids and graph shape).
def checkout_custom_nodes(kind: str, tmp_path: Path) -> tuple[str, ...]:
    """Arguments that give a real server its checkout's ``custom_nodes`` folder back (``--base-directory``
    hides it); it holds the example node SaveImageWebsocket. Nothing is copied."""
    if kind != "real" or not REAL_COMFYUI_DIR:
        return ()
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(json.dumps({"checkout": {"custom_nodes": str(Path(REAL_COMFYUI_DIR) / "custom_nodes")}}))
    return ("--extra-model-paths-config", str(config))


def lacks_example_node(kind: str) -> bool:
    """A real checkout without upstream's example custom node (``../shared``'s source has no custom_nodes)."""
    return kind == "real" and not (Path(REAL_COMFYUI_DIR or ".") / "custom_nodes" / "websocket_image_save.py").is_file()


def slow_version(kind: str, prompt: dict[str, Any], seconds: float = 0.15, steps: int = 1) -> dict[str, Any]:
    if kind == "real":
        return copy.deepcopy(prompt)
    out = copy.deepcopy(prompt)
    for node in out.values():
        if node["class_type"] == "ImageBlur":
            node["class_type"] = "StandinSleep"
            node["inputs"] = {"image": node["inputs"]["image"], "seconds": seconds, "steps": steps}
    return out


def running(frame: Frame, node_id: str) -> bool:
    return frame.type == "executing" and frame.data.get("node") == node_id


def test_l_addressing(start: Callable[..., Live]) -> None:
    """Which socket gets which frame: job events only reach the socket of the prompt's client_id."""
    live = start()
    tx = Transcript("l_addressing_observer_socket.json")
    canon = Canon()
    observer_id = uuid.uuid4().hex
    canon.alias("<observer>", tx.client_id, observer_id)
    observer = live.ws(observer_id)
    other = live.ws("someone-else")

    # 1. A prompt without client_id: the observer sees the status frames and the broadcast progress_state only.
    request = tx.request(2)
    recorded_id = tx.request(3)["body"]["json"]["prompt_id"]
    mark = observer.mark()
    other_mark = other.mark()
    prompt_id = live.post_prompt(request["json"])
    canon.alias("<prompt 1>", recorded_id, prompt_id)
    recorded = [f for _, f in tx.frames(after_seq=2, until_seq=10)]
    seen = observer.settle(at_least=mark + len(recorded))[mark:]
    assert_same("no client_id: observer frame types", frame_types(seen), frame_types(recorded))
    assert_same("no client_id: observer frames", frames_json(seen, canon), frames_json(recorded, canon))
    seen_by_other = other.settle(at_least=other_mark + len(recorded))[other_mark:]
    assert_same("no client_id: other socket", frame_types(seen_by_other), frame_types(recorded))

    # 2. A prompt for another client: the observer sees only status frames; that client sees the whole job.
    request = tx.request(12)
    recorded_id = tx.request(13)["body"]["json"]["prompt_id"]
    mark, other_mark = observer.mark(), other.mark()
    prompt_id = live.post_prompt(request["json"])
    canon.alias("<prompt 2>", recorded_id, prompt_id)
    job = other.wait_job_end(prompt_id, other_mark)
    recorded = [f for _, f in tx.frames(after_seq=12, until_seq=16)]
    seen = observer.settle(at_least=mark + len(recorded))[mark:]
    assert_same("other client_id: observer frame types", frame_types(seen), frame_types(recorded))
    a_job = Transcript("a_emptyimage_saveimage.json")
    a_types = frame_types(a_job.job_frames(2, a_job.request(12)["body"]["json"]["prompt_id"]))
    assert_same("other client_id: that client's frame types", frame_types(job), a_types)

    # 3. Interrupting a prompt without client_id: progress_state and execution_interrupted are broadcast.
    request = tx.request(18)
    prompt = slow_version(live.kind, request["json"]["prompt"])
    mark = observer.mark()
    prompt_id = live.post_prompt({"prompt": prompt})
    observer.wait_for(
        lambda f: f.type == "progress_state" and f.data["nodes"].get("11", {}).get("state") == "running", mark
    )
    assert live.request("POST", "/interrupt", json={}).status_code == 200
    observer.wait_for(lambda f: f.type == "execution_interrupted", mark)
    live.wait_history(prompt_id)
    index = observer.wait_for(
        lambda f: f.type == "status" and f.data["status"]["exec_info"]["queue_remaining"] == 0, mark
    )
    seen = observer.settle(at_least=index + 1)[mark:]
    recorded = [f for _, f in tx.frames(after_seq=18)]
    check_interrupted_job_skeleton("recorded interrupt (no client_id)", recorded, ends_with_executing=False)
    check_interrupted_job_skeleton("live interrupt (no client_id)", seen, ends_with_executing=False)
    check_interrupt_invariants("live interrupt", seen, prompt)
    check_interrupt_invariants("recorded interrupt", recorded, request["json"]["prompt"])


def test_h_queue_interrupt_history_view_misc(start: Callable[..., Live], kind: str, tmp_path: Path) -> None:
    """/queue, /interrupt (global, by prompt_id, no body), /history paging, /view variants, the misc routes."""
    tx = Transcript("h_queue_interrupt_history_view_misc.json")
    recorded_object_info = json.loads((TRANSCRIPTS / "object_info_full.json").read_text())

    def prepare(base: Path) -> None:
        # The files the recorded server had, so folder-based lists (and /object_info) match exactly.
        for folder, names in (
            ("models/checkpoints", recorded_object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]),
            ("models/configs", recorded_object_info["CheckpointLoader"]["input"]["required"]["config_name"][0]),
            ("input", recorded_object_info["LoadImage"]["input"]["required"]["image"][0]),
        ):
            (base / folder).mkdir(parents=True, exist_ok=True)
            for name in names:
                (base / folder / name).write_bytes(png_bytes((1, 2, 3)) if folder == "input" else b"")
        # Load3D creates input/3d the first time its inputs are listed; the recorded server had it already.
        (base / "input" / "3d").mkdir()

    # The recorded server also loaded the checkout's example custom node (SaveImageWebsocket).
    live = start(extra_args=checkout_custom_nodes(kind, tmp_path), prepare=prepare)
    canon = Canon()
    client_id = uuid.uuid4().hex
    canon.alias("<client>", tx.client_id, client_id)
    reader = live.ws(client_id)
    exchanges = {request["seq"]: (request, response) for request, response in tx.exchanges()}

    def check(seq: int, response: requests.Response, body: bool = True) -> Any:
        request, recorded = exchanges[seq]
        what = f"h #{seq} {request['method']} {request['path']} {request.get('note', '')}".strip()
        assert_same(
            f"{what}: status and content type",
            {"status": response.status_code, "content_type": response.headers.get("Content-Type")},
            {"status": recorded["status"], "content_type": recorded["content_type"]},
        )
        if body and "json" in recorded["body"]:
            assert_same(
                what, normalise_history(canon(response.json())), normalise_history(canon(recorded["body"]["json"]))
            )
        elif body and "text" in recorded["body"]:
            assert_same(what, response.text, recorded["body"]["text"])
        return response.json() if "json" in (response.headers.get("Content-Type") or "") else None

    # What the recorded server had from earlier sessions: the plain job of transcript a and an upload.
    a_tx = Transcript("a_emptyimage_saveimage.json")
    setup_client = uuid.uuid4().hex
    canon.alias("<setup client>", a_tx.client_id, setup_client)
    setup_reader = live.ws(setup_client)
    a_body = a_tx.request(2)["json"]
    first_id = live.post_prompt({**a_body, "client_id": setup_client})
    setup_reader.wait_job_end(first_id)
    canon.alias("<first prompt>", a_tx.request(12)["body"]["json"]["prompt_id"], first_id)
    harness_upload = png_bytes((10, 200, 30))
    upload = live.request(
        "POST",
        "/upload/image",
        data={"subfolder": "harness", "overwrite": "true"},
        files={"image": ("harness_upload.png", harness_upload, "image/png")},
    )
    assert upload.status_code == 200

    # J1 running, J2 and J3 pending.
    recorded_ids = {seq: exchanges[seq][1]["body"]["json"]["prompt_id"] for seq in (1, 5, 9)}
    live_ids = {}
    prompts = {}
    mark = reader.mark()
    for n, seq in enumerate((1, 5, 9), start=1):
        body = exchanges[seq][0]["json"]
        prompts[seq] = slow_version(live.kind, body["prompt"])
        canon.prompt(f"<J{n} prompt>", body["prompt"], prompts[seq])
        live_ids[seq] = live.post_prompt({"prompt": prompts[seq], "client_id": client_id})
        canon.alias(f"<J{n}>", recorded_ids[seq], live_ids[seq])
    reader.wait_for(lambda f: running(f, "11"), mark, what="J1 at node 11")
    check(22, live.request("GET", "/queue"))
    check(24, live.request("GET", "/prompt"))
    check(26, live.request("POST", "/queue", json={"delete": [live_ids[9]]}))
    check(29, live.request("GET", "/queue"))
    check(31, live.request("POST", "/queue", json={"clear": True}))
    check(34, live.request("GET", "/queue"))
    check(36, live.request("POST", "/interrupt", json={"prompt_id": "00000000-not-running"}))
    check(38, live.request("POST", "/interrupt", json={}))
    j1 = reader.wait_job_end(live_ids[1], mark)
    recorded_j1 = tx.job_frames(1, recorded_ids[1])
    for label, frames in (("recorded J1", recorded_j1), ("live J1", j1)):
        check_interrupted_job_skeleton(label, frames, ends_with_executing=True)
    check_interrupt_invariants("live J1", j1, prompts[1])

    def queue_remaining(frames: list[Frame]) -> dict[str, Any]:
        """What the protocol guarantees of the status frames while J1 runs, whatever the timing: each queue change
        sends one with the count of that moment. Posts (J1, J2, J3) only add; J1's start changes nothing and may
        come before, between or after the posts (hence no list of values to compare); then the delete, the clear
        and J1's end only take away, down to 0 in the last one. So the values rise to 3, then fall to 0."""
        # (the recording's socket connected while J1 was posted: its first status frame is not J1's)
        values = [
            f.data["status"]["exec_info"]["queue_remaining"]
            for f in frames
            if f.type == "status" and "sid" not in f.data
        ]
        top = values.index(max(values)) if values else 0
        return {
            "values": sorted(set(values)),
            "rise, then fall": values[:top] == sorted(values[:top])
            and values[top:] == sorted(values[top:], reverse=True),
            "last": values[-1:],
        }

    assert queue_remaining(recorded_j1) == {"values": [0, 1, 2, 3], "rise, then fall": True, "last": [0]}
    assert_same("J1 queue_remaining", queue_remaining(j1), queue_remaining(recorded_j1))
    check(46, live.request("GET", f"/history/{live_ids[1]}"))
    check(48, live.request("GET", f"/history/{live_ids[5]}"))
    check(50, live.request("GET", "/queue"))

    # J4: interrupt by prompt_id.
    body = exchanges[52][0]["json"]
    prompt4 = slow_version(live.kind, body["prompt"])
    canon.prompt("<J4 prompt>", body["prompt"], prompt4)
    mark = reader.mark()
    j4_id = live.post_prompt({"prompt": prompt4, "client_id": client_id})
    canon.alias("<J4>", exchanges[52][1]["body"]["json"]["prompt_id"], j4_id)
    reader.wait_for(lambda f: running(f, "11"), mark, what="J4 at node 11")
    check(66, live.request("POST", "/interrupt", json={"prompt_id": j4_id}))
    j4 = reader.wait_job_end(j4_id, mark)
    check_interrupted_job_skeleton("live J4", j4, ends_with_executing=True)
    check_interrupt_invariants("live J4", j4, prompt4)

    # J5: one long node, interrupt without a body (the real run blurs 2048x2048 once instead of 4 times).
    body = exchanges[74][0]["json"]
    prompt5 = copy.deepcopy(body["prompt"])
    prompt5["1"]["inputs"]["batch_size"] = 1
    prompt5 = slow_version(live.kind, prompt5, seconds=10.0, steps=100)
    canon.prompt("<J5 prompt>", body["prompt"], prompt5)
    mark = reader.mark()
    j5_id = live.post_prompt({"prompt": prompt5, "client_id": client_id})
    canon.alias("<J5>", exchanges[74][1]["body"]["json"]["prompt_id"], j5_id)
    reader.wait_for(lambda f: running(f, "10"), mark, what="J5 at node 10")
    check(85, live.request("POST", "/interrupt"))
    j5 = reader.wait_job_end(j5_id, mark)
    check_interrupted_job_skeleton("live J5", j5, ends_with_executing=True)
    check_interrupt_invariants("live J5", j5, prompt5)
    check(93, live.request("GET", f"/history/{j5_id}"))

    # History paging: the live history holds the setup job, J1, J4 and J5.
    check(95, live.request("GET", "/history?max_items=2"))
    check(97, live.request("GET", "/history?max_items=1&offset=0"))
    everything = check(99, live.request("GET", "/history"), body=False)
    assert list(everything) == [first_id, live_ids[1], j4_id, j5_id]

    # /view variants, byte for byte where the recording is deterministic.
    for seq in range(101, 125, 2):
        request, recorded = exchanges[seq]
        response = live.request("GET", request["path"])
        check(seq, response)
        if "binary" in recorded["body"]:
            expected = recorded["body"]["binary"]
            if "harness_upload" in request["path"]:
                assert response.content == harness_upload
            else:
                assert_same(
                    f"h #{seq} GET {request['path']}: body",
                    {"length": len(response.content), "sha256": sha256(response.content)},
                    {"length": expected["length"], "sha256": expected["sha256"]},
                )

    # /object_info: the recorded one exactly (the stand-in adds its Standin* classes).
    object_info = check(125, live.request("GET", "/object_info"), body=False)
    served = {name: info for name, info in object_info.items() if not name.startswith("Standin")}
    missing = sorted(
        set(recorded_object_info) - set(served) - ({"SaveImageWebsocket"} if lacks_example_node(kind) else set())
    )
    extra = sorted(set(served) - set(recorded_object_info))
    assert not missing and not extra, f"node classes missing {missing}, unexpected {extra}"
    for name in sorted(set(recorded_object_info) & set(served)):
        if served[name] != recorded_object_info[name]:
            assert_same(f"/object_info[{name}]", served[name], recorded_object_info[name])
    for seq in (135, 137, 139):
        check(seq, live.request("GET", exchanges[seq][0]["path"]))

    stats = check(141, live.request("GET", "/system_stats"), body=False)
    recorded_stats = exchanges[141][1]["body"]["json"]
    assert_same("/system_stats keys", shape(stats), shape(recorded_stats))
    for key in ("os", "comfyui_version", "required_frontend_version", "embedded_python"):
        assert stats["system"][key] == recorded_stats["system"][key], key
    assert stats["devices"][0]["type"] == "cpu"
    for seq in (143, 145, 147, 149, 151):
        check(seq, live.request("GET", exchanges[seq][0]["path"]))
    extensions = check(153, live.request("GET", "/extensions"), body=False)
    assert isinstance(extensions, list) and all(isinstance(e, str) for e in extensions)
    check(155, live.request("POST", "/free", json={"unload_models": True, "free_memory": True}))
    check(157, live.request("POST", "/history", json={"delete": [live_ids[1]]}))
    check(159, live.request("GET", f"/history/{live_ids[1]}"))


def normalise_history(obj: Any) -> Any:
    """History bodies: execution_interrupted messages carry timing-dependent node ids."""
    if isinstance(obj, dict) and all(isinstance(v, dict) and "status" in v for v in obj.values()):
        return {k: normalise_interrupt(v) for k, v in obj.items()}
    return obj


def shape(obj: Any) -> Any:
    """Keys and value types, without the values."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(v) for v in obj[:1]]
    return type(obj).__name__ if obj is not None else "null"


# ---------------------------------------------------------------------------------------------------------------
# The test-only Standin* nodes (stand-in only): they must produce the frames real nodes produce.
@pytest.fixture(scope="module")
def standin_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[tuple[str, ...]], ComfyServer]]:
    """Stand-in servers shared by the tests below, one per command line (the tests use distinct prompts)."""
    with contextlib.ExitStack() as stack:
        servers: dict[tuple[str, ...], ComfyServer] = {}

        def get(extra_args: tuple[str, ...]) -> ComfyServer:
            if extra_args not in servers:
                base = tmp_path_factory.mktemp("standin")
                servers[extra_args] = stack.enter_context(run_standin(base, extra_args=extra_args))
            return servers[extra_args]

        yield get


@pytest.fixture
def standin(standin_pool: Callable[[tuple[str, ...]], ComfyServer]) -> Iterator[Callable[..., Live]]:
    lives: list[Live] = []

    def _start(extra_args: tuple[str, ...] = ()) -> Live:
        live = Live(standin_pool(extra_args), "standin")
        lives.append(live)
        return live

    yield _start
    for live in lives:
        live.close()


def unique_color() -> int:
    """A colour no other test uses, so that a shared server's cache never serves another test's nodes."""
    return uuid.uuid4().int & 0xFFFFFF


def node_segment(frames: list[Frame], node_id: str) -> list[Frame]:
    """Frames from a node's start (progress_state running at 0) to its progress_state finished."""
    out: list[Frame] = []
    for frame in frames:
        state = frame.data["nodes"].get(node_id, {}) if frame.type == "progress_state" else {}
        if not out and state.get("state") == "running" and state.get("value") == 0:
            out.append(frame)
        elif out:
            out.append(frame)
            if state.get("state") == "finished":
                return out
    raise AssertionError(f"no complete segment for node {node_id}: {frame_types(frames)}")


def segment_summary(frames: list[Frame], node_id: str, canon: Canon) -> list[Any]:
    """Types, node progress values, ``progress`` data and preview headers of a node segment."""
    out: list[Any] = []
    for frame in frames:
        if frame.type == "progress_state":
            state = frame.data["nodes"][node_id]
            out.append(["progress_state", state["state"], state["value"], state["max"]])
        elif frame.type == "binary:4":
            out.append([frame.type, canon(frame.data)])
        elif frame.type == "binary:1":
            out.append([frame.type, frame.data["image_format_u32"]])
        elif frame.type in ("progress", "executing"):
            out.append([frame.type, canon(frame.data)])
        else:
            out.append([frame.type])
    return out


@pytest.mark.parametrize(
    ("transcript", "flags"),
    [
        ("k_stretch_preview_latent2rgb_with_feature_flags.json", True),
        ("k2_stretch_preview_latent2rgb_legacy_no_feature_flags.json", False),
        ("j_stretch_random_sd15_ksampler.json", None),
    ],
)
def test_standin_sleep_progress_like_ksampler(
    standin: Callable[..., Live], transcript: str, flags: bool | None
) -> None:
    """StandinSleep's ticks look like KSampler's: progress_state, previews (type 4 or legacy type 1), progress."""
    tx = Transcript(transcript)
    live = standin(("--preview-method", "none" if flags is None else "latent2rgb"))
    client_id = uuid.uuid4().hex
    first = {"type": "feature_flags", "data": {"supports_preview_metadata": True}} if flags else None
    reader = live.ws(client_id, first)
    prompt = {
        "5": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": unique_color()},
        },
        "3": {"class_type": "StandinSleep", "inputs": {"image": ["5", 0], "seconds": 0.1, "steps": 2}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "sleep"}},
    }
    mark = reader.mark()
    prompt_id = live.post_prompt({"prompt": prompt, "client_id": client_id})
    frames = reader.wait_job_end(prompt_id, mark)
    recorded_id = next(
        e["body"]["json"]["prompt_id"]
        for e in tx.events
        if e["kind"] == "http_response" and e["path"] == "/prompt" and e["status"] == 200
    )
    canon = Canon()
    canon.alias("<prompt>", recorded_id, prompt_id)
    recorded = node_segment([f for _, f in tx.frames()], "3")
    assert_same(
        f"StandinSleep vs KSampler ({transcript})",
        segment_summary(node_segment(frames, "3"), "3", canon),
        segment_summary(recorded, "3", canon),
    )
    for frame in node_segment(frames, "3"):
        if frame.type.startswith("binary:"):
            with Image.open(io.BytesIO(frame.image)) as preview:
                # (contained to --preview-size, which upscales a small image like the real server does)
                assert preview.format == "JPEG" and preview.size == (512, 512)


def test_standin_sleep_interrupt_lands_on_a_tick(standin: Callable[..., Live]) -> None:
    live = standin()
    client_id = uuid.uuid4().hex
    reader = live.ws(client_id)
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": unique_color()},
        },
        "2": {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": 30.0, "steps": 300}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    mark = reader.mark()
    started = time.monotonic()
    prompt_id = live.post_prompt({"prompt": prompt, "client_id": client_id})
    reader.wait_for(lambda f: f.type == "progress", mark)
    assert live.request("POST", "/interrupt", json={"prompt_id": prompt_id}).status_code == 200
    frames = reader.wait_job_end(prompt_id, mark, timeout=10)
    assert time.monotonic() - started < 5
    check_interrupted_job_skeleton("StandinSleep interrupt", frames, ends_with_executing=True)
    data = check_interrupt_invariants("StandinSleep interrupt", frames, prompt)
    assert (data["node_id"], data["node_type"], data["executed"]) == ("2", "StandinSleep", ["1"])


@pytest.mark.parametrize(
    ("exception_type", "type_name", "tips"),
    [("RuntimeError", "RuntimeError", ""), ("torch.OutOfMemoryError", "torch.OutOfMemoryError", "TIPS:")],
)
def test_standin_fail_is_an_execution_error(
    standin: Callable[..., Live], exception_type: str, type_name: str, tips: str
) -> None:
    """StandinFail gives the frames and history entry of a real node failure (transcript e, first job)."""
    tx = Transcript("e_execution_errors.json")
    live = standin()
    client_id = uuid.uuid4().hex
    reader = live.ws(client_id)
    prompt = {"1": {"class_type": "StandinFail", "inputs": {"message": "boom", "exception_type": exception_type}}}
    mark = reader.mark()
    prompt_id = live.post_prompt({"prompt": prompt, "client_id": client_id})
    frames = reader.wait_job_end(prompt_id, mark)
    recorded = tx.job_frames(4, tx.request(5)["body"]["json"]["prompt_id"])
    assert_same("StandinFail frame types", frame_types(frames), frame_types(recorded))
    error = next(f.data for f in frames if f.type == "execution_error")
    recorded_error = next(f.data for f in recorded if f.type == "execution_error")
    assert sorted(error) == sorted(recorded_error)
    assert error["exception_type"] == type_name
    assert error["exception_message"].startswith("boom\n") and tips in error["exception_message"]
    assert error["current_inputs"] == {"message": ["boom"], "exception_type": [exception_type]}
    assert traceback_shape(error["traceback"]) == "<traceback>"
    entry = live.wait_history(prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_error"]


def test_standin_save_file_outputs(standin: Callable[..., Live]) -> None:
    """StandinSaveFile reports files the way custom output nodes do; /view serves them with their MIME type."""
    live = standin()
    client_id = uuid.uuid4().hex
    reader = live.ws(client_id)
    prompt = {
        "1": {
            "class_type": "StandinSaveFile",
            "inputs": {"filename_prefix": "clips/vid", "kind": "gifs", "extension": "mp4", "size_bytes": 2048},
        },
        "2": {
            "class_type": "StandinSaveFile",
            "inputs": {"filename_prefix": "sound", "kind": "audio", "extension": "flac", "content": "fLaC?"},
        },
        "3": {"class_type": "StandinSaveFile", "inputs": {"filename_prefix": "t", "kind": "text", "extension": "txt"}},
    }
    mark = reader.mark()
    prompt_id = live.post_prompt({"prompt": prompt, "client_id": client_id})
    reader.wait_job_end(prompt_id, mark)
    outputs = live.wait_history(prompt_id)["outputs"]
    video = outputs["1"]["gifs"][0]
    assert {k: v for k, v in video.items() if k != "fullpath"} == {
        "filename": "vid_00001_.mp4",
        "subfolder": "clips",
        "type": "output",
        "format": "video/mp4",
        "frame_rate": 8.0,
    }
    assert Path(video["fullpath"]) == live.server.output_dir / "clips" / "vid_00001_.mp4"
    assert outputs["2"] == {"audio": [{"filename": "sound_00001_.flac", "subfolder": "", "type": "output"}]}
    assert outputs["3"] == {"text": [""]}
    response = live.request("GET", "/view?filename=vid_00001_.mp4&subfolder=clips&type=output")
    assert response.status_code == 200 and response.headers["Content-Type"] == "video/mp4"
    assert len(response.content) == 2048
    response = live.request("GET", "/view?filename=sound_00001_.flac&type=output")
    assert response.headers["Content-Type"] == "audio/flac" and response.content == b"fLaC?"


def test_standin_nodes_are_served(standin: Callable[..., Live]) -> None:
    live = standin()
    info = live.request("GET", "/object_info").json()
    assert {"StandinSleep", "StandinFail", "StandinSaveFile"} <= set(info)
    assert info["StandinSleep"]["input"]["required"]["image"][0] == "IMAGE"
    assert live.request("GET", "/object_info/StandinFail").json()["StandinFail"]["output_node"] is True


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        # A missing custom_nodes folder under --base-directory is fatal (a FileNotFoundError traceback).
        ((), 1, "custom_nodes"),
        (("--lowvram",), 2, "argument --lowvram: not allowed with argument --cpu"),
        (("--no-such-option",), 2, "unrecognized arguments: --no-such-option"),
    ],
)
def test_command_line_like_comfyui(kind: str, tmp_path: Path, args: tuple[str, ...], status: int, message: str) -> None:
    """ComfyUI's command-line rules: its options only, mutually exclusive groups, custom_nodes required."""
    if kind == "real":
        assert REAL_COMFYUI_DIR
        argv = [REAL_COMFYUI_PYTHON or "python", str(Path(REAL_COMFYUI_DIR) / "main.py")]
    else:
        argv = [sys.executable, str(Path(__file__).resolve().parent / "standin_comfyui" / "main.py")]
    result = subprocess.run(
        [*argv, "--cpu", "--port", "1", "--base-directory", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (result.returncode, message in result.stderr) == (status, True), result.stderr[-3000:]


def test_standin_accepts_every_comfyui_option(tmp_path: Path) -> None:
    """Options the stand-in does not model are accepted and ignored, as long as ComfyUI has them."""
    options = ("--fast", "--use-sage-attention", "--reserve-vram", "2", "--front-end-version", "a/b@latest")
    with run_standin(tmp_path, extra_args=(*options, "--disable-smart-memory", "--verbose", "WARNING")) as server:
        assert requests.get(f"{server.url}/system_stats", timeout=5).status_code == 200


@pytest.mark.parametrize("flags", [False, True], ids=["legacy", "feature_flags"])
def test_save_image_websocket(start: Callable[..., Live], kind: str, tmp_path: Path, flags: bool) -> None:
    """SaveImageWebsocket (not recorded; checked against the real server): full PNGs as preview frames."""
    if lacks_example_node(kind):
        pytest.skip("optional: this ComfyUI checkout has no custom_nodes/websocket_image_save.py (SaveImageWebsocket)")
    live = start(extra_args=checkout_custom_nodes(kind, tmp_path))
    client_id = uuid.uuid4().hex
    reader = live.ws(
        client_id, {"type": "feature_flags", "data": {"supports_preview_metadata": True}} if flags else None
    )
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": 2, "color": 0x102030}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    mark = reader.mark()
    prompt_id = live.post_prompt({"prompt": prompt, "client_id": client_id})
    frames = reader.wait_job_end(prompt_id, mark)
    segment = node_segment(frames, "2")
    preview = "binary:4" if flags else "binary:1"
    tick = ["progress_state", preview, "progress"] if flags else ["progress_state", "progress", preview]
    assert frame_types(segment) == ["progress_state", "executing", *tick, *tick, "progress_state"]
    assert [f.data["value"] for f in segment if f.type == "progress"] == [0, 1]
    for frame in segment:
        if frame.type == preview:
            if flags:
                assert frame.data["decoded_metadata"]["image_type"] == "image/png"
                assert frame.data["decoded_metadata"]["node_id"] == "2"
            else:
                assert frame.data["image_format_u32"] == 2
            with Image.open(io.BytesIO(frame.image)) as image:
                assert (image.format, image.size, image.getpixel((0, 0))) == ("PNG", (16, 8), (0x10, 0x20, 0x30))
    assert "executed" not in frame_types(frames)
    assert live.wait_history(prompt_id)["outputs"] == {}
