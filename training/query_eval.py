"""``xmodal eval --queries FILE --rerank``: a query set ranked by the dual encoder and as
the search engine reranks it, side by side.

Each query ranks every image of the pairs file twice: by cosine (the dual encoder, as
search does with reranking off), and as ``SearchEngine.text_to_images`` does with it on:
the dual top ``rerank_k`` re-scored by the engine's own ``Reranker`` (same fusion,
``match logit + w * cosine`` with the model's w, same ordering of ties), the rest after
them in dual order. The reranker reads the candidates' patch tokens from features
computed here (float16, as a bundle caches them) instead of a bundle's token cache, so
the figures are those search would give on a bundle of these images.

It lives with training as ``evaluate`` does (it shares the reranker's feature code);
``xmodal.search.evaluate`` parses the queries file, computes the figures and prints them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import ModelError
from xmodal.crossmodal.pairs import read_pairs
from xmodal.search import evaluate, rerank
from xmodal.search.engine import Result
from xmodal.search.limits import DEFAULT_RERANK_K
from xmodal.search.query import TextQuery
from xmodal.search.rerank import load_scorer

from .rerank_features import image_features

# Reranked candidates are scored above this plus their place, every other image by its
# cosine (at most 1): the engine's order, head first, as scores the metrics can rank.
HEAD_FLOOR = 2.0


@dataclass(frozen=True)
class _File:
    fs_path: bytes  # what the Reranker reads of a catalog hit to decode an image again


class _Features:
    """The two things the engine's ``Reranker`` asks of a bundle, answered from features
    computed here: cached patch tokens by id (an id is a column of ``tokens``), and the
    file of an image (for a scorer that reads no token cache and decodes again)."""

    def __init__(self, tokens: torch.Tensor, paths: list[Path]) -> None:
        self._tokens = tokens
        self._paths = paths

    def tokens(self, kind: str, ids: list[int]) -> dict[int, np.ndarray]:
        """Patch tokens ([P, Di] float16) of images by id."""
        return {i: self._tokens[i].numpy() for i in ids} if kind == "images" else {}

    def images(self, ids: list[int]) -> dict[int, _File]:
        """The file of each image id."""
        return {i: _File(os.fsencode(self._paths[i].resolve())) for i in ids}


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def evaluate_queries_reranked(
    encoder: Encoder,
    pairs_path: str | Path,
    queries_path: str | Path,
    rerank_k: int = DEFAULT_RERANK_K,
    progress: bool = True,
) -> dict[str, Any]:
    """The ``"queries"`` object of ``xmodal eval --queries Q --rerank --json``: the
    reranked figures on top (``query_block``), the dual encoder's under "dual", and under
    "rerank" its k, fusion weight, scorer and the median match logit of the relevant and
    of the irrelevant candidates it re-scored."""
    scorer = load_scorer(encoder)
    if scorer is None:
        raise ModelError(f"model {encoder.identity.name} has no reranker to evaluate")
    started = time.time()
    pairs = read_pairs(pairs_path)
    queries = evaluate.read_queries(queries_path, pairs)  # a bad file fails before the work
    image_emb, image_tok, kept = image_features(encoder, pairs.images, desc="query images")
    engine_reranker = rerank.Reranker(
        _Features(image_tok, [pairs.images[i] for i in kept]),  # a bundle's stand-in
        encoder,
        scorer,
    )
    column = {image: c for c, image in enumerate(kept)}
    dual = np.empty((len(queries.texts), len(kept)), np.float64)
    reranked = np.empty_like(dual)
    matches: dict[bool, list[float]] = {True: [], False: []}
    for q, text in enumerate(tqdm(queries.texts, desc="reranking queries", disable=not progress)):
        # What SearchEngine.text_query gives: one text-tower pass for vector and tokens.
        if engine_reranker.needs_text_features:
            query = engine_reranker.text_query(text)
        else:
            query = TextQuery(encoder.encode_texts([text])[0])
        cos = image_emb @ query.vector
        top = np.argsort(-cos, kind="stable")[:rerank_k]
        head = engine_reranker.images_for_text(
            text, query, [Result(int(c), float(cos[c])) for c in top]
        )
        dual[q] = cos
        reranked[q] = cos
        for place, hit in enumerate(head):
            reranked[q, hit.id] = HEAD_FLOOR + len(head) - place
        relevant = {column[i] for i in queries.relevant[q] if i in column}
        for hit in head:
            if hit.match is not None:
                matches[hit.id in relevant].append(hit.match)
    return {
        **evaluate.queries_head(queries, kept),
        **evaluate.query_block(queries, reranked, kept, "reranked"),
        "dual": evaluate.query_block(queries, dual, kept, "dual"),
        "rerank": {
            "k": rerank_k,
            "fusion_weight": engine_reranker.w,
            "scorer": type(scorer).__name__,
            "median_match": {
                "relevant": _median(matches[True]),
                "irrelevant": _median(matches[False]),
            },
        },
        "seconds": round(time.time() - started, 2),
    }
