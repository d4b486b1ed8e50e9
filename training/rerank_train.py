"""`xmodal train-reranker`: image-text matching training over a frozen dual encoder.

Features of the frozen encoder (pooled embeddings and token features) are computed
once. Each step takes a batch of images with one of their captions and scores, with
binary ITM loss:

* the matched pairs;
* hard negatives from the dual encoder's own similarities (ALBEF / BLIP): for each
  caption an image drawn from softmax(similarity) over the batch, and for each image
  a caption drawn likewise, with same-image entries masked;
* compositional negatives: the image's caption with two attributes or its relation
  swapped (training.negatives), which a bag-of-words scorer cannot reject;
* for demo-corpus images, counterfactual twins (training.counterfactual): the same
  picture with two objects' attribute swapped or their order reversed, rendered with
  the same layout. The twin's caption is a negative for the image and a positive for
  the twin picture, and the image's caption a negative for the twin picture, so only
  binding words to objects separates the pairs. A twin with the objects' order
  reversed is named, half the time, by the image's caption with its relation words
  flipped ("A right of B" for "A left of B"), which is how the relation is tested.
  Measured on a GPU (bench note in the reranker's README): with twins the reranker
  learns binding in far fewer steps. No twin is a val or test scene or holds a
  colour-shape combination held out of training.
* beside ITM, a listwise loss (``listwise``; localized contrastive estimation): each
  caption's image ranked against the other images it was shown with, each image's
  caption against its negative captions, each twin picture's caption against the
  original's: the ranking the reranker is used for.

Afterwards the fusion weight w (score = logit + w * cosine) is chosen on val as the
one with the best mean R@1 of both directions after reranking the top k, and saved
with the weights.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import DataError
from xmodal.crossmodal.images import ImageDecodeError, decode_image
from xmodal.crossmodal.pairs import PairSet, read_pairs
from xmodal.crossmodal.reranker import CrossModalReranker, RerankerConfig, itm_loss, pad_tokens

from .corpus import captions as scene_captions
from .counterfactual import (
    demo_images,
    held_out_keys,
    render_twin,
    reversed_order,
    symmetric,
    template_of,
    twin_scene,
)
from .negatives import negative, relation_flip
from .rerank_eval import Features, compositional_accuracy, reranked_recall

FUSION_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0)


@dataclass
class RerankTrainConfig:
    """Everything a reranker training run depends on (recorded in metrics.json)."""

    pairs: str
    out: str
    val: str | None = None
    model: str | None = None  # dual encoder (default: the built-in model)
    pretrained: str | None = None
    images: int | None = 12_000  # training images used (features are held in memory)
    captions_per_image: int = 2
    epochs: int = 28
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    width: int = 128
    layers: int = 2
    heads: int = 4
    rerank_k: int = 32  # candidates re-scored when tuning w on val
    val_images: int | None = 1000
    # A step's pairs run in this many groups of similar caption length, each padded
    # only to its own longest (one-object captions are far shorter than three-object
    # ones): same logits, less compute.
    length_groups: int = 4
    counterfactual: bool = True  # twins of demo-corpus images (others have none)
    # Weight of a listwise loss beside ITM: each caption's image against the images
    # shown with it, each image's caption against its negative captions (v5, weight
    # 0.5: val compositional 0.849 against 0.824 without; v6, weight 1.0: test R@1
    # +0.2 / +0.8 over v5, compositional the same).
    listwise: float = 1.0
    seed: int = 0


@torch.inference_mode()
def image_features(
    encoder: Encoder, paths: list, batch: int = 128, desc: str = "image features"
) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    """(embeddings [N, D], patch tokens [N, P, Di] float16, indices that loaded)."""
    embs, toks, kept = [], [], []
    for s in tqdm(range(0, len(paths), batch), desc=desc, unit="batch"):
        x, ok = [], []
        for i, p in enumerate(paths[s : s + batch]):
            try:
                x.append(encoder.preprocess_image(decode_image(p)))
                ok.append(s + i)
            except (OSError, ImageDecodeError):
                continue
        if not x:
            continue
        emb, tok = encoder.image_tokens(torch.stack(x))
        embs.append(emb)
        toks.append(tok.half())
        kept += ok
    if not kept:
        raise DataError("no image could be loaded")
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
        # "a blue star left of a blue star" flipped is still true of its picture.
        d = demo[i]
        flip = relation_flip(true)
        if flip and d is not None and template_of(d.scene, true) is not None and symmetric(d.scene):
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

    Each of the image's captions gets the twin's caption in the same paraphrase. None
    when the pairs are not a demo corpus (no ``corpus.json`` beside them). No twin is
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
        paraphrase = [template_of(d.scene, pairs.captions[c]) for c in caps_of[i]]
        twin = twin_scene(d.scene, rng, avoid) if None not in paraphrase else None
        if twin is None:
            continue
        image_row[i] = len(twins)
        twins.append((d, twin))
        twin_caps = scene_captions(twin)
        reverse = reversed_order(d.scene, twin)
        for c, k in zip(caps_of[i], paraphrase, strict=True):
            text_row[c] = len(texts)
            # A reversed twin is also described by the caption's relation flipped
            # ("A right of B" for "A left of B"): half of them get that wording, so the
            # relation words themselves are learnt, not only the order of the objects.
            flipped = relation_flip(pairs.captions[c]) if reverse else None
            texts.append(flipped if flipped and rng.random() < 0.5 else twin_caps[k])
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


class _StepPairs:
    """The (caption, image, label) pairs of one training step, added group by group,
    and for the listwise loss where each group's logits sit in each query's list.
    """

    def __init__(self) -> None:
        self.tokens: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.images: list[torch.Tensor] = []
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
        self.images.append(pics.image_tokens[image_rows])
        self.labels.append(np.full(n, float(label)))
        for name, rows in lists.items():
            self.lists.setdefault(name, []).append((rows, self.size))
        self.size += n

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text [N, L, Dt], mask [N, L], image [N, P, Di], labels [N]), captions padded
        to the step's longest."""
        width = max(t.shape[1] for t in self.tokens)
        text = torch.cat([F.pad(t, (0, 0, 0, width - t.shape[1])) for t in self.tokens])
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in self.masks])
        labels = torch.as_tensor(np.concatenate(self.labels))
        return text, mask, torch.cat(self.images), labels


def listwise_loss(logits: torch.Tensor, columns: list[tuple[np.ndarray, int]]) -> torch.Tensor:
    """Cross-entropy of each query's positive (its first column) against the other
    candidates in its row, absent ones left out: the ranking the reranker is used for
    (localized contrastive estimation, Gao et al. 2021), beside the pointwise ITM loss.
    """
    queries = len(columns[0][0])
    table = logits.new_full((queries, len(columns)), float("-inf"))  # [Q, candidates]
    for col, (rows, offset) in enumerate(columns):
        table[torch.as_tensor(rows), col] = logits[offset : offset + len(rows)]
    return (torch.logsumexp(table, dim=1) - table[:, 0]).mean()


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


def grouped_logits(
    model: CrossModalReranker,
    text: torch.Tensor,
    mask: torch.Tensor,
    image: torch.Tensor,
    groups: int,
) -> torch.Tensor:
    """Match logits [B] of pairs (text b, image b), computed in ``groups`` runs of pairs
    sorted by caption length so that each run pads only to its own longest caption.

    text [B, L, Dt] and image [B, P, Di] (any float dtype), mask [B, L]. Padding is
    masked out, so the logits are those of one padded batch; only the compute differs.
    """
    lengths = mask.sum(1)
    order = torch.argsort(lengths)
    dtype = next(model.parameters()).dtype  # cached tokens are float16
    parts = []
    # At most one group per pair: tensor_split then gives no empty group.
    for idx in torch.tensor_split(order, max(1, min(groups, len(order)))):
        longest = int(lengths[idx].max())
        t = text[idx, :longest].to(dtype)  # [b, longest, Dt]
        parts.append(model(t, mask[idx, :longest], image[idx].to(dtype)))
    return torch.cat(parts)[torch.argsort(order)]  # back to the pairs' order


def train_reranker(cfg: RerankTrainConfig) -> dict[str, Any]:
    """Train, tune w on val, save; returns the metrics also written to OUT/metrics.json."""
    started = time.time()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    encoder = Encoder.load(cfg.model, cfg.pretrained)
    train_pairs = read_pairs(cfg.pairs)
    feats, caps_of, train_pairs = features_for(
        encoder, train_pairs, cfg.images, cfg.captions_per_image, cfg.seed
    )
    # One compositional twin per image (when its caption allows a swap).
    comp_rows, _, comp_neg = compositional_set(encoder, train_pairs, caps_of, cfg.seed)
    comp_of = {int(r): j for j, r in enumerate(comp_rows)}
    comp = CompositionalNegatives(*comp_neg[1:3]) if len(comp_rows) else None
    cf = counterfactual_set(encoder, train_pairs, caps_of, cfg.seed) if cfg.counterfactual else None
    prep_s = time.time() - started

    rcfg = RerankerConfig(
        text_width=feats.text_tokens.shape[-1],
        image_width=feats.image_tokens.shape[-1],
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.heads,
        image_positions=feats.image_tokens.shape[1],
    )
    model = CrossModalReranker(rcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(caps_of)
    # Positives: an image for every caption of the same text (the same scene twice).
    by_text: dict[str, set[int]] = {}
    for c, text in enumerate(train_pairs.captions):
        by_text.setdefault(text, set()).add(int(feats.caption_image[c]))
    text_ids: dict[str, set[int]] = {}
    for c, text in enumerate(train_pairs.captions):
        text_ids.setdefault(text, set()).add(c)
    t_nn, t_w = hard_neighbours(
        feats.text_emb, feats.image_emb, [by_text[t] for t in train_pairs.captions]
    )
    own_caps = [set().union(*(text_ids[train_pairs.captions[c]] for c in cs)) for cs in caps_of]
    i_nn, i_w = hard_neighbours(feats.image_emb, feats.text_emb, own_caps)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, total // 20)
    history = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        perm = rng.permutation(n)
        losses, accs = [], []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="step")
        for b in bar:
            lr = cfg.lr * min(1.0, (step + 1) / warmup)
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
            for g in opt.param_groups:
                g["lr"] = lr
            imgs = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            caps = np.array([caps_of[i][rng.integers(len(caps_of[i]))] for i in imgs])
            neg_img = _draw(t_nn, t_w, caps, rng)  # a hard image for each caption
            neg_cap = _draw(i_nn, i_w, imgs, rng)  # a hard caption for each image
            # Plus an easy one: with hard negatives only the loss sits at chance for
            # hundreds of steps; random ones teach colours and shapes first.
            rand_img = rng.integers(0, n, len(imgs))
            rand_img = np.where(rand_img == imgs, (rand_img + 1) % n, rand_img)
            B = len(imgs)
            every = np.arange(B)
            pairs = _StepPairs()
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
            text, mask, image, y = pairs.tensors()
            logits = grouped_logits(model, text, mask, image, cfg.length_groups)
            # Positives are a minority of the pairs: weight them up to balance the classes.
            loss = itm_loss(logits, y, balance=True)
            if cfg.listwise:
                loss = loss + cfg.listwise * sum(
                    listwise_loss(logits, cols) for cols in pairs.lists.values()
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            accs.append(float(((logits > 0).float() == y).float().mean()))
            step += 1
            if b % 10 == 0:
                bar.set_postfix(
                    loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{np.mean(accs[-50:]):.3f}"
                )
        bar.close()
        history.append(
            {"epoch": epoch, "loss": float(np.mean(losses)), "pair_acc": float(np.mean(accs))}
        )
        print(
            f"epoch {epoch}: ITM loss {history[-1]['loss']:.4f}  "
            f"pair accuracy {history[-1]['pair_acc']:.3f}",
            flush=True,
        )
    model.eval()

    val_report: dict[str, Any] = {}
    if cfg.val:
        val_pairs = read_pairs(cfg.val)
        vfeats, vcaps_of, val_pairs = features_for(
            encoder, val_pairs, cfg.val_images, None, cfg.seed
        )
        by_w = reranked_recall(model, vfeats, cfg.rerank_k, FUSION_WEIGHTS)
        best_w = max(
            by_w, key=lambda w: by_w[w]["text_to_image"]["R@1"] + by_w[w]["image_to_text"]["R@1"]
        )
        model.cfg.fusion_weight = best_w
        from xmodal.crossmodal.metrics import retrieval_recall

        rows, pos, neg = compositional_set(encoder, val_pairs, vcaps_of, cfg.seed + 1)
        val_report = {
            "dual": retrieval_recall(vfeats.image_emb, vfeats.text_emb, vfeats.caption_image),
            "reranked_by_weight": {str(w): v for w, v in by_w.items()},
            "fusion_weight": best_w,
            "reranked": by_w[best_w],
            "rerank_k": cfg.rerank_k,
        }
        if len(rows):
            val_report["compositional"] = compositional_accuracy(
                model, vfeats.image_emb[rows], vfeats.image_tokens[rows], pos, neg
            )
        print(
            f"val (k={cfg.rerank_k}, w={best_w}): {json.dumps(val_report['reranked'])}", flush=True
        )
    out = Path(cfg.out)
    model.save(out, {"encoder": encoder.identity.to_dict()})
    metrics = {
        "settings": asdict(cfg),
        "reranker": asdict(model.cfg),
        "encoder": encoder.identity.to_dict(),
        "train_images": n,
        "train_captions": len(feats.text_emb),
        "compositional_negatives": len(comp_rows),
        "counterfactual_twins": 0 if cf is None else len(cf.image_tokens),
        "history": history,
        "val": val_report,
        "seconds": {"prepare": round(prep_s, 1), "total": round(time.time() - started, 1)},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
