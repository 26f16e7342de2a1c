"""Reading images safely: the format and the pixel cap are checked on the header before any pixel is
decoded; one RGB rule; deterministic PNG bytes.

Every image that enters DuetGen from outside (a dataset file, an upload to the server, a benchmark's
table, a fetched web image) goes through `inspect_image` (or `open_rgb_image` for a checked path, or
`decode_image_bytes` for bytes that will be stored), so a decompression bomb or a file that is not an
image is an `ImageError` naming where it came from, never a crash or a silently decoded 2 GB bitmap.
Bytes that `decode_image_bytes` decoded in full come back as `VerifiedImageBytes`, which the dataset
writer stores without decoding them a second time (the data engine's image path, issue 18). `to_rgb` is
the one transparency rule of the project (the image processor, the autoencoder's input, the engine and
the server all use it).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

from duetgen.data.record import RecordError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: above any training resolution, far below a decompression bomb
DEFAULT_MAX_IMAGE_BYTES = 256 << 20  # a 40 MP RGB image is 120 MB raw; an encoded file above this is not an image
# PIL format name -> file extension. MPO is the multi-picture JPEG phones write; its first frame is a JPEG.
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp", "GIF": "gif"}


class ImageError(RecordError):
    """An image of a record is missing, unreadable, too large or outside the root. ``reason``, where the
    image's bytes were judged: ``unsupported_format``, ``too_many_pixels`` or ``corrupt_image`` (the data
    engine's drop reasons)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


@contextlib.contextmanager
def pil_guard(where: str):
    """Turn PIL's decompression-bomb and decode failures into ImageError naming ``where``."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Our own cap is checked on the header; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as e:
        raise ImageError(f"{where}: refused as a decompression bomb ({e})", "too_many_pixels") from None
    except ImageError:
        raise
    except Image.UnidentifiedImageError:  # its message is the repr of our in-memory buffer: say what it means
        raise ImageError(f"{where}: not a readable image (no PNG, JPEG, WEBP or GIF header, or one cut short)",
                         "corrupt_image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL raises all of these on bad data
        raise ImageError(f"{where}: not a readable image ({type(e).__name__}: {e})", "corrupt_image") from None


def inspect_image(fp: Any, where: str, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True):
    """Open an image from a file object, check format and size BEFORE decoding, then decode.

    Returns the opened (and, if ``decode``, fully loaded) PIL image. ``where`` names the record
    and path in every error.
    """
    from PIL import Image

    with pil_guard(where):
        im = Image.open(fp)
        if im.format not in IMAGE_FORMATS:
            raise ImageError(f"{where}: unsupported image format {im.format!r} (allowed: PNG, JPEG, WEBP, GIF)",
                             "unsupported_format")
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageError(f"{where}: empty image ({w}x{h})", "corrupt_image")
        if w * h > max_pixels:
            raise ImageError(f"{where}: image is {w}x{h} = {w * h:,} pixels, over the cap of {max_pixels:,}",
                             "too_many_pixels")
        if decode:
            im.load()
    return im


class VerifiedImageBytes(bytes):
    """Encoded image bytes that ``decode_image_bytes`` decoded in full (format allowed, header size under
    its pixel cap, every pixel decoded), with that ``format`` (a key of IMAGE_FORMATS) and ``size``.

    ``store_image`` writes them without decoding them again: it checks ``size`` against its own cap and
    takes the extension from ``format``. Make them only with ``decode_image_bytes``; plain bytes are
    always decoded by the writer.
    """

    def __new__(cls, data: bytes, format: str, size: tuple[int, int]):
        self = super().__new__(cls, data)
        self.format, self.size = format, size
        return self

    def __reduce__(self):
        return VerifiedImageBytes, (bytes(self), self.format, self.size)


def decode_image_bytes(data: bytes, where: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None):
    """Check the header of encoded ``data`` (format, pixel cap) before decoding, decode every pixel,
    and return ``(VerifiedImageBytes, the RGB image)``. Raises ImageError (``.reason`` set) naming ``where``.

    ``min_side``: a JPEG whose longer side is at least twice this is decoded at libjpeg's DCT scale
    (1/2, 1/4 or 1/8) that keeps its longer side >= ``min_side``: every coefficient is still read
    (a cut or corrupt file fails as in a full decode), only the inverse DCT outputs fewer pixels. The
    image is then smaller than ``VerifiedImageBytes.size``, which is the file's own size.
    """
    im = inspect_image(io.BytesIO(data), where, max_pixels, decode=False)
    size = im.size
    with pil_guard(where):
        if min_side is not None and im.format in ("JPEG", "MPO") and max(size) >= 2 * min_side:
            w, h = size
            im.draft(None, (-(-w * min_side // max(size)), -(-h * min_side // max(size))))  # ceil: never below
        im.load()
        rgb = to_rgb(im)
    return VerifiedImageBytes(data, im.format, size), rgb


def open_rgb_image(path: Path, where: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A fully loaded RGB PIL image from a file whose path is already checked (``resolve_inside``).

    The format and pixel cap are checked on the header before decoding; ``where`` names the record
    and path in every error.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ImageError(f"{where}: cannot be read ({e.strerror})") from None
    with f:
        im = inspect_image(f, where, max_pixels)
        with pil_guard(where):
            return to_rgb(im)


def to_rgb(im):
    """RGB view of any PIL image: transparency (an alpha band, a palette's or a colour key's) is composited
    over white, as transformers' ``convert_to_rgb`` and a web page show it; an RGB image is returned as it is."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    bands = im.getbands()
    if "A" in bands or "a" in bands or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def encode_png(im) -> bytes:
    """Lossless PNG bytes of a PIL image (deterministic: the same pixels give the same bytes)."""
    if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        im = to_rgb(im)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
