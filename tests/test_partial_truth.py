"""Partial truth for reranker training: what a text asserts is checked against scenes
(``rerank_truth``), sampled positives are true and every negative is false (checked by
parsing the words, independently of the code under test), and a run on a varied demo
corpus draws its hard negatives only from images and texts that are really false."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from test_scene_queries import is_true
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.pairs import read_pairs
from xmodal.training.corpus import CorpusSpec, Obj, Scene, image_claims, plan_splits, write_corpus
from xmodal.training.counterfactual import demo_images
from xmodal.training.queries import true_queries
from xmodal.training.rerank_features import features_for
from xmodal.training.rerank_partial import partial_truth_set
from xmodal.training.rerank_truth import (
    Truth,
    claim_truth,
    false_queries,
    holds,
    query_truth,
    true_texts,
)
from xmodal.training.vocabulary import Claim, Mention

RED_CIRCLE = Obj("small", "red", "circle")
BLUE_STAR = Obj("large", "blue", "star")
ROW = Scene("white", "row", (RED_CIRCLE, BLUE_STAR))


def test_holds_reads_binding_order_background_and_count() -> None:
    star_left = Scene("white", "row", (BLUE_STAR, RED_CIRCLE))
    column = Scene("white", "column", (RED_CIRCLE, BLUE_STAR))
    a_red_circle = Truth(objects=((None, "red", "circle"),))
    assert holds(a_red_circle, ROW) and holds(a_red_circle, star_left)
    assert not holds(Truth(objects=((None, "blue", "circle"),)), ROW)  # a false binding
    assert not holds(Truth(objects=(("large", "red", "circle"),)), ROW)  # wrong size
    left_of = Truth(objects=((None, "red", "circle"), (None, "blue", "star")), ordered=True)
    left_of = Truth(objects=left_of.objects, ordered=True, arrangement="row")
    assert holds(left_of, ROW) and not holds(left_of, star_left) and not holds(left_of, column)
    on_black = Truth(objects=a_red_circle.objects, background="black")
    assert not holds(on_black, ROW)
    two_stars = Truth(objects=((None, None, "star"),), count=2)
    assert not holds(two_stars, ROW)
    assert holds(two_stars, Scene("gray", "row", (BLUE_STAR, RED_CIRCLE, BLUE_STAR)))
    assert holds(Truth(exact=ROW.key()), ROW) and not holds(Truth(exact=ROW.key()), star_left)


def test_a_partial_claim_holds_wherever_what_it_names_is_there() -> None:
    circle_only = Claim((Mention(0, size=False),), ordered=False, background=False)
    truth = claim_truth(ROW, circle_only)
    bigger = Scene("black", "column", (BLUE_STAR, Obj("large", "red", "circle")))
    assert holds(truth, ROW) and holds(truth, bigger)
    # A full caption names the whole scene: a scene with more in it is not it.
    full = claim_truth(ROW, Claim((Mention(0), Mention(1)), ordered=True, background=True))
    assert holds(full, ROW)
    assert not holds(full, Scene("white", "row", (RED_CIRCLE, BLUE_STAR, BLUE_STAR)))


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    plan = plan_splits(CorpusSpec(seed=3, train_size=300, val_size=60, test_size=60))
    return plan["train"] + plan["val"]


def test_query_truth_agrees_with_the_query_sets_own_relevance(scenes: list[Scene]) -> None:
    # A query is relevant to exactly the scenes that enumerate it (queries.py); its
    # truth must say the same of every scene, not only of the one it came from.
    asked = sorted({q for s in scenes[:40] for q in true_queries(s)}, key=lambda q: q.text())
    for q in asked[::3]:
        truth = query_truth(q)
        for other in scenes[:150]:
            assert holds(truth, other) == (q in true_queries(other)), (q.text(), other)


def test_sampled_queries_are_true_and_negatives_false_by_their_words(
    scenes: list[Scene],
) -> None:
    rng = random.Random(0)
    kinds = set()
    for scene in scenes:
        for text, truth, kind in true_texts(scene, rng, 4):
            assert holds(truth, scene) and is_true(kind, text, scene), (text, scene)
        for text, kind in false_queries(scene, rng, 6):
            assert not is_true(kind, text, scene), (text, scene)
            kinds.add(kind)
    # Every kind of negative occurs: bindings, relations, absent objects, backgrounds, counts.
    assert kinds == {"two_objects", "relation", "colour_shape", "shape", "background", "count"}


def test_every_corpus_caption_holds_of_its_scene_and_partial_ones_of_more(
    scenes: list[Scene],
) -> None:
    spec = CorpusSpec(seed=3, train_size=300, val_size=60, test_size=60, style="varied")
    plan = plan_splits(spec)
    partial_elsewhere = 0
    for i, scene in enumerate(plan["train"][:120]):
        for _, claim in image_claims(spec, "train", i, scene):
            truth = claim_truth(scene, claim)
            assert holds(truth, scene)
            others = [s for s in plan["train"][:120] if s.key() != scene.key()]
            if truth.exact is not None:
                assert not any(holds(truth, s) for s in others)
            else:
                partial_elsewhere += any(holds(truth, s) for s in others)
    assert partial_elsewhere > 20  # "a red circle" is true of other scenes too


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("varied")
    spec = CorpusSpec(seed=5, train_size=80, val_size=8, test_size=8, test_shifted_size=0)
    write_corpus(out, CorpusSpec(**{**spec.__dict__, "style": "varied"}), progress=False)
    return out


def test_partial_truth_set_negatives_are_false_and_positives_true(
    varied: Path, tiny_local_dir: Path
) -> None:
    enc = Encoder.load(f"local-dir:{tiny_local_dir}")
    pairs = read_pairs(varied / "train.jsonl")
    feats, caps_of, pairs = features_for(enc, pairs, None, None, seed=0)
    demo = demo_images(pairs.source, pairs.images)
    part = partial_truth_set(enc, pairs, caps_of, feats, demo, seed=0)
    n_texts = len(part.truths)
    assert part.pool.text_tokens.shape[0] == n_texts == len(part.pool.text_emb)
    assert n_texts > len(pairs.captions)  # queries beside the captions
    for i, rows in enumerate(part.pos_of):
        assert all(holds(part.truths[t], part.scenes[i]) for t in rows)
    for t in range(n_texts):
        found = part.text_nn[t][part.text_nn[t] >= 0]
        assert len(found)  # every text has a false image to learn from
        assert not any(holds(part.truths[t], part.scenes[i]) for i in found)
        assert np.isclose(part.text_weights[t].sum(), 1.0)
    for i in range(len(part.scenes)):
        found = part.image_nn[i][part.image_nn[i] >= 0]
        assert len(found) and not any(holds(part.truths[t], part.scenes[i]) for t in found)
    # A partial caption's true images are never its negatives, even when they are its
    # nearest: some text in the pool is true of an image other than its own.
    owner = {t: int(pairs.caption_image[t]) for t in range(len(pairs.captions))}
    shared = [
        t
        for t in range(len(pairs.captions))
        if any(holds(part.truths[t], s) for j, s in enumerate(part.scenes) if j != owner[t])
    ]
    assert shared
