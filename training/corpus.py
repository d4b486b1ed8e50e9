"""Deterministic synthetic scene corpus: the demo data that trains and tests the shapes model.

A scene is a background plus 1-3 objects (size, colour, shape) laid out in a row
(left to right) or a column (top to bottom). Captions are generated from the scene's
structure, so every caption is true of its image, and every caption names the whole
scene: background, each object's size, colour and shape, and their spatial order.

Splits: ``test`` (1,000 images by default) and ``val`` hold pairwise distinct scene
descriptions, drawn over all colour-shape combinations; ``train`` never contains the
held-out colour-shape combinations (one per colour and per shape) nor any scene
description of val or test. The same seed gives byte-identical files.

Output layout (the same format users bring their own pairs in)::

    DIR/images/{split}/{split}_000123.png
    DIR/{train,val,test}.jsonl     lines {"image": "images/...png", "caption": "..."}
    DIR/corpus.json                the vocabulary, held-out combinations, counts, seed
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "cross",
    "heart",
    "crescent",
)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 210, 30),
    "green": (44, 160, 44),
    "cyan": (23, 190, 207),
    "blue": (31, 80, 200),
    "purple": (128, 60, 180),
    "pink": (247, 129, 191),
}
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "checkered")
ARRANGEMENTS: tuple[str, ...] = ("row", "column")  # row: left to right; column: top to bottom

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# One held-out shape per colour and one colour per shape (a Latin-square diagonal):
# these combinations never occur in train, so test measures compositional generalisation.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    (COLOR_NAMES[i], SHAPES[(3 * i + 1) % len(SHAPES)]) for i in range(len(COLOR_NAMES))
)
# Probability of a scene having 1, 2 or 3 objects: fewer single-object scenes, whose
# description space is small (512), so train repeats them less.
COUNT_WEIGHTS: tuple[float, float, float] = (0.2, 0.4, 0.4)


@dataclass(frozen=True)
class Obj:
    """One object of a scene."""

    size: str
    color: str
    shape: str

    def phrase(self) -> str:
        """'a small red circle' / 'an orange star'."""
        words = f"{self.size} {self.color} {self.shape}"
        return ("an " if words[0] in "aeiou" else "a ") + words


@dataclass(frozen=True)
class Scene:
    """A scene description: background, arrangement and objects in reading order.

    For a ``row`` the objects go left to right, for a ``column`` top to bottom.
    """

    background: str
    arrangement: str
    objects: tuple[Obj, ...]

    def key(self) -> str:
        """A canonical string: two scenes with the same key are the same description."""
        objs = ",".join(f"{o.size} {o.color} {o.shape}" for o in self.objects)
        arrangement = self.arrangement if len(self.objects) > 1 else "single"
        return f"{self.background}|{arrangement}|{objs}"

    def combos(self) -> set[tuple[str, str]]:
        """The colour-shape combinations present."""
        return {(o.color, o.shape) for o in self.objects}


def captions(scene: Scene) -> list[str]:
    """Four paraphrases of the scene, each naming every attribute and the spatial order."""
    bg = scene.background
    objs = [o.phrase() for o in scene.objects]
    if len(objs) == 1:
        (a,) = objs
        return [
            f"{a} on a {bg} background",
            f"a {bg} background with {a}",
            f"a single {a.split(' ', 1)[1]} against {bg}",
            f"there is {a} on {bg}",
        ]
    if len(objs) == 2:
        a, b = objs
        if scene.arrangement == "row":
            return [
                f"{a} to the left of {b} on a {bg} background",
                f"{b} to the right of {a}, {bg} background",
                f"on a {bg} background, {a} is left of {b}",
                f"{a} and {b} side by side on {bg}, the {a.split(' ', 1)[1]} on the left",
            ]
        return [
            f"{a} above {b} on a {bg} background",
            f"{b} below {a}, {bg} background",
            f"on a {bg} background, {a} is on top of {b}",
            f"{a} and {b} stacked on {bg}, the {a.split(' ', 1)[1]} at the top",
        ]
    a, b, c = objs
    if scene.arrangement == "row":
        return [
            f"from left to right: {a}, {b} and {c} on a {bg} background",
            f"from right to left: {c}, {b} and {a}, {bg} background",
            f"{b} between {a} on the left and {c} on the right, on a {bg} background",
            f"three shapes in a row on {bg}: {a}, then {b}, then {c}",
        ]
    return [
        f"from top to bottom: {a}, {b} and {c} on a {bg} background",
        f"from bottom to top: {c}, {b} and {a}, {bg} background",
        f"{b} between {a} above and {c} below, on a {bg} background",
        f"three shapes in a column on {bg}: {a}, then {b}, then {c}",
    ]


def sample_scene(rng: random.Random, allow_held_out: bool) -> Scene:
    """Draw a random scene; without ``allow_held_out`` no object uses a held-out combination."""
    n = rng.choices((1, 2, 3), weights=COUNT_WEIGHTS)[0]
    objects = []
    while len(objects) < n:
        obj = Obj(rng.choice(SIZES), rng.choice(COLOR_NAMES), rng.choice(SHAPES))
        if allow_held_out or (obj.color, obj.shape) not in HELD_OUT:
            objects.append(obj)
    return Scene(rng.choice(BACKGROUNDS), rng.choice(ARRANGEMENTS), tuple(objects))


# ---------------------------------------------------------------------------- rendering

_SUPERSAMPLE = 3  # draw large, then downsample: antialiased edges with plain ImageDraw


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple]:
    """Polygon vertices of a shape of radius r centred on (cx, cy), rotated by rot radians."""

    def poly(radii_angles: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [
            (cx + rr * math.cos(a + rot), cy + rr * math.sin(a + rot)) for rr, a in radii_angles
        ]

    up = -math.pi / 2
    if shape == "circle":
        return poly([(r, 2 * math.pi * i / 48) for i in range(48)])
    if shape == "square":
        return poly([(r * 0.92, math.pi / 4 + math.pi / 2 * i) for i in range(4)])
    if shape == "diamond":
        return poly([(r, math.pi / 2 * i) for i in range(4)])
    if shape == "triangle":
        return poly([(r, up + 2 * math.pi * i / 3) for i in range(3)])
    if shape == "star":
        return poly([(r if i % 2 == 0 else r * 0.42, up + math.pi * i / 5) for i in range(10)])
    if shape == "cross":
        w = r * 0.36
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w)]
        pts += [(-r, w), (-r, -w), (-w, -w)]
        return [
            (cx + x * math.cos(rot) - y * math.sin(rot), cy + x * math.sin(rot) + y * math.cos(rot))
            for x, y in pts
        ]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x * r / 16.5, -(y + 2.5) * r / 16.5))
        return [
            (cx + x * math.cos(rot) - y * math.sin(rot), cy + x * math.sin(rot) + y * math.cos(rot))
            for x, y in pts
        ]
    if shape == "crescent":
        # Outer circle minus an offset inner circle, traced as one polygon.
        outer = [(r, math.pi / 2 + math.pi * i / 24) for i in range(25)]  # left half
        pts = [(cx + rr * math.cos(a + rot), cy + rr * math.sin(a + rot)) for rr, a in outer]
        ox, oy = cx + 0.45 * r * math.cos(rot), cy + 0.45 * r * math.sin(rot)
        ri = r * 0.82
        inner = []
        for i in range(25):
            a = 3 * math.pi / 2 - math.pi * i / 24 + rot
            inner.append((ox + ri * math.cos(a) - 0.3 * r * math.cos(rot), oy + ri * math.sin(a)))
        return pts + inner
    raise ValueError(f"unknown shape {shape!r}")


def _background(draw: ImageDraw.ImageDraw, name: str, size: int, rng: random.Random) -> None:
    shade = rng.randint(-12, 12)
    if name == "white":
        draw.rectangle([0, 0, size, size], fill=(245 + shade // 3,) * 3)
    elif name == "black":
        draw.rectangle([0, 0, size, size], fill=(18 + shade // 2,) * 3)
    elif name == "gray":
        draw.rectangle([0, 0, size, size], fill=(128 + shade,) * 3)
    elif name == "checkered":
        cells = rng.choice((4, 6, 8))
        step = size / cells
        light, dark = (225 + shade // 2,) * 3, (185 + shade // 2,) * 3
        for i in range(cells):
            for j in range(cells):
                x0, y0 = i * step, j * step
                draw.rectangle(
                    [x0, y0, x0 + step, y0 + step], fill=light if (i + j) % 2 == 0 else dark
                )
    else:
        raise ValueError(f"unknown background {name!r}")


def render(scene: Scene, rng: random.Random, size: int = 128) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(img)
    _background(draw, scene.background, big, rng)
    n = len(scene.objects)
    slot = big / max(n, 1)
    # A shared offset across the row/column plus small per-object jitter: the reading
    # order stays unambiguous and the objects never overlap.
    across = big / 2 + rng.uniform(-0.12, 0.12) * big
    for i, obj in enumerate(scene.objects):
        base = 0.30 if obj.size == "large" else 0.17
        r = big * base / 2 * rng.uniform(0.92, 1.08) * (1.0 if n < 3 else 0.95)
        along = slot * (i + 0.5) + rng.uniform(-0.08, 0.08) * slot
        jitter = rng.uniform(-0.03, 0.03) * big
        cx, cy = (
            (along, across + jitter) if scene.arrangement == "row" else (across + jitter, along)
        )
        if n == 1:
            cx, cy = big / 2 + rng.uniform(-0.2, 0.2) * big, big / 2 + rng.uniform(-0.2, 0.2) * big
        rot = math.radians(rng.uniform(-10, 10))
        color = tuple(max(0, min(255, c + rng.randint(-14, 14))) for c in COLORS[obj.color])
        draw.polygon(_shape_points(obj.shape, cx, cy, r, rot), fill=color)
    return img.resize((size, size), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class CorpusSpec:
    """What ``write_corpus`` generates."""

    seed: int = 0
    train_size: int = 30_000
    val_size: int = 1_000
    test_size: int = 1_000
    image_size: int = 128


def _rng(seed: int, *parts: object) -> random.Random:
    # Independent, order-free streams: image i of a split draws the same numbers however
    # the work is split across processes.
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def plan_splits(spec: CorpusSpec) -> dict[str, list[Scene]]:
    """Choose every split's scenes (no rendering)."""
    rng = _rng(spec.seed, "plan")
    taken: set[str] = set()

    def distinct(count: int) -> list[Scene]:
        out = []
        while len(out) < count:
            scene = sample_scene(rng, allow_held_out=True)
            if scene.key() not in taken:
                taken.add(scene.key())
                out.append(scene)
        return out

    test = distinct(spec.test_size)
    val = distinct(spec.val_size)
    train = []
    while len(train) < spec.train_size:
        scene = sample_scene(rng, allow_held_out=False)
        if scene.key() not in taken:  # val/test descriptions never appear in train
            train.append(scene)
    return {"train": train, "val": val, "test": test}


def render_image(spec: CorpusSpec, split: str, index: int, scene: Scene) -> Image.Image:
    """Image ``index`` of ``split`` as the corpus draws it (its own random stream).

    Drawing another scene of the same object count here gives the same layout.
    """
    return render(scene, _rng(spec.seed, split, index), spec.image_size)


def _render_png(args: tuple[CorpusSpec, str, int, Scene]) -> bytes:
    buf = io.BytesIO()
    render_image(*args).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _jobs(spec: CorpusSpec, split: str, scenes: list[Scene]) -> Iterator[tuple]:
    for i, scene in enumerate(scenes):
        yield spec, split, i, scene


def write_corpus(
    out: Path, spec: CorpusSpec, workers: int = 1, progress: bool = True
) -> dict[str, int]:
    """Write images, JSONL pair files and corpus.json under ``out``; returns image counts."""
    from tqdm import tqdm

    out = Path(out)
    plan = plan_splits(spec)
    counts: dict[str, int] = {}
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for split, scenes in plan.items():
            img_dir = out / "images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            jobs = list(_jobs(spec, split, scenes))
            pngs = pool.map(_render_png, jobs, chunksize=64) if pool else map(_render_png, jobs)
            lines = []
            bar = tqdm(total=len(jobs), desc=f"{split:5s}", unit="img", disable=not progress)
            for i, (scene, png) in enumerate(zip(scenes, pngs, strict=True)):
                rel = f"images/{split}/{split}_{i:06d}.png"
                (out / rel).write_bytes(png)
                lines += [json.dumps({"image": rel, "caption": c}) for c in captions(scene)]
                bar.update()
            bar.close()
            (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            counts[split] = len(scenes)
    finally:
        if pool:
            pool.shutdown()
    meta = {
        # The format's name, kept from when the generator lived in crossmodal/: corpora
        # already written carry it, and counterfactual.demo_images checks it.
        "generator": "crossmodal.corpus",
        "spec": asdict(spec),
        "counts": counts,
        "shapes": list(SHAPES),
        "colors": list(COLOR_NAMES),
        "sizes": list(SIZES),
        "backgrounds": list(BACKGROUNDS),
        "held_out_combinations": sorted(f"{c} {s}" for c, s in HELD_OUT),
    }
    (out / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return counts
