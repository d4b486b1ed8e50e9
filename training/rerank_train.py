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
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.metrics import retrieval_recall
from xmodal.crossmodal.pairs import read_pairs
from xmodal.crossmodal.reranker import CrossModalReranker, RerankerConfig, itm_loss
from xmodal.search.evaluate import read_queries

from .config import RerankTrainConfig
from .counterfactual import demo_images
from .loop import seed_all, set_lr, warmup_cosine
from .queries import queries_beside
from .rerank_eval import (
    Features,
    compositional_accuracy,
    reranked_query_map,
    reranked_recall,
)
from .rerank_features import (
    TrainingSet,
    compositional_set,
    features_for,
    text_features,
    training_set,
)
from .rerank_partial import PartialTruth, partial_truth_set
from .rerank_sampling import (
    HardNegatives,
    StepPairs,
    hard_negatives,
    sample_partial_step,
    sample_step,
)

FUSION_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0)


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


def grouped_logits(
    model: CrossModalReranker,
    text: torch.Tensor,
    mask: torch.Tensor,
    image: torch.Tensor,
    groups: int,
    image_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Match logits [B] of pairs (text b, image ``image_index[b]``, or image b), the
    image side computed once per image and the text side in ``groups`` runs of pairs
    sorted by caption length so that each run pads only to its own longest caption.

    text [B, L, Dt] and image [U, P, Di] (any float dtype), mask [B, L]. Padding is
    masked out, so the logits are those of one padded batch; only the compute differs.
    """
    if image_index is None:
        image_index = torch.arange(len(image))
    lengths = mask.sum(1)
    order = torch.argsort(lengths)
    dtype = next(model.parameters()).dtype  # cached tokens are float16
    kv = model.image_keys_values(image.to(dtype))  # per block, [U, H, P, W/H] each
    parts = []
    # At most one group per pair: tensor_split then gives no empty group.
    for idx in torch.tensor_split(order, max(1, min(groups, len(order)))):
        longest = int(lengths[idx].max())
        t = text[idx, :longest].to(dtype)  # [b, longest, Dt]
        parts.append(model.score_texts(t, mask[idx, :longest], kv, image_index[idx]))
    return torch.cat(parts)[torch.argsort(order)]  # back to the pairs' order


def new_reranker(feats: Features, cfg: RerankTrainConfig) -> CrossModalReranker:
    """A freshly initialised reranker sized to the encoder's token features."""
    rcfg = RerankerConfig(
        text_width=feats.text_tokens.shape[-1],
        image_width=feats.image_tokens.shape[-1],
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.heads,
        image_positions=feats.image_tokens.shape[1],
    )
    return CrossModalReranker(rcfg)


def optimisation_step(
    model: CrossModalReranker,
    opt: torch.optim.Optimizer,
    pairs: StepPairs,
    cfg: RerankTrainConfig,
) -> tuple[float, float]:
    """One AdamW step on a step's pairs: ITM (+ listwise) loss, gradients clipped to 1.
    Returns (loss, pair accuracy)."""
    text, mask, images, index, y = pairs.tensors()
    logits = grouped_logits(model, text, mask, images, cfg.length_groups, index)
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
    return loss.item(), float(((logits > 0).float() == y).float().mean())


def train_epoch(
    model: CrossModalReranker,
    opt: torch.optim.Optimizer,
    data: TrainingSet,
    negs: HardNegatives | None,
    rng: np.random.Generator,
    cfg: RerankTrainConfig,
    epoch: int,
    lr_at: Callable[[int], float],
    first_step: int,
) -> dict[str, Any]:
    """One pass over the training images in a random order, the learning rate of run
    step ``first_step + b`` at its step b; returns the epoch's history line."""
    n = len(data.caps_of)
    steps_per_epoch = max(1, n // cfg.batch_size)
    perm = rng.permutation(n)
    losses, accs = [], []
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="step")
    for b in bar:
        set_lr(opt, lr_at(first_step + b))
        imgs = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        if data.partial is not None:
            pairs = sample_partial_step(data, imgs, rng)
        else:
            assert negs is not None
            pairs = sample_step(data, negs, imgs, rng)
        loss, acc = optimisation_step(model, opt, pairs, cfg)
        losses.append(loss)
        accs.append(acc)
        if b % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{np.mean(accs[-50:]):.3f}")
    bar.close()
    line = {"epoch": epoch, "loss": float(np.mean(losses)), "pair_acc": float(np.mean(accs))}
    print(
        f"epoch {epoch}: ITM loss {line['loss']:.4f}  pair accuracy {line['pair_acc']:.3f}",
        flush=True,
    )
    return line


# Weights whose mean val R@1 (both directions) is within this of the best stay
# candidates; among them the best mAP@100 on the val queries wins. R@1 of full captions
# is near 1 for many weights, so it alone cannot tell them apart; the queries can.
RECALL_SLACK = 0.005


def val_queries_path(cfg: RerankTrainConfig) -> Path | None:
    """The queries that choose w: --val-queries, or the query set beside --val."""
    if cfg.val_queries:
        return Path(cfg.val_queries)
    return queries_beside(cfg.val) if cfg.val else None


def query_map_by_weight(
    model: CrossModalReranker, encoder: Encoder, vfeats: Features, val_pairs, path: Path, k: int
) -> dict[float, float]:
    """mAP@100 of the val queries at ``path`` over the val images, per fusion weight."""
    queries = read_queries(path, val_pairs)
    relevant = np.zeros((len(queries.texts), len(val_pairs.images)), bool)
    for q, images in enumerate(queries.relevant):
        relevant[q, images] = True
    q_feats = text_features(encoder, queries.texts, desc="val queries")
    return reranked_query_map(
        model, vfeats.image_emb, vfeats.image_tokens, q_feats, relevant, k, FUSION_WEIGHTS
    )


def tune_fusion(
    model: CrossModalReranker, encoder: Encoder, cfg: RerankTrainConfig
) -> dict[str, Any]:
    """Choose w (score = logit + w * cosine) on val, set it on the model; returns the
    val report. With val queries: the best mAP@100 among the weights within
    ``RECALL_SLACK`` of the best mean R@1; without: the best mean R@1."""
    assert cfg.val is not None
    val_pairs = read_pairs(cfg.val)
    vfeats, vcaps_of, val_pairs = features_for(encoder, val_pairs, cfg.val_images, None, cfg.seed)
    by_w = reranked_recall(model, vfeats, cfg.rerank_k, FUSION_WEIGHTS)

    def recall(w: float) -> float:
        return (by_w[w]["text_to_image"]["R@1"] + by_w[w]["image_to_text"]["R@1"]) / 2

    best_recall = max(recall(w) for w in by_w)
    queries = val_queries_path(cfg) if cfg.fusion_by == "queries" else None
    maps: dict[float, float] = {}
    if queries is not None:
        maps = query_map_by_weight(model, encoder, vfeats, val_pairs, queries, cfg.rerank_k)
        near = [w for w in by_w if recall(w) >= best_recall - RECALL_SLACK]
        best_w = max(near, key=lambda w: (maps[w], recall(w)))
    else:
        best_w = max(by_w, key=recall)
    model.cfg.fusion_weight = best_w
    rows, pos, neg = compositional_set(encoder, val_pairs, vcaps_of, cfg.seed + 1)
    report: dict[str, Any] = {
        "dual": retrieval_recall(vfeats.image_emb, vfeats.text_emb, vfeats.caption_image),
        "reranked_by_weight": {str(w): v for w, v in by_w.items()},
        "fusion_weight": best_w,
        "reranked": by_w[best_w],
        "rerank_k": cfg.rerank_k,
    }
    if maps:
        report["queries"] = {
            "file": str(queries),
            "map100_by_weight": {str(w): round(v, 4) for w, v in maps.items()},
            "map100": maps[best_w],
        }
    if len(rows):
        report["compositional"] = compositional_accuracy(
            model, vfeats.image_emb[rows], vfeats.image_tokens[rows], pos, neg
        )
    extra = f", queries mAP@100 {maps[best_w]:.3f}" if maps else ""
    print(
        f"val (k={cfg.rerank_k}, w={best_w}{extra}): {json.dumps(report['reranked'])}", flush=True
    )
    return report


def save_run(
    cfg: RerankTrainConfig,
    model: CrossModalReranker,
    encoder: Encoder,
    data: TrainingSet,
    history: list[dict[str, Any]],
    val_report: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Write the weights and OUT/metrics.json; returns the metrics."""
    out = Path(cfg.out)
    model.save(out, {"encoder": encoder.identity.to_dict()})
    metrics = {
        "settings": asdict(cfg),
        "reranker": asdict(model.cfg),
        "encoder": encoder.identity.to_dict(),
        "train_images": len(data.caps_of),
        "train_captions": len(data.feats.text_emb),
        "compositional_negatives": len(data.comp_of),
        "counterfactual_twins": 0 if data.cf is None else len(data.cf.image_tokens),
        "partial_truth": None
        if data.partial is None
        else {
            "texts": len(data.partial.truths),
            "queries": len(data.partial.truths) - len(data.feats.text_emb),
            "negative_queries": len(data.partial.negatives.text_emb),
        },
        "history": history,
        "val": val_report,
        "seconds": seconds,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def partial_truth(encoder: Encoder, data: TrainingSet, seed: int) -> PartialTruth | None:
    """The partial-truth set of a demo corpus's training pairs (None for other pairs,
    which carry no scene to check a text against: they train as before)."""
    demo = demo_images(data.pairs.source, data.pairs.images)
    if any(d is None for d in demo):
        print("not a demo corpus: partial-truth training needs scenes; training without it")
        return None
    return partial_truth_set(encoder, data.pairs, data.caps_of, data.feats, demo, seed)


def train_reranker(cfg: RerankTrainConfig) -> dict[str, Any]:
    """Train, tune w on val, save; returns the metrics also written to OUT/metrics.json."""
    started = time.time()
    seed_all(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    encoder = Encoder.load(cfg.model, cfg.pretrained)
    data = training_set(
        encoder, cfg.pairs, cfg.images, cfg.captions_per_image, cfg.counterfactual, cfg.seed
    )
    negs = None
    if cfg.partial_truth:
        data.partial = partial_truth(encoder, data, cfg.seed)
    if data.partial is None:
        negs = hard_negatives(data)
    prep_s = time.time() - started
    model = new_reranker(data.feats, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(data.caps_of) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    lr_at = partial(
        warmup_cosine, lr=cfg.lr, total=total, warmup=max(1, total // 20), decay_from_start=True
    )
    history = [
        train_epoch(model, opt, data, negs, rng, cfg, epoch, lr_at, (epoch - 1) * steps_per_epoch)
        for epoch in range(1, cfg.epochs + 1)
    ]
    model.eval()
    val_report = tune_fusion(model, encoder, cfg) if cfg.val else {}
    seconds = {"prepare": round(prep_s, 1), "total": round(time.time() - started, 1)}
    return save_run(cfg, model, encoder, data, history, val_report, seconds)
