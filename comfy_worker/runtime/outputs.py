"""Turn a ``/history`` entry into the result's outputs.

``/history/{prompt_id}`` is the source of truth: it lists every output node, also for a cached prompt whose
nodes did not run again. Every entry with a ``filename`` is a file (SaveImage's ``images``,
VideoHelperSuite's ``gifs``, SaveAudio's ``audio``, 3D files...), sorted into images, videos, audio or
files by its type; strings under ``text`` are text. Files are read from disk when ComfyUI shares this
machine (no HTTP copy of a 12 MB PNG), through ``/view`` otherwise.

Converting to WebP/JPEG decodes the image: a 164 KB PNG can hold 13000x13000 pixels (500 MB decoded), so
an image over OUTPUT_CONVERT_MAX_MEGAPIXELS is refused from its header before decoding, and the images
being converted at once share that same budget of pixels.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import mimetypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from comfy_worker.comfy.client import ComfyClient
from comfy_worker.errors import OutputError, WorkerError

KINDS = ("images", "videos", "audio", "files")
STILL_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff")

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


def collect(entry: dict[str, Any], include_temp: bool) -> CollectedOutputs:
    """List the files and texts of a history entry, in node order, without duplicates."""
    files: list[OutputFile] = []
    texts: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    skipped_temp = 0
    for node_id, node_output in (entry.get("outputs") or {}).items():
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
    path = (root / file.subfolder / file.filename).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        return None
    return path


def read_bytes(client: ComfyClient, folders: dict[str, Path], file: OutputFile) -> bytes:
    path = _local_path(folders, file)
    try:
        return path.read_bytes() if path else client.view(file.filename, file.subfolder, file.folder_type)
    except (OSError, WorkerError) as exc:
        raise OutputError(
            f"ComfyUI reported the output {file.relative_path} (node {file.node_id}) but it could not be read: {exc}",
            {"node_id": file.node_id, "filename": file.filename, "subfolder": file.subfolder},
        ) from exc


@dataclass(frozen=True)
class Payload:
    """One output's bytes as they will be delivered (after an optional format conversion)."""

    file: OutputFile
    filename: str
    mime_type: str
    data: bytes

    @property
    def base64_size(self) -> int:
        return 4 * ((len(self.data) + 2) // 3)


class PixelBudget:
    """At most ``limit`` pixels decoded at once, across the threads converting images (each image is at most
    ``limit``, so every one gets its turn)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = limit
        self._condition = threading.Condition()

    def acquire(self, pixels: int) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._free >= pixels)
            self._free -= pixels

    def release(self, pixels: int) -> None:
        with self._condition:
            self._free += pixels
            self._condition.notify_all()


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
) -> tuple[list[Payload], list[str]]:
    """Read every output file (in parallel: disk and Pillow's encoders release the GIL), converting still
    images when a format other than ``png`` is asked for; return them and the warnings.

    A temp output (PreviewImage...) that cannot be read is left out with a warning naming it: it is a preview,
    asked for as an extra (``include_temp``), and ComfyUI deletes temp files whenever a ComfyUI using that
    folder starts or exits, so losing one must not throw away the outputs the job was run for. A saved output
    (SaveImage...) that cannot be read fails the job: it is what the job was run for, and a result without it
    would look like a success that silently lost work."""
    budget = PixelBudget(max_pixels)

    def one(file: OutputFile) -> Payload | str:
        try:
            data = read_bytes(client, folders, file)
        except OutputError as exc:
            if file.folder_type != "temp":
                raise
            return unreadable_temp_warning(file, exc)
        converted = convert_image(data, file, image_format, quality, budget)
        if converted is None:
            return Payload(file, file.filename, file.mime_type, data)
        new_data, mime_type, extension = converted
        return Payload(file, f"{file.filename.rsplit('.', 1)[0]}.{extension}", mime_type, new_data)

    if len(collected.files) <= 1:
        loaded = [one(file) for file in collected.files]
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(collected.files))) as pool:
            loaded = list(pool.map(one, collected.files))
    return [p for p in loaded if isinstance(p, Payload)], [w for w in loaded if isinstance(w, str)]


def _too_many_pixels(file: OutputFile, size: str, limit: int) -> OutputError:
    return OutputError(
        f"Output {file.relative_path} (node {file.node_id}) is {size} pixels, over OUTPUT_CONVERT_MAX_MEGAPIXELS "
        f"({limit / 1e6:g} megapixels), so it cannot be converted: ask for output.format 'png' to get it as "
        "ComfyUI wrote it.",
        {"node_id": file.node_id, "filename": file.filename, "subfolder": file.subfolder, "max_pixels": limit},
    )


def convert_image(
    data: bytes, file: OutputFile, image_format: str, quality: int, budget: PixelBudget
) -> tuple[bytes, str, str] | None:
    """``webp``/``jpeg`` for still images; None keeps the file as ComfyUI wrote it (png, videos, animations)."""
    if image_format == "png" or file.mime_type not in STILL_IMAGE_TYPES:
        return None
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning, where it is an error
        raise _too_many_pixels(file, "more than Pillow's own limit of", budget.limit) from None
    with image:
        pixels = image.width * image.height
        if pixels > budget.limit:
            raise _too_many_pixels(file, f"{image.width}x{image.height}", budget.limit)
        if getattr(image, "is_animated", False):
            return None
        budget.acquire(pixels)
        try:
            return _encode(image, image_format, quality)
        finally:
            budget.release(pixels)


def _encode(image: Image.Image, image_format: str, quality: int) -> tuple[bytes, str, str]:
    buffer = io.BytesIO()
    if image_format == "jpeg":
        rgb = image.convert("RGBA") if image.mode in ("P", "LA") else image
        if rgb.mode == "RGBA":  # JPEG has no alpha: flatten onto white
            background = Image.new("RGB", rgb.size, (255, 255, 255))
            background.paste(rgb, mask=rgb.getchannel("A"))
            rgb = background
        rgb.convert("RGB").save(buffer, "JPEG", quality=quality, optimize=True)
        return buffer.getvalue(), "image/jpeg", "jpg"
    image.save(buffer, "WEBP", quality=quality, method=4)
    return buffer.getvalue(), "image/webp", "webp"


def entry(payload: Payload, delivery_type: str, data: str) -> dict[str, Any]:
    """One output in the result; ``type``/``data`` keep runpod-workers/worker-comfyui's shape."""
    return {
        "filename": payload.filename,
        "subfolder": payload.file.subfolder,
        "node_id": payload.file.node_id,
        "mime_type": payload.mime_type,
        "size_bytes": len(payload.data),
        "type": delivery_type,
        "data": data,
    }


def base64_entry(payload: Payload) -> dict[str, Any]:
    return entry(payload, "base64", base64.b64encode(payload.data).decode("ascii"))


def assemble(entries: list[tuple[Payload, dict[str, Any]]], texts: list[dict[str, str]]) -> dict[str, Any]:
    """The result's output lists: every kind present (possibly empty), plus ``text``."""
    result: dict[str, Any] = {kind: [] for kind in KINDS}
    for payload, item in entries:
        result[payload.file.kind].append(item)
    result["text"] = texts
    return result
