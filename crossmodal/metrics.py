"""Retrieval metrics: image-text recall, by the standard protocol (CLIP_benchmark, ALBEF
itm_eval), and ranking metrics for query sets with several relevant images each.

Every caption is a query for text-to-image: a hit at k when its own image is in the
top k images. Every image is a query for image-to-text: a hit at k when any of its
captions is in the top k captions (its rank is its best caption's rank).

Ties count against the query: a candidate that scores the same as the true one is
ranked ahead of it. A scorer that gives everything the same score thus gets R@1 = 0
instead of whatever an argsort happens to do; captions of the same image never
count against each other.

Query sets (a text query, several relevant images; binary relevance, as TREC's
``trec_eval`` computes them): average precision (over the whole ranking, and over the
top ``AP_K`` as a search engine shows them), precision at k, R-precision and nDCG@k,
each from one query's relevance in rank order (``ranked_relevance``, which breaks ties
against the query too), macro-averaged by ``query_set_metrics``. Relevant
images that are not ranked at all (an image that failed to load) still count in
``n_relevant``: they are relevant images the ranking never found.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

KS: tuple[int, ...] = (1, 5, 10)
# AP is truncated here for mAP@100: what a search engine shows (a page, a few scrolls),
# not where the 300th of 300 relevant images lands.
AP_K = 100


def text_to_image_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """0-based rank of each caption's image. ``scores`` is [captions, images]."""
    scores = np.asarray(scores)
    rows = np.arange(scores.shape[0])
    true = scores[rows, caption_image]
    ahead = (scores >= true[:, None]).sum(axis=1) - 1  # minus the true image itself
    return ahead


def image_to_text_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """0-based rank of each image's best caption; -1 for images without captions.

    ``scores`` is [images, captions].
    """
    scores = np.asarray(scores)
    n_images = scores.shape[0]
    own = caption_image[None, :] == np.arange(n_images)[:, None]  # [images, captions]
    has = own.any(axis=1)
    best = np.where(own, scores, -np.inf).max(axis=1)
    ahead = ((scores >= best[:, None]) & ~own).sum(axis=1)
    return np.where(has, ahead, -1)


def recall_at(ranks: Iterable[int], ks: Iterable[int] = KS) -> dict[str, float]:
    """{'R@k': fraction of ranks < k}, ignoring ranks of -1 (no positives)."""
    r = np.asarray(list(ranks) if not isinstance(ranks, np.ndarray) else ranks)
    r = r[r >= 0]
    if r.size == 0:
        return {f"R@{k}": 0.0 for k in ks}
    return {f"R@{k}": float((r < k).mean()) for k in ks}


def retrieval_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: np.ndarray,
    ks: Iterable[int] = KS,
    chunk: int = 4096,
) -> dict[str, dict[str, float]]:
    """Both directions from embeddings: {'text_to_image': {...}, 'image_to_text': {...}}.

    ``caption_image[i]`` is the row of ``image_emb`` that caption ``i`` describes.
    Scores are dot products (cosine for unit vectors); computed in chunks of queries.
    """
    ks = tuple(ks)
    caption_image = np.asarray(caption_image)
    t2i = np.concatenate(
        [
            text_to_image_ranks(text_emb[i : i + chunk] @ image_emb.T, caption_image[i : i + chunk])
            for i in range(0, len(text_emb), chunk)
        ]
        or [np.zeros(0, int)]
    )
    i2t_parts = []
    for i in range(0, len(image_emb), chunk):
        block = image_emb[i : i + chunk] @ text_emb.T
        i2t_parts.append(image_to_text_ranks(block, caption_image - i))
    i2t = np.concatenate(i2t_parts or [np.zeros(0, int)])
    return {"text_to_image": recall_at(t2i, ks), "image_to_text": recall_at(i2t, ks)}


# ------------------------------------------------------------------ query sets


def ranked_relevance(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """The candidates' relevance (bool) in rank order: by descending score, and among
    equal scores the irrelevant ones first (ties count against the query).

    ``scores`` and ``relevant`` are [candidates].
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.shape != relevant.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape}: want one [N] each")
    # lexsort's last key is the primary one: descending score, then relevant after irrelevant.
    order = np.lexsort((relevant, -scores))
    return relevant[order]


def _relevant_count(ranked: np.ndarray, n_relevant: int | None) -> int:
    found = int(ranked.sum())
    total = found if n_relevant is None else int(n_relevant)
    if total < found:
        raise ValueError(f"n_relevant {total} is less than the {found} relevant items ranked")
    if total == 0:
        raise ValueError("a query without relevant items has no ranking metrics")
    return total


def average_precision(ranked: np.ndarray, n_relevant: int | None = None) -> float:
    """AP of one query: the mean, over its relevant items, of the precision at the rank
    where each is found; a relevant item never ranked contributes 0.

    ``ranked`` is the relevance (bool) of the candidates in rank order;
    ``n_relevant`` the query's relevant items (default: those in ``ranked``).
    E.g. ``[1, 0, 1, 0]`` gives (1/1 + 2/3) / 2 = 0.833.
    """
    ranked = np.asarray(ranked, dtype=bool)
    total = _relevant_count(ranked, n_relevant)
    hits = np.cumsum(ranked)
    positions = np.flatnonzero(ranked) + 1  # 1-based ranks of the relevant items
    return float((hits[ranked] / positions).sum() / total)


def ap_at_k(ranked: np.ndarray, k: int = AP_K, n_relevant: int | None = None) -> float:
    """AP@k of one query: the precision at the rank of each relevant item found in the
    top ``k``, summed and divided by min(``n_relevant``, k), so a ranking whose top k
    are all relevant (or that holds every relevant item first) scores 1.0.

    E.g. ``[0, 1, 1, 0, 1]`` with k = 3: (1/2 + 2/3) / min(3, 3) = 0.389.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    ranked = np.asarray(ranked, dtype=bool)
    total = _relevant_count(ranked, n_relevant)
    top = ranked[:k]
    hits = np.cumsum(top)
    positions = np.flatnonzero(top) + 1  # 1-based ranks of the relevant items in the top k
    return float((hits[top] / positions).sum() / min(total, k))


def precision_at_k(ranked: np.ndarray, k: int) -> float:
    """Relevant items in the top ``k``, divided by ``k`` (also when fewer than ``k``
    candidates are ranked: the standard definition, so a short list cannot score 1
    by being short)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    ranked = np.asarray(ranked, dtype=bool)
    return float(ranked[:k].sum() / k)


def r_precision(ranked: np.ndarray, n_relevant: int | None = None) -> float:
    """Precision at R, where R is the query's number of relevant items: 1.0 exactly
    when every relevant item is ranked ahead of every other."""
    ranked = np.asarray(ranked, dtype=bool)
    total = _relevant_count(ranked, n_relevant)
    return float(ranked[:total].sum() / total)


def ndcg_at_k(ranked: np.ndarray, k: int, n_relevant: int | None = None) -> float:
    """nDCG@k with binary relevance: DCG = sum over the top ``k`` of rel_i / log2(i + 1)
    (i from 1), divided by the DCG of the ideal ranking (all ``n_relevant`` first)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    ranked = np.asarray(ranked, dtype=bool)
    total = _relevant_count(ranked, n_relevant)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))  # ranks 1..k
    dcg = float((ranked[:k] * discounts[: len(ranked[:k])]).sum())
    ideal = float(discounts[: min(total, k)].sum())
    return dcg / ideal


def query_metrics(
    ranked: np.ndarray, n_relevant: int | None = None, k: int = 10, ap_k: int = AP_K
) -> dict:
    """One query's {'AP', 'AP@ap_k', 'P@k', 'R-precision', 'nDCG@k'} (k and ap_k in the
    key names)."""
    return {
        "AP": average_precision(ranked, n_relevant),
        f"AP@{ap_k}": ap_at_k(ranked, ap_k, n_relevant),
        f"P@{k}": precision_at_k(ranked, k),
        "R-precision": r_precision(ranked, n_relevant),
        f"nDCG@{k}": ndcg_at_k(ranked, k, n_relevant),
    }


def query_set_metrics(
    scores: np.ndarray,
    relevant: np.ndarray,
    n_relevant: Iterable[int] | None = None,
    k: int = 10,
    ap_k: int = AP_K,
) -> dict[str, Any]:
    """Macro averages over queries ({'mAP', 'mAP@ap_k', 'P@k', 'R-precision', 'nDCG@k'})
    and each query's own figures ('per_query', with 'AP...' where the mean says 'mAP...').

    ``scores`` and ``relevant`` (bool) are [queries, candidates]; ``n_relevant[q]``
    counts query q's relevant items including any not among the candidates (default:
    ``relevant``'s row sums).
    """
    scores = np.asarray(scores)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.ndim != 2 or scores.shape != relevant.shape or not len(scores):
        raise ValueError(f"scores {scores.shape}, relevant {relevant.shape}: want one [Q, N] each")
    totals = relevant.sum(axis=1) if n_relevant is None else np.asarray(list(n_relevant))
    per_query = [
        query_metrics(ranked_relevance(s, r), int(n), k, ap_k)
        for s, r, n in zip(scores, relevant, totals, strict=True)
    ]
    return {**mean_metrics(per_query), "per_query": per_query}


def mean_metrics(per_query: list[dict[str, float]]) -> dict[str, float]:
    """Macro averages of ``query_metrics`` results: 'AP...' keys become 'mAP...'."""
    if not per_query:
        raise ValueError("no queries to average")
    return {
        ("m" + key if key.startswith("AP") else key): float(np.mean([q[key] for q in per_query]))
        for key in per_query[0]
    }
