"""WebP through libwebp directly (``comfy_worker.runtime.webp``): the same picture libwebp's own tools make,
alpha kept, every Pillow mode, its errors as output errors, and its end when the job ends.

CI installs libwebp (``.ci/run``); elsewhere, without it, these tests are skipped, as the worker then falls
back to Pillow."""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageStat

from comfy_worker.errors import OutputError
from comfy_worker.runtime import outputs, webp

if not webp.available():
    if os.environ.get("CI") == "true":
        pytest.fail("libwebp is not installed, and CI must test the worker's WebP path", pytrace=False)
    pytest.skip("libwebp is not installed (apt-get install libwebp7): the worker uses Pillow", allow_module_level=True)

MAX_PIXELS = 10**9
HEADER = Path("/usr/include/webp/encode.h")


def photo(mode: str, size: tuple[int, int]) -> Image.Image:
    """Gradients and noise in ``mode``: WebP does not shrink it to nothing, and each strip differs."""
    bands = [
        Image.linear_gradient("L").resize(size),
        Image.effect_noise(size, 30).convert("L"),
        Image.radial_gradient("L").resize(size),
    ]
    image = Image.merge("RGB", bands)
    return image if mode == "RGB" else image.convert(mode)


def encoded(image: Image.Image, quality: int = 90, stop: threading.Event | None = None) -> Image.Image:
    sink = io.BytesIO()
    webp.encode(image, sink, quality, stop or threading.Event())
    decoded = Image.open(io.BytesIO(sink.getvalue()))
    assert decoded.format == "WEBP"
    return decoded


def mean_error(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean) / 3


@pytest.mark.skipif(
    shutil.which("gcc") is None or not HEADER.exists(), reason="optional: no gcc or libwebp's headers (libwebp-dev)"
)
def test_the_structures_are_laid_out_as_libwebps_header_says(tmp_path: Path) -> None:
    """A field at the wrong offset would make libwebp write over Python's memory: compare with the C compiler."""
    fields = {"WebPConfig": webp.WebPConfig, "WebPPicture": webp.WebPPicture}
    lines = []
    for struct, cls in fields.items():
        lines.append(f'printf("{struct} %zu\\n", sizeof({struct}));')
        for name, *_ in cls._fields_:
            if not name.startswith("pad"):
                c_name = "pass" if name == "pass_" else name
                lines.append(f'printf("{struct}.{name} %zu\\n", offsetof({struct}, {c_name}));')
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <webp/encode.h>\n"
        f"int main(void) {{ {' '.join(lines)} "
        f"return WEBP_ENCODER_ABI_VERSION == {webp.ENCODER_ABI_VERSION} ? 0 : 1; }}\n"
    )
    subprocess.run(["gcc", str(source), "-o", str(tmp_path / "layout")], check=True)
    done = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, "the header's encoder ABI is not the one the module is written for"
    expected = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines())
    ours = {}
    for struct, cls in fields.items():
        ours[struct] = str(ctypes.sizeof(cls))
        for name, *_ in cls._fields_:
            if not name.startswith("pad"):
                ours[f"{struct}.{name}"] = str(getattr(cls, name).offset)
    assert ours == expected


def test_the_picture_is_the_one_pillows_libwebp_makes(tmp_path: Path) -> None:
    """Odd sizes (a last strip of odd height, chroma of odd width) and several strips: what comes back is as
    close to the source as Pillow's own WebP at the same quality, and smaller at a lower quality."""
    source = photo("RGB", (203, 2 * webp.STRIP_ROWS + 7))
    reference = io.BytesIO()
    source.save(reference, "WEBP", quality=90, method=4)
    with Image.open(reference) as pillows:
        pillow_error = mean_error(pillows, source)
    with encoded(source.copy()) as ours:
        assert ours.size == source.size and ours.mode == "RGB"
        assert mean_error(ours, source) <= pillow_error + 0.5
        assert mean_error(ours, pillows) < 2, "the same colours as libwebp's own conversion"
    high, low = io.BytesIO(), io.BytesIO()
    webp.encode(source.copy(), high, 95, threading.Event())
    webp.encode(source.copy(), low, 30, threading.Event())
    assert len(low.getvalue()) < len(high.getvalue())


def test_alpha_is_kept_exactly_also_where_some_strips_are_opaque() -> None:
    """Strips without transparency get no alpha plane from libwebp: theirs is filled opaque."""
    rgba = photo("RGBA", (150, 3 * webp.STRIP_ROWS))
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (10, webp.STRIP_ROWS + 5, 90, webp.STRIP_ROWS + 40))  # the middle strip only
    rgba.putalpha(alpha)
    with encoded(rgba) as ours:
        assert ours.mode == "RGBA"
        assert ImageChops.difference(ours.getchannel("A"), alpha).getbbox() is None


@pytest.mark.parametrize(("dst_stride", "src_stride"), [(5, 5), (8, 5), (5, 7), (6, 9)])
def test_planes_are_copied_row_by_row_when_a_stride_has_padding(dst_stride: int, src_stride: int) -> None:
    """libwebp packs its planes today; a padded stride (another build, another version) must still copy right."""
    rows, row_bytes, first = 3, 5, 2
    src = (ctypes.c_uint8 * (rows * src_stride))(*range(rows * src_stride))
    dst = (ctypes.c_uint8 * ((first + rows) * dst_stride))()
    webp._copy_rows(ctypes.addressof(dst), dst_stride, first, ctypes.addressof(src), src_stride, rows, row_bytes)
    for row in range(first + rows):
        got = bytes(dst[row * dst_stride : row * dst_stride + row_bytes])
        want = bytes(src[(row - first) * src_stride :][:row_bytes]) if row >= first else bytes(row_bytes)
        assert got == want, row
    padding = [dst[row * dst_stride + row_bytes : (row + 1) * dst_stride] for row in range(first + rows)]
    assert all(not any(pad) for pad in padding), "nothing written into a stride's padding"


@pytest.mark.parametrize(
    ("mode", "expected"), [("L", "RGB"), ("P", "RGB"), ("I;16", "RGB"), ("LA", "RGBA"), ("CMYK", "RGB")]
)
def test_every_mode_pillow_decodes_is_encoded(mode: str, expected: str) -> None:
    image = photo("RGB", (40, 30))
    if mode == "LA":
        image = image.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    image = image.convert(mode)
    with encoded(image) as ours:
        assert ours.size == (40, 30) and ours.mode == expected


def test_a_palette_with_a_transparent_colour_keeps_its_transparency() -> None:
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste(0, (0, 0, 16, 32))
    image.info["transparency"] = 0
    with encoded(image) as ours:
        assert ours.mode == "RGBA" and ours.getpixel((4, 4))[3] == 0
        red, green, blue, alpha = ours.getpixel((20, 4))
        assert red > 250 and green < 5 and blue < 5 and alpha == 255


def convert(tmp_path: Path, image: Image.Image, stop: threading.Event) -> Any:
    source = tmp_path / "in.png"
    image.save(source)
    file = outputs.OutputFile("9", "in.png", "", "output", "image/png")
    return outputs.convert_image(source, file, "webp", 90, MAX_PIXELS, tmp_path / "spool", stop)


@pytest.mark.parametrize("libwebp", [True, False], ids=["libwebp", "pillow"])
def test_an_image_wider_than_webp_allows_is_an_output_error_that_says_what_to_ask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, libwebp: bool
) -> None:
    monkeypatch.setattr(webp, "available", lambda: libwebp)
    with pytest.raises(OutputError, match=r"16383 pixels a side.*'png' or 'jpeg'") as info:
        convert(tmp_path, Image.new("RGB", (16384, 2)), threading.Event())
    assert info.value.details["node_id"] == "9"


def test_a_job_that_ended_before_its_conversion_converts_nothing(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(OutputError, match="stopped: the job ended"):
        convert(tmp_path, photo("RGB", (64, 64)), stop)


def test_the_encoder_stops_when_the_job_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop set once the picture is made: libwebp's progress hook ends the encoding."""
    stop = threading.Event()
    real = webp._encode

    def after_the_import(*args: Any) -> None:
        stop.set()
        real(*args)

    monkeypatch.setattr(webp, "_encode", after_the_import)
    sink = io.BytesIO()
    with pytest.raises(webp.Stopped):
        webp.encode(photo("RGB", (256, 256)), sink, 90, stop)
    assert len(sink.getvalue()) < 100, "nothing but, perhaps, the header was written"


def test_a_failed_write_is_the_writes_own_error() -> None:
    class Full(io.RawIOBase):
        def write(self, data: Any) -> int:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        webp.encode(photo("RGB", (64, 64)), Full(), 90, threading.Event())  # type: ignore[arg-type]


def test_without_libwebp_pillow_converts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(*_args: Any) -> None:
        raise AssertionError("libwebp used although it is not there")

    monkeypatch.setattr(webp, "available", lambda: False)
    monkeypatch.setattr(webp, "encode", no_library)
    target, name, mime_type = convert(tmp_path, photo("RGB", (64, 64)), threading.Event())
    assert (name, mime_type) == ("in.webp", "image/webp")
    with Image.open(target) as image:
        assert image.format == "WEBP" and image.size == (64, 64)
