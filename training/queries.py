"""Query sets of the demo corpus: short, partial queries derived from scene structure.

People type "a red circle" or "two stars", not the generator's full captions. For a
split's scenes this module writes such queries with every image they are true of, the
query-set format ``xmodal eval --queries`` reads (JSONL ``{"query": text, "kind": kind,
"relevant": [image paths]}``, paths as in the split's pairs file). Kinds (``KINDS``):

- ``shape``: "a star" (a scene with at least one star)
- ``colour_shape``: "a red circle" (an object that is a red circle, any size)
- ``two_objects``: "a green star and a blue heart" (both present, in any place)
- ``background``: "a red circle on a black background"
- ``relation``: "a yellow cross to the left of a pink square" (a row with the cross
  before the square, other objects in between or not), "... to the right of ...",
  "... above ..." / "... below ..." (a column, read top to bottom)
- ``count``: "two stars" (exactly two stars, any colours)

Relevance is by construction: every query true of a scene is enumerated from that
scene (``true_queries``), so a query's relevant images are exactly the scenes that
enumerate it. Each kind keeps at most its split's bound (``QUERY_SPLITS``), queries with
several relevant images first; the choice and the wording's order are drawn from the
corpus seed, so the same seed gives the same bytes. The words are the generator's
canonical ones (``vocabulary``): its colour, shape and background names and the first
of its relation phrases; no synonyms, in test-shifted either.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from .vocabulary import RELATIONS, Scene

KINDS: tuple[str, ...] = ("shape", "colour_shape", "two_objects", "background", "relation", "count")
# Splits that get a query file, and the most queries of one kind each keeps: val tunes
# (fewer keeps tuning quick), test and test-shifted report.
QUERY_SPLITS: dict[str, int] = {"val": 30, "test": 50, "test-shifted": 50}
# Queries with at least this many relevant images are preferred over the rest: a
# ranking with several right answers is what a search engine is judged on.
SEVERAL = 2
# Counted queries: exactly this many objects of a shape (a scene holds at most three).
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}


def queries_file(split: str) -> str:
    """The query file's name beside the split's pairs file: 'queries-test.jsonl'."""
    return f"queries-{split}.jsonl"


def queries_beside(pairs_file: str | Path) -> Path | None:
    """The query set over a pairs file's images, where there is one beside it
    (``queries-val.jsonl`` beside ``val.jsonl``, as ``write_queries`` names them)."""
    path = Path(pairs_file).with_name(queries_file(Path(pairs_file).stem))
    return path if path.is_file() else None


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


Target = tuple[str | None, str]  # (colour or None: any colour, shape)


@dataclass(frozen=True)
class SceneQuery:
    """One query, as structure: its kind, one or two targets, and what else it asks.

    ``targets`` of ``two_objects`` are in canonical (sorted) order; of ``relation``, in
    reading order (the first left of / above the second in ``arrangement``).
    """

    kind: str
    targets: tuple[Target, ...]
    background: str | None = None
    arrangement: str | None = None
    count: int | None = None

    def text(self, flip: bool = False) -> str:
        """The query's words; ``flip`` names the targets the other way round ("B to the
        right of A" for "A to the left of B", "B and A" for "A and B")."""
        phrases = [_article(f"{c} {s}" if c else s) for c, s in self.targets]
        if self.kind == "count":
            assert self.count is not None
            return f"{COUNT_WORDS[self.count]} {_plural(self.targets[0][1])}"
        if self.kind == "two_objects":
            a, b = reversed(phrases) if flip else phrases
            return f"{a} and {b}"
        if self.kind == "relation":
            assert self.arrangement is not None
            # The canonical phrase (each list's first): "to the left of", "below"...
            direction = "after" if flip else "before"
            phrase = RELATIONS[self.arrangement, direction][0]
            a, b = reversed(phrases) if flip else phrases
            return f"{a} {phrase} {b}"
        if self.kind == "background":
            return f"{phrases[0]} on a {self.background} background"
        return phrases[0]


def true_queries(scene: Scene) -> set[SceneQuery]:
    """Every query of every kind that is true of the scene (at most two targets)."""
    combos = [(o.color, o.shape) for o in scene.objects]
    distinct = sorted(set(combos))
    out: set[SceneQuery] = set()
    for shape in {s for _, s in combos}:
        out.add(SceneQuery("shape", ((None, shape),)))
        n = sum(s == shape for _, s in combos)
        if n in COUNT_WORDS:
            out.add(SceneQuery("count", ((None, shape),), count=n))
    for combo in distinct:
        out.add(SceneQuery("colour_shape", (combo,)))
        out.add(SceneQuery("background", (combo,), background=scene.background))
    for a, b in combinations(distinct, 2):
        out.add(SceneQuery("two_objects", (a, b)))
    # Objects are in reading order; a relation between two of the same colour and shape
    # is true both ways round and tests no binding, so it is left out.
    for i, j in combinations(range(len(combos)), 2):
        if combos[i] != combos[j]:
            out.add(SceneQuery("relation", (combos[i], combos[j]), arrangement=scene.arrangement))
    return out


def derive_queries(
    scenes: list[Scene], images: list[str], seed: int, split: str, per_kind: int
) -> list[dict]:
    """The query rows of one split: at most ``per_kind`` of each kind, each true of at
    least one scene. ``images[i]`` is scene i's image path as the pairs file writes it."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} image paths for {len(scenes)} scenes of {split}")
    found: dict[SceneQuery, list[int]] = {}
    for i, scene in enumerate(scenes):
        for query in true_queries(scene):
            found.setdefault(query, []).append(i)
    # A string seed is hashed with SHA-512 by random: the same on every run and platform.
    rng = random.Random(f"xmodal-queries:{seed}:{split}")
    rows = []
    for kind in KINDS:
        candidates = sorted((q for q in found if q.kind == kind), key=SceneQuery.text)
        rng.shuffle(candidates)
        candidates.sort(key=lambda q: len(found[q]) < SEVERAL)  # stable: several first
        for query in sorted(candidates[:per_kind], key=SceneQuery.text):
            rows.append(
                {
                    "query": query.text(flip=rng.random() < 0.5),
                    "kind": kind,
                    "relevant": [images[i] for i in found[query]],
                }
            )
    return rows


def _pair_images(pairs_file: Path) -> list[str]:
    """A pairs file's image paths in the order they first appear (scene order)."""
    seen: dict[str, None] = {}
    for line in pairs_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            seen.setdefault(json.loads(line)["image"], None)
    return list(seen)


def write_queries(out: Path, plan: dict[str, list[Scene]], seed: int) -> dict[str, int]:
    """Write ``queries-{split}.jsonl`` beside each ``{split}.jsonl`` of a written corpus
    for the splits of ``QUERY_SPLITS`` that ``plan`` holds; returns query counts."""
    counts: dict[str, int] = {}
    for split, per_kind in QUERY_SPLITS.items():
        if split not in plan:
            continue
        # Image paths from the pairs file just written: its naming is defined once, there.
        images = _pair_images(Path(out) / f"{split}.jsonl")
        rows = derive_queries(plan[split], images, seed, split, per_kind)
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (Path(out) / queries_file(split)).write_text(text, encoding="utf-8")
        counts[split] = len(rows)
    return counts
