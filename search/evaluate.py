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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.images import ImageDecodeError, decode_image
from xmodal.crossmodal.metrics import retrieval_recall
from xmodal.crossmodal.pairs import PairSet, read_pairs


def _decoded(encoder: Encoder, paths: list[Path], workers: int) -> Iterator[torch.Tensor | str]:
    def one(path: Path) -> torch.Tensor | str:
        try:
            return encoder.preprocess_image(decode_image(path))
        except (OSError, ImageDecodeError) as exc:
            return f"{path}: {exc}"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        yield from pool.map(one, paths)


def embed_pairs(
    encoder: Encoder, pairs: PairSet, batch_size: int = 64, workers: int = 2, progress: bool = True
) -> tuple[np.ndarray, list[int], list[str]]:
    """Embed every image that loads: (embeddings [kept, D], kept indices, failure messages)."""
    kept: list[int] = []
    failures: list[str] = []
    chunks: list[np.ndarray] = [np.zeros((0, encoder.dim), np.float32)]
    batch: list[torch.Tensor] = []
    bar = tqdm(total=len(pairs.images), desc="images", unit="img", disable=not progress)
    for i, item in enumerate(_decoded(encoder, pairs.images, workers)):
        bar.update()
        if isinstance(item, str):
            failures.append(item)
            continue
        kept.append(i)
        batch.append(item)
        if len(batch) == batch_size:
            chunks.append(encoder.encode_image_tensors(torch.stack(batch)))
            batch = []
    if batch:
        chunks.append(encoder.encode_image_tensors(torch.stack(batch)))
    bar.close()
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
        "failures": failures[:20],
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
