"""The frozen dual encoder's features for reranker training and evaluation.

Everything a reranker run computes once before its first step: pooled embeddings and
token features of the images and captions, one compositional swap per image
(``negatives``), and the counterfactual twins of demo-corpus images
(``counterfactual``). ``xmodal eval --rerank`` and ``bench/rerank_misses.py`` use the
same features.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import DataError
from xmodal.crossmodal.pair_images import ImageFailure, decode_pair_images, describe_failures
from xmodal.crossmodal.pairs import PairSet, read_pairs
from xmodal.crossmodal.reranker import pad_tokens

from .counterfactual import (
    demo_images,
    held_out_keys,
    render_twin,
    reversed_order,
    symmetric,
    twin_caption,
    twin_scene,
)
from .negatives import negative, relation_flip
from .rerank_eval import Features

if TYPE_CHECKING:  # rerank_partial imports this module
    from .rerank_partial import PartialTruth


@torch.inference_mode()
def image_features(
    encoder: Encoder, paths: list, batch: int = 128, desc: str = "image features"
) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    """(embeddings [N, D], patch tokens [N, P, Di] float16, indices that loaded).

    Images that fail to load are left out with a warning naming the first few;
    DataError when none loads.
    """
    embs, toks, kept = [], [], []
    failures: list[ImageFailure] = []
    decoded = decode_pair_images(paths, encoder.preprocess_image, failures, desc=desc)
    # Batches of ``batch`` paths (fewer images where some failed): the batches, and
    # so the encoder's float results, are the same as before failures were reported.
    for _, group in groupby(decoded, key=lambda item: item[0] // batch):
        idx, x = zip(*group, strict=True)
        emb, tok = encoder.image_tokens(torch.stack(x))
        embs.append(emb)
        toks.append(tok.half())
        kept += idx
    if not kept:
        raise DataError(f"no image could be loaded ({describe_failures(failures)})")
    if failures:
        warnings.warn(
            f"{len(failures)} of {len(paths)} images left out ({describe_failures(failures)})",
            stacklevel=3,  # the caller, past inference_mode's wrapper
        )
    return np.concatenate(embs), torch.cat(toks), kept


@torch.inference_mode()
def text_features(
    encoder: Encoder, texts: list[str], batch: int = 256, desc: str = "text features"
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(embeddings [M, D], tokens [M, L, Dt] float16 padded, mask [M, L])."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    emb = np.zeros((len(texts), encoder.dim), np.float32)
    seqs: list[torch.Tensor | None] = [None] * len(texts)
    for s in tqdm(range(0, len(order), batch), desc=desc, unit="batch"):
        idx = order[s : s + batch]
        e, tok, mask = encoder.text_tokens([texts[i] for i in idx])
        emb[idx] = e
        for row, i in enumerate(idx):
            seqs[i] = tok[row, mask[row]].half()
    tokens, mask = pad_tokens([s for s in seqs if s is not None])
    return emb, tokens, mask


def features_for(
    encoder: Encoder, pairs: PairSet, max_images: int | None, per_image: int | None, seed: int
) -> tuple[Features, list[list[int]], PairSet]:
    """Features of (a subset of) a pairs file; returns features, captions per image, pairs."""
    rng = random.Random(seed)
    order = list(range(len(pairs.images)))
    if max_images is not None and len(order) > max_images:
        order = sorted(rng.sample(order, max_images))
    pairs = pairs.subset_images(order)
    img_emb, img_tok, kept = image_features(encoder, pairs.images)
    pairs = pairs.subset_images(kept)
    caps_of = pairs.captions_of()
    if per_image is not None:
        keep = sorted(c for cs in caps_of for c in rng.sample(cs, min(per_image, len(cs))))
        caps = [pairs.captions[c] for c in keep]
        owner = pairs.caption_image[keep]
        pairs = PairSet(pairs.source, pairs.images, caps, owner)
        caps_of = pairs.captions_of()
    t_emb, t_tok, t_mask = text_features(encoder, pairs.captions)
    feats = Features(img_emb, img_tok, t_emb, t_tok, t_mask, pairs.caption_image, pairs.captions)
    return feats, caps_of, pairs


def compositional_set(
    encoder: Encoder, pairs: PairSet, caps_of: list[list[int]], seed: int
) -> tuple[np.ndarray, tuple, tuple]:
    """For each image with a swappable caption: (image rows, true caption, swapped twin)."""
    rng = random.Random(seed)
    demo = demo_images(pairs.source, pairs.images)
    rows, pos, neg = [], [], []
    for i, cs in enumerate(caps_of):
        if not cs:
            continue
        own = {pairs.captions[c] for c in cs}
        true = pairs.captions[cs[0]]
        # "a blue star left of a blue star" flipped is still true of its picture: a
        # symmetric scene is its own reversal, so any caption of it, flat or varied,
        # full or partial, holds with its relation flipped.
        d = demo[i]
        flip = relation_flip(true)
        if flip and d is not None and symmetric(d.scene):
            own.add(flip)
        twin = negative(true, rng, avoid=own)
        if twin is not None:
            rows.append(i)
            pos.append(true)
            neg.append(twin)
    if not rows:
        return np.zeros(0, int), (), ()
    return (
        np.array(rows),
        (*text_features(encoder, pos, desc="true captions"), pos),
        (*text_features(encoder, neg, desc="swapped captions"), neg),
    )


@dataclass
class Counterfactuals:
    """Twin pictures and twin captions of training images (rows -1 where none)."""

    image_row: np.ndarray  # [N images] row of the image's twin picture, or -1
    text_row: np.ndarray  # [M captions] row of the caption's twin caption, or -1
    image_tokens: torch.Tensor  # [T, P, Di] float16
    text_tokens: torch.Tensor  # [U, L, Dt] float16
    text_mask: torch.Tensor  # [U, L]
    texts: list[str]  # [U] the twin captions


@torch.inference_mode()
def counterfactual_set(
    encoder: Encoder, pairs: PairSet, caps_of: list[list[int]], seed: int, batch: int = 128
) -> Counterfactuals | None:
    """Render and encode a counterfactual twin of every demo image with 2+ objects.

    Each of the image's captions that has one gets the twin's caption in the same form
    (``twin_caption``: flat templates, varied full paraphrases). None when the pairs
    are not a demo corpus (no ``corpus.json`` beside them). No twin is
    a val or test scene.
    """
    demo = demo_images(pairs.source, pairs.images)
    specs = {d.spec for d in demo if d is not None}
    avoid = frozenset().union(*(held_out_keys(spec) for spec in specs))
    rng = random.Random(seed)
    image_row = np.full(len(pairs.images), -1)
    text_row = np.full(len(pairs.captions), -1)
    twins, texts = [], []
    for i, d in enumerate(demo):
        if d is None or not caps_of[i]:
            continue
        twin = twin_scene(d.scene, rng, avoid)
        if twin is None:
            continue
        reverse = reversed_order(d.scene, twin)
        named = []
        for c in caps_of[i]:
            text = twin_caption(d, twin, pairs.captions[c], rng)
            if text is None:
                continue
            # A reversed twin is also described by the caption's relation flipped
            # ("A right of B" for "A left of B"): half of them get that wording, so the
            # relation words themselves are learnt, not only the order of the objects.
            flipped = relation_flip(pairs.captions[c]) if reverse else None
            named.append((c, flipped if flipped and rng.random() < 0.5 else text))
        if not named:
            continue
        image_row[i] = len(twins)
        twins.append((d, twin))
        for c, text in named:
            text_row[c] = len(texts)
            texts.append(text)
    if not twins:
        return None
    toks = []
    for s in tqdm(range(0, len(twins), batch), desc="counterfactual twins", unit="batch"):
        x = torch.stack(
            [encoder.preprocess_image(render_twin(d, t)) for d, t in twins[s : s + batch]]
        )
        toks.append(encoder.image_tokens(x)[1].half())
    _, t_tok, t_mask = text_features(encoder, texts, desc="twin captions")
    return Counterfactuals(image_row, text_row, torch.cat(toks), t_tok, t_mask, texts)


@dataclass
class CompositionalNegatives:
    """Text-only swapped captions (compositional_set's), as token features."""

    text_tokens: torch.Tensor  # [C, L, Dt] float16
    text_mask: torch.Tensor  # [C, L]


@dataclass
class TrainingSet:
    """What a reranker run trains on: the training pairs' features and the negatives
    computed once from them (a compositional swap per image, counterfactual twins)."""

    feats: Features
    caps_of: list[list[int]]  # [N images] their caption rows
    pairs: PairSet  # the images and captions kept (features cover exactly these)
    comp_of: dict[int, int]  # image row -> row of its swapped caption in ``comp``
    comp: CompositionalNegatives | None
    cf: Counterfactuals | None
    # Partial-truth texts and truth-filtered negatives (demo corpora; rerank_partial).
    partial: PartialTruth | None = None


def training_set(
    encoder: Encoder,
    pairs_path: str,
    images: int | None,
    captions_per_image: int,
    counterfactual: bool,
    seed: int,
) -> TrainingSet:
    """Read the pairs file and compute everything the training steps draw from."""
    pairs = read_pairs(pairs_path)
    feats, caps_of, pairs = features_for(encoder, pairs, images, captions_per_image, seed)
    # One compositional twin per image (when its caption allows a swap).
    comp_rows, _, comp_neg = compositional_set(encoder, pairs, caps_of, seed)
    comp_of = {int(r): j for j, r in enumerate(comp_rows)}
    comp = CompositionalNegatives(*comp_neg[1:3]) if len(comp_rows) else None
    cf = counterfactual_set(encoder, pairs, caps_of, seed) if counterfactual else None
    return TrainingSet(feats, caps_of, pairs, comp_of, comp, cf)
