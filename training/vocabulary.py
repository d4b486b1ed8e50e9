"""The demo corpus's words: what a scene is made of, the synonyms each value may be
called by, and how a scene (or a true part of it) is phrased as a caption.

One place for the vocabulary: ``corpus`` re-exports the names (``SHAPES``, ``COLORS``,
``Obj``, ``Scene``, ``captions``...) so code that imports them from there keeps working.

Two caption styles:

- ``captions(scene)``: the four fixed templates of the flat corpus, canonical words only,
  each naming the whole scene (kept byte-for-byte: the shipped models were trained on it).
- ``describe(scene, rng, ...)``: free paraphrases with synonyms, built from a ``Claim``
  (which objects are named, which of their attributes, whether their order and the
  background are stated). A claim only ever copies values from the scene, so every
  caption is true of its image; a *partial* claim leaves out objects, sizes or the
  background (what people type) and is still true.

Synonyms come in two sets: ``SYNONYMS`` (train, val and test captions) and
``HELD_OUT_SYNONYMS`` (only in test-shifted captions), so test-shifted measures
whether a model understands a word it never saw paired with a picture.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

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
# The flat style's RGB for each colour name (the varied style samples a range around it,
# see styles.COLOR_RANGES).
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

# Words for each value in train/val/test captions besides its canonical name (which
# comes first in ``SYNONYMS``). A synonym must name the value unambiguously (no "ring"
# for circle, no "navy" for a blue that may be light, no "amber" between orange and
# yellow). Black has none.
_OTHER_WORDS: dict[str, str] = {
    "shape": "circle=disc, square=box, triangle=triangular shape, diamond=rhombus, "
    "star=five-pointed star, cross=greek cross, heart=heart shape, crescent=crescent shape",
    "color": "red=scarlet, orange=tangerine, yellow=lemon-yellow, green=grass-green, "
    "cyan=turquoise, blue=royal blue, purple=violet, pink=rose",
    "size": "small=little, large=big",
    "background": "white=plain white, black=, gray=grey, checkered=checkerboard",
}


def _word_table(spec: str) -> dict[str, tuple[str, ...]]:
    """'circle=disc, black=' -> {"circle": ("circle", "disc"), "black": ("black",)}."""
    table = {}
    for entry in spec.split(", "):
        value, other = entry.split("=")
        table[value] = (value, other) if other else (value,)
    return table


SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    kind: _word_table(spec) for kind, spec in _OTHER_WORDS.items()
}
# Only in test-shifted captions; none is a word of a SYNONYMS phrase, so a model cannot
# have seen it in training.
HELD_OUT_SYNONYMS: dict[str, dict[str, str]] = {
    "shape": {
        "circle": "dot",
        "square": "block",
        "triangle": "pyramid",
        "diamond": "lozenge",
        "star": "pentagram",
        "cross": "plus sign",
        "heart": "valentine",
        "crescent": "moon",
    },
    "color": {
        "red": "crimson",
        "orange": "pumpkin",
        "yellow": "golden",
        "green": "emerald",
        "cyan": "aqua",
        "blue": "cobalt",
        "purple": "amethyst",
        "pink": "fuchsia",
    },
    "size": {"small": "tiny", "large": "huge"},
    "background": {
        "white": "snow-white",
        "black": "pitch-black",
        "gray": "slate",
        "checkered": "chessboard",
    },
}
# Relation phrases: (first object) PHRASE (second object), where first is the left one of
# a row or the upper one of a column ("before"), or the other way round ("after").
RELATIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("row", "before"): ("to the left of", "left of", "on the left of"),
    ("row", "after"): ("to the right of", "right of", "on the right of"),
    ("column", "before"): ("above", "on top of", "higher than"),
    ("column", "after"): ("below", "beneath", "lower than"),
}
HELD_OUT_RELATIONS: dict[tuple[str, str], str] = {
    ("row", "before"): "on the left-hand side of",
    ("row", "after"): "on the right-hand side of",
    ("column", "before"): "over",
    ("column", "after"): "under",
}
# Reading orders of a list of three: forward is left to right / top to bottom.
ORDERS: dict[tuple[str, str], str] = {
    ("row", "forward"): "left to right",
    ("row", "backward"): "right to left",
    ("column", "forward"): "top to bottom",
    ("column", "backward"): "bottom to top",
}


def spatial_opposites() -> dict[str, str]:
    """Each spatial phrase the captions use -> the phrase of the reversed order: the
    relations pair by position ("on top of" <-> "beneath", not "on bottom of"), reading
    orders and held-out relations with their opposites, and the single words of the
    flat templates' free wording ("the circle on the left", "at the top")."""
    out = {"left": "right", "right": "left", "above": "below", "below": "above"}
    out |= {"top": "bottom", "bottom": "top"}
    for arr in ARRANGEMENTS:
        pairs = [
            *zip(RELATIONS[arr, "before"], RELATIONS[arr, "after"], strict=True),
            (HELD_OUT_RELATIONS[arr, "before"], HELD_OUT_RELATIONS[arr, "after"]),
            (ORDERS[arr, "forward"], ORDERS[arr, "backward"]),
        ]
        for a, b in pairs:
            out[a], out[b] = b, a
    return out


# Free wording around the description (none holds a held-out word: no "over").
_LEADS = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "there is ", "this shows ")
_BACKDROPS = (
    "on a {} background",
    "against a {} backdrop",
    "with a {} background",
    "set on a {} background",
    "on {}",
)
HELD_OUT_SYNONYM_P = 0.5  # test-shifted: chance that a word slot takes its held-out synonym


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


# ---------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Mention:
    """An object as a caption names it: which scene object, and which attributes."""

    index: int  # position in Scene.objects
    size: bool = True
    color: bool = True


@dataclass(frozen=True)
class Claim:
    """What a caption asserts about its scene; every value it implies is the scene's.

    Mentions are in reading order (increasing index). ``ordered``: the caption states
    their order (left/right, above/below); otherwise it only says they are there.
    """

    mentions: tuple[Mention, ...]
    ordered: bool
    background: bool

    def is_full(self, scene: Scene) -> bool:
        """Whether the claim names the whole scene (every object, attribute, order, background)."""
        every = all(m.size and m.color for m in self.mentions)
        n = len(scene.objects)
        return len(self.mentions) == n and every and self.background and (self.ordered or n == 1)


def full_claim(scene: Scene) -> Claim:
    """The claim naming everything in ``scene``."""
    return Claim(tuple(Mention(i) for i in range(len(scene.objects))), True, True)


def partial_claim(scene: Scene, rng: random.Random) -> Claim:
    """A true but incomplete claim: some objects, maybe without size or background.

    Colour and shape are always named (binding them is what a search must get right);
    at least one thing is left out.
    """
    n = len(scene.objects)
    while True:
        keep = sorted(rng.sample(range(n), rng.randint(1, n)))
        mentions = tuple(Mention(i, size=rng.random() < 0.4) for i in keep)
        claim = Claim(mentions, len(keep) > 1 and rng.random() < 0.7, rng.random() < 0.4)
        if not claim.is_full(scene):
            return claim


class Lexicon:
    """Picks the words of a caption: train synonyms, or (test-shifted) held-out ones too."""

    def __init__(self, rng: random.Random, held_out: bool) -> None:
        self.rng = rng
        self.held_out = held_out
        self.used_held_out = False

    def word(self, kind: str, value: str, force_held_out: bool = False) -> str:
        """A name for ``value`` of attribute ``kind`` (shape, color, size, background)."""
        if self.held_out and (force_held_out or self.rng.random() < HELD_OUT_SYNONYM_P):
            self.used_held_out = True
            return HELD_OUT_SYNONYMS[kind][value]
        return self.rng.choice(SYNONYMS[kind][value])

    def relation(self, arrangement: str, direction: str) -> str:
        """A relation phrase: ``direction`` is "before" (left/above) or "after"."""
        if self.held_out and self.rng.random() < HELD_OUT_SYNONYM_P:
            self.used_held_out = True
            return HELD_OUT_RELATIONS[arrangement, direction]
        return self.rng.choice(RELATIONS[arrangement, direction])


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _object(obj: Obj, mention: Mention, lex: Lexicon, force_held_out: bool = False) -> str:
    shape = lex.word("shape", obj.shape, force_held_out)
    size = lex.word("size", obj.size) + " " if mention.size else ""
    if mention.color and lex.rng.random() < 0.2:  # "a large star in blue"
        return _article(f"{size}{shape} in {lex.word('color', obj.color)}")
    color = lex.word("color", obj.color) + " " if mention.color else ""
    return _article(f"{size}{color}{shape}")


def _order_words(scene: Scene, lex: Lexicon, n: int, order: str) -> str:
    """'from left to right:' and the like, for a list of n >= 3 objects read in ``order``
    ("forward": left to right or top to bottom; "backward": the reverse)."""
    count = ("two", "three")[n - 2]
    phrase = ORDERS[scene.arrangement, order]
    return lex.rng.choice(
        (f"from {phrase}:", f"{count} shapes in a {scene.arrangement}, {phrase}:")
    )


def realise(scene: Scene, claim: Claim, lex: Lexicon) -> str:
    """The words for ``claim``: one free paraphrase, drawn from ``lex``'s stream."""
    rng = lex.rng
    force = lex.held_out and rng.random() < 0.5  # test-shifted: one held-out word at least
    objs = [
        _object(scene.objects[m.index], m, lex, force and k == 0)
        for k, m in enumerate(claim.mentions)
    ]
    if len(objs) == 1:
        body = objs[0]
    elif not claim.ordered:
        joint = (
            " and " if len(objs) > 2 else rng.choice((" and ", " together with ", " as well as "))
        )
        body = ", ".join(objs[:-1]) + joint + objs[-1]
    elif len(objs) == 2:
        a, b = objs
        if rng.random() < 0.5:
            body = f"{a} {lex.relation(scene.arrangement, 'before')} {b}"
        else:
            body = f"{b} {lex.relation(scene.arrangement, 'after')} {a}"
    else:  # read either way, as a person might ("from right to left: ...")
        order = rng.choice(("forward", "backward"))
        if order == "backward":
            objs = objs[::-1]
        body = f"{_order_words(scene, lex, len(objs), order)} " + ", ".join(objs[:-1]) + " and "
        body += objs[-1]
    lead = rng.choice(_LEADS)
    text = (lead if not body.startswith("from") else "") + body  # no "a picture of from..."
    if claim.background:
        bg = lex.word("background", scene.background)
        if rng.random() < 0.2 and not body.startswith("from"):
            text = f"{_article(bg)} background with {body}"
        else:
            text += " " + rng.choice(_BACKDROPS).format(bg)
    return text


T = TypeVar("T")


class RecordedDraws:
    """A random stream that records its draws (``random`` floats, ``choice`` indices),
    the two calls ``describe`` makes, so ``ReplayedDraws`` can phrase another scene of
    the same shape with the same choices."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.draws: list[float | int] = []

    def random(self) -> float:
        """``rng.random()``, recorded."""
        x = self.rng.random()
        self.draws.append(x)
        return x

    def choice(self, seq: Sequence[T]) -> T:
        """``rng.choice(seq)`` (the same draw), recorded as the index taken."""
        x = self.rng.choice(seq)
        self.draws.append(seq.index(x))
        return x


class ReplayedDraws:
    """The draws of a ``RecordedDraws`` again, in order: a choice takes the recorded
    index (modulo the options, as another value may have fewer synonyms)."""

    def __init__(self, draws: list[float | int]) -> None:
        self._draws = iter(draws)

    def random(self) -> float:
        """The next recorded float."""
        return float(next(self._draws))

    def choice(self, seq: Sequence[T]) -> T:
        """The option at the next recorded index."""
        return seq[int(next(self._draws)) % len(seq)]


def rephrase(caption_draws: list[float | int], scene: Scene, claim: Claim) -> str:
    """The caption ``describe`` drew with ``caption_draws`` (``RecordedDraws.draws``),
    said of ``scene`` instead: the same lead, template, mention order, relation phrase
    and synonym picks, with ``scene``'s values. For a counterfactual twin (same object
    count) the result differs from the original caption only where the twin does."""
    return realise(scene, claim, Lexicon(ReplayedDraws(caption_draws), held_out=False))  # type: ignore[arg-type]


def describe(scene: Scene, rng: random.Random, claim: Claim, held_out: bool = False) -> str:
    """A caption of ``claim`` about ``scene``; ``held_out``: a test-shifted caption, with at
    least one held-out synonym."""
    while True:
        lex = Lexicon(rng, held_out)
        text = realise(scene, claim, lex)
        if lex.used_held_out or not held_out:
            return text
