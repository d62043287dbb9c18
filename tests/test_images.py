"""Untrusted images: accepted formats come out as RGB; hostile or broken files get a specific sentence."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from vlui.images import ImageError, ImageLimits, load_image
from tests.conftest import png_bytes


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_common_formats_decode_to_rgb(fmt):
    loaded = load_image(encode(Image.new("RGB", (40, 30), (10, 200, 30)), fmt), name=f"x.{fmt.lower()}")
    assert loaded.image.mode == "RGB" and loaded.size == (40, 30)
    assert len(loaded.digest) == 64


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert load_image(encode(img, "PNG")).image.getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    img = Image.new("I;16", (8, 8), 40000)
    r, g, b = load_image(encode(img, "PNG")).image.getpixel((0, 0))
    assert r == g == b and 150 <= r <= 160  # 40000 / 256 = 156


@pytest.mark.parametrize("mode,value,bright", [("F", 0.5, 127), ("I", 2_000_000, 255), ("F", 1000.0, 255)])
def test_float_and_32_bit_images_keep_their_contrast(mode, value, bright):
    img = Image.new(mode, (8, 8), value)
    img.putpixel((0, 0), 0)  # one dark pixel
    loaded = load_image(encode(img, "TIFF")).image
    assert loaded.getpixel((0, 0))[0] == 0 and loaded.getpixel((4, 4))[0] == bright  # not all black or white


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    assert load_image(encode(img, "JPEG", exif=exif.tobytes())).size == (20, 60)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r, g, _ = load_image(buf.getvalue()).image.getpixel((4, 4))
    assert r > 200 and g < 50


def test_same_content_same_digest():
    assert load_image(png_bytes()).digest == load_image(png_bytes()).digest
    assert load_image(png_bytes()).digest != load_image(png_bytes(color=(0, 0, 0))).digest


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge image, with almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data,words",
    [
        (b"", "empty"),
        (b"hello, I am a text file", "not an image"),
        (png_bytes()[:60], "damaged or truncated"),
        (bomb_png(100_000, 100_000), "enormous size"),  # Pillow's own bomb check fires first
        (bomb_png(8_000, 8_000), "limit is 50 MP"),  # ours: refused from the header, nothing decoded
        (png_bytes((2000, 50)), "too long and thin"),
        (encode(Image.new("RGB", (16, 16)), "ICO"), "not an image this app can read"),
        (encode(Image.new("RGB", (16, 16)), "PDF"), "not an image this app can read"),
    ],
)
def test_bad_files_get_a_specific_sentence(data, words):
    with pytest.raises(ImageError) as err:
        load_image(data, name="upload.bin")
    message = str(err.value)
    assert words in message and "upload.bin" in message or words == "empty"
    assert "Traceback" not in message


def test_file_size_limit_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.effect_noise((200, 200), 64).convert("RGB"), "PNG"))
    with pytest.raises(ImageError, match="limit is 1 KB"):
        load_image(path, ImageLimits(max_bytes=1024))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
