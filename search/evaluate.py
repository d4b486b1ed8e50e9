"""``xmodal eval``: image-text retrieval recall of a model on a pairs file.

All captions are embedded; text-to-image ranks each caption's own image among all
images, image-to-text counts a hit when any of the image's captions is in the top k
(CLIP_benchmark's protocol; see ``crossmodal.metrics``). Images that fail to load are
counted and reported, and their captions are left out of both directions.

With a query set (``xmodal eval --queries FILE``: JSONL lines ``{"query": text,
"relevant": [image paths], "kind": optional label}``, paths as in the pairs file,
relative to the queries file's folder) each query ranks all the pairs file's images by
cosine with its text embedding, and mAP@100, P@10, nDCG@10, R-precision and mAP (whole
ranking) are macro-averaged over the queries (binary relevance; ``crossmodal.metrics``),
overall and per ``kind`` ("by_kind"). A relevant image that fails to load stays
relevant and counts as never found.

Recall after reranking (``xmodal eval --rerank``) needs the reranker's training code
(features, compositional swaps), so it lives in ``xmodal.training.evaluate``; query sets
ranked as the search engine reranks them, in ``xmodal.training.query_eval``, which
builds its result from ``query_block`` and prints it with ``format_queries``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from xmodal.crossmodal import metrics
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import DataError
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


QUERY_K = 10  # P@10 and nDCG@10, the usual cut-offs
NO_KIND = "other"  # the by_kind group of queries that name no kind
# The figures of a query block, in the order the table prints them.
QUERY_FIGURES = (f"mAP@{metrics.AP_K}", f"P@{QUERY_K}", f"nDCG@{QUERY_K}", "R-precision", "mAP")
KIND_FIGURES = QUERY_FIGURES[:3]  # the by-kind table's columns


@dataclass
class QuerySet:
    """Text queries and, for each, the indices (into a pair set's images) of its
    relevant images, and its kind (None where the line names none)."""

    source: Path
    texts: list[str]
    relevant: list[list[int]]
    kinds: list[str | None] = field(default_factory=list)


def _query_problem(row: Any) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("query"), str) or not row["query"].strip():
        return "missing 'query' (a non-empty string)"
    rel = row.get("relevant")
    if not isinstance(rel, list) or not rel:
        return "missing 'relevant' (a non-empty list of image paths)"
    if not all(isinstance(r, str) and r.strip() for r in rel):
        return "'relevant' holds something that is not an image path string"
    kind = row.get("kind")
    if kind is not None and (not isinstance(kind, str) or not kind.strip()):
        return "'kind' is not a non-empty string"
    return None


def read_queries(path: str | Path, pairs: PairSet) -> QuerySet:
    """Parse a queries file against the pairs it is evaluated on.

    A malformed line raises DataError naming the file and line; so does the first
    relevant image that is not one of the pairs file's images (compared as resolved
    paths, so ``images/a.png`` and ``./images/a.png`` are one image).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"queries file not found: {path}")
    root = path.resolve().parent
    index = {image.resolve(): i for i, image in enumerate(pairs.images)}
    texts: list[str] = []
    relevant: list[list[int]] = []
    kinds: list[str | None] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
        problem = _query_problem(row)
        if problem:
            raise DataError(f"{path}:{lineno}: {problem}")
        found: list[int] = []
        for raw in row["relevant"]:
            image = Path(raw)
            image = (image if image.is_absolute() else root / image).resolve()
            if image not in index:
                raise DataError(
                    f"{path}:{lineno}: relevant image {raw!r} is not in the pairs file "
                    f"{pairs.source}"
                )
            if index[image] not in found:  # a path listed twice is one relevant image
                found.append(index[image])
        texts.append(" ".join(row["query"].split()))
        relevant.append(found)
        kinds.append(row["kind"].strip() if row.get("kind") is not None else None)
    if not texts:
        raise DataError(f"{path}: no queries")
    return QuerySet(source=path, texts=texts, relevant=relevant, kinds=kinds)


def queries_head(queries: QuerySet, kept: list[int]) -> dict[str, Any]:
    """The keys every ``"queries"`` object starts with."""
    return {
        "file": str(queries.source),
        "count": len(queries.texts),
        "images": len(kept),
        "k": QUERY_K,
        "ap_k": metrics.AP_K,
    }


def query_block(
    queries: QuerySet, scores: np.ndarray, kept: list[int], scorer: str
) -> dict[str, Any]:
    """The figures of one ranking of a query set: ``scores`` [queries, len(kept)] ranks
    the images that loaded (pair-set indices ``kept``), higher first, ties against the
    query.

    Macro averages (``QUERY_FIGURES``), 'by_kind' (the same per query kind, with each
    kind's 'count'; present when any query names a kind), 'unranked_relevant' and
    'per_query' (each query's text, kind, relevant images, how many of them were not
    ranked because they failed to load, and its own figures).
    """
    column = {image: c for c, image in enumerate(kept)}
    relevant = np.zeros((len(queries.texts), len(kept)), dtype=bool)
    for q, images in enumerate(queries.relevant):
        relevant[q, [column[i] for i in images if i in column]] = True
    n_relevant = [len(images) for images in queries.relevant]
    result = metrics.query_set_metrics(scores, relevant, n_relevant, QUERY_K, metrics.AP_K)
    kinds = queries.kinds or [None] * len(queries.texts)
    own = result.pop("per_query")  # each query's figures
    per_query = [
        {
            "query": text,
            **({"kind": kind} if kind is not None else {}),
            "relevant": n,
            "unranked": n - int(row.sum()),
            **figures,
        }
        for text, kind, n, row, figures in zip(
            queries.texts, kinds, n_relevant, relevant, own, strict=True
        )
    ]
    block: dict[str, Any] = {"scorer": scorer, **result}
    if any(kind is not None for kind in kinds):
        groups: dict[str, list[dict[str, float]]] = {}  # in the file's order of first use
        for kind, figures in zip(kinds, own, strict=True):
            groups.setdefault(kind or NO_KIND, []).append(figures)
        block["by_kind"] = {
            kind: {"count": len(rows), **metrics.mean_metrics(rows)}
            for kind, rows in groups.items()
        }
    block["unranked_relevant"] = sum(q["unranked"] for q in per_query)
    block["per_query"] = per_query
    return block


def score_queries(
    encoder: Encoder, queries: QuerySet, image_emb: np.ndarray, kept: list[int]
) -> dict[str, Any]:
    """The ``"queries"`` object of ``xmodal eval --json``: each query ranks the images
    that loaded (``image_emb`` rows, pair-set indices ``kept``) by cosine similarity
    (``queries_head`` and a dual-encoder ``query_block``)."""
    scores = encoder.encode_texts(queries.texts) @ image_emb.T
    return {**queries_head(queries, kept), **query_block(queries, scores, kept, "dual")}


def evaluate_queries(
    encoder: Encoder,
    pairs_path: str | Path,
    queries_path: str | Path,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Only the query-set metrics (``score_queries``) of the images of a pairs file."""
    pairs = read_pairs(pairs_path)
    queries = read_queries(queries_path, pairs)
    image_emb, kept, _ = embed_pairs(encoder, pairs, batch_size, workers, progress)
    return score_queries(encoder, queries, image_emb, kept)


def evaluate_pairs(
    encoder: Encoder,
    pairs_path: str | Path,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = True,
    queries_path: str | Path | None = None,
) -> dict[str, Any]:
    """Recall@{1,5,10} both ways, as the JSON object ``xmodal eval --json`` prints; with
    ``queries_path``, also the query set's metrics under "queries" (``score_queries``)."""
    started = time.time()
    pairs = read_pairs(pairs_path)
    # Before the slow part: a bad queries file fails at once.
    queries = read_queries(queries_path, pairs) if queries_path is not None else None
    image_emb, kept, failures = embed_pairs(encoder, pairs, batch_size, workers, progress)
    extra: dict[str, Any] = {}
    if queries is not None:
        extra["queries"] = score_queries(encoder, queries, image_emb, kept)
    pairs = pairs.subset_images(kept)
    text_emb = encoder.encode_texts(pairs.captions)
    recall = retrieval_recall(image_emb, text_emb, pairs.caption_image)
    return {
        **report_head(encoder, pairs_path, pairs, len(failures)),
        "failures": [str(f) for f in failures[:20]],
        **recall,
        **extra,
        "seconds": round(time.time() - started, 2),
    }


def _fig(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_queries(queries: dict[str, Any]) -> list[str]:
    """The query-set lines of ``xmodal eval``'s table: a head line, one line per figure
    (dual, and reranked beside it where the object holds both), then one per kind."""
    # Reranked objects hold the reranked figures on top and the dual ones under "dual",
    # as the pairs result does.
    if "dual" in queries:
        columns = [("dual", queries["dual"]), ("reranked", queries)]
    else:
        columns = [(queries.get("scorer", "dual"), queries)]
    unranked = columns[0][1]["unranked_relevant"]
    lines = [
        f"queries  {queries['file']}: {queries['count']} queries over {queries['images']} images"
        + (f", {unranked} relevant images failed to load" if unranked else ""),
    ]
    rerank = queries.get("rerank")
    if rerank:
        lines.append(
            f"reranked as search does: the dual top {rerank['k']} re-scored, match logit + "
            f"{rerank['fusion_weight']:g} x cosine"
        )
        medians = rerank.get("median_match")
        if medians:
            lines.append(
                f"median match logit of the top {rerank['k']}: relevant "
                f"{_fig(medians['relevant'])}, irrelevant {_fig(medians['irrelevant'])}"
            )
    lines.append(f"{'':<16}" + "".join(f"{name:>10}" for name, _ in columns))
    for key in QUERY_FIGURES:
        lines.append(f"{key:<16}" + "".join(f"{b[key]:>10.3f}" for _, b in columns))
    kinds = columns[0][1].get("by_kind")
    if kinds:
        names = "/".join(name for name, _ in columns)
        width = max(14, *(len(kind) for kind in kinds)) + 2
        lines += [
            "",
            f"{'by kind':<{width}}{'count':>6}"
            + "".join(f"{f + ' ' + names:>22}" for f in KIND_FIGURES),
        ]
        for kind, first in kinds.items():
            cells = [
                "/".join(f"{b['by_kind'][kind][f]:.3f}" for _, b in columns) for f in KIND_FIGURES
            ]
            lines.append(f"{kind:<{width}}{first['count']:>6}" + "".join(f"{c:>22}" for c in cells))
    return lines


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
            if kind != "relation":
                continue
            for phrase, r in comp.get("by_relation", {}).items():
                lines.append(
                    f"    {phrase!r:<24}{r['pairs']:>5} images: "
                    f"dual {r['dual']:.3f}, reranked {r['reranked']:.3f}"
                )
    if "queries" in result:
        lines += ["", *format_queries(result["queries"])]
    for failure in result.get("failures", []):
        lines.append(f"failed: {failure}")
    return "\n".join(lines)
