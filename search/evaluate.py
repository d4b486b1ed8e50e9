"""``xmodal eval``: image-text retrieval recall of a model on a pairs file.

All captions are embedded; text-to-image ranks each caption's own image among all
images, image-to-text counts a hit when any of the image's captions is in the top k
(CLIP_benchmark's protocol; see ``crossmodal.metrics``). Images that fail to load are
counted and reported, and their captions are left out of both directions.

Recall after reranking (``xmodal eval --rerank``) needs the reranker's training code
(features, compositional swaps), so it lives in ``xmodal.training.evaluate``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.metrics import retrieval_recall
from xmodal.crossmodal.pair_images import ImageFailure, decode_pair_images
from xmodal.crossmodal.pairs import PairSet, read_pairs


def embed_pairs(
    encoder: Encoder, pairs: PairSet, batch_size: int = 64, workers: int = 2, progress: bool = True
) -> tuple[np.ndarray, list[int], list[ImageFailure]]:
    """Embed every image that loads: (embeddings [kept, D], kept indices, failures)."""
    kept: list[int] = []
    failures: list[ImageFailure] = []
    chunks: list[np.ndarray] = [np.zeros((0, encoder.dim), np.float32)]
    batch: list[torch.Tensor] = []
    decoded = decode_pair_images(
        pairs.images, encoder.preprocess_image, failures, workers, progress=progress
    )
    for i, item in decoded:
        kept.append(i)
        batch.append(item)
        if len(batch) == batch_size:
            chunks.append(encoder.encode_image_tensors(torch.stack(batch)))
            batch = []
    if batch:
        chunks.append(encoder.encode_image_tensors(torch.stack(batch)))
    return np.concatenate(chunks), kept, failures


def report_head(
    encoder: Encoder, pairs_path: str | Path, pairs: PairSet, failed: int
) -> dict[str, Any]:
    """The keys every ``xmodal eval --json`` object starts with."""
    return {
        "model": encoder.identity.name,
        "pretrained": encoder.identity.pretrained,
        "pairs": str(pairs_path),
        "images": len(pairs.images),
        "captions": len(pairs.captions),
        "failed_images": failed,
    }


def evaluate_pairs(
    encoder: Encoder,
    pairs_path: str | Path,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Recall@{1,5,10} both ways, as the JSON object ``xmodal eval --json`` prints."""
    started = time.time()
    pairs = read_pairs(pairs_path)
    image_emb, kept, failures = embed_pairs(encoder, pairs, batch_size, workers, progress)
    pairs = pairs.subset_images(kept)
    text_emb = encoder.encode_texts(pairs.captions)
    recall = retrieval_recall(image_emb, text_emb, pairs.caption_image)
    return {
        **report_head(encoder, pairs_path, pairs, len(failures)),
        "failures": [str(f) for f in failures[:20]],
        **recall,
        "seconds": round(time.time() - started, 2),
    }


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table ``xmodal eval`` prints."""
    lines = [
        f"model    {result['model']}",
        f"pairs    {result['pairs']}: {result['images']} images, {result['captions']} captions"
        + (f", {result['failed_images']} images failed to load" if result["failed_images"] else ""),
        "",
        f"{'direction':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}",
    ]
    rows = [("text_to_image", "text -> image"), ("image_to_text", "image -> text")]
    if "dual" in result:
        rows = [
            (("dual", "text_to_image"), "text -> image (dual)"),
            (("dual", "image_to_text"), "image -> text (dual)"),
            ("text_to_image", f"text -> image (reranked top {result['rerank']['k']})"),
            ("image_to_text", f"image -> text (reranked top {result['rerank']['k']})"),
        ]
    width = max(len(label) for _, label in rows) + 2
    lines[-1] = f"{'direction':<{width}}{'R@1':>8}{'R@5':>8}{'R@10':>8}"
    for key, label in rows:
        r = result[key[0]][key[1]] if isinstance(key, tuple) else result[key]
        lines.append(f"{label:<{width}}{r['R@1']:>8.3f}{r['R@5']:>8.3f}{r['R@10']:>8.3f}")
    comp = result.get("compositional")
    if comp and comp.get("pairs"):
        lines.append(
            f"compositional 2-way accuracy ({comp['pairs']} images, true caption vs swapped): "
            f"dual {comp['dual']:.3f}, reranked {comp['reranked']:.3f}"
        )
        for kind, k in comp.get("by_kind", {}).items():
            lines.append(
                f"  {kind + ' swapped':<18}{k['pairs']:>5} images: "
                f"dual {k['dual']:.3f}, reranked {k['reranked']:.3f}"
            )
    for failure in result.get("failures", []):
        lines.append(f"failed: {failure}")
    return "\n".join(lines)
