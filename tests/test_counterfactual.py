"""Counterfactual twins: binding changed, words and layout kept."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rerank_fixtures import tiny_rerank_config
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.pairs import PairSet, read_pairs
from xmodal.training.corpus import (
    HELD_OUT,
    CorpusSpec,
    Obj,
    Scene,
    captions,
    image_claims,
    plan_splits,
    twin_paraphrase,
    write_corpus,
)
from xmodal.training.counterfactual import (
    DemoImage,
    demo_images,
    held_out_keys,
    render_twin,
    reversed_order,
    scene_difference,
    symmetric,
    template_of,
    twin_caption,
    twin_scene,
)
from xmodal.training.negatives import negative, relation_flip
from xmodal.training.rerank_features import (
    Counterfactuals,
    compositional_set,
    counterfactual_set,
)
from xmodal.training.rerank_train import train_reranker
from xmodal.training.vocabulary import SYNONYMS


def test_a_twin_changes_binding_not_words() -> None:
    scene = Scene(
        "white",
        "row",
        (Obj("small", "red", "circle"), Obj("large", "blue", "star"), Obj("small", "red", "heart")),
    )
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        twin = twin_scene(scene, rng)
        assert twin is not None and twin.key() != scene.key()
        for a, b in zip(captions(scene), captions(twin), strict=True):
            assert a != b and sorted(re.findall(r"\w+", a)) == sorted(re.findall(r"\w+", b))
        seen.add(twin.key())
    assert len(seen) >= 5  # colour, shape, size swaps and the reversal all occur
    assert twin_scene(Scene("white", "row", (Obj("small", "red", "circle"),)), rng) is None


def test_twins_bring_in_no_held_out_combination_nor_a_val_or_test_scene(
    small_corpus: Path,
) -> None:
    # Blue circles and red squares are held out of train: swapping colours or shapes
    # of these two would bring both in, so the reversal is the only twin left.
    red, blue = Obj("small", "red", "circle"), Obj("small", "blue", "square")
    assert {("blue", "circle"), ("red", "square")} <= HELD_OUT
    scene = Scene("white", "row", (red, blue))
    rng = random.Random(0)
    assert all(twin_scene(scene, rng).objects == (blue, red) for _ in range(20))
    # Over a corpus's training scenes, with its val and test keys to avoid.
    spec = CorpusSpec(**json.loads((small_corpus / "corpus.json").read_text())["spec"])
    avoid = held_out_keys(spec)
    plan = plan_splits(spec)
    assert plan["test-shifted"]  # its scenes are held out of twins as well
    assert avoid == {s.key() for s in plan["val"] + plan["test"] + plan["test-shifted"]}
    made = 0
    for train_scene in plan["train"]:
        twin = twin_scene(train_scene, rng, avoid)
        if twin is not None:
            assert not twin.combos() & HELD_OUT and twin.key() not in avoid
            made += 1
    assert made > len(plan["train"]) / 2


def test_scene_difference_names_what_a_twin_changed() -> None:
    red, blue = Obj("small", "red", "circle"), Obj("large", "blue", "star")
    scene = Scene("white", "row", (red, blue))
    assert scene_difference(scene, scene) == ()
    assert scene_difference(scene, Scene("white", "row", (blue, red))) == ("order",)
    swapped = Scene("white", "row", (Obj("small", "blue", "circle"), Obj("large", "red", "star")))
    assert scene_difference(scene, swapped) == ("color-bind",)
    other = Scene("black", "column", (red, Obj("large", "blue", "heart")))
    assert scene_difference(scene, other) == ("background", "arrangement", "shape")
    assert scene_difference(scene, Scene("white", "single", (red,))) == ("count",)
    rng = random.Random(1)
    for _ in range(20):  # every twin differs in binding only: one swap or the order
        twin = twin_scene(scene, rng)
        assert twin is not None
        (diff,) = scene_difference(scene, twin)
        assert diff == "order" if reversed_order(scene, twin) else diff.endswith("-bind")


def test_twins_are_drawn_with_the_original_layout(small_corpus: Path) -> None:
    pairs = read_pairs(small_corpus / "train.jsonl")
    demo = demo_images(pairs.source, pairs.images)
    assert all(d is not None for d in demo)
    for path, d in list(zip(pairs.images, demo, strict=True))[:8]:
        # The scene itself through the twin renderer is the corpus's own image, pixel
        # for pixel: the same random stream, so a twin keeps positions and shades.
        drawn = np.asarray(render_twin(d, d.scene))
        assert np.array_equal(drawn, np.asarray(Image.open(path).convert("RGB")))
    caps_of = pairs.captions_of()
    i = next(i for i, d in enumerate(demo) if len(d.scene.objects) == 2)
    assert template_of(demo[i].scene, pairs.captions[caps_of[i][0]]) == 0
    assert template_of(demo[i].scene, "a green moon") is None


def test_pairs_without_a_corpus_have_no_twins(tmp_path: Path, small_corpus: Path) -> None:
    lines = (small_corpus / "train.jsonl").read_text().splitlines()[:8]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(
        "\n".join(line.replace('"images/', f'"{small_corpus}/images/') for line in lines) + "\n"
    )
    pairs = read_pairs(pairs_file)
    assert demo_images(pairs.source, pairs.images) == [None] * len(pairs.images)


def test_a_corpus_json_without_a_style_is_a_flat_one(tmp_path: Path, small_corpus: Path) -> None:
    """corpus.json files written before styles existed name neither style nor
    test-shifted: they are flat corpora without test-shifted."""
    shutil.copytree(small_corpus, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "corpus.json").read_text())
    del meta["spec"]["style"], meta["spec"]["test_shifted_size"]
    (tmp_path / "old" / "corpus.json").write_text(json.dumps(meta))
    pairs = read_pairs(tmp_path / "old" / "train.jsonl")
    demo = demo_images(pairs.source, pairs.images)
    assert all(d is not None and d.spec.style == "flat" for d in demo)
    assert demo[0].spec.test_shifted_size == 0


def test_a_varied_corpus_has_scenes_and_twins_of_its_full_captions(
    tmp_path: Path, tiny_local_dir: Path
) -> None:
    spec = CorpusSpec(
        seed=2, train_size=12, val_size=2, test_size=2, test_shifted_size=3, style="varied"
    )
    write_corpus(tmp_path, spec, workers=1, progress=False)
    plan = plan_splits(spec)
    for split in ("train", "test-shifted"):
        pairs = read_pairs(tmp_path / f"{split}.jsonl")
        demo = demo_images(pairs.source, pairs.images)
        assert [d.scene for d in demo] == plan[split]  # .jpg and .png images alike
        for path, d in zip(pairs.images, demo, strict=True):
            drawn = np.asarray(render_twin(d, d.scene))  # the same style and stream
            assert np.array_equal(drawn, np.asarray(Image.open(path).convert("RGB")))
    assert {p.suffix for p in (tmp_path / "images" / "train").iterdir()} == {".png", ".jpg"}
    # Its full captions are paraphrases: each twin gets a full paraphrase of its own
    # scene, partial captions none (what they name may be true of the twin too).
    enc = Encoder.load(f"local-dir:{tiny_local_dir}")
    pairs = read_pairs(tmp_path / "train.jsonl")
    caps_of = pairs.captions_of()
    cf = counterfactual_set(enc, pairs, caps_of, seed=0)
    assert cf is not None
    demo = demo_images(pairs.source, pairs.images)
    twins = 0
    for i, cs in enumerate(caps_of):
        claims = dict(image_claims(spec, "train", i, demo[i].scene))
        for c in cs:
            full = claims[pairs.captions[c]].is_full(demo[i].scene)
            if cf.text_row[c] >= 0:
                twins += 1
                assert full and cf.texts[cf.text_row[c]] != pairs.captions[c]
            elif cf.image_row[i] >= 0:
                assert not full
    assert twins


def test_a_varied_twin_caption_is_its_caption_with_the_twin_s_words(tmp_path: Path) -> None:
    # Flat twins are named by the same template with the twin's words; varied ones by
    # the caption's own draws replayed on the twin, so the two still differ only where
    # the scenes do, not in lead, template, relation phrase or mention order.
    spec = CorpusSpec(seed=3, train_size=40, val_size=2, test_size=2, style="varied")
    plan = plan_splits(spec)
    attribute_words = {
        w
        for table in SYNONYMS.values()
        for names in table.values()
        for n in names
        for w in n.split()
    }

    def skeleton(text: str) -> list[str]:
        return [w for w in re.split(r"[\s,:]+", text) if w not in attribute_words | {"a", "an"}]

    rng = random.Random(0)
    checked = 0
    for i, scene in enumerate(plan["train"]):
        twin = twin_scene(scene, rng)
        if twin is None:
            continue
        for text, claim in image_claims(spec, "train", i, scene):
            if not claim.is_full(scene):
                continue
            assert twin_paraphrase(spec, "train", i, scene, text, scene) == text
            said = twin_paraphrase(spec, "train", i, scene, text, twin)
            assert said is not None and said != text
            assert skeleton(said) == skeleton(text), (text, said)
            image = DemoImage(spec, "train", i, scene)
            assert twin_caption(image, twin, text, random.Random(1)) == said
            checked += 1
    assert checked > 40
    assert (
        twin_paraphrase(spec, "train", 0, plan["train"][0], "not a caption", plan["train"][0])
        is None
    )


@pytest.fixture(scope="module")
def twins(
    small_corpus: Path, tiny_local_dir: Path
) -> tuple[Encoder, PairSet, list[list[int]], list[DemoImage | None], Counterfactuals]:
    """(encoder, train pairs, captions per image, demo scenes, their twins), rendered
    and encoded once for the tests that read them."""
    enc = Encoder.load(f"local-dir:{tiny_local_dir}")
    pairs = read_pairs(small_corpus / "train.jsonl")
    caps_of = pairs.captions_of()
    cf = counterfactual_set(enc, pairs, caps_of, seed=0)
    assert cf is not None
    return enc, pairs, caps_of, demo_images(pairs.source, pairs.images), cf


def test_counterfactual_set_pairs_each_caption_with_its_twin(twins) -> None:
    enc, _, caps_of, demo, cf = twins
    many = np.array([len(d.scene.objects) > 1 for d in demo])
    palindrome = np.array([symmetric(d.scene) for d in demo])
    has = cf.image_row >= 0
    # Every multi-object image but one that reads the same reversed (when its draw is
    # the reversal) has a twin; no single-object image has one.
    assert (has[many & ~palindrome]).all() and not has[~many].any()
    assert len(cf.image_tokens) == has.sum()
    assert cf.image_tokens.shape[1:] == enc.image_tokens(torch.zeros(1, 3, 32, 32))[1].shape[1:]
    with_twin = [c for i in np.flatnonzero(has) for c in caps_of[i]]
    assert (cf.text_row[with_twin] >= 0).all()
    assert len(set(cf.text_row[with_twin].tolist())) == len(with_twin)


def test_training_with_twins_uses_them_and_lowers_the_loss(
    small_corpus: Path, tiny_local_dir: Path, tmp_path: Path
) -> None:
    metrics = train_reranker(tiny_rerank_config(small_corpus, tiny_local_dir, tmp_path / "rr"))
    demo = demo_images(
        small_corpus / "train.jsonl", read_pairs(small_corpus / "train.jsonl").images
    )
    multi = sum(len(d.scene.objects) > 1 for d in demo)
    # A scene that reads the same reversed has no twin when its draw is the reversal.
    palindromes = sum(symmetric(d.scene) for d in demo)
    assert multi - palindromes <= metrics["counterfactual_twins"] <= multi
    assert metrics["counterfactual_twins"] > 0.9 * multi
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]


def test_a_flipped_relation_of_symmetric_objects_is_no_negative() -> None:
    same = Obj("small", "cyan", "heart")
    pal = Scene("gray", "row", (same, Obj("large", "red", "star"), same))
    assert symmetric(pal) and symmetric(Scene("gray", "row", (same, same)))
    assert not symmetric(Scene("gray", "row", (same, Obj("small", "red", "heart"))))
    assert not symmetric(Scene("gray", "row", (same,)))
    caption = captions(Scene("checkered", "row", (same, same)))[0]
    rng = random.Random(0)
    # Identical objects: the flip is the only swap, and it is true of the picture.
    assert negative(caption, rng) is not None
    assert negative(caption, rng, avoid={relation_flip(caption)}) is None


def test_reversed_twins_are_also_named_by_the_flipped_relation(twins) -> None:
    _, pairs, caps_of, demo, cf = twins
    # Re-draw the twins counterfactual_set drew (same seed, same order of draws).
    rng = random.Random(0)
    avoid = held_out_keys(demo[0].spec)
    flipped = templated = 0
    for i, d in enumerate(demo):
        if len(d.scene.objects) < 2:
            continue
        twin = twin_scene(d.scene, rng, avoid)
        if twin is None:
            continue
        reverse = reversed_order(d.scene, twin)
        for c in caps_of[i]:
            text = cf.texts[cf.text_row[c]]
            flip = relation_flip(pairs.captions[c]) if reverse else None
            if flip and rng.random() < 0.5:
                assert text == flip
                flipped += 1
            else:
                assert text == captions(twin)[template_of(d.scene, pairs.captions[c])]
                templated += 1
    assert flipped > 0 and templated > 0


def test_a_varied_symmetric_scene_keeps_its_flipped_caption_out_of_the_negatives(
    tmp_path: Path, tiny_local_dir: Path
) -> None:
    # Seed 8's val holds "a large turquoise rhombus right of a large turquoise diamond"
    # (the same object twice): flipped, it still describes its picture.
    spec = CorpusSpec(
        seed=8, train_size=4, val_size=40, test_size=2, test_shifted_size=0, style="varied"
    )
    write_corpus(tmp_path, spec, workers=1, progress=False)
    pairs = read_pairs(tmp_path / "val.jsonl")
    caps_of = pairs.captions_of()
    demo = demo_images(pairs.source, pairs.images)
    enc = Encoder.load(f"local-dir:{tiny_local_dir}")
    rows, (*_, pos), (*_, neg) = compositional_set(enc, pairs, caps_of, seed=0)
    flippable = [
        i
        for i, d in enumerate(demo)
        if symmetric(d.scene) and relation_flip(pairs.captions[caps_of[i][0]])
    ]
    assert flippable  # the case is there
    for row, true, swapped in zip(rows.tolist(), pos, neg, strict=True):
        if row in flippable:
            assert swapped != relation_flip(true), true
    assert len(rows) > 20  # the other images still get their negatives
