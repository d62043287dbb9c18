"""Loading untrusted images safely.

Every image that reaches a model goes through `load_image`: uploads from the browser, files named on
the command line, paths handed over by gradio_client. It enforces limits on file size, pixel count
and format *before* decoding, so a decompression bomb or a 1 GB file is refused with a sentence the
user can act on, and never a traceback.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# Formats a camera, a browser screenshot or a chat paste produce. Anything else (PSD, EPS which
# would run Ghostscript, ICO, ...) is refused by name rather than handed to a rarely-used decoder.
Image.init()  # register every plugin now, so the allow-list below can be checked against them
ALLOWED_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO") if f in Image.OPEN)

DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # 20 MiB: a 48 MP phone photo as JPEG is ~15 MiB
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000; decoding it takes ~150 MB of RAM as RGB
MAX_ASPECT_RATIO = 20.0  # beyond this, padding to a square leaves only a sliver of picture


class ImageError(ValueError):
    """An image that cannot be used. `str(err)` is a complete sentence meant for the end user."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image plus a content hash (used to cache its vision features)."""

    image: Image.Image
    digest: str
    name: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _human_bytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KB"


def load_image(source: str | os.PathLike | bytes, limits: ImageLimits = ImageLimits(), name: str | None = None) -> LoadedImage:
    """Decode `source` (a path or raw bytes) into an RGB image, or raise ImageError."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        name = name or "image"
    else:
        path = os.fspath(source)
        name = name or os.path.basename(path)
        if os.path.isdir(path):
            raise ImageError(f"'{name}' is a folder, not an image file.")
        try:
            size = os.path.getsize(path)
        except OSError:
            raise ImageError(f"Cannot read the image file '{name}': it does not exist or is not readable.") from None
        if size > limits.max_bytes:
            raise ImageError(
                f"The image '{name}' is {_human_bytes(size)}; the limit is {_human_bytes(limits.max_bytes)}. "
                "Please use a smaller file."
            )
        try:
            with open(path, "rb") as f:
                data = f.read(size + 1)  # the size is checked, so this never reserves the whole limit
        except OSError as err:
            raise ImageError(f"Cannot read the image file '{name}': {err.strerror or err}.") from None
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"The image '{name}' is {_human_bytes(len(data))}; the limit is {_human_bytes(limits.max_bytes)}. "
            "Please use a smaller file."
        )
    if not data:
        raise ImageError(f"The file '{name}' is empty.")
    return LoadedImage(image=_decode(data, name, limits), digest=hashlib.sha256(data).hexdigest(), name=name)


def _decode(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
    unsupported = (
        f"'{name}' is not an image this app can read. Supported formats: JPEG, PNG, WebP, GIF, BMP and TIFF."
    )
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between MAX_IMAGE_PIXELS and twice that; make it an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size  # read from the header: nothing is decoded yet
            if width <= 0 or height <= 0:
                raise ImageError(f"The image '{name}' has no pixels.")
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"The image '{name}' is {width}x{height} pixels ({width * height / 1e6:.0f} MP); "
                    f"the limit is {limits.max_pixels / 1e6:.0f} MP. Please downscale it."
                )
            if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
                raise ImageError(
                    f"The image '{name}' is {width}x{height} pixels, too long and thin to look at "
                    f"(aspect ratio over {MAX_ASPECT_RATIO:.0f}:1). Please crop it."
                )
            img.seek(0)  # animated GIF/WebP: the first frame is what the model sees
            img.load()
            img = ImageOps.exif_transpose(img)  # phone photos: honour the orientation tag
            return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"The image '{name}' declares an enormous size and was refused as unsafe.") from None
    except UnidentifiedImageError:
        raise ImageError(unsupported) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error):
        raise ImageError(f"The image '{name}' is damaged or truncated and cannot be decoded.") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (what a person sees in a browser)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I;16"):
        # 16-bit greyscale (scans, PNG from scientific tools): scale into 8 bits instead of clipping.
        img = img.point(lambda v: v / 256).convert("L")
    elif img.mode in ("I", "F"):
        img = _stretch_to_8bit(img)
    return img.convert("RGB")


def _stretch_to_8bit(img: Image.Image) -> Image.Image:
    """32-bit integer or float greyscale (TIFF) into 0..255: 16-bit-range integers and 0..1 floats keep
    their meaning; anything else is stretched from its own minimum to its maximum."""
    low, high = img.getextrema()
    if img.mode == "I" and 0 <= low and high <= 65535:
        scale, offset = 1 / 256, 0.0
    elif img.mode == "F" and 0 <= low and high <= 1:
        scale, offset = 255.0, 0.0
    elif high > low:
        scale, offset = 255.0 / (high - low), -low * 255.0 / (high - low)
    else:
        scale, offset = 0.0, 128.0
    return img.point(lambda v: v * scale + offset).convert("L")
