"""Recall after reranking, and compositional accuracy, from precomputed features.

Shared by reranker training (to tune the fusion weight on val) and `xmodal eval
--rerank`. Retrieval is two-stage as at search time: the dual encoder's top-k
candidates are re-scored with ``match logit + w * cosine``; everything outside the
top k keeps its dual-encoder order after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from xmodal.crossmodal.metrics import (
    AP_K,
    image_to_text_ranks,
    query_set_metrics,
    recall_at,
    text_to_image_ranks,
)
from xmodal.crossmodal.scoring import MatchScorer, fusion_weight


@dataclass
class Features:
    """Frozen dual-encoder outputs for a set of images and captions."""

    image_emb: np.ndarray  # [N, D] unit vectors
    image_tokens: torch.Tensor  # [N, P, Di] (float16 to save memory)
    text_emb: np.ndarray  # [M, D]
    text_tokens: torch.Tensor  # [M, L, Dt] padded
    text_mask: torch.Tensor  # [M, L] True on real tokens
    caption_image: np.ndarray  # [M] index into images
    texts: list[str] | None = None  # the captions (scorers that read raw text need them)


@torch.inference_mode()
def pair_logits(
    model: MatchScorer,
    feats: Features,
    text_idx: np.ndarray,
    image_idx: np.ndarray,
    chunk: int = 512,
    desc: str = "reranking pairs",
) -> np.ndarray:
    """Match scores of (caption, image) index pairs, in chunks (with a progress bar)."""
    out = np.empty(len(text_idx), np.float32)
    starts = range(0, len(text_idx), chunk)
    for s in tqdm(starts, desc=desc, unit="chunk", disable=len(starts) < 8, leave=False):
        t = torch.as_tensor(text_idx[s : s + chunk])
        i = torch.as_tensor(image_idx[s : s + chunk])
        texts: list[str] = []
        text_tok = mask = None
        if model.needs_text_features:
            mask = feats.text_mask[t]
            longest = int(mask.sum(1).max())
            text_tok, mask = feats.text_tokens[t, :longest].float(), mask[:, :longest]
        else:  # CoCa: log p(caption | image tokens)
            assert feats.texts is not None
            texts = [feats.texts[j] for j in t.tolist()]
        logits = model.match_scores(texts, text_tok, mask, feats.image_tokens[i].float())
        out[s : s + chunk] = logits.float().numpy()
    return out


def _reranked_positions(dual: np.ndarray, fused: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """New scores where the top-k candidates outrank everything else, in fused order."""
    scores = dual.astype(np.float64).copy()
    # Candidates above every non-candidate: offset by the dual range, keep fused order.
    offset = (dual.max() - dual.min()) + 1.0 + (fused.max() - fused.min())
    scores[cand] = dual.max() + offset + (fused - fused.max())
    return scores


def reranked_recall(
    model: MatchScorer,
    feats: Features,
    k: int,
    weights: Sequence[float],
) -> dict[float, dict[str, dict[str, float]]]:
    """Recall in both directions after reranking the top ``k``, for each fusion weight."""
    sims = feats.text_emb @ feats.image_emb.T  # [M, N]
    m, n = sims.shape
    k_img, k_txt = min(k, n), min(k, m)
    t_cand = np.argsort(-sims, axis=1)[:, :k_img]  # [M, k] image candidates per caption
    i_cand = np.argsort(-sims.T, axis=1)[:, :k_txt]  # [N, k] caption candidates per image
    t_logits = pair_logits(
        model, feats, np.repeat(np.arange(m), k_img), t_cand.ravel(), desc="rerank text->image"
    )
    i_logits = pair_logits(
        model, feats, i_cand.ravel(), np.repeat(np.arange(n), k_txt), desc="rerank image->text"
    )
    t_logits, i_logits = t_logits.reshape(m, k_img), i_logits.reshape(n, k_txt)
    out = {}
    for w in weights:
        t_scores = np.empty_like(sims, dtype=np.float64)
        for q in range(m):
            cos = sims[q, t_cand[q]]
            t_scores[q] = _reranked_positions(sims[q], t_logits[q] + w * cos, t_cand[q])
        i_scores = np.empty((n, m), dtype=np.float64)
        for q in range(n):
            cos = sims[i_cand[q], q]
            i_scores[q] = _reranked_positions(sims[:, q], i_logits[q] + w * cos, i_cand[q])
        out[float(w)] = {
            "text_to_image": recall_at(text_to_image_ranks(t_scores, feats.caption_image)),
            "image_to_text": recall_at(image_to_text_ranks(i_scores, feats.caption_image)),
        }
    return out


def compositional_accuracy(
    model: MatchScorer,
    image_emb: np.ndarray,
    image_tokens: torch.Tensor,
    pos: tuple[np.ndarray, torch.Tensor, torch.Tensor],
    neg: tuple[np.ndarray, torch.Tensor, torch.Tensor],
    kinds: Sequence[str | None] | None = None,
    relations: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """2-way accuracy: the true caption must outscore its swapped twin, image by image.

    ``pos`` and ``neg`` are (embeddings [N, D], tokens [N, L, Dt], mask [N, L]) of the
    true and the swapped caption of each image. With ``kinds`` (what each twin swapped)
    the result also holds the accuracies per kind, under "by_kind"; with ``relations``
    (the spatial phrase of each relation swap, None for other swaps), those of the
    relation swaps per phrase, under "by_relation".
    """
    n = len(image_emb)
    dual_pos = np.sum(image_emb * pos[0], axis=1)
    dual_neg = np.sum(image_emb * neg[0], axis=1)
    texts_pos = pos[3] if len(pos) > 3 else None
    texts_neg = neg[3] if len(neg) > 3 else None
    feats_pos = Features(image_emb, image_tokens, pos[0], pos[1], pos[2], np.arange(n), texts_pos)
    feats_neg = Features(image_emb, image_tokens, neg[0], neg[1], neg[2], np.arange(n), texts_neg)
    idx = np.arange(n)
    w = fusion_weight(model)
    fused_pos = pair_logits(model, feats_pos, idx, idx) + w * dual_pos
    fused_neg = pair_logits(model, feats_neg, idx, idx) + w * dual_neg
    dual_ok, fused_ok = dual_pos > dual_neg, fused_pos > fused_neg  # [N] each
    out: dict[str, Any] = {
        "pairs": int(n),
        "dual": float(np.mean(dual_ok)),
        "reranked": float(np.mean(fused_ok)),
    }
    if kinds is not None:
        out["by_kind"] = _breakdown([k or "other" for k in kinds], dual_ok, fused_ok)
    if relations is not None:
        out["by_relation"] = _breakdown(relations, dual_ok, fused_ok)
    return out


def _breakdown(
    labels: Sequence[str | None], dual_ok: np.ndarray, fused_ok: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Pairs and accuracies per label (pairs labelled None are left out)."""
    by = np.array([label or "" for label in labels])
    return {
        str(k): {
            "pairs": int(np.sum(by == k)),
            "dual": float(np.mean(dual_ok[by == k])),
            "reranked": float(np.mean(fused_ok[by == k])),
        }
        for k in sorted(set(by.tolist()) - {""})
    }


def reranked_query_map(
    model: MatchScorer,
    image_emb: np.ndarray,
    image_tokens: torch.Tensor,
    queries: tuple[np.ndarray, torch.Tensor, torch.Tensor],
    relevant: np.ndarray,
    k: int,
    weights: Sequence[float],
) -> dict[float, float]:
    """Mean AP@100 of a query set after reranking each query's dual top ``k`` images,
    for each fusion weight. ``queries`` is (embeddings [Q, D], tokens [Q, L, Dt],
    mask [Q, L]); ``relevant`` [Q, N] marks each query's relevant images."""
    q_emb, q_tok, q_mask = queries
    feats = Features(image_emb, image_tokens, q_emb, q_tok, q_mask, np.zeros(len(q_emb), int))
    sims = q_emb @ image_emb.T  # [Q, N]
    q, n = sims.shape
    k = min(k, n)
    cand = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    logits = pair_logits(model, feats, np.repeat(np.arange(q), k), cand.ravel(), desc="queries")
    logits = logits.reshape(q, k)
    n_relevant = relevant.sum(axis=1).tolist()
    out = {}
    for w in weights:
        scores = np.stack(
            [
                _reranked_positions(sims[r], logits[r] + w * sims[r, cand[r]], cand[r])
                for r in range(q)
            ]
        )
        out[float(w)] = query_set_metrics(scores, relevant, n_relevant)[f"mAP@{AP_K}"]
    return out
