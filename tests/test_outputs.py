"""Output collection from recorded /history entries and from the shapes custom nodes produce."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.errors import OutputError
from comfy_worker.runtime.outputs import (
    OutputFile,
    PixelBudget,
    assemble,
    base64_entry,
    collect,
    convert_image,
    load,
)

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
    collected = collect(entry, False)
    payloads, warnings = load(client, {"output": tmp_path / "out"}, collected, "png", 90, MAX_PIXELS)
    assert warnings == []
    result = assemble([(p, base64_entry(p)) for p in payloads], collected.texts)
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
        load(client, {"output": tmp_path}, collect(entry, False), "png", 90, MAX_PIXELS)


def saved_and_previewed(tmp_path: Path) -> dict[str, object]:
    """A SaveImage output and two PreviewImage outputs; only the second temp file is on disk."""
    for folder, name in (("output", "saved_00001_.png"), ("temp", "ComfyUI_temp_bbbbb_00001_.png")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"PNG " + name.encode())
    return {
        "outputs": {
            "3": {"images": [{"filename": "ComfyUI_temp_aaaaa_00001_.png", "subfolder": "", "type": "temp"}]},
            "4": {"images": [{"filename": "ComfyUI_temp_bbbbb_00001_.png", "subfolder": "", "type": "temp"}]},
            "9": {"images": [{"filename": "saved_00001_.png", "subfolder": "", "type": "output"}]},
        }
    }


def test_an_unreadable_temp_output_is_left_out_with_a_warning(tmp_path: Path) -> None:
    """Another ComfyUI on the same temp folder deleted it (at its start or exit): the rest is delivered."""
    entry = saved_and_previewed(tmp_path)
    client = ComfyClient("http://127.0.0.1:9", client_id="test", timeout_s=0.5)  # /view fails too
    folders = {"output": tmp_path / "output", "temp": tmp_path / "temp"}
    payloads, warnings = load(client, folders, collect(entry, include_temp=True), "png", 90, MAX_PIXELS)
    assert [(p.file.node_id, p.filename) for p in payloads] == [
        ("4", "ComfyUI_temp_bbbbb_00001_.png"),
        ("9", "saved_00001_.png"),
    ]
    [warning] = warnings
    assert warning.startswith("The temp output ComfyUI_temp_aaaaa_00001_.png (node 3) could not be read (")
    assert "the job's other outputs are delivered" in warning


def test_an_unreadable_saved_output_still_fails(tmp_path: Path) -> None:
    """What the job was run for: a success result without it would hide the loss."""
    entry = saved_and_previewed(tmp_path)
    (tmp_path / "output" / "saved_00001_.png").unlink()
    client = ComfyClient("http://127.0.0.1:9", client_id="test", timeout_s=0.5)
    folders = {"output": tmp_path / "output", "temp": tmp_path / "temp"}
    with pytest.raises(OutputError, match=r"saved_00001_.png \(node 9\) but it could not be read"):
        load(client, folders, collect(entry, include_temp=True), "png", 90, MAX_PIXELS)


MAX_PIXELS = 80_000_000
BUDGET = PixelBudget(MAX_PIXELS)


def output(mime_type: str, name: str = "out.png") -> OutputFile:
    return OutputFile("9", name, "", "output", mime_type)


def png_bytes(mode: str = "RGBA", size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_still_images_convert_to_webp_and_jpeg() -> None:
    source = png_bytes()
    assert convert_image(source, output("image/png"), "png", 90, BUDGET) is None
    webp, mime, extension = convert_image(source, output("image/png"), "webp", 80, BUDGET) or (b"", "", "")
    assert (mime, extension) == ("image/webp", "webp")
    with Image.open(io.BytesIO(webp)) as image:
        assert image.format == "WEBP" and image.size == (64, 48) and image.mode == "RGBA"
    jpeg, mime, extension = convert_image(source, output("image/png"), "jpeg", 70, BUDGET) or (b"", "", "")
    assert (mime, extension) == ("image/jpeg", "jpg")
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        red, green, _blue = image.getpixel((10, 10))
        assert red > 200 and green > 100, "alpha is flattened onto white, not black"


def test_animations_and_videos_are_left_alone() -> None:
    frames = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    assert convert_image(buffer.getvalue(), output("image/webp"), "jpeg", 90, BUDGET) is None
    assert convert_image(b"\x00\x00\x00 ftypmp42", output("video/mp4"), "webp", 90, BUDGET) is None


def test_converted_outputs_get_the_new_name(tmp_path: Path) -> None:
    (tmp_path / "ComfyUI_00001_.png").write_bytes(png_bytes("RGB", (32, 32)))
    entry = {"outputs": {"9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}}}
    client = ComfyClient("http://127.0.0.1:9", client_id="test", timeout_s=0.5)
    [payload], _ = load(client, {"output": tmp_path}, collect(entry, False), "jpeg", 85, MAX_PIXELS)
    assert (payload.filename, payload.mime_type) == ("ComfyUI_00001_.jpg", "image/jpeg")
    assert payload.data[:3] == b"\xff\xd8\xff"


def png_header(width: int, height: int) -> bytes:
    """The start of a PNG that says it is ``width`` x ``height``: what a small file of a huge image looks like
    to a decoder before it decodes (a 13000x13000 PNG of one colour is only about 164 KB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1000)))


@pytest.mark.parametrize(
    ("size", "limit"), [((60000, 60000), MAX_PIXELS), ((13000, 13000), MAX_PIXELS), ((40, 40), 1000)]
)
def test_images_over_the_pixel_limit_are_refused_before_decoding(size: tuple[int, int], limit: int) -> None:
    data = png_header(*size) if size[0] > 1000 else png_bytes("RGB", size)
    with pytest.raises(OutputError, match="OUTPUT_CONVERT_MAX_MEGAPIXELS") as info:
        convert_image(data, output("image/png", "big.png"), "webp", 90, PixelBudget(limit))
    assert info.value.details["node_id"] == "9" and "big.png" in info.value.message
    assert convert_image(data, output("image/png"), "png", 90, PixelBudget(limit)) is None, "png is not decoded"


def test_conversions_at_once_share_the_pixel_budget() -> None:
    budget = PixelBudget(100)
    budget.acquire(60)
    second = threading.Thread(target=budget.acquire, args=(60,), daemon=True)
    second.start()
    second.join(timeout=0.2)
    assert second.is_alive(), "60 + 60 pixels would exceed the budget of 100: the second waits"
    budget.release(60)
    second.join(timeout=10)
    assert not second.is_alive(), "and goes on once the first is done"
