"""Output collection from recorded /history entries and from the shapes custom nodes produce."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from comfy_worker.comfy_client import ComfyClient
from comfy_worker.errors import OutputError
from comfy_worker.outputs import build, collect

from .conftest import recorded_history


def test_plain_job_lists_its_image() -> None:
    entry = recorded_history("a_emptyimage_saveimage.json")[0]
    collected = collect(entry, include_temp=False)
    assert [(f.node_id, f.filename, f.folder_type, f.mime_type, f.kind) for f in collected.files] == [
        ("2", "a_empty_00001_.png", "output", "image/png", "images")
    ]
    assert collected.texts == [] and collected.skipped_temp == 0


def test_temp_outputs_are_skipped_unless_asked() -> None:
    entries = recorded_history("b_upload_loadimage_invert.json")
    preview = next(e for e in entries if any(i["type"] == "temp" for o in e["outputs"].values() for i in o["images"]))
    assert collect(preview, include_temp=False).files == []
    assert collect(preview, include_temp=False).skipped_temp == 1
    files = collect(preview, include_temp=True).files
    assert len(files) == 1 and files[0].folder_type == "temp"


def test_cached_resubmission_still_has_outputs() -> None:
    entries = recorded_history("f_cache_hits.json")
    first, second = entries[0], entries[1]
    assert collect(first, False).files == collect(second, False).files


def test_every_output_kind_is_collected() -> None:
    entry = {
        "outputs": {
            "10": {"images": [{"filename": "anim.webp", "subfolder": "", "type": "output"}], "animated": [True]},
            "11": {
                "gifs": [
                    {"filename": "clip_00001.mp4", "subfolder": "vid", "type": "output", "format": "video/h264-mp4"}
                ]
            },
            "12": {"audio": [{"filename": "voice.flac", "subfolder": "", "type": "output"}]},
            "13": {"text": ["hello", "world"]},
            "14": {"3d": [{"filename": "mesh.glb", "subfolder": "", "type": "output"}]},
            "15": {"latents": [{"filename": "x.latent", "subfolder": "", "type": "output"}]},
            "16": {"images": [{"filename": "anim.webp", "subfolder": "", "type": "output"}]},
        }
    }
    collected = collect(entry, include_temp=False)
    assert [(f.node_id, f.kind, f.mime_type) for f in collected.files] == [
        ("10", "images", "image/webp"),
        ("11", "videos", "video/mp4"),
        ("12", "audio", "audio/flac"),
        ("14", "files", "model/gltf-binary"),
        ("15", "files", "application/octet-stream"),
    ]  # node 16 repeats node 10's file: listed once
    assert collected.texts == [{"node_id": "13", "text": "hello"}, {"node_id": "13", "text": "world"}]


def test_files_are_read_from_disk_and_encoded(tmp_path: Path) -> None:
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "sub" / "a.png").write_bytes(b"PNGDATA")
    entry = {"outputs": {"9": {"images": [{"filename": "a.png", "subfolder": "sub", "type": "output"}]}}}
    # No server answers on this port: reading from disk must not need one.
    client = ComfyClient("http://127.0.0.1:9", client_id="test", timeout_s=0.5)
    result = build(client, {"output": tmp_path / "out"}, collect(entry, False))
    assert result["images"] == [
        {
            "filename": "a.png",
            "subfolder": "sub",
            "node_id": "9",
            "mime_type": "image/png",
            "size_bytes": 7,
            "type": "base64",
            "data": base64.b64encode(b"PNGDATA").decode(),
        }
    ]
    assert result["videos"] == result["audio"] == result["files"] == result["text"] == []


def test_unreadable_output_is_an_output_error(tmp_path: Path) -> None:
    entry = {"outputs": {"9": {"images": [{"filename": "../../etc/passwd", "subfolder": "", "type": "output"}]}}}
    client = ComfyClient("http://127.0.0.1:9", client_id="test", timeout_s=0.5)
    with pytest.raises(OutputError, match="could not be read"):
        build(client, {"output": tmp_path}, collect(entry, False))
