"""Counterfactual twins of demo-corpus scenes: the same picture with its binding changed.

For a scene with two or more objects, its twin swaps one attribute (colour, shape or
size) between two objects, or reverses their order (the relation), and is rendered
with the original's random stream, so layout, jitter and shades are identical and only
the binding differs. Training the reranker on such minimal pairs (the twin's caption
is a negative for the image and a positive for the twin picture, and the other way
round) leaves it no shortcut: the two captions hold the same words and the two
pictures the same colours and shapes, so only binding words to objects separates them.

Only images of a generated demo corpus have twins: the corpus's ``corpus.json``
next to the pairs file gives the seed from which each image's scene is re-planned
(``demo_images`` finds the scene of flat and varied images alike, for
``scene_difference`` and the symmetric-scene check). A twin *caption*
(``twin_caption``) is, in the flat style, the same fixed template (``template_of``)
filled in with the twin's words; in the varied style, for a caption that names the
whole scene, the same paraphrase with the twin's words (``corpus.twin_paraphrase``:
its template and word choices replayed), so that varied twins are minimal pairs in
text as well as in pixels (a partial caption has none: what it names may hold of the
twin too).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

from PIL import Image

from .corpus import (
    HELD_OUT,
    SHIFTED,
    CorpusSpec,
    Scene,
    captions,
    describe,
    full_claim,
    image_claims,
    plan_splits,
    render_image,
    twin_paraphrase,
)

_NAME = re.compile(r"^(train|val|test|test-shifted)_(\d+)\.(png|jpg)$")
# What a corpus.json written before a spec field existed implies: the flat style (the
# only one then) and no test-shifted split.
_SPEC_BEFORE = {"style": "flat", "test_shifted_size": 0}


@dataclasses.dataclass(frozen=True)
class DemoImage:
    """Where an image of a demo corpus comes from: enough to render its twin."""

    spec: CorpusSpec
    split: str
    index: int
    scene: Scene


def demo_images(pairs_file: Path, images: list[Path]) -> list[DemoImage | None]:
    """The demo scene of each image (None where an image is not a demo corpus image).

    An image counts only if its captions could be the scene's (checked by the caller
    through ``template_of``); a pairs file without ``corpus.json`` beside it has none.
    """
    meta = Path(pairs_file).parent / "corpus.json"
    if not meta.is_file():
        return [None] * len(images)
    doc = json.loads(meta.read_text(encoding="utf-8"))
    if doc.get("generator") != "crossmodal.corpus":
        return [None] * len(images)
    spec = CorpusSpec(**{**_SPEC_BEFORE, **doc["spec"]})
    plan = plan_splits(spec)
    out: list[DemoImage | None] = []
    for path in images:
        m = _NAME.match(Path(path).name)
        scenes = plan.get(m.group(1), []) if m else []
        index = int(m.group(2)) if m else -1
        ok = m is not None and Path(path).parent.name == m.group(1) and index < len(scenes)
        out.append(DemoImage(spec, m.group(1), index, scenes[index]) if ok else None)
    return out


def template_of(scene: Scene, caption: str) -> int | None:
    """Which of the scene's paraphrases ``caption`` is (None: not a caption of it)."""
    try:
        return captions(scene).index(caption)
    except ValueError:
        return None


def _keeps_held_out(scene: Scene, twin: Scene) -> bool:
    """Whether ``twin`` brings in no held-out colour-shape combination ``scene`` lacks.

    Training scenes never hold one (test measures them as unseen), so their twins
    must not either; a scene that has one may keep it.
    """
    return (twin.combos() & HELD_OUT) <= (scene.combos() & HELD_OUT)


def twin_scene(
    scene: Scene, rng: random.Random, avoid: frozenset[str] = frozenset()
) -> Scene | None:
    """A scene that differs from ``scene`` in binding only (None for one object).

    One of: an attribute swapped between two objects that differ in it, or the
    objects' order reversed; drawn uniformly over the possible swaps, with the
    reversal weighted like a third of them (relations are one kind among four).
    Swaps that would bring in a held-out colour-shape combination, or give a scene
    whose key is in ``avoid`` (the val and test descriptions), are not drawn.
    """
    objs = scene.objects
    if len(objs) < 2:
        return None
    options: list[Scene] = []
    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            for attr in ("color", "shape", "size"):
                if getattr(objs[a], attr) == getattr(objs[b], attr):
                    continue
                swapped = list(objs)
                swapped[a] = dataclasses.replace(objs[a], **{attr: getattr(objs[b], attr)})
                swapped[b] = dataclasses.replace(objs[b], **{attr: getattr(objs[a], attr)})
                twin = Scene(scene.background, scene.arrangement, tuple(swapped))
                if _keeps_held_out(scene, twin) and twin.key() not in avoid:
                    options.append(twin)
    reverse = Scene(scene.background, scene.arrangement, tuple(reversed(objs)))
    twin = rng.choice(options + [reverse] * max(1, len(options) // 3))
    return twin if twin.key() != scene.key() and twin.key() not in avoid else None


def held_out_keys(spec: CorpusSpec) -> frozenset[str]:
    """Keys of the corpus's val, test and test-shifted scenes, which no twin may have."""
    plan = plan_splits(spec)
    return frozenset(s.key() for split in ("val", "test", SHIFTED) for s in plan.get(split, []))


def twin_caption(image: DemoImage, twin: Scene, caption: str, rng: random.Random) -> str | None:
    """The twin's caption in the form of the image's ``caption`` (None: no such form).

    Flat: the same template filled in with the twin's words. Varied: a caption that
    names the whole scene gets the same paraphrase with the twin's words
    (``twin_paraphrase``; a fresh one drawn from ``rng`` if it cannot be replayed); a
    partial caption has no twin caption (what it names may hold of the twin too).
    """
    if image.spec.style == "flat" and image.split != SHIFTED:
        k = template_of(image.scene, caption)
        return None if k is None else captions(twin)[k]
    claims = dict(image_claims(image.spec, image.split, image.index, image.scene))
    if caption not in claims or not claims[caption].is_full(image.scene):
        return None
    same_words = twin_paraphrase(image.spec, image.split, image.index, image.scene, caption, twin)
    return same_words if same_words is not None else describe(twin, rng, full_claim(twin))


def symmetric(scene: Scene) -> bool:
    """True when the objects read the same in reverse order: then flipping the caption's
    relation ("left of" -> "right of") still describes the picture: a true caption.
    """
    return len(scene.objects) > 1 and tuple(reversed(scene.objects)) == scene.objects


def reversed_order(scene: Scene, twin: Scene) -> bool:
    """Whether ``twin`` is ``scene`` with its objects in reverse order."""
    return twin.objects == tuple(reversed(scene.objects))


def scene_difference(true: Scene, other: Scene) -> tuple[str, ...]:
    """How ``other`` differs from ``true``, for sorting a reranker's mistakes.

    ("count",) for another number of objects; else any of "background", "arrangement"
    (row vs column), "order" (the same objects reversed), and per attribute "size",
    "color" or "shape" where the values differ, or "size-bind" etc. where they are the
    same values held by other objects. () for the same description.
    """
    a, b = true.objects, other.objects
    if len(a) != len(b):
        return ("count",)
    diff = []
    if true.background != other.background:
        diff.append("background")
    if len(a) > 1 and true.arrangement != other.arrangement:
        diff.append("arrangement")
    if a != b and reversed_order(true, other):
        diff.append("order")
    elif a != b:
        for attr in ("size", "color", "shape"):
            va, vb = [getattr(o, attr) for o in a], [getattr(o, attr) for o in b]
            if sorted(va) != sorted(vb):
                diff.append(attr)
            elif va != vb:
                diff.append(f"{attr}-bind")
    return tuple(diff)


def render_twin(image: DemoImage, twin: Scene) -> Image.Image:
    """The twin drawn with the original image's random stream: the same layout."""
    return render_image(image.spec, image.split, image.index, twin)
