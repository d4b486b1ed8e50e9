"""Image-text retrieval recall, by the standard protocol (CLIP_benchmark, ALBEF itm_eval).

Every caption is a query for text-to-image: a hit at k when its own image is in the
top k images. Every image is a query for image-to-text: a hit at k when any of its
captions is in the top k captions (its rank is its best caption's rank).

Ties count against the query: a candidate that scores the same as the true one is
ranked ahead of it. A scorer that gives everything the same score thus gets R@1 = 0
instead of whatever an argsort happens to do; captions of the same image never
count against each other.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

KS: tuple[int, ...] = (1, 5, 10)


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
