"""Node classes of the stand-in: the recorded ``/object_info`` plus Pillow implementations of a few image nodes.

Every class in the recorded object_info validates exactly like the real server (the recorded input specs are
the real ``INPUT_TYPES()``), but only the classes in ``IMPLEMENTATIONS`` can execute; the others fail at run
time with a ``NotImplementedError`` execution_error. Images travel between nodes as lists of RGB Pillow
images (one per batch item); masks as lists of ``L`` images.

The ``Standin*`` classes exist only here, for fault tests: ``StandinSleep`` (slow node with progress ticks and
previews), ``StandinFail`` (raises), ``StandinSaveFile`` (writes arbitrary outputs such as videos or audio),
``StandinApiKey`` (reports a hash of the Comfy.org API key it gets, like a partner API node).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, ImageFile, ImageFilter, ImageOps, ImageSequence, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from standin_paths import FolderPaths

log = logging.getLogger("standin.nodes")

Images = list[Image.Image]

STANDIN_MODULE = "custom_nodes.standin"

# EmptyImage refuses (like a failed torch allocation) above this many bytes of pixel data.
MAX_EMPTY_IMAGE_BYTES = 2 * 1024**3


class InterruptProcessingError(Exception):
    """Raised at an interrupt check point, like ``comfy.model_management.InterruptProcessingException``."""


class OutOfMemoryError(RuntimeError):
    """Looks like torch's OOM error to the executor (its full type name is ``torch.OutOfMemoryError``)."""


OutOfMemoryError.__module__ = "torch"
OutOfMemoryError.__qualname__ = "OutOfMemoryError"


@dataclass
class NodeEnv:
    """What node implementations may use: folders, options and the progress/text channels."""

    paths: FolderPaths
    disable_metadata: bool = False
    preview_method: str = "none"
    preview_size: int = 512
    # Set by the executor: progress hook (value, total, preview) and progress text sender (text, node_id).
    progress_hook: Callable[[int | float, int | float, tuple[str, Image.Image, int | None] | None], None] = field(
        default=lambda value, total, preview: None
    )
    send_text: Callable[[str, str], None] = field(default=lambda text, node_id: None)


# ---------------------------------------------------------------------------------------------------------------
# float32 arithmetic of the real server, so that single-step pixel maths matches it byte for byte.
def _f32(value: float) -> float:
    result: float = struct.unpack("f", struct.pack("f", value))[0]
    return result


def _to_uint8(value: float) -> int:
    """``np.clip(255. * x, 0, 255).astype(np.uint8)`` on a float32 value."""
    scaled = _f32(255.0 * value)
    return int(min(max(scaled, 0.0), 255.0))


_INVERT_LUT = [_to_uint8(_f32(1.0 - _f32(v / 255.0))) for v in range(256)]


def tolerant(fn: Callable[[Any], Any], arg: Any) -> Any:
    """A Pillow call retried once with truncated images allowed, so damaged uploads still load."""
    try:
        return fn(arg)
    except (OSError, UnidentifiedImageError, ValueError):
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return fn(arg)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read())
    return digest.digest().hex()


# ---------------------------------------------------------------------------------------------------------------
class BaseNode:
    """A node implementation. Class attributes mirror the real node API the executor looks at."""

    FUNCTION = "run"
    # Names of the inputs a VALIDATE_INPUTS classmethod takes (empty: the node has none).
    VALIDATE_INPUT_NAMES: tuple[str, ...] = ()
    HAS_IS_CHANGED = False
    NOT_IDEMPOTENT = False
    INPUT_IS_LIST = False
    OUTPUT_IS_LIST: tuple[bool, ...] | None = None

    def __init__(self, env: NodeEnv) -> None:
        self.env = env

    @classmethod
    def IS_CHANGED(cls, env: NodeEnv, **inputs: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def VALIDATE_INPUTS(cls, env: NodeEnv, **inputs: Any) -> bool | str:
        return True


class NotImplementedNode(BaseNode):
    """Any recorded class the stand-in cannot run: validation works, execution fails clearly."""

    class_type = "?"

    def run(self, **inputs: Any) -> Any:
        raise NotImplementedError(f"The stand-in ComfyUI cannot execute node class {self.class_type}")


class _ValidateImageFile(NotImplementedNode):
    VALIDATE_INPUT_NAMES = ("image",)
    HAS_IS_CHANGED = True

    @classmethod
    def IS_CHANGED(cls, env: NodeEnv, image: str, channel: Any = None) -> Any:  # type: ignore[override]
        return _file_sha256(env.paths.annotated_path(image))

    @classmethod
    def VALIDATE_INPUTS(cls, env: NodeEnv, image: str) -> bool | str:  # type: ignore[override]
        if not env.paths.annotated_exists(image):
            return f"Invalid image file: {image}"
        return True


class _ValidateLatentFile(NotImplementedNode):
    VALIDATE_INPUT_NAMES = ("latent",)
    HAS_IS_CHANGED = True

    @classmethod
    def IS_CHANGED(cls, env: NodeEnv, latent: str) -> Any:  # type: ignore[override]
        return _file_sha256(env.paths.annotated_path(latent))

    @classmethod
    def VALIDATE_INPUTS(cls, env: NodeEnv, latent: str) -> bool | str:  # type: ignore[override]
        if not env.paths.annotated_exists(latent):
            return f"Invalid latent file: {latent}"
        return True


class _ValidateVideoFile(NotImplementedNode):
    VALIDATE_INPUT_NAMES = ("file",)
    HAS_IS_CHANGED = True

    @classmethod
    def IS_CHANGED(cls, env: NodeEnv, file: str) -> Any:  # type: ignore[override]
        return os.path.getmtime(env.paths.annotated_path(file))

    @classmethod
    def VALIDATE_INPUTS(cls, env: NodeEnv, file: str) -> bool | str:  # type: ignore[override]
        if not env.paths.annotated_exists(file):
            return f"Invalid video file: {file}"
        return True


# Validation-only behaviour of real classes the stand-in cannot execute.
VALIDATION_ONLY: dict[str, type[NotImplementedNode]] = {
    "LoadImageMask": _ValidateImageFile,
    "LoadLatent": _ValidateLatentFile,
    "LoadVideo": _ValidateVideoFile,
}


# ---------------------------------------------------------------------------------------------------------------
class EmptyImage(BaseNode):
    FUNCTION = "generate"

    def generate(self, width: int, height: int, batch_size: int = 1, color: int = 0) -> tuple[Images]:
        # The real node allocates batch x height x width float32 values per channel with torch; refuse sizes the
        # stand-in would not survive with the error torch gives when that allocation fails.
        if batch_size * height * width * 3 > MAX_EMPTY_IMAGE_BYTES:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                f"you tried to allocate {batch_size * height * width * 4} bytes. Error code 12 (Cannot allocate memory)"
            )
        rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
        image = Image.new("RGB", (width, height), rgb)
        return ([image] * batch_size,)


def png_metadata(env: NodeEnv, prompt: Any, extra_pnginfo: Any) -> PngInfo | None:
    """PNG text chunks: the prompt, then one per extra_pnginfo key, all as JSON (none with --disable-metadata)."""
    if env.disable_metadata:
        return None
    chunks = PngInfo()
    entries = [("prompt", prompt)] if prompt is not None else []
    entries += [(key, extra_pnginfo[key]) for key in extra_pnginfo or ()]
    for key, value in entries:
        chunks.add_text(key, json.dumps(value))
    return chunks


class SaveImage(BaseNode):
    FUNCTION = "save_images"
    kind = "output"
    png_compression = 4

    def __init__(self, env: NodeEnv) -> None:
        super().__init__(env)
        self.root = env.paths.output_dir
        self.name_suffix = ""

    def save_images(
        self, images: Images, filename_prefix: str = "ComfyUI", prompt: Any = None, extra_pnginfo: Any = None
    ) -> dict[str, Any]:
        width, height = images[0].size
        folder, stem, first, subfolder, _ = self.env.paths.save_slot(
            filename_prefix + self.name_suffix, self.root, width, height
        )
        metadata = png_metadata(self.env, prompt, extra_pnginfo)
        saved = []
        for index, image in enumerate(images):
            name = f"{stem.replace('%batch_num%', str(index))}_{first + index:05}_.png"
            image.save(os.path.join(folder, name), pnginfo=metadata, compress_level=self.png_compression)
            saved.append({"filename": name, "subfolder": subfolder, "type": self.kind})
        return {"ui": {"images": saved}}


class PreviewImage(SaveImage):
    kind = "temp"
    png_compression = 1

    def __init__(self, env: NodeEnv) -> None:
        super().__init__(env)
        self.root = env.paths.temp_dir
        # Five random letters per node instance, from the real node's alphabet (sic: two p's, no w).
        self.name_suffix = "_temp_" + "".join(random.choices("abcdefghijklmnopqrstupvxyz", k=5))


class LoadImage(BaseNode):
    FUNCTION = "load_image"
    VALIDATE_INPUT_NAMES = ("image",)
    HAS_IS_CHANGED = True

    def load_image(self, image: str) -> tuple[Images, Images]:
        image_path = self.env.paths.annotated_path(image)
        img = tolerant(Image.open, image_path)
        output_images: Images = []
        output_masks: Images = []
        size: tuple[int, int] | None = None
        for raw_frame in ImageSequence.Iterator(img):
            frame = tolerant(ImageOps.exif_transpose, raw_frame)
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            if size is None:
                size = rgb.size
            if rgb.size != size:
                continue
            if "A" in frame.getbands():
                mask = ImageOps.invert(frame.getchannel("A"))
            elif frame.mode == "P" and "transparency" in frame.info:
                mask = ImageOps.invert(frame.convert("RGBA").getchannel("A"))
            else:
                mask = Image.new("L", (64, 64), 0)
            output_images.append(rgb)
            output_masks.append(mask)
        if len(output_images) > 1 and img.format not in ("MPO",):
            return (output_images, output_masks)
        return (output_images[:1], output_masks[:1])

    @classmethod
    def IS_CHANGED(cls, env: NodeEnv, image: str) -> Any:  # type: ignore[override]
        return _file_sha256(env.paths.annotated_path(image))

    @classmethod
    def VALIDATE_INPUTS(cls, env: NodeEnv, image: str) -> bool | str:  # type: ignore[override]
        if not env.paths.annotated_exists(image):
            return f"Invalid image file: {image}"
        return True


class ImageInvert(BaseNode):
    FUNCTION = "invert"

    def invert(self, image: Images) -> tuple[Images]:
        return ([im.point(_INVERT_LUT * len(im.getbands())) for im in image],)


_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bislerp": Image.Resampling.BILINEAR,
}


def _center_box(size: tuple[int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """The centred part of an image of ``size`` that has the aspect ratio of ``width`` x ``height``."""
    w, h = size
    current, wanted = w / h, width / height
    if current > wanted:
        trim = round((w - w * (wanted / current)) / 2)
        return trim, 0, w - trim, h
    if current < wanted:
        trim = round((h - h * (current / wanted)) / 2)
        return 0, trim, w, h - trim
    return 0, 0, w, h


def _upscale(images: Images, width: int, height: int, method: str, crop: str) -> Images:
    resample = _RESAMPLE.get(method, Image.Resampling.BILINEAR)
    if crop == "center":
        images = [im.crop(_center_box(im.size, width, height)) for im in images]
    return [im.resize((width, height), resample) for im in images]


class ImageScale(BaseNode):
    FUNCTION = "upscale"

    def upscale(self, image: Images, upscale_method: str, width: int, height: int, crop: str) -> tuple[Images]:
        if width == 0 and height == 0:
            return (image,)
        if width == 0:
            width = max(1, round(image[0].width * height / image[0].height))
        elif height == 0:
            height = max(1, round(image[0].height * width / image[0].width))
        return (_upscale(image, width, height, upscale_method, crop),)


class ImageBlur(BaseNode):
    FUNCTION = "execute"

    def execute(self, image: Images, blur_radius: int, sigma: float) -> tuple[Images]:
        if blur_radius == 0:
            return (image,)
        return ([im.filter(ImageFilter.GaussianBlur(radius=min(sigma, float(blur_radius)))) for im in image],)


class RepeatImageBatch(BaseNode):
    FUNCTION = "repeat"

    def repeat(self, image: Images, amount: int) -> tuple[Images]:
        return (list(image) * amount,)


class GetImageSize(BaseNode):
    FUNCTION = "get_size"

    def get_size(self, image: Images, unique_id: str | None = None) -> tuple[int, int, int]:
        width, height = image[0].size
        batch_size = len(image)
        if unique_id:
            self.env.send_text(f"width: {width}, height: {height}\n batch size: {batch_size}", unique_id)
        return width, height, batch_size


class PreviewAny(BaseNode):
    FUNCTION = "main"

    def main(self, source: Any = None) -> dict[str, Any]:
        return {"ui": {"text": [_as_text(source)]}}


def _as_text(source: Any) -> str:
    """Strings as they are, numbers via ``str``, anything else as JSON if it can be."""
    if source is None or isinstance(source, (str, int, float, bool)):
        return str(source)
    try:
        return json.dumps(source)
    except Exception:
        try:
            return str(source)
        except Exception:
            return "source exists, but could not be serialized."


class SaveAnimatedWEBP(BaseNode):
    FUNCTION = "save_images"
    effort: ClassVar[dict[str, int]] = {"default": 4, "fastest": 0, "slowest": 6}

    def save_images(
        self,
        images: Images,
        fps: float,
        filename_prefix: str,
        lossless: bool,
        quality: int,
        method: str,
        num_frames: int = 0,
        prompt: Any = None,
        extra_pnginfo: Any = None,
    ) -> dict[str, Any]:
        paths = self.env.paths
        folder, stem, first, subfolder, _ = paths.save_slot(filename_prefix, paths.output_dir, *images[0].size)
        # Metadata goes into EXIF: the prompt in the Model tag, extra_pnginfo keys downwards from Make.
        exif = images[0].getexif()
        if not self.env.disable_metadata:
            if prompt is not None:
                exif[0x0110] = f"prompt:{json.dumps(prompt)}"
            for offset, key in enumerate(extra_pnginfo or ()):
                exif[0x010F - offset] = f"{key}:{json.dumps(extra_pnginfo[key])}"
        per_file = num_frames or len(images)
        saved = []
        for number, start in enumerate(range(0, len(images), per_file), start=first):
            name = f"{stem}_{number:05}_.webp"
            images[start].save(
                os.path.join(folder, name),
                save_all=True,
                append_images=images[start + 1 : start + per_file],
                duration=int(1000.0 / fps),
                exif=exif,
                lossless=lossless,
                quality=quality,
                method=self.effort.get(method),
            )
            saved.append({"filename": name, "subfolder": subfolder, "type": "output"})
        return {"ui": {"images": saved, "animated": [per_file != 1]}}


class SaveAnimatedPNG(BaseNode):
    FUNCTION = "save_images"

    def save_images(
        self,
        images: Images,
        fps: float,
        compress_level: int,
        filename_prefix: str = "ComfyUI",
        prompt: Any = None,
        extra_pnginfo: Any = None,
    ) -> dict[str, Any]:
        paths = self.env.paths
        folder, stem, number, subfolder, _ = paths.save_slot(filename_prefix, paths.output_dir, *images[0].size)
        chunks = None
        if not self.env.disable_metadata:
            # Private "comf" chunks after the image data: b"key\0" + JSON, latin-1 encoded.
            chunks = PngInfo()
            entries = [("prompt", prompt)] if prompt is not None else []
            entries += [(key, extra_pnginfo[key]) for key in extra_pnginfo or ()]
            for key, value in entries:
                chunks.add(b"comf", f"{key}\0{json.dumps(value)}".encode("latin-1"), after_idat=True)
        name = f"{stem}_{number:05}_.png"
        images[0].save(
            os.path.join(folder, name),
            save_all=True,
            append_images=images[1:],
            duration=int(1000.0 / fps),
            pnginfo=chunks,
            compress_level=compress_level,
        )
        return {"ui": {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}], "animated": [True]}}


class SaveImageWebsocket(BaseNode):
    """ComfyUI's example custom node: full-size PNGs as binary preview frames (progress ticks), no files."""

    FUNCTION = "save_images"
    HAS_IS_CHANGED = True

    def save_images(self, images: Images) -> dict[str, Any]:
        for step, image in enumerate(images):
            self.env.progress_hook(step, len(images), ("PNG", image, None))
        return {}

    @classmethod
    def IS_CHANGED(cls, env: NodeEnv, images: Any = None) -> Any:  # type: ignore[override]
        return time.time()


# ---------------------------------------------------------------------------------------------------------------
# Test-only nodes.
class StandinSleep(BaseNode):
    """Passes the image through after ``seconds``, ticking progress like a sampler (interrupts land on ticks)."""

    FUNCTION = "sleep"

    def sleep(self, image: Images, seconds: float, steps: int = 0) -> tuple[Images]:
        if steps <= 0:
            steps = max(1, round(seconds / 0.1))
        step_seconds = seconds / steps
        preview = None
        if self.env.preview_method != "none":
            preview = ("JPEG", image[0], self.env.preview_size)
        deadline = time.monotonic()
        for step in range(1, steps + 1):
            deadline += step_seconds
            remaining = deadline - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
            self.env.progress_hook(step, steps, preview)
        return (image,)


_FAIL_TYPES: dict[str, type[BaseException]] = {
    "RuntimeError": RuntimeError,
    "ValueError": ValueError,
    "TypeError": TypeError,
    "KeyError": KeyError,
    "OSError": OSError,
    "MemoryError": MemoryError,
    "Exception": Exception,
    "torch.OutOfMemoryError": OutOfMemoryError,
}


class StandinFail(BaseNode):
    """Raises ``exception_type(message)`` (after ``seconds``), giving an ``execution_error``."""

    FUNCTION = "fail"

    def fail(
        self, message: str, image: Images | None = None, exception_type: str = "RuntimeError", seconds: float = 0.0
    ) -> tuple[Images]:
        if seconds > 0:
            time.sleep(seconds)
        raise _FAIL_TYPES.get(exception_type, RuntimeError)(message)


class StandinApiKey(BaseNode):
    """Like a partner API node: reads the Comfy.org API key ComfyUI passes from the prompt's ``extra_data``
    (hidden ``API_KEY_COMFY_ORG``) and reports its SHA-256 as text (``none`` without one), never the key."""

    FUNCTION = "report"

    def report(self, label: str, api_key_comfy_org: str | None = None) -> dict[str, Any]:
        digest = hashlib.sha256(api_key_comfy_org.encode()).hexdigest() if api_key_comfy_org else "none"
        return {"ui": {"text": [f"{label}: {digest}"]}}


class StandinSaveFile(BaseNode):
    """Writes ``count`` arbitrary files and reports them under ``kind`` the way custom nodes do.

    ``kind="gifs"`` looks like VideoHelperSuite's Video Combine (``format``, ``frame_rate``, ``fullpath``),
    ``kind="audio"`` like SaveAudio, ``kind="images"`` like SaveImage, ``kind="text"`` reports ``content`` as
    text without writing a file. ``extra_ui`` (a JSON object) is merged into the ui dict, e.g.
    ``{"animated": [true]}``.
    """

    FUNCTION = "save"

    def save(
        self,
        filename_prefix: str,
        kind: str,
        extension: str,
        format: str = "video/mp4",
        content: str = "",
        size_bytes: int = 1024,
        count: int = 1,
        type: str = "output",
        frame_rate: float = 8.0,
        extra_ui: str = "",
        images: Images | None = None,
    ) -> dict[str, Any]:
        ui: dict[str, Any] = {}
        if kind == "text":
            ui["text"] = [content]
        else:
            paths = self.env.paths
            base = paths.temp_dir if type == "temp" else paths.output_dir
            folder, filename, counter, subfolder, _ = paths.save_slot(filename_prefix, base)
            entries = []
            for _ in range(count):
                file = f"{filename}_{counter:05}_.{extension.lstrip('.')}"
                full = os.path.join(folder, file)
                data = content.encode("utf-8") if content else os.urandom(size_bytes)
                Path(full).write_bytes(data)
                entry: dict[str, Any] = {"filename": file, "subfolder": subfolder, "type": type}
                if kind == "gifs":
                    entry.update({"format": format, "frame_rate": frame_rate, "fullpath": full})
                entries.append(entry)
                counter += 1
            ui[kind] = entries
        if extra_ui:
            ui.update(json.loads(extra_ui))
        return {"ui": ui}


IMPLEMENTATIONS: dict[str, type[BaseNode]] = {
    cls.__name__: cls
    for cls in (
        EmptyImage,
        SaveImage,
        PreviewImage,
        LoadImage,
        ImageInvert,
        ImageScale,
        ImageBlur,
        RepeatImageBatch,
        GetImageSize,
        PreviewAny,
        SaveAnimatedWEBP,
        SaveAnimatedPNG,
        SaveImageWebsocket,
        StandinSleep,
        StandinFail,
        StandinApiKey,
        StandinSaveFile,
    )
}


def _info(
    name: str,
    display_name: str,
    required: dict[str, list[Any]],
    optional: dict[str, list[Any]] | None,
    output: list[str],
    output_node: bool,
    description: str,
    hidden: dict[str, str] | None = None,
) -> dict[str, Any]:
    inputs: dict[str, Any] = {"required": required}
    if optional:
        inputs["optional"] = optional
    if hidden:
        inputs["hidden"] = hidden
    return {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": output,
        "output_is_list": [False] * len(output),
        "output_name": list(output),
        "name": name,
        "display_name": display_name,
        "description": description,
        "python_module": STANDIN_MODULE,
        "category": "standin",
        "output_node": output_node,
    }


STANDIN_OBJECT_INFO: dict[str, dict[str, Any]] = {
    "StandinSleep": _info(
        "StandinSleep",
        "Stand-in Sleep",
        {
            "image": ["IMAGE", {}],
            "seconds": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 86400.0, "step": 0.01}],
        },
        {"steps": ["INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "progress ticks; 0: one per 0.1 s"}]},
        ["IMAGE"],
        False,
        "Test node: sleeps, sending progress ticks (and previews unless --preview-method none); interruptible.",
    ),
    "StandinFail": _info(
        "StandinFail",
        "Stand-in Fail",
        {"message": ["STRING", {"default": "Stand-in failure", "multiline": True}]},
        {
            "image": ["IMAGE", {}],
            "exception_type": [list(_FAIL_TYPES), {"default": "RuntimeError"}],
            "seconds": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 86400.0, "step": 0.01}],
        },
        ["IMAGE"],
        True,
        "Test node: raises exception_type(message) after `seconds`.",
    ),
    "StandinApiKey": _info(
        "StandinApiKey",
        "Stand-in API key",
        {"label": ["STRING", {"default": "api key"}]},
        None,
        [],
        True,
        "Test node: reports the SHA-256 of the Comfy.org API key in the prompt's extra_data (hidden input).",
        hidden={"api_key_comfy_org": "API_KEY_COMFY_ORG"},
    ),
    "StandinSaveFile": _info(
        "StandinSaveFile",
        "Stand-in Save File",
        {
            "filename_prefix": ["STRING", {"default": "standin"}],
            "kind": [["gifs", "audio", "images", "video", "files", "text"], {"default": "gifs"}],
            "extension": ["STRING", {"default": "mp4"}],
        },
        {
            "format": ["STRING", {"default": "video/mp4"}],
            "content": ["STRING", {"default": "", "multiline": True}],
            "size_bytes": ["INT", {"default": 1024, "min": 0, "max": 1024**3}],
            "count": ["INT", {"default": 1, "min": 1, "max": 1000}],
            "type": [["output", "temp"], {"default": "output"}],
            "frame_rate": ["FLOAT", {"default": 8.0, "min": 0.01, "max": 1000.0, "step": 0.01}],
            "extra_ui": ["STRING", {"default": "", "multiline": True}],
            "images": ["IMAGE", {}],
        },
        [],
        True,
        "Test node: writes arbitrary files and reports them under `kind` (gifs, audio, ...).",
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Combos whose options the real server computes from folders at request time.
def _vae_list(paths: FolderPaths) -> list[str]:
    vaes = paths.files_in("vae")
    approx = paths.files_in("vae_approx")
    for name in ("taesd", "taesdxl", "taesd3", "taef1"):
        has_encoder = any(a.startswith(f"{name}_encoder.") for a in approx)
        has_decoder = any(a.startswith(f"{name}_decoder.") for a in approx)
        if has_encoder and has_decoder:
            vaes.append(name)
    vaes.append("pixel_space")
    return vaes


def _folder(name: str) -> Callable[[FolderPaths], list[str]]:
    return lambda paths: paths.files_in(name)


def _input_subfolders(paths: FolderPaths) -> list[str]:
    folders = []
    for root, _, _ in os.walk(paths.input_dir):
        rel = os.path.relpath(root, paths.input_dir)
        if rel != ".":
            folders.append(rel.replace(os.sep, "/"))
    return sorted(folders)


def _files_3d(extensions: set[str]) -> Callable[[FolderPaths], list[str]]:
    """Load3D's list; like the real node, computing it creates ``input/3d``."""

    def list_files(paths: FolderPaths) -> list[str]:
        folder = Path(paths.input_dir) / "3d"
        folder.mkdir(parents=True, exist_ok=True)
        base = Path(paths.input_dir)
        return sorted(
            str(p.relative_to(base)).replace("\\", "/") for p in folder.rglob("*") if p.suffix.lower() in extensions
        )

    return list_files


DYNAMIC_COMBOS: dict[tuple[str, str], Callable[[FolderPaths], list[str]]] = {
    ("LoadImage", "image"): FolderPaths.input_images,
    ("LoadImageMask", "image"): FolderPaths.input_listing,
    ("VAELoader", "vae_name"): _vae_list,
    ("CheckpointLoader", "config_name"): _folder("configs"),
    ("UNETLoader", "unet_name"): _folder("diffusion_models"),
    ("ControlNetLoader", "control_net_name"): _folder("controlnet"),
    ("DiffControlNetLoader", "control_net_name"): _folder("controlnet"),
    ("StyleModelLoader", "style_model_name"): _folder("style_models"),
    ("CLIPVisionLoader", "clip_name"): _folder("clip_vision"),
    ("GLIGENLoader", "gligen_name"): _folder("gligen"),
    ("HypernetworkLoader", "hypernetwork_name"): _folder("hypernetworks"),
    ("ModelPatchLoader", "name"): _folder("model_patches"),
    ("UpscaleModelLoader", "model_name"): _folder("upscale_models"),
    ("PhotoMakerLoader", "photomaker_model_name"): _folder("photomaker"),
    ("LoadImageSetFromFolderNode", "folder"): _input_subfolders,
    ("LoadImageTextSetFromFolderNode", "folder"): _input_subfolders,
    ("Load3D", "model_file"): _files_3d({".gltf", ".glb", ".obj", ".fbx", ".stl"}),
    ("Load3DAnimation", "model_file"): _files_3d({".gltf", ".glb", ".fbx"}),
}
for _cls in (
    "CheckpointLoaderSimple",
    "CheckpointLoader",
    "unCLIPCheckpointLoader",
    "ImageOnlyCheckpointLoader",
    "CreateHookModelAsLora",
    "CreateHookModelAsLoraModelOnly",
):
    DYNAMIC_COMBOS[(_cls, "ckpt_name")] = _folder("checkpoints")
for _cls in ("LoraLoader", "LoraLoaderModelOnly", "CreateHookLora", "CreateHookLoraModelOnly"):
    DYNAMIC_COMBOS[(_cls, "lora_name")] = _folder("loras")
for _cls, _names in (
    ("CLIPLoader", ("clip_name",)),
    ("DualCLIPLoader", ("clip_name1", "clip_name2")),
    ("TripleCLIPLoader", ("clip_name1", "clip_name2", "clip_name3")),
    ("QuadrupleCLIPLoader", ("clip_name1", "clip_name2", "clip_name3", "clip_name4")),
):
    for _name in _names:
        DYNAMIC_COMBOS[(_cls, _name)] = _folder("text_encoders")


@dataclass
class NodeClass:
    """One node class: its recorded info, and the implementation that runs it."""

    name: str
    info: dict[str, Any]
    impl: type[BaseNode]

    @property
    def output_node(self) -> bool:
        return self.info.get("output_node") is True

    @property
    def return_types(self) -> tuple[Any, ...]:
        return tuple(self.info.get("output", ()))

    @property
    def output_is_list(self) -> tuple[bool, ...]:
        if self.impl.OUTPUT_IS_LIST is not None:
            return self.impl.OUTPUT_IS_LIST
        return tuple(self.info.get("output_is_list") or [False] * len(self.return_types))

    @property
    def is_v3(self) -> bool:
        """V3 classes (io.ComfyNode) report these keys always; V1 classes only when set."""
        return all(key in self.info for key in ("deprecated", "experimental", "api_node", "output_tooltips"))


class NodeRegistry:
    """The served node classes: recorded object_info (+ Standin nodes), with folder-based combos refreshed."""

    def __init__(self, object_info: dict[str, dict[str, Any]], paths: FolderPaths) -> None:
        self.paths = paths
        self.classes: dict[str, NodeClass] = {}
        for name, info in {**object_info, **STANDIN_OBJECT_INFO}.items():
            impl = IMPLEMENTATIONS.get(name)
            if impl is None:
                base = VALIDATION_ONLY.get(name, NotImplementedNode)
                impl = type(f"NotImplemented_{name}", (base,), {"class_type": name})
            self.classes[name] = NodeClass(name, info, impl)

    def get(self, name: str) -> NodeClass | None:
        if not isinstance(name, str):
            return None
        return self.classes.get(name)

    def _dynamic_inputs(self, name: str) -> list[tuple[str, str, Callable[[FolderPaths], list[str]]]]:
        found = []
        for (cls, input_name), fn in DYNAMIC_COMBOS.items():
            if cls == name:
                for category, inputs in self.classes[name].info.get("input", {}).items():
                    if input_name in inputs:
                        found.append((category, input_name, fn))
        return found

    def input_types(self, name: str) -> dict[str, Any]:
        """``INPUT_TYPES()`` of a class as the real server would compute it now."""
        info = self.classes[name].info
        dynamic = self._dynamic_inputs(name)
        if not dynamic:
            inputs: dict[str, Any] = info.get("input", {})
            return inputs
        inputs = copy.deepcopy(info.get("input", {}))
        for category, input_name, fn in dynamic:
            spec = inputs[category][input_name]
            options = fn(self.paths)
            if isinstance(spec[0], list):
                spec[0] = options
            elif len(spec) > 1 and isinstance(spec[1], dict):
                spec[1]["options"] = options
        return inputs

    def node_info(self, name: str) -> dict[str, Any]:
        info = self.classes[name].info
        if not self._dynamic_inputs(name):
            return info
        info = dict(info)
        info["input"] = self.input_types(name)
        return info

    def object_info(self) -> dict[str, Any]:
        return {name: self.node_info(name) for name in self.classes}


# The recording in the repository (tests/comfyui_transcripts); a copy of this folder elsewhere (the provisioning
# tests install the stand-in from a temporary git repository) has no such neighbour and serves the small list.
RECORDED_OBJECT_INFO = Path(__file__).resolve().parent.parent / "comfyui_transcripts" / "object_info_full.json"


def find_object_info(explicit: str | None) -> Path | None:
    """The recorded object_info: ``--object-info``, ``STANDIN_COMFYUI_OBJECT_INFO``, or the repository's
    recording when this folder sits in the repository's ``tests/``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("STANDIN_COMFYUI_OBJECT_INFO")
    if env:
        return Path(env)
    return RECORDED_OBJECT_INFO if RECORDED_OBJECT_INFO.is_file() else None


FALLBACK_OBJECT_INFO = Path(__file__).resolve().parent / "object_info_min.json"


def load_object_info(explicit: str | None) -> tuple[dict[str, dict[str, Any]], Path]:
    path = find_object_info(explicit)
    if path is None or not path.is_file():
        if explicit:
            raise FileNotFoundError(f"object_info file not found: {explicit}")
        log.warning(
            "Recorded object_info_full.json not found; serving only the node classes the stand-in implements (%s)",
            FALLBACK_OBJECT_INFO,
        )
        path = FALLBACK_OBJECT_INFO
    with open(path, encoding="utf-8") as f:
        data: dict[str, dict[str, Any]] = json.load(f)
    return data, path


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
