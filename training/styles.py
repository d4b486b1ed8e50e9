"""Render styles of the varied demo corpus: sampling a style, then applying it.

A model trained on one flat rendering learns its pixels (one RGB value per colour name,
one backdrop per background name) rather than the concepts; on another renderer it
falls to chance. So every varied image draws a ``Style`` from a ``StyleFamily``:

- backdrop treatment around the background's name: flat, gradient, noise or texture
  (stripes, dots, grain); a "white" backdrop stays light, "black" dark, "gray" middling,
  "checkered" two-tone checks, whatever the treatment;
- object fill (solid or shaded), outline (width, dark/light/shade), per-object rotation
  and aspect jitter, a scale factor for the whole image, blur, JPEG recompression
  (one or two passes) and the output size;
- each object's colour drawn from its name's range (``COLOR_RANGES``: hue, saturation,
  value in HSV), with hue ranges disjoint so the names stay distinguishable.

``HELD_OUT_FAMILY`` ("sketch": hatched fills, crosshatch and paper textures, vignettes,
its own image sizes) never occurs in train, val or test: it renders test-shifted only.
Everything draws from the caller's ``random.Random``, so a seed fixes the bytes.
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 3  # draw large, then downsample: antialiased edges with plain ImageDraw


@dataclass(frozen=True)
class ColorRange:
    """The HSV box a colour name spans: hue in degrees (``lo > hi`` wraps through 0),
    saturation and value in [0, 1]."""

    hue: tuple[float, float]
    sat: tuple[float, float]
    val: tuple[float, float]

    def hue_contains(self, h: float) -> bool:
        """Whether hue ``h`` (degrees) lies in the range."""
        lo, hi = self.hue
        h %= 360
        return lo <= h <= hi if lo <= hi else h >= lo or h <= hi


# Hue ranges are pairwise disjoint; red and pink also differ in saturation (a pale red
# would read as pink), orange and yellow stay bright (dark ones read as brown and olive).
COLOR_RANGES: dict[str, ColorRange] = {
    "red": ColorRange((352, 8), (0.75, 1.0), (0.62, 0.95)),
    "orange": ColorRange((20, 34), (0.8, 1.0), (0.88, 1.0)),
    "yellow": ColorRange((47, 58), (0.75, 1.0), (0.88, 1.0)),
    "green": ColorRange((100, 140), (0.55, 0.9), (0.45, 0.8)),
    "cyan": ColorRange((178, 194), (0.7, 1.0), (0.7, 0.95)),
    "blue": ColorRange((212, 234), (0.7, 0.95), (0.6, 0.92)),
    "purple": ColorRange((264, 286), (0.5, 0.8), (0.5, 0.8)),
    "pink": ColorRange((318, 340), (0.35, 0.65), (0.88, 1.0)),
}
# Grey levels a background name may take: disjoint, so the name stays true.
BACKGROUND_TONES: dict[str, tuple[float, float]] = {
    "white": (228.0, 252.0),
    "gray": (108.0, 152.0),
    "black": (6.0, 42.0),
    "checkered_light": (205.0, 240.0),
    "checkered_dark": (150.0, 185.0),
}


def sample_color(name: str, rng: random.Random) -> tuple[int, int, int]:
    """An RGB colour inside ``name``'s range."""
    rng_ = COLOR_RANGES[name]
    lo, hi = rng_.hue
    h = rng.uniform(lo, hi if lo <= hi else hi + 360) % 360
    r, g, b = colorsys.hsv_to_rgb(h / 360, rng.uniform(*rng_.sat), rng.uniform(*rng_.val))
    return round(r * 255), round(g * 255), round(b * 255)


@dataclass(frozen=True)
class StyleFamily:
    """The choices one family of renderings draws from."""

    name: str
    backdrops: tuple[str, ...]  # flat, gradient, noise, texture, vignette
    textures: tuple[str, ...]  # for the texture backdrop
    fills: tuple[str, ...]  # solid, shaded, hatched
    outline_p: float
    rotation: float  # degrees either way; < 22.5 keeps a square from reading as a diamond
    aspect: float  # log of the largest stretch of an object
    scale: tuple[float, float]  # all objects of an image, beside their size
    blur: float  # largest Gaussian radius, output pixels
    jpeg_p: float
    jpeg_quality: tuple[int, int]
    recompress_p: float  # chance of a second JPEG pass (a re-saved download)
    sizes: tuple[int, ...]


FAMILIES: dict[str, StyleFamily] = {
    f.name: f
    for f in (
        StyleFamily(
            "clean", ("flat", "gradient"), (), ("solid",), 0.2, 12, 0.1, (0.9, 1.1), 0.0,
            0.3, (60, 95), 0.0, (96, 128, 160),
        ),
        StyleFamily(
            "print", ("texture", "gradient", "flat"), ("stripes", "dots"), ("solid", "shaded"),
            0.7, 15, 0.15, (0.85, 1.15), 0.6, 0.5, (50, 90), 0.2, (128, 160, 192),
        ),
        StyleFamily(
            "photo", ("noise", "gradient", "texture"), ("grain",), ("solid", "shaded"), 0.3,
            15, 0.15, (0.85, 1.15), 1.2, 0.9, (30, 85), 0.5, (128, 160, 224),
        ),
        StyleFamily(
            "sketch", ("texture", "vignette"), ("crosshatch", "paper"), ("hatched",), 1.0,
            15, 0.15, (0.85, 1.15), 0.8, 0.5, (40, 90), 0.3, (112, 200),
        ),
    )
}  # fmt: skip
TRAIN_FAMILIES: tuple[str, ...] = ("clean", "print", "photo")  # train, val and test
HELD_OUT_FAMILY = "sketch"  # test-shifted only


@dataclass(frozen=True)
class Style:
    """One image's concrete rendering choices (sampled by ``sample_style``)."""

    family: str
    size: int
    backdrop: str
    texture: str | None
    fill: str
    outline: int  # width in output pixels, 0 for none
    outline_tone: str  # dark, light or shade (a darker shade of the fill)
    rotation: float
    aspect: float
    scale: float
    blur: float
    jpeg: tuple[int, ...]  # qualities of successive JPEG passes; () for PNG
    tint: tuple[int, int, int]  # per-channel offset of the backdrop

    @property
    def ext(self) -> str:
        """The file extension the image is written with."""
        return "jpg" if self.jpeg else "png"


def sample_style(family: str, rng: random.Random) -> Style:
    """Draw a style of ``family``."""
    f = FAMILIES[family]
    backdrop = rng.choice(f.backdrops)
    jpeg: tuple[int, ...] = ()
    if rng.random() < f.jpeg_p:
        jpeg = (rng.randint(*f.jpeg_quality),)
        if rng.random() < f.recompress_p:
            jpeg += (rng.randint(*f.jpeg_quality),)
    return Style(
        family=family,
        size=rng.choice(f.sizes),
        backdrop=backdrop,
        texture=rng.choice(f.textures) if backdrop == "texture" else None,
        fill=rng.choice(f.fills),
        outline=rng.randint(1, 3) if rng.random() < f.outline_p else 0,
        outline_tone=rng.choice(("dark", "light", "shade")),
        rotation=f.rotation,
        aspect=f.aspect,
        scale=rng.uniform(*f.scale),
        blur=rng.uniform(0, f.blur) if f.blur and rng.random() < 0.6 else 0.0,
        jpeg=jpeg,
        tint=(rng.randint(-5, 5), rng.randint(-5, 5), rng.randint(-5, 5)),
    )


# ---------------------------------------------------------------------------- backdrop


def _texture(kind: str, size: int, gen: np.random.Generator) -> np.ndarray:
    """A zero-mean pattern in [-1, 1] of shape (size, size)."""
    y, x = np.mgrid[0:size, 0:size] / size
    angle = gen.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    if kind == "stripes":
        return np.sign(np.sin(2 * math.pi * u * gen.uniform(6, 14)))
    if kind == "dots":
        period = gen.uniform(0.06, 0.12)
        fx, fy = (x / period) % 1 - 0.5, (y / period) % 1 - 0.5
        return np.where(fx**2 + fy**2 < 0.08, 1.0, -0.15)
    if kind == "grain":
        cells = int(gen.integers(6, 16))
        field = Image.fromarray(gen.uniform(0, 255, (cells, cells)).astype(np.uint8))
        return np.asarray(field.resize((size, size), Image.Resampling.BICUBIC)) / 127.5 - 1
    if kind == "crosshatch":
        v = x * math.cos(angle + math.pi / 2) + y * math.sin(angle + math.pi / 2)
        freq = gen.uniform(10, 18)
        lines = (np.abs(np.sin(math.pi * u * freq)) > 0.92) | (
            np.abs(np.sin(math.pi * v * freq)) > 0.92
        )
        return np.where(lines, -1.0, 0.15)
    if kind == "paper":
        rows = max(size // 6, 2)
        fibres = Image.fromarray(gen.uniform(0, 255, (rows, 8)).astype(np.uint8))
        return np.asarray(fibres.resize((size, size), Image.Resampling.BILINEAR)) / 127.5 - 1
    raise ValueError(f"unknown texture {kind!r}")


def _tone_field(name: str, size: int, style: Style, gen: np.random.Generator) -> np.ndarray:
    """Grey levels (size, size) of a plain backdrop named ``name``, treatment applied."""
    lo, hi = BACKGROUND_TONES[name]
    span = hi - lo
    base = gen.uniform(lo + 0.25 * span, hi - 0.25 * span)
    y, x = np.mgrid[0:size, 0:size] / size
    if style.backdrop == "gradient":
        angle = gen.uniform(0, 2 * math.pi)
        ramp = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle)  # in [-0.71, 0.71]
        field = base + ramp * gen.uniform(0.4, 0.7) * span
    elif style.backdrop == "vignette":
        field = base - ((x - 0.5) ** 2 + (y - 0.5) ** 2) * gen.uniform(0.6, 1.2) * span
    elif style.backdrop == "noise":
        field = base + gen.normal(0, gen.uniform(3, 9), (size, size))
    elif style.backdrop == "texture":
        field = base + _texture(style.texture or "", size, gen) * gen.uniform(0.2, 0.35) * span
    else:
        field = np.full((size, size), base)
    return np.clip(field, lo - 0.1 * span, hi + 0.1 * span)


def paint_background(name: str, style: Style, rng: random.Random) -> Image.Image:
    """The RGB backdrop, supersampled (``style.size * SUPERSAMPLE`` px), whose look
    matches the background's name.

    Painted at the output size and enlarged pixel for pixel: a backdrop has no edges to
    antialias, and this is nine times less work.
    """
    gen = np.random.default_rng(rng.getrandbits(63))
    size = style.size
    if name == "checkered":
        light = _tone_field("checkered_light", size, style, gen)
        dark = _tone_field("checkered_dark", size, style, gen)
        cells = int(gen.choice((4, 5, 6, 8)))
        y, x = np.mgrid[0:size, 0:size] * cells // size
        grey = np.where((x + y) % 2 == 0, light, dark)
    else:
        grey = _tone_field(name, size, style, gen)
    rgb = grey[..., None] + np.asarray(style.tint, dtype=float)
    img = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    return img.resize((size * SUPERSAMPLE,) * 2, Image.Resampling.NEAREST)


# ---------------------------------------------------------------------------- objects


def _outline_color(
    fill: tuple[int, int, int], style: Style, background: str
) -> tuple[int, int, int]:
    if style.outline_tone == "shade":
        return tuple(int(c * 0.7) for c in fill)  # type: ignore[return-value]
    dark = style.outline_tone == "dark"
    if background == "black":  # a dark outline would vanish: always light on black
        dark = False
    elif background == "white":
        dark = True
    return (30, 30, 34) if dark else (236, 236, 232)


def draw_object(
    img: Image.Image,
    points: list[tuple[float, float]],
    color: str,
    background: str,
    style: Style,
    rng: random.Random,
) -> None:
    """Draw one object (polygon ``points`` on the supersampled image) in ``color``."""
    fill = sample_color(color, rng)
    draw = ImageDraw.Draw(img)
    if style.fill == "solid":
        draw.polygon(points, fill=fill)
    else:
        # Fills other than solid are painted through a mask over the object's box only.
        x0 = max(int(min(p[0] for p in points)) - 1, 0)
        y0 = max(int(min(p[1] for p in points)) - 1, 0)
        x1 = min(int(max(p[0] for p in points)) + 2, img.size[0])
        y1 = min(int(max(p[1] for p in points)) + 2, img.size[1])
        w, h = max(x1 - x0, 1), max(y1 - y0, 1)
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in points], fill=255)
        if style.fill == "shaded":
            # A ramp between two shades of the same name, both inside its range.
            other = np.asarray(sample_color(color, rng), dtype=np.float32)
            t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
            ramp = np.asarray(fill, dtype=np.float32) * (1 - t) + other * t
            layer = np.broadcast_to(ramp, (h, w, 3))
            paint = Image.fromarray(np.rint(layer).astype(np.uint8), "RGB")
        else:  # hatched: thick diagonal strokes of the colour over the backdrop
            period = max(w / rng.uniform(4, 7), 3.0)
            yy, xx = np.mgrid[0:h, 0:w]
            stripes = ((xx + yy) % period) < period * 0.5
            mask = Image.fromarray(np.where(stripes, np.asarray(mask), 0).astype(np.uint8), "L")
            paint = Image.new("RGB", (w, h), fill)
        img.paste(paint, (x0, y0), mask)
    if style.outline or style.fill == "hatched":
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        extent = min(max(xs) - min(xs), max(ys) - min(ys))
        # Thin on small objects: an outline must not bury the fill (and its colour).
        width = max(1, min(max(style.outline, 2) * SUPERSAMPLE, round(0.1 * extent)))
        outline = fill if style.fill == "hatched" else _outline_color(fill, style, background)
        draw.polygon(points, outline=outline, width=width)


def object_transform(style: Style, rng: random.Random) -> tuple[float, float]:
    """(rotation in radians, aspect stretch) of one object."""
    rot = math.radians(rng.uniform(-style.rotation, style.rotation))
    return rot, math.exp(rng.uniform(-style.aspect, style.aspect))


def finish(img: Image.Image, style: Style) -> bytes:
    """Downsample, blur and encode the supersampled image: the file's bytes."""
    out = img.resize((style.size, style.size), Image.Resampling.LANCZOS)
    if style.blur:
        out = out.filter(ImageFilter.GaussianBlur(style.blur))
    buf = io.BytesIO()
    if not style.jpeg:
        out.save(buf, format="PNG", optimize=False)
        return buf.getvalue()
    for quality in style.jpeg:  # each pass decodes the last one: recompression artefacts
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=quality)
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return buf.getvalue()
