"""The shipped shapes model's reranker where binding decides: a relation query ranks its
scene above the mirror scene (the same two objects the other way round) by its match
logit. Real weights, real rendering, a real bundle."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.search.engine import SearchEngine
from xmodal.training.corpus import Obj, Scene, render, sample_scene

# (query, scene it is true of); the mirror scene reverses the objects.
RELATIONS = [
    (
        "a large blue star to the left of a large red star",
        Scene("white", "row", (Obj("large", "blue", "star"), Obj("large", "red", "star"))),
    ),
    (
        "a small green circle to the left of a large yellow square",
        Scene("gray", "row", (Obj("small", "green", "circle"), Obj("large", "yellow", "square"))),
    ),
    (
        "a large purple heart above a small orange triangle",
        Scene(
            "black", "column", (Obj("large", "purple", "heart"), Obj("small", "orange", "triangle"))
        ),
    ),
]


def _mirror(scene: Scene) -> Scene:
    return Scene(scene.background, scene.arrangement, tuple(reversed(scene.objects)))


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory: pytest.TempPathFactory, default_encoder) -> SearchEngine:
    """Each relation's scene and its mirror drawn with the same layout, among 20 other
    scenes, indexed with the shapes model."""
    root = tmp_path_factory.mktemp("mirrors")
    images = root / "images"
    images.mkdir()
    for n, (_, scene) in enumerate(RELATIONS):
        for name, s in (("true", scene), ("mirror", _mirror(scene))):
            render(s, random.Random(n), 128).save(images / f"{n}-{name}.png")
    rng = random.Random(3)
    for n in range(20):
        render(sample_scene(rng, allow_held_out=False), rng, 128).save(images / f"other-{n}.png")
    bundle = root / "bundle"
    run_index(
        default_encoder,
        IndexOptions(bundle=bundle, roots=[images], workers=0, progress=False, cache_tokens=True),
    )
    return SearchEngine(bundle, default_encoder)


@pytest.mark.parametrize("n", range(len(RELATIONS)))
def test_a_relation_query_ranks_its_scene_above_the_mirror(mirrors: SearchEngine, n: int) -> None:
    query, _ = RELATIONS[n]
    hits = mirrors.text_to_images(query, k=5, rerank=True)
    assert Path(hits[0].path).name == f"{n}-true.png", [(Path(h.path).name, h.match) for h in hits]
    mirror = next(h for h in hits if Path(h.path).name == f"{n}-mirror.png")
    assert hits[0].match > mirror.match  # by the reranker's judgement, not the cosine's
