"""Safe decoding: formats by content, bombs refused, orientation and modes handled."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from image_fixtures import bomb_png, exif_rotated_pair, jpeg_bytes, scene
from PIL import Image
from xmodal.crossmodal.images import ImageDecodeError, decode_image
from xmodal.indexer.decode import DecodePool, Job
from xmodal.indexer.sources import sniff_format


def test_bomb_header_is_refused_before_decoding() -> None:
    with pytest.raises(ImageDecodeError, match=r"decompression bomb|too large"):
        decode_image(bomb_png())


def test_pixel_limit_is_ours_to_set() -> None:
    data = io.BytesIO()
    scene(0, 64).save(data, "PNG")
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data.getvalue(), max_pixels=1000)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not an image"),
        (b"hello world" * 20, "not an image"),
        (jpeg_bytes(scene(1))[:300], "truncated|corrupt"),
        (b"%PDF-1.7\n" + b"x" * 100, "not an image"),
    ],
)
def test_bad_bytes_fail_with_a_reason(data: bytes, match: str) -> None:
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(data)


def test_modes_become_rgb() -> None:
    base = scene(2)
    for mode in ("CMYK", "L", "LA", "RGBA", "P", "I;16", "1"):
        img = base.convert("L").convert(mode) if mode == "I;16" else base.convert(mode)
        fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
        buf = io.BytesIO()
        img.save(buf, fmt)
        out = decode_image(buf.getvalue())
        assert out.mode == "RGB" and out.size == base.size, mode


def test_transparent_pixels_composite_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_keeps_its_range() -> None:
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    out = np.asarray(decode_image(buf.getvalue()))[..., 0]
    assert out.min() == 0 and out.max() == 255  # not clipped to white


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    tagged, upright = exif_rotated_pair(tmp_path)
    a, info = decode_image(tagged, with_info=True)
    b = decode_image(upright)
    assert a.size == b.size == (120, 160)
    assert (info["width"], info["height"]) == (120, 160)
    diff = np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
    assert diff < 3.0  # JPEG noise only


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue()).getpixel((1, 1)) == (255, 0, 0)


def test_jpeg_draft_decodes_at_a_covering_scale() -> None:
    big = scene(3, 96).resize((1920, 1080))
    img, info = decode_image(jpeg_bytes(big), draft=(224, 224), with_info=True)
    assert (info["width"], info["height"]) == (1920, 1080)  # the file's real size
    assert min(img.size) >= 224 and img.size[0] < 1920


def test_format_is_sniffed_from_content() -> None:
    assert sniff_format(jpeg_bytes(scene(0))[:32]) == "JPEG"
    assert sniff_format(bomb_png()[:32]) == "PNG"
    assert sniff_format(b"GIF89a" + b"\x00" * 20) == "GIF"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"\x00\x00\x00\x18ftypheic\x00\x00") == "HEIF"
    assert sniff_format(b"hello") is None


def test_a_file_that_blocks_is_failed_after_the_time_bound(tmp_path: Path) -> None:
    fifo = tmp_path / "blocks.jpg"
    os.mkfifo(fifo)  # open() waits for a writer that never comes
    good = tmp_path / "good.png"
    scene(1).save(good)
    t0 = time.monotonic()
    with DecodePool(workers=1, preprocess=None, timeout_s=2.0) as pool:
        results = {
            r.key: r
            for r in pool.run([Job("fifo", os.fsencode(fifo)), Job("good", os.fsencode(good))])
        }
        assert pool.killed == 1
    assert "longer than 2 s" in results["fifo"].error
    assert results["good"].error is None and results["good"].width == 96
    assert time.monotonic() - t0 < 60


def test_heic_is_decoded_when_pillow_heif_is_installed(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    scene(5, 64).save(buf, format="HEIF")
    data = buf.getvalue()
    assert sniff_format(data[:32]) == "HEIF"
    img, info = decode_image(data, with_info=True)
    assert img.mode == "RGB" and img.size == (64, 64) and info["format"] == "HEIF"
