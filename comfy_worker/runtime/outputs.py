"""Turn a ``/history`` entry into the result's outputs.

``/history/{prompt_id}`` is the source of truth: it lists every output node, also for a cached prompt whose
nodes did not run again. The prompt's ``executed`` frames carry the same entries, so when none was lost the
job makes the entry from them (``follow``). Every entry with a ``filename`` is a file (SaveImage's ``images``,
VideoHelperSuite's ``gifs``, SaveAudio's ``audio``, 3D files...), sorted into images, videos, audio or
files by its type; strings under ``text`` are text.

Outputs stay on disk until they are delivered, so a job's memory does not grow with its outputs: ComfyUI's
own files when it shares this machine (no HTTP copy of a 12 MB PNG), else ``/view`` streamed to a file in the
job's spool folder. Their sizes are known before anything is read (the result limit is checked on them), S3
uploads read the files in parts, and base64 is made one output at a time.

Converting to WebP/JPEG decodes the image: a 164 KB PNG can hold 13000x13000 pixels (500 MB decoded), so
an image over OUTPUT_CONVERT_MAX_MEGAPIXELS is refused from its header before decoding, and images are
converted one at a time, each released before the next is decoded. WebP goes through libwebp directly
(``webp``), which needs a fraction of what Pillow's WebP save does.
"""

from __future__ import annotations

import base64
import concurrent.futures
import mimetypes
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.errors import OutputError, WorkerError
from comfy_worker.fsutil import within
from comfy_worker.runtime import webp

KINDS = ("images", "videos", "audio", "files")
STILL_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff")
BASE64_PIECE = 3 * 1024 * 1024  # a multiple of 3: pieces encode without padding in between
FLATTEN_ROWS = 256  # rows of an image with transparency flattened at a time for JPEG
WHITE = (255, 255, 255)

# Each image in one block of memory, not in Pillow's default chain of 16 MB blocks: Image.fromarrow can then
# see a decoded RGBA image as RGBX (which JPEG encodes) without copying it (``_flattened_in_place``). A global
# setting of Pillow's (its "Arrow support" page); the worker uses Pillow for outputs alone.
Image.core.set_use_block_allocator(1)  # type: ignore[attr-defined]  # Image.core is Pillow's C module

mimetypes.add_type("image/webp", ".webp")
mimetypes.add_type("video/webm", ".webm")
mimetypes.add_type("audio/flac", ".flac")
mimetypes.add_type("model/gltf-binary", ".glb")


@dataclass(frozen=True)
class OutputFile:
    """One file ComfyUI reported for an output node."""

    node_id: str
    filename: str
    subfolder: str
    folder_type: str
    mime_type: str

    @property
    def kind(self) -> str:
        major = self.mime_type.split("/", 1)[0]
        return {"image": "images", "video": "videos", "audio": "audio"}.get(major, "files")

    @property
    def relative_path(self) -> str:
        return f"{self.subfolder}/{self.filename}" if self.subfolder else self.filename

    @property
    def details(self) -> dict[str, Any]:
        """What an error about this file names in its ``details``."""
        return {"node_id": self.node_id, "filename": self.filename, "subfolder": self.subfolder}


@dataclass
class CollectedOutputs:
    files: list[OutputFile]
    texts: list[dict[str, str]]
    skipped_temp: int


def _mime_type(entry: dict[str, Any]) -> str:
    guessed, _ = mimetypes.guess_type(entry["filename"])
    if guessed:
        return guessed
    declared = entry.get("format")  # VideoHelperSuite: "video/h264-mp4", "image/gif"...
    if isinstance(declared, str) and "/" in declared:
        return declared
    return "application/octet-stream"


def collect(entry: dict[str, Any], include_temp: bool, node_order: Sequence[str] = ()) -> CollectedOutputs:
    """List the files and texts of a history entry, without duplicates, in ``node_order`` (the workflow's:
    ComfyUI's history lists its nodes in the order of a set), nodes it does not name last, as listed."""
    files: list[OutputFile] = []
    texts: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    skipped_temp = 0
    rank = {node_id: index for index, node_id in enumerate(node_order)}
    listed = (entry.get("outputs") or {}).items()
    for node_id, node_output in sorted(listed, key=lambda item: rank.get(str(item[0]), len(rank))):
        if not isinstance(node_output, dict):
            continue
        for key, values in node_output.items():
            items = values if isinstance(values, list) else [values]
            for item in items:
                if key == "text" and isinstance(item, str):
                    texts.append({"node_id": str(node_id), "text": item})
                elif isinstance(item, dict) and isinstance(item.get("filename"), str):
                    folder_type = str(item.get("type") or "output")
                    ident = (folder_type, str(item.get("subfolder") or ""), item["filename"])
                    if ident in seen:
                        continue
                    seen.add(ident)
                    if folder_type == "temp" and not include_temp:
                        skipped_temp += 1
                        continue
                    files.append(OutputFile(str(node_id), ident[2], ident[1], folder_type, _mime_type(item)))
    return CollectedOutputs(files, texts, skipped_temp)


def _local_path(folders: dict[str, Path], file: OutputFile) -> Path | None:
    """The file on this machine's disk, if ComfyUI's folder is known and the path stays inside it."""
    root = folders.get(file.folder_type)
    if root is None:
        return None
    real = within(root, root / file.subfolder / file.filename)
    if real is None or not os.path.isfile(real):
        return None
    return Path(real)


def _unreadable(file: OutputFile, exc: Exception) -> OutputError:
    return OutputError(
        f"ComfyUI reported the output {file.relative_path} (node {file.node_id}) but it could not be read: {exc}",
        file.details,
    )


def locate(client: ComfyClient, folders: dict[str, Path], file: OutputFile, spool: Path, index: int) -> Path:
    """Where the output's bytes are on this disk, without reading them: ComfyUI's own file when the worker
    shares its folder, else a copy streamed from ``/view`` into ``spool`` (never whole in memory; the folder
    is made on first use: most jobs never need it)."""
    path = _local_path(folders, file)
    if path is not None:
        return path
    target = spool / f"{index}-{Path(file.filename).name}"
    try:
        spool.mkdir(mode=0o700, exist_ok=True)
        with target.open("wb") as sink:
            client.view_into(file.filename, file.subfolder, file.folder_type, sink)
    except (OSError, WorkerError) as exc:
        target.unlink(missing_ok=True)
        raise _unreadable(file, exc) from exc
    return target


@dataclass(frozen=True)
class Payload:
    """One output as it will be delivered (after an optional format conversion): a file on this disk, read
    only when it is delivered, so the result's size is known from ``size`` before any byte is read."""

    file: OutputFile
    filename: str
    mime_type: str
    path: Path
    size: int

    @property
    def base64_size(self) -> int:
        return 4 * ((self.size + 2) // 3)


def unreadable_temp_warning(file: OutputFile, error: OutputError) -> str:
    return (
        f"The temp output {file.relative_path} (node {file.node_id}) could not be read "
        f"({error.__cause__ or error.message}) and is left out; the job's other outputs are delivered. Temp "
        "files are previews, deleted whenever a ComfyUI using that temp folder starts or exits."
    )


def load(
    client: ComfyClient,
    folders: dict[str, Path],
    collected: CollectedOutputs,
    image_format: str,
    quality: int,
    max_pixels: int,
    spool: Path,
    stop: threading.Event,
) -> tuple[list[Payload], list[str]]:
    """Find every output file on disk (``/view`` downloads in parallel, into ``spool``), then convert still
    images one at a time when a format other than ``png`` is asked for (into ``spool`` too); return them and
    the warnings. Nothing is held in memory but the one image being converted, and a conversion ends when
    ``stop`` is set (the job's end).

    A temp output (PreviewImage...) that cannot be read is left out with a warning naming it: it is a preview,
    asked for as an extra (``include_temp``), and ComfyUI deletes temp files whenever a ComfyUI using that
    folder starts or exits, so losing one must not throw away the outputs the job was run for. A saved output
    (SaveImage...) that cannot be read fails the job: it is what the job was run for, and a result without it
    would look like a success that silently lost work."""

    def one(indexed: tuple[int, OutputFile]) -> tuple[OutputFile, Path, int] | str:
        index, file = indexed
        try:
            path = locate(client, folders, file, spool, index)
            return file, path, path.stat().st_size
        except OSError as exc:
            error = _unreadable(file, exc)
        except OutputError as exc:
            error = exc
        if file.folder_type != "temp":
            raise error
        return unreadable_temp_warning(file, error)

    numbered = list(enumerate(collected.files))
    if len(numbered) <= 1:
        found = [one(item) for item in numbered]
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(numbered))) as pool:
            found = list(pool.map(one, numbered))
    payloads = []
    for item in found:
        if isinstance(item, str):
            continue
        file, path, size = item
        converted = convert_image(path, file, image_format, quality, max_pixels, spool, stop)
        if converted is None:
            payloads.append(Payload(file, file.filename, file.mime_type, path, size))
        else:
            target, name, mime_type = converted
            payloads.append(Payload(file, name, mime_type, target, target.stat().st_size))
    return payloads, [item for item in found if isinstance(item, str)]


def _too_many_pixels(file: OutputFile, size: str, limit: int) -> OutputError:
    return OutputError(
        f"Output {file.relative_path} (node {file.node_id}) is {size} pixels, over OUTPUT_CONVERT_MAX_MEGAPIXELS "
        f"({limit / 1e6:g} megapixels), so it cannot be converted: ask for output.format 'png' to get it as "
        "ComfyUI wrote it.",
        file.details | {"max_pixels": limit},
    )


def convert_image(
    source: Path,
    file: OutputFile,
    image_format: str,
    quality: int,
    max_pixels: int,
    spool: Path,
    stop: threading.Event,
) -> tuple[Path, str, str] | None:
    """``webp``/``jpeg`` for still images, written into ``spool`` (the file, its new name, its type); None
    keeps the file as ComfyUI wrote it (png, videos, animations). The image is decoded from the file (no copy of its
    bytes in memory) and released before the next one is."""
    if image_format == "png" or file.mime_type not in STILL_IMAGE_TYPES:
        return None
    try:
        image = Image.open(source)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning, where it is an error
        raise _too_many_pixels(file, "more than Pillow's own limit of", max_pixels) from None
    except OSError as exc:
        raise _unreadable(file, exc) from exc
    with image:
        if image.width * image.height > max_pixels:
            raise _too_many_pixels(file, f"{image.width}x{image.height}", max_pixels)
        if getattr(image, "is_animated", False):
            return None
        name = f"{file.filename.rsplit('.', 1)[0]}.{'jpg' if image_format == 'jpeg' else 'webp'}"
        target = spool / f"converted-{uuid.uuid4().hex}-{Path(name).name}"
        try:
            spool.mkdir(mode=0o700, exist_ok=True)
            with target.open("wb") as sink:
                mime_type = _encode(image, image_format, quality, sink, stop)
        except OSError as exc:
            raise _unreadable(file, exc) from exc
        except webp.WebPError as exc:
            raise OutputError(
                f"Output {file.relative_path} (node {file.node_id}) could not be converted to WebP: {exc}. Ask for "
                "output.format 'png' or 'jpeg'.",
                file.details,
            ) from exc
        except webp.Stopped:
            raise OutputError(
                f"Converting output {file.relative_path} (node {file.node_id}) stopped: the job ended.",
                file.details,
            ) from None
    return target, name, mime_type


def _encode(image: Image.Image, image_format: str, quality: int, sink: BinaryIO, stop: threading.Event) -> str:
    """Encode into ``sink``; returns the MIME type. WebP goes through libwebp directly where the system has
    it (``webp``: a fraction of Pillow's memory). JPEG is saved without Huffman optimisation, which would
    buffer every DCT coefficient of the image (three quarters of its decoded size) before writing any."""
    if image_format == "jpeg":
        with _jpeg_ready(image) as ready:
            ready.save(sink, "JPEG", quality=quality)
        return "image/jpeg"
    if max(image.size) > webp.MAX_DIMENSION:  # Pillow's own encoder would fail with a bare "encoding error"
        raise webp.WebPError(
            f"WebP holds at most {webp.MAX_DIMENSION} pixels a side; this image is {image.width}x{image.height}"
        )
    if webp.available():
        webp.encode(image, sink, quality, stop)
    else:
        image.save(sink, "WEBP", quality=quality, method=4)
    return "image/webp"


def _jpeg_ready(image: Image.Image) -> Image.Image:
    """The image in a mode JPEG holds, with at most one whole copy: RGB and greyscale as they are, RGBA flattened
    onto white in its own memory (no copy), other transparency flattened into one RGB copy a strip of rows at a
    time (not an RGBA copy first), any other mode converted to RGB."""
    image.load()
    if image.mode in ("RGB", "L"):
        return image
    if not image.has_transparency_data:
        return image.convert("RGB")
    if image.mode == "RGBA" and (flattened := _flattened_in_place(image)) is not None:
        return flattened
    flat = Image.new("RGB", image.size, WHITE)
    for top in range(0, image.height, FLATTEN_ROWS):
        box = (0, top, image.width, min(top + FLATTEN_ROWS, image.height))
        with image.crop(box) as part, part.convert("RGBA") as rgba:
            flat.paste(rgba, box, mask=rgba)
    return flat


def _flattened_in_place(image: Image.Image) -> Image.Image | None:
    """The RGBA ``image`` flattened onto white a strip of rows at a time, written back into it, and returned seen
    as RGBX (the same memory, which JPEG encodes as RGB). None, and nothing changed, when its memory cannot be
    shared so: rows not in one block, as Image.fromarrow needs (Pillow's allocator set back to its chain of
    blocks), or a read-only image (mapped from its file), which Pillow would copy before writing to it."""
    if image.readonly:
        return None
    try:
        opaque = Image.fromarrow(image, "RGBX", image.size)
    except ValueError:
        return None
    for top in range(0, image.height, FLATTEN_ROWS):
        box = (0, top, image.width, min(top + FLATTEN_ROWS, image.height))
        with image.crop(box) as part, Image.new("RGB", part.size, WHITE) as flat:
            flat.paste(part, mask=part)
            image.paste(flat, box)
    return opaque


def entry(payload: Payload, delivery_type: str, data: str) -> dict[str, Any]:
    """One output in the result; ``type``/``data`` keep runpod-workers/worker-comfyui's shape."""
    return {
        "filename": payload.filename,
        "subfolder": payload.file.subfolder,
        "node_id": payload.file.node_id,
        "mime_type": payload.mime_type,
        "size_bytes": payload.size,
        "type": delivery_type,
        "data": data,
    }


def base64_text(path: Path, size: int) -> str:
    """The file as base64 text, read in pieces into one buffer of the encoded size: the string the result
    holds, and that buffer while it is made; never the file's bytes whole, nor a list of copies."""
    expected = 4 * ((size + 2) // 3)
    encoded = bytearray(expected)
    done = 0
    # written through a memoryview: a bytearray's own slice assignment is several times slower (CPython 3.11)
    with path.open("rb") as source, memoryview(encoded) as view:
        while piece := source.read(BASE64_PIECE):
            chunk = base64.b64encode(piece)
            if done + len(chunk) > expected:
                break
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
    if done != expected:  # the file changed since it was measured: the limit was checked on its size
        raise OSError(f"{path.name} is no longer {size} bytes long")
    text = encoded.decode("ascii")
    del encoded
    return text


def base64_entry(payload: Payload) -> dict[str, Any]:
    try:
        return entry(payload, "base64", base64_text(payload.path, payload.size))
    except OSError as exc:
        raise _unreadable(payload.file, exc) from exc


def assemble(entries: list[tuple[Payload, dict[str, Any]]], texts: list[dict[str, str]]) -> dict[str, Any]:
    """The result's output lists: every kind present (possibly empty), plus ``text``."""
    result: dict[str, Any] = {kind: [] for kind in KINDS}
    for payload, item in entries:
        result[payload.file.kind].append(item)
    result["text"] = texts
    return result
