"""Hostile and awkward image files made with Pillow, for decoder and indexer tests."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def scene(seed: int = 0, size: int = 96) -> Image.Image:
    """A small asymmetric RGB picture (so rotations change it)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 3), np.uint8)
    arr[: size // 2, : size // 3] = rng.integers(0, 255, 3)
    arr[size // 2 :, size // 3 :] = rng.integers(0, 255, 3)
    arr[size // 4 : size // 3, size // 2 :] = (255, 255, 255)
    return Image.fromarray(arr, "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 12_000, height: int = 12_000) -> bytes:
    """A PNG whose header claims width x height pixels (decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def exif_rotated_pair(folder: Path) -> tuple[Path, Path]:
    """(JPEG with EXIF orientation 6, the same picture physically rotated)."""
    img = scene(3, 120).resize((160, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    tagged = folder / "tagged.jpg"
    tagged.write_bytes(jpeg_bytes(img, exif=exif))
    upright = folder / "upright.jpg"
    upright.write_bytes(jpeg_bytes(img.transpose(Image.Transpose.ROTATE_270)))
    return tagged, upright


def write_awkward_tree(folder: Path) -> dict[str, str]:
    """Every awkward case under ``folder``; returns {relative name: expected status}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def put(name: str | bytes, data: bytes, status: str) -> None:
        path = os.path.join(os.fsencode(folder), os.fsencode(name))
        with open(path, "wb") as f:
            f.write(data)
        expected[os.fsdecode(name)] = status

    good = scene(1)
    put("zero.jpg", b"", "failed")
    put("text.jpg", b"this is not a picture\n" * 10, "failed")
    put("truncated.jpg", jpeg_bytes(scene(2))[:400], "failed")
    put("bomb.png", bomb_png(), "failed")
    put("notes.txt", b"shopping list", "excluded")
    put("cmyk.jpg", jpeg_bytes(good.convert("CMYK")), "indexed")
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(buf, "PNG")
    put("sixteen.png", buf.getvalue(), "indexed")
    buf = io.BytesIO()
    pal = good.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(buf, "PNG", transparency=0)
    put("palette.png", buf.getvalue(), "indexed")
    frames = [scene(i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("animated.gif", buf.getvalue(), "indexed")
    buf = io.BytesIO()
    good.save(buf, "WEBP")
    put("picture.webp", buf.getvalue(), "indexed")
    buf = io.BytesIO()
    good.save(buf, "BMP")
    put("picture.bmp", buf.getvalue(), "indexed")
    buf = io.BytesIO()
    good.save(buf, "TIFF")
    put("picture.tiff", buf.getvalue(), "indexed")
    buf = io.BytesIO()
    scene(4).save(buf, "PNG")
    put("named wrongly.jpg", buf.getvalue(), "indexed")  # PNG content, .jpg name: fine
    put(b"caf\xe9 non-utf8.png", _png(scene(5)), "indexed")
    put("my holiday photo (1).png", _png(scene(6)), "indexed")
    tagged, upright = exif_rotated_pair(folder)
    expected[tagged.name] = expected[upright.name] = "indexed"
    sub = folder / "sub"
    sub.mkdir()
    (sub / "nested.png").write_bytes(_png(scene(7)))
    expected["sub/nested.png"] = "indexed"
    os.symlink("..", sub / "loop")  # a symlink loop
    expected["sub/loop"] = "excluded"
    os.symlink("/etc/hostname", folder / "escape.png")  # leads outside the root
    expected["escape.png"] = "excluded"
    os.symlink("missing-target.png", folder / "dangling.png")
    expected["dangling.png"] = "failed"
    os.mkfifo(folder / "pipe.jpg")  # would block a naive open() forever
    expected["pipe.jpg"] = "excluded"
    return expected


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
