"""The pairs of one reranker training step: positives, hard and easy negatives.

Hard negatives come from the dual encoder's own similarities over the whole training
set (ALBEF / BLIP), drawn anew each step; each step also holds a random image per
caption, the counterfactual twins of its images where they have one, and otherwise a
text-only compositional swap. All randomness comes from the run's one generator, in a
fixed order, so that a seed gives the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .rerank_features import TrainingSet
from .rerank_truth import holds


class StepPairs:
    """The (caption, image, label) pairs of one training step, added group by group,
    and for the listwise loss where each group's logits sit in each query's list.

    Images are kept as rows of their token tables, not copies: a step shows each image
    with several captions (its own, a hard negative's, a twin's), and ``tensors`` gives
    each distinct image once with the index of every pair's image into them.
    """

    def __init__(self) -> None:
        self.tokens: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.tables: list[torch.Tensor] = []  # distinct image token tables, first use first
        self.image_rows: list[tuple[int, np.ndarray]] = []  # per group: (table, rows)
        self.labels: list[np.ndarray] = []
        self.size = 0
        # list name -> one column per group: (query rows, offset of the group's logits)
        self.lists: dict[str, list[tuple[np.ndarray, int]]] = {}

    def add(
        self,
        texts: Any,
        text_rows: np.ndarray,
        pics: Any,
        image_rows: np.ndarray,
        label: int,
        **lists: np.ndarray,
    ) -> None:
        """Pairs (texts.text_tokens[text_rows[j]], pics.image_tokens[image_rows[j]]),
        all with ``label``; each keyword names a list and the query row of each pair."""
        n = len(text_rows)
        self.tokens.append(texts.text_tokens[text_rows])
        self.masks.append(texts.text_mask[text_rows])
        table = next((t for t, tab in enumerate(self.tables) if tab is pics.image_tokens), None)
        if table is None:
            self.tables.append(pics.image_tokens)
            table = len(self.tables) - 1
        self.image_rows.append((table, np.asarray(image_rows, np.int64)))
        self.labels.append(np.full(n, float(label)))
        for name, rows in lists.items():
            self.lists.setdefault(name, []).append((rows, self.size))
        self.size += n

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the step's distinct images [U, P, Di], index [N] of each pair's image)."""
        parts, index, offset = [], [np.zeros(0, np.int64)] * len(self.image_rows), 0
        for t, table in enumerate(self.tables):
            groups = [g for g, (tab, _) in enumerate(self.image_rows) if tab == t]
            rows = [self.image_rows[g][1] for g in groups]
            distinct, inverse = np.unique(np.concatenate(rows), return_inverse=True)
            parts.append(table[torch.as_tensor(distinct)])
            ends = np.cumsum([len(r) for r in rows])[:-1]
            for g, inv in zip(groups, np.split(inverse, ends), strict=True):
                index[g] = inv + offset
            offset += len(distinct)
        return torch.cat(parts), torch.as_tensor(np.concatenate(index))

    def tensors(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text [N, L, Dt], mask [N, L], images [U, P, Di], image index [N], labels [N]),
        captions padded to the step's longest; pair j shows image ``index[j]``."""
        width = max(t.shape[1] for t in self.tokens)
        text = torch.cat([F.pad(t, (0, 0, 0, width - t.shape[1])) for t in self.tokens])
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in self.masks])
        labels = torch.as_tensor(np.concatenate(self.labels))
        images, index = self.images()
        return text, mask, images, index, labels


def hard_neighbours(
    emb_q: np.ndarray,
    emb_c: np.ndarray,
    positives: list[set[int]],
    top: int = 16,
    temperature: float = 20.0,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, its ``top`` most similar candidates that are not positives,
    and softmax(similarity) sampling weights over them (ALBEF / BLIP hard negatives,
    drawn from the whole training set rather than one batch: at search time the
    reranker sees the dual encoder's top candidates, so those are what it must learn).
    """
    top = max(1, min(top, len(emb_c) - max(len(p) for p in positives) - 1))
    nn = np.zeros((len(emb_q), top), np.int64)
    weights = np.zeros((len(emb_q), top), np.float64)
    for s in range(0, len(emb_q), 1024):
        sims = emb_q[s : s + 1024] @ emb_c.T  # [chunk, candidates]
        for row, pos in enumerate(positives[s : s + 1024]):
            sims[row, list(pos)] = -np.inf
        idx = np.argpartition(-sims, top, axis=1)[:, :top]
        part = np.take_along_axis(sims, idx, axis=1) * temperature
        part -= part.max(axis=1, keepdims=True)
        w = np.exp(part)
        nn[s : s + 1024] = idx
        weights[s : s + 1024] = w / w.sum(axis=1, keepdims=True)
    return nn, weights


def _draw(nn: np.ndarray, weights: np.ndarray, rows: np.ndarray, rng: np.random.Generator):
    """One neighbour per row, drawn by its weights."""
    cum = weights[rows].cumsum(axis=1)
    pick = (cum < rng.random((len(rows), 1))).sum(axis=1).clip(max=nn.shape[1] - 1)
    return nn[rows, pick]


@dataclass
class HardNegatives:
    """Each caption's most similar other images and each image's most similar other
    captions, with the softmax weights a step draws them by."""

    text_nn: np.ndarray  # [M captions, top] image rows
    text_weights: np.ndarray  # [M, top]
    image_nn: np.ndarray  # [N images, top] caption rows
    image_weights: np.ndarray  # [N, top]


def hard_negatives(data: TrainingSet) -> HardNegatives:
    """Nearest non-matching neighbours both ways; matches are by caption text, so the
    same scene described twice is never its own negative."""
    feats, captions = data.feats, data.pairs.captions
    # Positives: an image for every caption of the same text (the same scene twice).
    by_text: dict[str, set[int]] = {}
    for c, text in enumerate(captions):
        by_text.setdefault(text, set()).add(int(feats.caption_image[c]))
    text_ids: dict[str, set[int]] = {}
    for c, text in enumerate(captions):
        text_ids.setdefault(text, set()).add(c)
    t_nn, t_w = hard_neighbours(feats.text_emb, feats.image_emb, [by_text[t] for t in captions])
    own_caps = [set().union(*(text_ids[captions[c]] for c in cs)) for cs in data.caps_of]
    i_nn, i_w = hard_neighbours(feats.image_emb, feats.text_emb, own_caps)
    return HardNegatives(t_nn, t_w, i_nn, i_w)


def sample_step(
    data: TrainingSet, negs: HardNegatives, imgs: np.ndarray, rng: np.random.Generator
) -> StepPairs:
    """The pairs of one step over the images ``imgs``: each with one of its captions,
    and their negatives. Draws from ``rng`` in a fixed order (captions, hard images,
    hard captions, random images)."""
    feats, caps_of, cf, comp, comp_of = data.feats, data.caps_of, data.cf, data.comp, data.comp_of
    n = len(caps_of)
    caps = np.array([caps_of[i][rng.integers(len(caps_of[i]))] for i in imgs])
    neg_img = _draw(negs.text_nn, negs.text_weights, caps, rng)  # a hard image per caption
    neg_cap = _draw(negs.image_nn, negs.image_weights, imgs, rng)  # a hard caption per image
    # Plus an easy one: with hard negatives only the loss sits at chance for
    # hundreds of steps; random ones teach colours and shapes first.
    rand_img = rng.integers(0, n, len(imgs))
    rand_img = np.where(rand_img == imgs, (rand_img + 1) % n, rand_img)
    B = len(imgs)
    every = np.arange(B)
    pairs = StepPairs()
    # Rows of the "text" lists are the step's captions (caption b is image b's),
    # of the "image" lists its images; the positive comes first in each.
    pairs.add(feats, caps, feats, imgs, 1, text=every, image=every)
    pairs.add(feats, caps, feats, neg_img, 0, text=every)
    pairs.add(feats, neg_cap, feats, imgs, 0, image=every)
    pairs.add(feats, caps, feats, rand_img, 0, text=every)
    twin = np.zeros(B, bool)
    if cf is not None:
        twin = (cf.image_row[imgs] >= 0) & (cf.text_row[caps] >= 0)
        ti, tt = cf.image_row[imgs[twin]], cf.text_row[caps[twin]]
        rows = np.flatnonzero(twin)
        # twin caption: wrong for the image, right for the twin picture;
        # the image's own caption: wrong for the twin picture.
        pairs.add(cf, tt, feats, imgs[twin], 0, image=rows)
        pairs.add(cf, tt, cf, ti, 1, twin=np.arange(len(ti)))
        pairs.add(feats, caps[twin], cf, ti, 0, text=rows, twin=np.arange(len(ti)))
    # Images without a twin get a text-only swap as their compositional negative.
    alone = np.array([not t and int(i) in comp_of for i, t in zip(imgs, twin, strict=True)])
    if comp is not None and alone.any():
        rows = [comp_of[int(i)] for i in imgs[alone]]
        pairs.add(comp, np.array(rows), feats, imgs[alone], 0, image=np.flatnonzero(alone))
    return pairs


def sample_partial_step(data: TrainingSet, imgs: np.ndarray, rng: np.random.Generator) -> StepPairs:
    """The pairs of one partial-truth step over the images ``imgs`` (``rerank_partial``):
    each image with a text true of it (a caption, full or partial, or a query), a hard
    image the text is false of, a hard text false of the image, a random image the text
    is false of, a structured negative and, on a flat corpus, its counterfactual twin.
    Draws from ``rng`` in a fixed order."""
    feats, part, cf = data.feats, data.partial, data.cf
    n = len(part.scenes)
    texts = np.array([part.pos_of[i][rng.integers(len(part.pos_of[i]))] for i in imgs])
    # A row with no false neighbour has all-zero weights: _draw then picks its last
    # column, which holds -1.
    neg_img = _draw(part.text_nn, part.text_weights, texts, rng)
    neg_txt = _draw(part.image_nn, part.image_weights, imgs, rng)
    rand_img = rng.integers(0, n, len(imgs))
    B = len(imgs)
    every = np.arange(B)
    pairs = StepPairs()
    pairs.add(part.pool, texts, feats, imgs, 1, text=every, image=every)
    ok = np.flatnonzero(neg_img >= 0)
    pairs.add(part.pool, texts[ok], feats, neg_img[ok], 0, text=ok)
    ok = np.flatnonzero(neg_txt >= 0)
    pairs.add(part.pool, neg_txt[ok], feats, imgs[ok], 0, image=ok)
    ok = np.array(
        [b for b in every if not holds(part.truths[texts[b]], part.scenes[rand_img[b]])], int
    )
    if len(ok):
        pairs.add(part.pool, texts[ok], feats, rand_img[ok], 0, text=ok)
    has = np.array([b for b in every if part.neg_of[imgs[b]]], int)
    if len(has):
        rows = np.array(
            [part.neg_of[imgs[b]][rng.integers(len(part.neg_of[imgs[b]]))] for b in has]
        )
        pairs.add(part.negatives, rows, feats, imgs[has], 0, image=has)
    if cf is not None:
        # Twins are of the pairs' captions: only steps whose text is one of them.
        caption = texts < len(cf.text_row)
        twin = caption & (cf.image_row[imgs] >= 0)
        twin[twin] &= cf.text_row[texts[twin]] >= 0
        rows = np.flatnonzero(twin)
        if len(rows):
            ti, tt = cf.image_row[imgs[twin]], cf.text_row[texts[twin]]
            pairs.add(cf, tt, feats, imgs[twin], 0, image=rows)
            pairs.add(cf, tt, cf, ti, 1, twin=np.arange(len(ti)))
            pairs.add(part.pool, texts[twin], cf, ti, 0, text=rows, twin=np.arange(len(ti)))
    return pairs
