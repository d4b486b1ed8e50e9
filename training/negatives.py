"""Compositional negatives: a caption with two attributes or its relations swapped.

"a small red circle left of a large blue star" becomes "a small blue circle left of a
large red star" (colours swapped), "... red star left of ... blue circle" (shapes), or
"... right of ..." (relation flipped). The words are the same, so a bag-of-words
model cannot tell the two apart; binding them to the right objects can (the ARO /
SugarCrepe style of test). Used to train the reranker and to measure it.
"""

from __future__ import annotations

import random
import re

from .corpus import COLOR_NAMES, SHAPES, SIZES
from .vocabulary import spatial_opposites

ATTRIBUTES: dict[str, frozenset[str]] = {
    "color": frozenset(COLOR_NAMES) | {"white", "black", "gray", "grey", "brown"},
    "shape": frozenset(SHAPES),
    "size": frozenset(SIZES) | {"big", "tiny"},
}
# Longest phrase first, whole words only: "on top of" flips as a phrase, not as "top".
RELATION_FLIP = spatial_opposites()
_RELATION = re.compile(
    r"\b(" + "|".join(re.escape(p) for p in sorted(RELATION_FLIP, key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)
_SPLIT = re.compile(r"(\W+)")


def swaps(caption: str) -> list[tuple[str, str]]:
    """Every (kind, negative caption) obtainable by one swap; none equal the input."""
    parts = _SPLIT.split(caption)
    out: list[tuple[str, str]] = []
    seen = {caption}
    for kind, words in ATTRIBUTES.items():
        where = [i for i, p in enumerate(parts) if p.lower() in words]
        for a in range(len(where)):
            for b in range(a + 1, len(where)):
                i, j = where[a], where[b]
                if parts[i].lower() == parts[j].lower():
                    continue
                new = list(parts)
                new[i], new[j] = parts[j], parts[i]
                text = "".join(new)
                if text not in seen:
                    seen.add(text)
                    out.append((kind, text))
    text = relation_flip(caption)
    if text is not None and text not in seen:
        out.append(("relation", text))
    return out


def relation_flip(caption: str) -> str | None:
    """The caption with every spatial phrase flipped to its opposite ("left of" <->
    "right of", "on top of" <-> "beneath", "from left to right" <-> "from right to
    left"; ``vocabulary.spatial_opposites``), or None when it has none. It describes
    the objects' order reversed, in words the captions themselves use.
    """
    text = _RELATION.sub(lambda m: RELATION_FLIP[m.group(1).lower()], caption)
    return text if text != caption else None


def relation_phrase(caption: str) -> str | None:
    """The caption's first spatial phrase ("to the left of", "from right to left"), the
    one a relation flip turns first; None without one."""
    m = _RELATION.search(caption)
    return m.group(1).lower() if m else None


def negative(caption: str, rng: random.Random, avoid: set[str] | None = None) -> str | None:
    """One random compositional negative, or None when no swap changes the caption.

    ``avoid`` holds texts that are true of the image (its other captions): a swap that
    lands on one of them is not a negative.
    """
    options = [t for _, t in swaps(caption) if not avoid or t not in avoid]
    return rng.choice(options) if options else None


def swap_kind(caption: str, twin: str) -> str | None:
    """Which swap turns ``caption`` into ``twin`` ("color", "shape", "size", "relation")."""
    return next((kind for kind, text in swaps(caption) if text == twin), None)
