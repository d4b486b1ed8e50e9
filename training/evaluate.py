"""``xmodal eval --rerank``: recall after cross-attention reranking, and compositional
accuracy, on a pairs file.

It shares the reranker training's features (``rerank_features.features_for``) and
compositional swaps (``negatives``), which is why it lives with training and not in
``xmodal.search.evaluate`` (dual-encoder recall, the table both print).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import ModelError
from xmodal.crossmodal.metrics import retrieval_recall
from xmodal.crossmodal.pairs import read_pairs
from xmodal.search.evaluate import report_head
from xmodal.search.limits import DEFAULT_RERANK_K
from xmodal.search.rerank import load_scorer

from .negatives import relation_phrase, swap_kind
from .rerank_eval import compositional_accuracy, fusion_weight, reranked_recall
from .rerank_features import compositional_set, features_for


def evaluate_reranked(
    encoder: Encoder, pairs_path: str | Path, rerank_k: int = DEFAULT_RERANK_K, seed: int = 0
) -> dict[str, Any]:
    """Recall after reranking the dual top-k (top level), dual-only recall ("dual"), and
    compositional 2-way accuracy, as ``xmodal eval --rerank --json`` prints them."""
    scorer = load_scorer(encoder)
    if scorer is None:
        raise ModelError(f"model {encoder.identity.name} has no reranker to evaluate")
    started = time.time()
    pairs = read_pairs(pairs_path)
    n_images = len(pairs.images)
    feats, caps_of, pairs = features_for(encoder, pairs, None, None, seed)
    w = fusion_weight(scorer)
    reranked = reranked_recall(scorer, feats, rerank_k, [w])[w]
    rows, pos, neg = compositional_set(encoder, pairs, caps_of, seed)
    comp: dict[str, Any] = {"pairs": 0, "dual": None, "reranked": None}
    if len(rows):
        kinds = [swap_kind(p, n) for p, n in zip(pos[3], neg[3], strict=True)]
        phrases = [
            relation_phrase(p) if k == "relation" else None
            for p, k in zip(pos[3], kinds, strict=True)
        ]
        comp = compositional_accuracy(
            scorer, feats.image_emb[rows], feats.image_tokens[rows], pos, neg, kinds, phrases
        )
    return {
        **report_head(encoder, pairs_path, pairs, n_images - len(pairs.images)),
        **reranked,
        "dual": retrieval_recall(feats.image_emb, feats.text_emb, feats.caption_image),
        "compositional": comp,
        "rerank": {"k": rerank_k, "fusion_weight": w, "scorer": type(scorer).__name__},
        "seconds": round(time.time() - started, 2),
    }
