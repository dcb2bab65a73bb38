"""Output collection from recorded /history entries and from the shapes custom nodes produce."""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.errors import OutputError, ResultTooLargeError
from comfy_worker.runtime import outputs
from comfy_worker.runtime.delivery import MB, deliver
from comfy_worker.runtime.outputs import (
    OutputFile,
    Payload,
    assemble,
    base64_entry,
    collect,
    convert_image,
    load,
)

from .conftest import recorded_history

GOING = threading.Event()  # a job's stop that is never set


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


def test_outputs_are_listed_in_the_workflows_node_order() -> None:
    # ComfyUI's history lists its output nodes in the order of a set: the result follows the workflow instead
    def image(name: str) -> dict[str, Any]:
        return {"images": [{"filename": name, "subfolder": "", "type": "output"}]}

    entry = {"outputs": {"7": image("c.png"), "x.1": image("sub.png"), "3": image("a.png"), "12": image("b.png")}}
    collected = collect(entry, False, ["12", "3", "5", "7"])
    assert [f.filename for f in collected.files] == ["b.png", "a.png", "c.png", "sub.png"]
    assert [f.filename for f in collect(entry, False).files] == ["c.png", "sub.png", "a.png", "b.png"], "as listed"


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
    payloads, warnings = load(
        client, {"output": tmp_path / "out"}, collected, "png", 90, MAX_PIXELS, spool(tmp_path), GOING
    )
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
        load(client, {"output": tmp_path}, collect(entry, False), "png", 90, MAX_PIXELS, spool(tmp_path), GOING)


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
    payloads, warnings = load(
        client, folders, collect(entry, include_temp=True), "png", 90, MAX_PIXELS, spool(tmp_path), GOING
    )
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
        load(client, folders, collect(entry, include_temp=True), "png", 90, MAX_PIXELS, spool(tmp_path), GOING)


MAX_PIXELS = 80_000_000


def spool(tmp_path: Path) -> Path:
    folder = tmp_path / "spool"
    folder.mkdir(exist_ok=True)
    return folder


def written(tmp_path: Path, data: bytes, name: str = "in.png") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def converted(tmp_path: Path, data: bytes, image_format: str, quality: int) -> tuple[bytes, str, str]:
    result = convert_image(
        written(tmp_path, data), output("image/png"), image_format, quality, MAX_PIXELS, spool(tmp_path), GOING
    )
    assert result is not None
    path, name, mime = result
    return path.read_bytes(), mime, name


def output(mime_type: str, name: str = "out.png") -> OutputFile:
    return OutputFile("9", name, "", "output", mime_type)


def png_bytes(mode: str = "RGBA", size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_still_images_convert_to_webp_and_jpeg(tmp_path: Path) -> None:
    source = png_bytes()
    assert convert_image(written(tmp_path, source), output("image/png"), "png", 90, MAX_PIXELS, tmp_path, GOING) is None
    webp, mime, name = converted(tmp_path, source, "webp", 80)
    assert (mime, name) == ("image/webp", "out.webp")
    with Image.open(io.BytesIO(webp)) as image:
        assert image.format == "WEBP" and image.size == (64, 48) and image.mode == "RGBA"
    jpeg, mime, name = converted(tmp_path, source, "jpeg", 70)
    assert (mime, name) == ("image/jpeg", "out.jpg")
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        red, green, _blue = image.getpixel((10, 10))
        assert red > 200 and green > 100, "alpha is flattened onto white, not black"


def test_jpeg_flattens_every_kind_of_transparency_onto_white_and_keeps_greyscale_grey(tmp_path: Path) -> None:
    """A palette with a transparent colour and an RGBA image taller than one flattening strip come out white
    where they were transparent; greyscale stays one channel; 16-bit greyscale becomes RGB."""
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 20, 40, 200])
    palette.paste(0, (0, 0, 16, 32))
    palette.info["transparency"] = 0
    tall = Image.new("RGBA", (8, 3 * 256 + 5), (20, 40, 200, 255))
    tall.paste((0, 0, 0, 0), (0, 2 * 256, 8, 2 * 256 + 5))  # in the third strip only
    cases = [(palette, (4, 4), (20, 4), "RGB"), (tall, (2, 2 * 256 + 2), (2, 3 * 256 + 2), "RGB")]
    for image, clear, opaque, mode in cases:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        jpeg, mime, _name = converted(tmp_path, buffer.getvalue(), "jpeg", 95)
        with Image.open(io.BytesIO(jpeg)) as result:
            assert mime == "image/jpeg" and result.mode == mode and result.size == image.size
            assert min(result.getpixel(clear)) > 240, "transparent parts are white"
            red, _green, blue = result.getpixel(opaque)
            assert blue > 170 and red < 50, "opaque parts keep their colour"
    for source_mode, mode in (("L", "L"), ("I;16", "RGB")):
        buffer = io.BytesIO()
        Image.new(source_mode, (16, 16), 100).save(buffer, "PNG")
        jpeg, _mime, _name = converted(tmp_path, buffer.getvalue(), "jpeg", 90)
        with Image.open(io.BytesIO(jpeg)) as result:
            assert result.mode == mode


def test_an_rgba_image_is_flattened_for_jpeg_in_its_own_memory_and_as_a_copy_alike(tmp_path: Path) -> None:
    """A decoded RGBA image is flattened where it lies (its own pixels become the flattened ones: no copy);
    with Pillow's allocator back to its chain of blocks (an image over one block, 16 MB), or for an image
    mapped read-only from its file, the copy is made, and all give the same JPEG."""
    image = Image.new("RGBA", (2100, 2100), (20, 40, 200, 255))  # 17.6 MB decoded
    image.paste((0, 0, 0, 0), (0, 300, 2100, 310))
    image.paste((200, 30, 30, 128), (0, 1500, 2100, 2100))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    with Image.open(buffer) as decoded, outputs._jpeg_ready(decoded) as ready:
        assert ready.mode == "RGBX", "JPEG encodes RGBX as RGB"
        assert decoded.getpixel((5, 305)) == (255, 255, 255, 255), "flattened in the decoded image's memory"
        assert ready.getpixel((5, 305))[:3] == (255, 255, 255) and ready.getpixel((5, 5))[:3] == (20, 40, 200)
        in_place = ready.convert("RGB").tobytes()
    in_place_jpeg, _mime, _name = converted(tmp_path, buffer.getvalue(), "jpeg", 90)
    Image.core.set_use_block_allocator(0)
    try:
        with Image.open(buffer) as decoded, outputs._jpeg_ready(decoded) as ready:
            assert ready.mode == "RGB" and decoded.getpixel((5, 305)) == (0, 0, 0, 0), "a copy, the image untouched"
            assert ready.tobytes() == in_place
        copied_jpeg, _mime, _name = converted(tmp_path, buffer.getvalue(), "jpeg", 90)
    finally:
        Image.core.set_use_block_allocator(1)
    assert copied_jpeg == in_place_jpeg
    tiff = io.BytesIO()
    image.save(tiff, "TIFF", compression=None)  # uncompressed: Pillow maps it from its file, read-only
    path = written(tmp_path, tiff.getvalue(), "in.tif")
    with Image.open(path) as mapped:
        mapped.load()
        assert mapped.readonly, "the read-only case"
    result = convert_image(path, output("image/tiff", "out.tif"), "jpeg", 90, MAX_PIXELS, spool(tmp_path), GOING)
    assert result is not None
    assert result[0].read_bytes() == in_place_jpeg, "a read-only image is flattened into a copy"


def test_animations_and_videos_are_left_alone(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    animation = written(tmp_path, buffer.getvalue(), "anim.webp")
    assert convert_image(animation, output("image/webp"), "jpeg", 90, MAX_PIXELS, tmp_path, GOING) is None
    video = written(tmp_path, b"\x00\x00\x00 ftypmp42", "v.mp4")
    assert convert_image(video, output("video/mp4"), "webp", 90, MAX_PIXELS, tmp_path, GOING) is None


def test_converted_outputs_get_the_new_name(tmp_path: Path) -> None:
    (tmp_path / "ComfyUI_00001_.png").write_bytes(png_bytes("RGB", (32, 32)))
    entry = {"outputs": {"9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}}}
    client = ComfyClient("http://127.0.0.1:9", client_id="test", timeout_s=0.5)
    [payload], _ = load(
        client, {"output": tmp_path}, collect(entry, False), "jpeg", 85, MAX_PIXELS, spool(tmp_path), GOING
    )
    assert (payload.filename, payload.mime_type) == ("ComfyUI_00001_.jpg", "image/jpeg")
    assert payload.path.read_bytes()[:3] == b"\xff\xd8\xff" and payload.size == payload.path.stat().st_size


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
def test_images_over_the_pixel_limit_are_refused_before_decoding(
    size: tuple[int, int], limit: int, tmp_path: Path
) -> None:
    source = written(tmp_path, png_header(*size) if size[0] > 1000 else png_bytes("RGB", size))
    with pytest.raises(OutputError, match="OUTPUT_CONVERT_MAX_MEGAPIXELS") as info:
        convert_image(source, output("image/png", "big.png"), "webp", 90, limit, tmp_path, GOING)
    assert info.value.details["node_id"] == "9" and "big.png" in info.value.message
    assert convert_image(source, output("image/png"), "png", 90, limit, tmp_path, GOING) is None, "png is not decoded"


def bytes_read() -> int:
    """What this process has read so far (``rchar``: every read call, from any file, in any thread)."""
    line = next(row for row in Path("/proc/self/io").read_text().splitlines() if row.startswith("rchar:"))
    return int(line.split()[1])


def test_the_result_limit_is_refused_before_any_byte_is_read(tmp_path: Path) -> None:
    """A 512 MB output (sparse: it costs no disk) against a 10 MB limit: refused from its size alone."""
    (tmp_path / "out").mkdir()
    with (tmp_path / "out" / "huge.png").open("wb") as huge:
        huge.truncate(512 * MB)
    (tmp_path / "out" / "small.png").write_bytes(b"small")
    entry = {
        "outputs": {
            "9": {"images": [{"filename": "huge.png", "subfolder": "", "type": "output"}]},
            "10": {"images": [{"filename": "small.png", "subfolder": "", "type": "output"}]},
        }
    }
    client = ComfyClient("http://127.0.0.1:9", client_id="test", timeout_s=0.5)
    before = bytes_read()
    payloads, _ = load(
        client, {"output": tmp_path / "out"}, collect(entry, False), "png", 90, MAX_PIXELS, tmp_path, GOING
    )
    with pytest.raises(ResultTooLargeError) as refused:
        deliver(payloads, "auto", None, 10 * MB, {"job_id": "j", "prompt_id": "p"}, None)
    assert bytes_read() - before < 16 * MB, "the outputs were read before their size was checked"
    assert refused.value.details["outputs"] == [
        {"node_id": "9", "filename": "huge.png", "size_mb": 512.0},
        {"node_id": "10", "filename": "small.png", "size_mb": 0.0},
    ]
    assert refused.value.details["base64_mb"] > 682 and "huge.png 512.0 MB" in refused.value.message


@pytest.mark.parametrize("size", [0, 1, 2, 3, 3 * 1024 * 1024, 7 * 1024 * 1024 + 1])
def test_base64_is_bit_for_bit_across_pieces(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = written(tmp_path, data, "blob.bin")
    item = base64_entry(Payload(output("application/octet-stream", "blob.bin"), "blob.bin", "x", path, size))
    assert item["data"] == base64.b64encode(data).decode("ascii") and item["size_bytes"] == size


def test_an_output_that_changed_after_it_was_measured_is_an_output_error(tmp_path: Path) -> None:
    path = written(tmp_path, b"grown since", "late.png")
    with pytest.raises(OutputError, match=r"late\.png \(node 9\) but it could not be read: .*no longer 4 bytes"):
        base64_entry(Payload(output("image/png", "late.png"), "late.png", "image/png", path, 4))


def test_images_are_converted_one_at_a_time_into_the_spool(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    images = []
    for index in range(3):
        (tmp_path / "out" / f"img_{index}.png").write_bytes(png_bytes("RGB", (16 + index, 16)))
        images.append({"filename": f"img_{index}.png", "subfolder": "", "type": "output"})
    entry = {"outputs": {"9": {"images": images}}}
    client = ComfyClient("http://127.0.0.1:9", client_id="test", timeout_s=0.5)
    payloads, _ = load(
        client, {"output": tmp_path / "out"}, collect(entry, False), "webp", 80, MAX_PIXELS, spool(tmp_path), GOING
    )
    assert [p.filename for p in payloads] == ["img_0.webp", "img_1.webp", "img_2.webp"]
    for index, payload in enumerate(payloads):
        assert payload.path.parent == tmp_path / "spool"
        with Image.open(payload.path) as image:
            assert image.format == "WEBP" and image.size == (16 + index, 16)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img_0.png", "img_1.png", "img_2.png"]


def test_only_files_inside_comfyuis_folder_are_read_from_disk(tmp_path: Path) -> None:
    """A name that climbs out (``..``) or a link that points out is not read from this machine's disk: the
    worker asks ComfyUI's ``/view`` for it instead (here unreachable, so the output cannot be read)."""
    out = tmp_path / "output"
    out.mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes("RGB", (4, 4)))
    (out / "link.png").symlink_to(tmp_path / "secret.png")
    (out / "own.png").write_bytes(png_bytes("RGB", (4, 4)))
    client = ComfyClient("http://127.0.0.1:9", client_id="test", timeout_s=0.5)
    for name, subfolder in (("own.png", ""), ("secret.png", ".."), ("link.png", "")):
        entry = {"outputs": {"9": {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}]}}}
        collected = collect(entry, False)
        if name == "own.png":
            [payload], _ = load(client, {"output": out}, collected, "png", 90, MAX_PIXELS, spool(tmp_path), GOING)
            assert payload.path == out / "own.png"
            continue
        with pytest.raises(OutputError, match="could not be read"):
            load(client, {"output": out}, collected, "png", 90, MAX_PIXELS, spool(tmp_path), GOING)
