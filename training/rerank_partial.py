"""Partial-truth training data for the reranker over a demo corpus.

Every training text knows what it asserts (``rerank_truth.Truth``): the corpus's own
captions (full ones name the whole scene, partial ones only part of it) and short
queries of the kinds people type, sampled from what is true of each training scene. A
text's hard negative images are its nearest images by the dual encoder that it is
really false of, and an image's hard negative texts the nearest texts false of it, so a
partial text is never taught as a mismatch for an image it describes. Each image also
gets structured negatives (``rerank_truth.false_queries``): a swapped binding, a
reversed relation, an absent object, another background, a wrong count.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.pairs import PairSet

from .corpus import Scene, image_claims
from .counterfactual import DemoImage
from .rerank_eval import Features
from .rerank_features import text_features
from .rerank_truth import Truth, claim_truth, false_queries, holds, true_texts

# Per training image: queries sampled from what is true of it, and structured negatives.
QUERIES_PER_IMAGE = 3
NEGATIVES_PER_IMAGE = 3
# Nearest neighbours looked at for hard negatives, and how many false ones are kept.
LOOK_AT = 64
KEEP = 16
TEMPERATURE = 20.0  # softmax(similarity * T) over the kept ones, as hard_neighbours


@dataclass
class TextPool:
    """Token features of a set of texts, as ``StepPairs.add`` reads them."""

    text_emb: np.ndarray  # [T, D]
    text_tokens: torch.Tensor  # [T, L, Dt] float16
    text_mask: torch.Tensor  # [T, L]


@dataclass
class PartialTruth:
    """What a partial-truth run draws from, beside the image features.

    Pool rows ``< len(pairs.captions)`` are the pairs file's captions (the same rows as
    ``Features``), the rest the sampled queries.
    """

    scenes: list[Scene]  # [N] each training image's scene
    truths: list[Truth]  # [T] what each pool text asserts
    pool: TextPool  # [T] positive-kind texts: captions, then queries
    pos_of: list[list[int]]  # [N] pool rows written for the image (all true of it)
    negatives: TextPool  # [U] structured negatives
    neg_of: list[list[int]]  # [N] rows of ``negatives`` false of the image
    text_nn: np.ndarray  # [T, KEEP] image rows the text is false of, -1 where none
    text_weights: np.ndarray  # [T, KEEP] sampling weights (0 where none)
    image_nn: np.ndarray  # [N, KEEP] pool rows false of the image, -1 where none
    image_weights: np.ndarray  # [N, KEEP]


def _concat(a: TextPool, b: TextPool) -> TextPool:
    width = max(a.text_tokens.shape[1], b.text_tokens.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, 0, width - t.shape[1]))

    def padm(m: torch.Tensor) -> torch.Tensor:
        return F.pad(m, (0, width - m.shape[1]))

    return TextPool(
        np.concatenate([a.text_emb, b.text_emb]),
        torch.cat([pad(a.text_tokens), pad(b.text_tokens)]),
        torch.cat([padm(a.text_mask), padm(b.text_mask)]),
    )


def false_neighbours(
    emb_q: np.ndarray,
    emb_c: np.ndarray,
    is_false: Callable[[int, int], bool],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row its ``KEEP`` most similar candidates for which
    ``is_false(query, candidate)``, looked for among its ``LOOK_AT`` nearest and then at
    random; (rows [Q, KEEP] with -1 where fewer were found, softmax weights [Q, KEEP])."""
    look = min(LOOK_AT, len(emb_c))
    nn = np.full((len(emb_q), KEEP), -1, np.int64)
    weights = np.zeros((len(emb_q), KEEP), np.float64)
    for s in range(0, len(emb_q), 1024):
        sims = emb_q[s : s + 1024] @ emb_c.T  # [chunk, candidates]
        idx = np.argpartition(-sims, look - 1, axis=1)[:, :look]
        for row in range(len(idx)):
            q = s + row
            near = idx[row][np.argsort(-sims[row, idx[row]])]
            found = [int(c) for c in near if is_false(q, int(c))][:KEEP]
            for c in rng.integers(0, len(emb_c), 4 * KEEP):  # a text true of all near ones
                if len(found) >= KEEP // 2:
                    break
                if int(c) not in found and is_false(q, int(c)):
                    found.append(int(c))
            if not found:
                continue
            sim = sims[row, found] * TEMPERATURE
            w = np.exp(sim - sim.max())
            nn[q, : len(found)] = found
            weights[q, : len(found)] = w / w.sum()
    return nn, weights


def partial_truth_set(
    encoder: Encoder,
    pairs: PairSet,
    caps_of: list[list[int]],
    feats: Features,
    demo: list[DemoImage],
    seed: int,
) -> PartialTruth:
    """Truths of the pairs' captions, sampled queries and negatives for each image, with
    their token features, and the truth-filtered hard negatives both ways."""
    rng = random.Random(seed)
    scenes = [d.scene for d in demo]
    of_caption: dict[int, Truth] = {}
    for d, cs in zip(demo, caps_of, strict=True):
        claims = dict(image_claims(d.spec, d.split, d.index, d.scene))  # once per image
        for c in cs:
            claim = claims.get(pairs.captions[c])
            # Not the corpus's caption: only its own scene is sure.
            of_caption[c] = (
                Truth(exact=d.scene.key()) if claim is None else claim_truth(d.scene, claim)
            )
    truths = [of_caption[c] for c in range(len(pairs.captions))]
    queries: list[str] = []
    pos_of = [list(cs) for cs in caps_of]
    negs: list[str] = []
    neg_of: list[list[int]] = []
    for i, scene in enumerate(scenes):
        for text, truth, _ in true_texts(scene, rng, QUERIES_PER_IMAGE):
            pos_of[i].append(len(pairs.captions) + len(queries))
            queries.append(text)
            truths.append(truth)
        rows = []
        for text, _ in false_queries(scene, rng, NEGATIVES_PER_IMAGE):
            rows.append(len(negs))
            negs.append(text)
        neg_of.append(rows)
    q_emb, q_tok, q_mask = text_features(encoder, queries, desc="query texts")
    pool = _concat(
        TextPool(feats.text_emb, feats.text_tokens, feats.text_mask),
        TextPool(q_emb, q_tok, q_mask),
    )
    n_emb, n_tok, n_mask = text_features(encoder, negs, desc="negative queries")
    gen = np.random.default_rng(seed)
    t_nn, t_w = false_neighbours(
        pool.text_emb, feats.image_emb, lambda t, i: not holds(truths[t], scenes[i]), gen
    )
    i_nn, i_w = false_neighbours(
        feats.image_emb, pool.text_emb, lambda i, t: not holds(truths[t], scenes[i]), gen
    )
    return PartialTruth(
        scenes,
        truths,
        pool,
        pos_of,
        TextPool(n_emb, n_tok, n_mask),
        neg_of,
        t_nn,
        t_w,
        i_nn,
        i_w,
    )
