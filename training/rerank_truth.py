"""What a text says about a demo scene, checkable against any other scene: the partial
truth the reranker is trained on.

A search query is usually incomplete ("a red circle", "two stars"): it is true of every
scene that holds what it names, not only of the scene it was written for. Training a
reranker with the scene's own caption as the only positive teaches it that an
incomplete caption is a mismatch. Here every training text carries a ``Truth`` (what
it asserts), and ``holds`` decides it for any scene, so that hard negatives are images
the text is really false of, and partial texts are positives wherever they hold.

Texts come from three places: the corpus's own captions (``corpus.image_claims``: a
full caption names the whole scene and is true of that description only, a partial one
wherever its claim holds), the query kinds of ``queries`` ("a red circle on a black
background", "two stars") sampled from what is true of a scene, and structured
negatives (``false_queries``): false bindings, false relations, absent objects, wrong
backgrounds and wrong counts, each checked false of its scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import combinations, permutations

from .queries import COUNT_WORDS, SceneQuery, true_queries
from .vocabulary import BACKGROUNDS, COLOR_NAMES, SHAPES, Claim, Scene

Wanted = tuple[str | None, str | None, str]  # (size or None, colour or None, shape)


@dataclass(frozen=True)
class Truth:
    """What a text asserts about a scene.

    ``objects``: objects that must be there, each a distinct scene object; ``ordered``:
    in this reading order of ``arrangement`` (a row left to right, a column top to
    bottom; others may sit in between). ``count``: exactly that many objects of the
    first object's shape. ``exact``: a full description, true only of the scene with
    this key (it names everything, so a scene with more or other objects is not it).
    """

    objects: tuple[Wanted, ...] = ()
    ordered: bool = False
    arrangement: str | None = None
    background: str | None = None
    count: int | None = None
    exact: str | None = None


def _fits(want: Wanted, obj) -> bool:
    size, colour, shape = want
    return obj.shape == shape and colour in (None, obj.color) and size in (None, obj.size)


def holds(truth: Truth, scene: Scene) -> bool:
    """Whether ``truth`` is true of ``scene``."""
    if truth.exact is not None:
        return scene.key() == truth.exact
    if truth.background is not None and scene.background != truth.background:
        return False
    objs = scene.objects
    if truth.count is not None:
        shape = truth.objects[0][2]
        return sum(o.shape == shape for o in objs) == truth.count
    wanted = truth.objects
    if truth.ordered and len(wanted) > 1:
        if len(objs) < 2 or scene.arrangement != truth.arrangement:
            return False
        picks = combinations(range(len(objs)), len(wanted))  # increasing: reading order
    else:
        picks = permutations(range(len(objs)), len(wanted))
    return any(all(_fits(w, objs[i]) for w, i in zip(wanted, pick, strict=True)) for pick in picks)


def claim_truth(scene: Scene, claim: Claim) -> Truth:
    """The truth of a corpus caption of ``scene`` with this claim."""
    if claim.is_full(scene):
        return Truth(exact=scene.key())
    objs = [scene.objects[m.index] for m in claim.mentions]
    objects = tuple(
        (o.size if m.size else None, o.color if m.color else None, o.shape)
        for o, m in zip(objs, claim.mentions, strict=True)
    )
    return Truth(
        objects=objects,
        ordered=claim.ordered and len(objects) > 1,
        arrangement=scene.arrangement if claim.ordered else None,
        background=scene.background if claim.background else None,
    )


def query_truth(query: SceneQuery) -> Truth:
    """The truth of a query of ``queries`` (its own definition of relevance)."""
    objects = tuple((None, colour, shape) for colour, shape in query.targets)
    if query.kind == "count":
        return Truth(objects=objects, count=query.count)
    if query.kind == "relation":
        return Truth(objects=objects, ordered=True, arrangement=query.arrangement)
    return Truth(objects=objects, background=query.background)


def true_texts(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, Truth, str]]:
    """Up to ``n`` queries true of ``scene`` as (text, truth, kind), drawn without
    replacement, each phrased either way round at random."""
    options = sorted(true_queries(scene), key=SceneQuery.text)
    picked = rng.sample(options, min(n, len(options)))
    return [(q.text(flip=rng.random() < 0.5), query_truth(q), q.kind) for q in picked]


def _false_options(scene: Scene, rng: random.Random) -> list[SceneQuery]:
    """Candidate negatives of each kind (not yet checked): a swapped binding, a reversed
    relation, an object the scene lacks, another background, a wrong count."""
    combos = [(o.color, o.shape) for o in scene.objects]
    out: list[SceneQuery] = []
    for i, j in combinations(range(len(combos)), 2):
        (ca, sa), (cb, sb) = combos[i], combos[j]
        if ca != cb and sa != sb:  # "a blue circle and a red star" for red circle, blue star
            pair = tuple(sorted([(cb, sa), (ca, sb)]))
            out.append(SceneQuery("two_objects", pair))
            out.append(SceneQuery("relation", ((cb, sa), (ca, sb)), arrangement=scene.arrangement))
        if combos[i] != combos[j]:  # the order reversed
            out.append(
                SceneQuery("relation", (combos[j], combos[i]), arrangement=scene.arrangement)
            )
    colour, shape = rng.choice(combos)
    out.append(SceneQuery("colour_shape", ((rng.choice(COLOR_NAMES), shape),)))
    out.append(SceneQuery("colour_shape", ((colour, rng.choice(SHAPES)),)))
    out.append(SceneQuery("shape", ((None, rng.choice(SHAPES)),)))
    background = rng.choice([b for b in BACKGROUNDS if b != scene.background])
    out.append(SceneQuery("background", ((colour, shape),), background=background))
    counts = {s: sum(c[1] == s for c in combos) for _, s in combos}
    wrong = [(s, n) for s in counts for n in COUNT_WORDS if n != counts[s]]
    if wrong:
        s, n = rng.choice(wrong)
        out.append(SceneQuery("count", ((None, s),), count=n))
    return out


def false_queries(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Up to ``n`` queries false of ``scene`` as (text, kind), binding and relation
    negatives first where the scene has them (what only reading binding can reject)."""
    options = [q for q in _false_options(scene, rng) if not holds(query_truth(q), scene)]
    unique = list(dict.fromkeys(options))
    binding = [q for q in unique if q.kind in ("two_objects", "relation")]
    other = [q for q in unique if q.kind not in ("two_objects", "relation")]
    rng.shuffle(binding)
    rng.shuffle(other)
    return [(q.text(flip=rng.random() < 0.5), q.kind) for q in (binding + other)[:n]]
