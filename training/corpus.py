"""Deterministic synthetic scene corpus: the demo data that trains and tests the shapes model.

A scene is a background plus 1-3 objects (size, colour, shape) laid out in a row
(left to right) or a column (top to bottom). Captions are generated from the scene's
structure (``vocabulary``), so every caption is true of its image.

Two styles (``CorpusSpec.style``; ``DEFAULT_STYLE`` is flat until the shapes model and
its reranker are retrained on varied, then it switches):

- ``flat``: one RGB value per colour name, flat backdrops, 128 px PNGs, four fixed
  templates per image each naming the whole scene. The shipped models were trained on
  it; for a seed its train/val/test files are byte-identical to the generator's before
  styles existed.
- ``varied``: every image draws a render style (``styles``: gradient, noise and
  texture backdrops as well as flat ones, outlines, shaded fills, rotation, aspect and
  scale jitter, blur, JPEG recompression, several image sizes, each colour name a range
  of hues and shades) from one of the training style families; captions are free
  paraphrases with synonyms, four naming the whole scene, and in train two partial
  ones (some of the objects, no size, no background) that are still true.

Splits: ``test`` (1,000 images by default) and ``val`` hold pairwise distinct scene
descriptions, drawn over all colour-shape combinations; ``train`` never contains the
held-out colour-shape combinations (one per colour and per shape) nor any scene
description of val or test. ``test-shifted`` (300 by default, in either style) keeps
those held-out combinations and descriptions apart from train too, but is rendered in a
style family that never occurs elsewhere (``styles.HELD_OUT_FAMILY``) and captioned
with synonyms held out of every other split (``vocabulary.HELD_OUT_SYNONYMS``). Val,
test and test-shifted captions all name the whole scene, so recall@1 is well defined.
The same seed gives byte-identical files, however many rendering processes.

Output layout (the same format users bring their own pairs in)::

    DIR/images/{split}/{split}_000123.png   (.jpg for a varied image saved as JPEG)
    DIR/{train,val,test,test-shifted}.jsonl lines {"image": "images/...", "caption": "..."}
    DIR/queries-{val,test,test-shifted}.jsonl  query sets (``queries``): lines {"query":
                      "...", "kind": "...", "relevant": ["images/...", ...]}
    DIR/corpus.json   the spec (style included), vocabulary, synonyms, held-out
                      combinations and family, image formats and sizes, counts
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
from typing import ClassVar

from PIL import Image, ImageDraw

from . import styles
from .vocabulary import (
    ARRANGEMENTS,
    BACKGROUNDS,
    COLOR_NAMES,
    COLORS,
    HELD_OUT_SYNONYMS,
    SHAPES,
    SIZES,
    SYNONYMS,
    Claim,
    Obj,
    RecordedDraws,
    Scene,
    captions,
    describe,
    full_claim,
    partial_claim,
    rephrase,
)

__all__ = [
    "ARRANGEMENTS",
    "BACKGROUNDS",
    "COLORS",
    "COLOR_NAMES",
    "COUNT_WEIGHTS",
    "DEFAULT_STYLE",
    "FULL_CAPTIONS",
    "HELD_OUT",
    "PARTIAL_CAPTIONS",
    "SHAPES",
    "SHIFTED",
    "SIZES",
    "SPLITS",
    "STYLES",
    "CorpusSpec",
    "Obj",
    "Scene",
    "captions",
    "image_captions",
    "image_style",
    "plan_splits",
    "render",
    "render_image",
    "render_styled",
    "sample_scene",
    "write_corpus",
]

# One held-out shape per colour and one colour per shape (a Latin-square diagonal):
# these combinations never occur in train, so test measures compositional generalisation.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    (COLOR_NAMES[i], SHAPES[(3 * i + 1) % len(SHAPES)]) for i in range(len(COLOR_NAMES))
)
# Probability of a scene having 1, 2 or 3 objects: fewer single-object scenes, whose
# description space is small (512), so train repeats them less.
COUNT_WEIGHTS: tuple[float, float, float] = (0.2, 0.4, 0.4)
SHIFTED = "test-shifted"
SPLITS: tuple[str, ...] = ("train", "val", "test", SHIFTED)
STYLES: tuple[str, ...] = ("flat", "varied")
# Flat until the shapes model and its reranker are retrained on the varied corpus: they
# were trained on flat, and `make demo`'s figures measure them on it.
DEFAULT_STYLE = "flat"
FULL_CAPTIONS = 4  # paraphrases per image naming the whole scene (varied style)
# Partial captions per image (varied style), in train only: in val and test every
# caption names its whole scene, so text -> image recall@1 stays well defined (a
# partial caption is true of many images; the query files measure those).
PARTIAL_CAPTIONS = 2


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


def render_styled(scene: Scene, rng: random.Random, style: styles.Style) -> Image.Image:
    """Draw the scene in ``style`` (varied corpus): the supersampled RGB image, before
    ``styles.finish`` downsamples, blurs and encodes it.

    The layout follows ``render``'s (objects in reading order, never overlapping), with
    the style's scale, rotation and aspect jitter on top.
    """
    big = style.size * styles.SUPERSAMPLE
    img = styles.paint_background(scene.background, style, rng)
    n = len(scene.objects)
    slot = big / max(n, 1)
    across = big / 2 + rng.uniform(-0.12, 0.12) * big
    for i, obj in enumerate(scene.objects):
        rot, stretch = styles.object_transform(style, rng)
        base = 0.30 if obj.size == "large" else 0.17
        r = big * base / 2 * rng.uniform(0.92, 1.08) * style.scale * (1.0 if n < 3 else 0.95)
        reach = r * max(stretch, 1 / stretch)  # half the object's widest extent
        if n > 1:  # a neighbour's slot is out of reach: the order stays unambiguous
            r *= min(1.0, 0.46 * slot / reach)
            reach = r * max(stretch, 1 / stretch)
        room = max(0.0, slot / 2 - reach)
        along = slot * (i + 0.5) + rng.uniform(-0.8, 0.8) * min(room, 0.08 * slot)
        jitter = rng.uniform(-0.03, 0.03) * big
        cx, cy = (
            (along, across + jitter) if scene.arrangement == "row" else (across + jitter, along)
        )
        if n == 1:
            cx, cy = big / 2 + rng.uniform(-0.2, 0.2) * big, big / 2 + rng.uniform(-0.2, 0.2) * big
        pts = [
            (cx + x * stretch, cy + y / stretch)
            for x, y in _shape_points(obj.shape, 0.0, 0.0, r, rot)
        ]
        styles.draw_object(img, pts, obj.color, scene.background, style, rng)
    return img


# ---------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class CorpusSpec:
    """What ``write_corpus`` generates.

    ``style``: "flat" (one RGB value per colour, flat backdrops, ``image_size`` px PNGs;
    what the shipped shapes model was trained on, byte-identical to before styles
    existed) or "varied" (randomised styles, see ``styles``, at the families' sizes,
    PNG or JPEG; synonyms, free paraphrases and partial captions). The default is flat
    until the retrained models land, then it switches to varied. ``test_shifted_size``
    images of test-shifted are rendered in the held-out style family with held-out
    synonyms, in either style (0: no test-shifted split).
    """

    STYLES: ClassVar[tuple[str, ...]] = STYLES  # the choices, for the CLI

    seed: int = 0
    train_size: int = 30_000
    val_size: int = 1_000
    test_size: int = 1_000
    image_size: int = 128
    style: str = DEFAULT_STYLE
    test_shifted_size: int = 300

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown corpus style {self.style!r}; expected one of {STYLES}")


def _rng(seed: int, *parts: object) -> random.Random:
    # Independent, order-free streams: image i of a split draws the same numbers however
    # the work is split across processes.
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def plan_splits(spec: CorpusSpec) -> dict[str, list[Scene]]:
    """Choose every split's scenes (no rendering).

    test, val and test-shifted hold pairwise distinct descriptions over all colour-shape
    combinations (held-out ones included), none of them in train. In the varied style
    test-shifted is drawn before train, and train avoids it; in the flat style train is
    drawn as it always was (so the shipped models' training corpus is unchanged) and
    test-shifted avoids train instead, which leaves it few one-object scenes when train
    is large (their description space is small).
    """
    rng = _rng(spec.seed, "plan")
    taken: set[str] = set()

    def distinct(count: int, stream: random.Random) -> list[Scene]:
        out = []
        while len(out) < count:
            scene = sample_scene(stream, allow_held_out=True)
            if scene.key() not in taken:
                taken.add(scene.key())
                out.append(scene)
        return out

    test = distinct(spec.test_size, rng)
    val = distinct(spec.val_size, rng)
    shifted_rng = _rng(spec.seed, "plan", SHIFTED)  # its own stream: the others stay put
    shifted = distinct(spec.test_shifted_size, shifted_rng) if spec.style != "flat" else []
    train = []
    while len(train) < spec.train_size:
        scene = sample_scene(rng, allow_held_out=False)
        if scene.key() not in taken:  # val/test descriptions never appear in train
            train.append(scene)
    if spec.style == "flat":
        taken.update(s.key() for s in train)
        shifted = distinct(spec.test_shifted_size, shifted_rng)
    plan = {"train": train, "val": val, "test": test}
    if spec.test_shifted_size:
        plan[SHIFTED] = shifted
    return plan


def _flat(spec: CorpusSpec, split: str) -> bool:
    return spec.style == "flat" and split != SHIFTED


def image_style(spec: CorpusSpec, split: str, index: int) -> styles.Style | None:
    """The style image ``index`` of ``split`` is rendered in (None: the flat renderer).

    Drawn from its own stream, independent of the scene: a twin scene rendered at the
    same index gets the same style.
    """
    if _flat(spec, split):
        return None
    rng = _rng(spec.seed, split, index, "style")
    family = styles.HELD_OUT_FAMILY if split == SHIFTED else rng.choice(styles.TRAIN_FAMILIES)
    return styles.sample_style(family, rng)


def _encode(spec: CorpusSpec, split: str, index: int, scene: Scene) -> tuple[bytes, str]:
    """Image ``index`` of ``split`` as the file's bytes and extension."""
    style = image_style(spec, split, index)
    rng = _rng(spec.seed, split, index)
    if style is None:
        buf = io.BytesIO()
        render(scene, rng, spec.image_size).save(buf, format="PNG", optimize=False)
        return buf.getvalue(), "png"
    return styles.finish(render_styled(scene, rng, style), style), style.ext


def render_image(spec: CorpusSpec, split: str, index: int, scene: Scene) -> Image.Image:
    """Image ``index`` of ``split`` as the corpus draws it (its own random stream).

    Drawing another scene of the same object count here gives the same layout (and,
    in the varied style, the same style, JPEG artefacts included).
    """
    if _flat(spec, split):
        return render(scene, _rng(spec.seed, split, index), spec.image_size)
    data, _ = _encode(spec, split, index, scene)
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def _full_paraphrases(
    scene: Scene, rng: random.Random, held_out: bool
) -> Iterator[tuple[str, list[float | int]]]:
    """The ``FULL_CAPTIONS`` distinct full paraphrases ``image_claims`` draws from
    ``rng`` (a one-object scene may have fewer), each with the draws that made it
    (``vocabulary.RecordedDraws``, for ``rephrase``)."""
    full = full_claim(scene)
    seen: set[str] = set()
    for _ in range(8 * FULL_CAPTIONS):
        recorded = RecordedDraws(rng)
        text = describe(scene, recorded, full, held_out)  # type: ignore[arg-type]
        if text not in seen:
            seen.add(text)
            yield text, recorded.draws
            if len(seen) == FULL_CAPTIONS:
                return


def image_claims(spec: CorpusSpec, split: str, index: int, scene: Scene) -> list[tuple[str, Claim]]:
    """The captions the corpus writes for image ``index`` of ``split``, each with the
    claim it makes about the scene (what ``rerank_truth`` checks against other scenes).

    Flat style: ``captions(scene)``, each the full claim. Varied: ``FULL_CAPTIONS``
    distinct free paraphrases naming the whole scene, plus in train
    ``PARTIAL_CAPTIONS`` true partial ones. test-shifted (either style): full
    paraphrases, each with a held-out synonym.
    """
    full = full_claim(scene)
    if _flat(spec, split):
        return [(text, full) for text in captions(scene)]
    rng = _rng(spec.seed, split, index, "captions")
    out: dict[str, Claim] = {
        text: full for text, _ in _full_paraphrases(scene, rng, split == SHIFTED)
    }
    if split == "train":
        wanted = len(out) + PARTIAL_CAPTIONS
        for _ in range(8 * PARTIAL_CAPTIONS):
            claim = partial_claim(scene, rng)
            out.setdefault(describe(scene, rng, claim), claim)
            if len(out) == wanted:
                break
    return list(out.items())


def twin_paraphrase(
    spec: CorpusSpec, split: str, index: int, scene: Scene, caption: str, twin: Scene
) -> str | None:
    """``caption``, one of the full paraphrases ``image_claims`` writes for image
    ``index`` (varied style, not test-shifted), said of ``twin``: the same template and
    word choices with the twin's values (``vocabulary.rephrase``), so the two captions
    are a minimal pair. None when ``caption`` is not one of them.
    """
    if _flat(spec, split) or split == SHIFTED:
        return None
    rng = _rng(spec.seed, split, index, "captions")
    for text, draws in _full_paraphrases(scene, rng, held_out=False):
        if text == caption:
            return rephrase(draws, twin, full_claim(twin))
    return None


def image_captions(spec: CorpusSpec, split: str, index: int, scene: Scene) -> list[str]:
    """The captions the corpus writes for image ``index`` of ``split`` (``image_claims``'
    texts)."""
    return [text for text, _ in image_claims(spec, split, index, scene)]


def _render_file(args: tuple[CorpusSpec, str, int, Scene]) -> tuple[bytes, str]:
    return _encode(*args)


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
    formats: set[str] = set()
    sizes: set[int] = set()
    families: dict[str, list[str]] = {}
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for split, scenes in plan.items():
            img_dir = out / "images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            jobs = list(_jobs(spec, split, scenes))
            files = pool.map(_render_file, jobs, chunksize=64) if pool else map(_render_file, jobs)
            lines = []
            used: set[str] = set()
            bar = tqdm(total=len(jobs), desc=f"{split:5s}", unit="img", disable=not progress)
            for i, (scene, (data, ext)) in enumerate(zip(scenes, files, strict=True)):
                rel = f"images/{split}/{split}_{i:06d}.{ext}"
                (out / rel).write_bytes(data)
                caps = image_captions(spec, split, i, scene)
                lines += [json.dumps({"image": rel, "caption": c}) for c in caps]
                style = image_style(spec, split, i)
                formats.add(ext)
                sizes.add(style.size if style else spec.image_size)
                used.add(style.family if style else "flat")
                bar.update()
            bar.close()
            (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            counts[split] = len(scenes)
            families[split] = sorted(used)
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
        "image_formats": sorted(formats),
        "image_sizes": sorted(sizes),
        "style_families": families,
        "held_out_family": styles.HELD_OUT_FAMILY,
        "synonyms": SYNONYMS,
        "held_out_synonyms": HELD_OUT_SYNONYMS,
    }
    (out / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    from .queries import write_queries  # here: queries.py imports this module

    write_queries(out, plan, spec.seed)
    return counts
