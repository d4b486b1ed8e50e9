"""Safe image decoding shared by training, evaluation, the indexer and query uploads.

Only allowlisted formats are decoded, chosen from the content (Pillow's sniffing), not
the file name. Decompression bombs are refused: Pillow's pixel limit stays on and its
warning is raised as an error. EXIF orientation is applied, and CMYK, palette, 16-bit,
grey and alpha images are converted to RGB deliberately (alpha composited on white).
Animated images give their first frame.

Query uploads (``decode_upload``) are decoded small: baseline JPEG at a reduced DCT scale
(``Image.draft``), everything else only when its declared size is within
``MAX_UPLOAD_PIXELS``, since Pillow cannot decode PNG, WebP, GIF, BMP, TIFF, HEIF or
progressive JPEG below full size (a 10 KB PNG may declare 9000x9000: 440 MB to decode).
"""

from __future__ import annotations

import functools
import io
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import XmodalError

# Formats we decode. HEIF/AVIF join when pillow-heif registers its opener.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_HEIF_FORMATS: tuple[str, ...] = ("HEIF", "AVIF")
MAX_PIXELS: int = 89_478_485  # Pillow's default limit, stated here on purpose
# Uploads that must be decoded at full size: 4096x4096 is about 70 MB of pixels at most.
MAX_UPLOAD_PIXELS: int = 4096 * 4096
# Uploads are decoded and kept at no less than this on their short side: model inputs are
# 224 px (up to 448 for the largest open_clip towers), so the ranking does not change.
QUERY_SIDE: int = 512

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure, not grey pixels

EXIF_IFD = 0x8769  # the Exif sub-IFD
EXIF_DATETIME_ORIGINAL = 36867  # in the Exif IFD: when the photo was taken
EXIF_DATETIME = 306  # in IFD0: when the file was last changed by the camera or an editor


class ImageDecodeError(XmodalError):
    """The bytes are not an allowed, sound image; the message says why."""


@functools.cache
def _heif_formats() -> tuple[str, ...]:
    # Once per process: registering pillow-heif's opener is not free.
    try:
        import pillow_heif  # type: ignore[import-not-found]

        pillow_heif.register_heif_opener()
        return _HEIF_FORMATS
    except ImportError:
        return ()


def allowed_formats() -> tuple[str, ...]:
    """The formats this installation decodes."""
    return ALLOWED_FORMATS + _heif_formats()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on white, 16-bit scaled, CMYK converted."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit grey or float: scale to 8 bits (Pillow's own convert clips at 255).
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def exif_taken_ns(exif: Image.Exif) -> int | None:
    """When a photo was taken, from its EXIF (DateTimeOriginal, else DateTime), as ns
    since the epoch reading the camera's wall-clock time as UTC; None without a sound one.
    """
    try:
        stamp = exif.get_ifd(EXIF_IFD).get(EXIF_DATETIME_ORIGINAL) or exif.get(EXIF_DATETIME)
    except Exception:  # a damaged Exif IFD: no date, not a failed image
        return None
    if isinstance(stamp, bytes):
        stamp = stamp.decode("ascii", "replace")
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.strptime(stamp.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:  # "0000:00:00 00:00:00" and other placeholders
        return None
    return int(when.replace(tzinfo=UTC).timestamp()) * 1_000_000_000


def decode_image(
    source: str | Path | bytes,
    max_pixels: int = MAX_PIXELS,
    draft: tuple[int, int] | None = None,
    with_info: bool = False,
    max_full_pixels: int | None = None,
) -> Any:
    """Open, verify and fully decode an image into an RGB PIL image.

    ``source`` is a path or the file's bytes. ``draft`` (width, height) lets JPEG
    decode at a reduced scale that still covers that size: several times faster for
    photos far larger than the model's input. With ``with_info`` returns
    ``(image, {"format", "width", "height", "taken_ns"})`` where the size is the full,
    upright one and ``taken_ns`` the EXIF date taken (``exif_taken_ns``) or None.
    ``max_full_pixels`` refuses images above that many pixels unless ``draft`` can reduce
    them (baseline JPEG): what a server needs to bound the memory of one decode.
    Raises ImageDecodeError (bad data, disallowed format, bomb) or OSError (unreadable).
    """
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    formats = allowed_formats()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp, formats=list(formats)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"image too large: {width}x{height} pixels exceeds the "
                        f"{max_pixels:,}-pixel limit (decompression bomb guard)"
                    )
                full_size = not (draft and _draftable(img))
                if max_full_pixels is not None and full_size and width * height > max_full_pixels:
                    raise ImageDecodeError(
                        f"image too large to search with: {width}x{height} {img.format} is "
                        f"{width * height:,} pixels, more than the {max_full_pixels:,} decoded "
                        "at full size; send a smaller image or a baseline JPEG"
                    )
                exif = img.getexif()
                info = {
                    "format": img.format,
                    "width": width,
                    "height": height,
                    "taken_ns": exif_taken_ns(exif),
                }
                if exif.get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                    info["width"], info["height"] = height, width
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)  # animated: first frame only
                if draft and img.format == "JPEG":
                    img.draft("RGB", draft)
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"decompression bomb refused: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ImageDecodeError(
                f"not an image in an allowed format ({', '.join(formats)})"
            ) from exc
        except ImageDecodeError:
            raise
        except (SyntaxError, ValueError, EOFError, struct_error()) as exc:
            raise ImageDecodeError(f"corrupt image data: {exc}") from exc
        except OSError as exc:
            if isinstance(source, bytes) or "truncated" in str(exc) or "image file" in str(exc):
                raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc
            raise
    return (rgb, info) if with_info else rgb


def _draftable(img: Image.Image) -> bool:
    """Whether ``draft`` decodes this image below full size, in time and in memory."""
    # Progressive JPEG keeps every DCT coefficient at full size (about 3 bytes a pixel)
    # even when it decodes at 1/8 scale.
    progressive = "progressive" in img.info or "progression" in img.info
    return img.format == "JPEG" and not progressive


def decode_upload(
    data: bytes, side: int = QUERY_SIDE, max_full_pixels: int = MAX_UPLOAD_PIXELS
) -> Image.Image:
    """Decode uploaded query bytes small: at least ``side`` px on the short side, no more.

    Baseline JPEG decodes at a reduced DCT scale (up to ``MAX_PIXELS`` declared); other
    images are refused above ``max_full_pixels`` (ImageDecodeError naming the size), and
    a decoded image far larger than ``side`` is reduced at once so requests in flight
    hold little memory.
    """
    img = decode_image(data, draft=(side, side), max_full_pixels=max_full_pixels)
    factor = min(img.size) // side
    if factor >= 2:
        img = img.reduce(factor)
    return img


def struct_error() -> type[Exception]:
    """struct.error, raised by some Pillow plugins on malformed headers."""
    import struct

    return struct.error
