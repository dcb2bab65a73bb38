"""WebP in bounded memory: libwebp's encoder driven directly, fed the decoded image a strip of rows at a time.

Pillow's WebP save holds, beside the decoded image, an RGBA copy of it, libwebp's YUV picture and the
encoder's token buffers: 5.8 x the decoded image for an 8192x8192 PNG (1.49 GB for two). Here the image,
decoded by Pillow, is turned into libwebp's YUV picture ``STRIP_ROWS`` rows at a time (libwebp's own
``WebPPictureImportRGB[A]`` on a strip-sized picture, copied into the whole one, so the colours are exactly
libwebp's), the decoded image is released, and libwebp encodes with its ``low_memory`` option, writing
straight to the file. The peak is the decoded image plus its YUV picture (about 1.4 x the decoded image).
libwebp's progress hook ends the encoding when the job's stop is set (cancelled, timed out).

The library is the system's libwebp (Debian and Ubuntu's ``libwebp7``, in the image). Its structures below
are those of encoder ABI 0x020f (libwebp 1.x's ``encode.h``); libwebp's init functions refuse another major
ABI, and then ``available()`` is False and the worker converts with Pillow, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading
from typing import BinaryIO

from PIL import Image

log = logging.getLogger(__name__)

ENCODER_ABI_VERSION = 0x020F
MAX_DIMENSION = 16383  # WEBP_MAX_DIMENSION
STRIP_ROWS = 64  # even, so each strip's chroma rows are whole: 2 MB of RGBA for an 8192-pixel-wide image
YUV420, YUV420A = 0, 4  # WebPEncCSP
ERRORS = (
    "ok",
    "out of memory",
    "out of memory while flushing bits",
    "a NULL parameter",
    "an invalid configuration",
    "a bad dimension",
    "partition 0 over 512 KB (try a lower quality)",
    "a partition over 16 MB (try a lower quality)",
    "a failed write",
    "a file over 4 GB",
    "the job's end",
)
USER_ABORT = 10


class WebPConfig(ctypes.Structure):
    """``struct WebPConfig`` (encode.h)."""

    _fields_ = (
        ("lossless", ctypes.c_int),
        ("quality", ctypes.c_float),
        ("method", ctypes.c_int),
        ("image_hint", ctypes.c_int),
        ("target_size", ctypes.c_int),
        ("target_PSNR", ctypes.c_float),
        ("segments", ctypes.c_int),
        ("sns_strength", ctypes.c_int),
        ("filter_strength", ctypes.c_int),
        ("filter_sharpness", ctypes.c_int),
        ("filter_type", ctypes.c_int),
        ("autofilter", ctypes.c_int),
        ("alpha_compression", ctypes.c_int),
        ("alpha_filtering", ctypes.c_int),
        ("alpha_quality", ctypes.c_int),
        ("pass_", ctypes.c_int),
        ("show_compressed", ctypes.c_int),
        ("preprocessing", ctypes.c_int),
        ("partitions", ctypes.c_int),
        ("partition_limit", ctypes.c_int),
        ("emulate_jpeg_size", ctypes.c_int),
        ("thread_level", ctypes.c_int),
        ("low_memory", ctypes.c_int),
        ("near_lossless", ctypes.c_int),
        ("exact", ctypes.c_int),
        ("use_delta_palette", ctypes.c_int),
        ("use_sharp_yuv", ctypes.c_int),
        ("qmin", ctypes.c_int),
        ("qmax", ctypes.c_int),
    )


class WebPPicture(ctypes.Structure):
    """``struct WebPPicture`` (encode.h); the writer and progress hook are set as ``c_void_p``."""

    _fields_ = (
        ("use_argb", ctypes.c_int),
        ("colorspace", ctypes.c_int),
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("y", ctypes.c_void_p),
        ("u", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("y_stride", ctypes.c_int),
        ("uv_stride", ctypes.c_int),
        ("a", ctypes.c_void_p),
        ("a_stride", ctypes.c_int),
        ("pad1", ctypes.c_uint32 * 2),
        ("argb", ctypes.c_void_p),
        ("argb_stride", ctypes.c_int),
        ("pad2", ctypes.c_uint32 * 3),
        ("writer", ctypes.c_void_p),
        ("custom_ptr", ctypes.c_void_p),
        ("extra_info_type", ctypes.c_int),
        ("extra_info", ctypes.c_void_p),
        ("stats", ctypes.c_void_p),
        ("error_code", ctypes.c_int),
        ("progress_hook", ctypes.c_void_p),
        ("user_data", ctypes.c_void_p),
        ("pad3", ctypes.c_uint32 * 3),
        ("pad4", ctypes.c_void_p),
        ("pad5", ctypes.c_void_p),
        ("pad6", ctypes.c_uint32 * 8),
        ("memory_", ctypes.c_void_p),
        ("memory_argb_", ctypes.c_void_p),
        ("pad7", ctypes.c_void_p * 2),
    )


WRITER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
PROGRESS = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


class WebPError(Exception):
    """libwebp could not encode the image; the message says why."""


class Stopped(Exception):
    """The job ended (cancelled, timed out) while its image was being encoded."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The system's libwebp with its encoder's signatures, or None (not installed, or another major ABI)."""
    name = ctypes.util.find_library("webp")
    if name is None:
        log.warning("libwebp not found: WebP outputs are encoded by Pillow, which takes several times the memory")
        return None
    lib = ctypes.CDLL(name)
    picture, config = ctypes.POINTER(WebPPicture), ctypes.POINTER(WebPConfig)
    signatures = {
        "WebPConfigInitInternal": (ctypes.c_int, [config, ctypes.c_int, ctypes.c_float, ctypes.c_int]),
        "WebPValidateConfig": (ctypes.c_int, [config]),
        "WebPPictureInitInternal": (ctypes.c_int, [picture, ctypes.c_int]),
        "WebPPictureAlloc": (ctypes.c_int, [picture]),
        "WebPPictureFree": (None, [picture]),
        "WebPPictureImportRGB": (ctypes.c_int, [picture, ctypes.c_char_p, ctypes.c_int]),
        "WebPPictureImportRGBA": (ctypes.c_int, [picture, ctypes.c_char_p, ctypes.c_int]),
        "WebPEncode": (ctypes.c_int, [config, picture]),
    }
    for function, (restype, argtypes) in signatures.items():
        getattr(lib, function).restype = restype
        getattr(lib, function).argtypes = argtypes
    if not lib.WebPPictureInitInternal(ctypes.byref(WebPPicture()), ENCODER_ABI_VERSION):
        log.warning(
            "%s has another encoder ABI than 0x%04x: WebP outputs are encoded by Pillow", name, ENCODER_ABI_VERSION
        )
        return None
    return lib


def available() -> bool:
    return _library() is not None


def encode(image: Image.Image, sink: BinaryIO, quality: int, stop: threading.Event) -> None:
    """Encode ``image`` (opened, not yet decoded, at most MAX_DIMENSION a side) as lossy WebP into ``sink``, as
    Pillow's ``save(..., "WEBP", quality=quality, method=4)`` would, and close it once its YUV picture is made. Raises
    ``WebPError`` (libwebp failed), ``Stopped`` (``stop`` was set), ``OSError`` (decoding or writing)."""
    lib = _library()
    assert lib is not None, "call available() first"
    config = WebPConfig()
    if not lib.WebPConfigInitInternal(ctypes.byref(config), 0, float(quality), ENCODER_ABI_VERSION):
        raise WebPError("libwebp refused its default configuration")
    config.method = 4
    config.low_memory = 1
    if not lib.WebPValidateConfig(ctypes.byref(config)):
        raise WebPError(f"libwebp refused quality {quality}")
    picture = WebPPicture()
    lib.WebPPictureInitInternal(ctypes.byref(picture), ENCODER_ABI_VERSION)
    try:
        _import(lib, image, picture, stop)
        image.close()  # the decoded image goes before the encoder's buffers come
        _encode(lib, config, picture, sink, stop)
    finally:
        lib.WebPPictureFree(ctypes.byref(picture))


def _import(lib: ctypes.CDLL, image: Image.Image, picture: WebPPicture, stop: threading.Event) -> None:
    """Fill ``picture``'s YUV(A) planes from ``image``, one strip of rows at a time."""
    alpha = image.has_transparency_data
    mode, importer = ("RGBA", lib.WebPPictureImportRGBA) if alpha else ("RGB", lib.WebPPictureImportRGB)
    picture.width, picture.height = image.size
    picture.colorspace = YUV420A if alpha else YUV420
    if not lib.WebPPictureAlloc(ctypes.byref(picture)):
        raise WebPError(f"libwebp could not allocate a {image.width}x{image.height} picture (out of memory)")
    image.load()
    width, chroma_width = image.width, (image.width + 1) // 2
    strip = WebPPicture()
    lib.WebPPictureInitInternal(ctypes.byref(strip), ENCODER_ABI_VERSION)
    try:
        for top in range(0, image.height, STRIP_ROWS):
            if stop.is_set():
                raise Stopped
            rows = min(STRIP_ROWS, image.height - top)
            with image.crop((0, top, width, top + rows)) as cropped, cropped.convert(mode) as converted:
                pixels = converted.tobytes()
            strip.width, strip.height = width, rows
            if not importer(ctypes.byref(strip), pixels, width * len(mode)):
                raise WebPError("libwebp could not convert the image to YUV (out of memory)")
            chroma_top, chroma_rows = top // 2, (rows + 1) // 2
            _copy_rows(picture.y, picture.y_stride, top, strip.y, strip.y_stride, rows, width)
            _copy_rows(picture.u, picture.uv_stride, chroma_top, strip.u, strip.uv_stride, chroma_rows, chroma_width)
            _copy_rows(picture.v, picture.uv_stride, chroma_top, strip.v, strip.uv_stride, chroma_rows, chroma_width)
            if alpha and strip.a:
                _copy_rows(picture.a, picture.a_stride, top, strip.a, strip.a_stride, rows, width)
            elif alpha:  # libwebp keeps no alpha plane for an opaque strip
                for row in range(top, top + rows):
                    ctypes.memset(picture.a + row * picture.a_stride, 255, width)
    finally:
        lib.WebPPictureFree(ctypes.byref(strip))


def _copy_rows(dst: int, dst_stride: int, first: int, src: int, src_stride: int, rows: int, row_bytes: int) -> None:
    """Copy ``rows`` rows of a plane into another from row ``first`` on: in one move when both are packed (as
    libwebp allocates them today), row by row when a stride has padding."""
    start = dst + first * dst_stride
    if dst_stride == src_stride == row_bytes:
        ctypes.memmove(start, src, rows * row_bytes)
        return
    for row in range(rows):
        ctypes.memmove(start + row * dst_stride, src + row * src_stride, row_bytes)


def _encode(lib: ctypes.CDLL, config: WebPConfig, picture: WebPPicture, sink: BinaryIO, stop: threading.Event) -> None:
    """Encode ``picture``, its bytes written to ``sink`` as libwebp makes them."""
    failed: list[OSError] = []

    def write(data: int, size: int, _picture: int) -> int:
        try:
            sink.write(ctypes.string_at(data, size))
        except OSError as exc:
            failed.append(exc)
            return 0
        return 1

    def progress(_percent: int, _picture: int) -> int:
        return 0 if stop.is_set() else 1

    writer, hook = WRITER(write), PROGRESS(progress)  # kept alive until WebPEncode returns
    picture.writer = ctypes.cast(writer, ctypes.c_void_p)
    picture.progress_hook = ctypes.cast(hook, ctypes.c_void_p)
    if lib.WebPEncode(ctypes.byref(config), ctypes.byref(picture)):
        return
    if failed:
        raise failed[0]
    if picture.error_code == USER_ABORT:
        raise Stopped
    reason = ERRORS[picture.error_code] if 0 <= picture.error_code < len(ERRORS) else f"error {picture.error_code}"
    raise WebPError(f"libwebp could not encode the image: {reason}")
