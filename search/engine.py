"""Search over a bundle: text -> images, image -> images, image -> captions.

The engine opens a bundle (manifest, FAISS indexes, catalog), loads the model that
built it (or checks that the one given is that model), encodes the query and asks
FAISS. Results carry catalog facts; ids FAISS pads with (-1) and ids whose catalog row
is gone or no longer indexed (stale) never reach the caller, nor do scores no cosine
can have (a damaged stored vector): dual-encoder scores are always within [-1, 1].
Safe to call from several threads at once: FAISS CPU searches and torch inference
share no mutable state, and the catalog is read through a connection pool.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import ModelError
from xmodal.crossmodal.loading import LOCAL_DIR, WEIGHTS_FILE, load_model
from xmodal.crossmodal.registry import BUILTIN_MODELS, sha256_file
from xmodal.indexer.bundle import (
    Bundle,
    BundleError,
    CatalogError,
    FilterError,
    ImageFilter,
    ImageHit,
    manifest_stamp,
    read_manifest,
)

from .limits import (
    DEFAULT_K,
    DEFAULT_RERANK_K,
    MAX_K,
    MAX_QUERY_CHARS,
    MAX_RERANK_K,
    QueryError,
)
from .matching import find_calibration, with_probabilities
from .query import TextQuery
from .rerank import Reranker, open_scorer

log = logging.getLogger(__name__)

# BundleError and CatalogError are what a search raises for a bundle or catalog that
# cannot be read: offered here, as the search side's API, to callers above it (web).
__all__ = [
    "DEFAULT_K",
    "DEFAULT_RERANK_K",
    "MAX_K",
    "MAX_QUERY_CHARS",
    "MAX_RERANK_K",
    "BundleError",
    "CatalogError",
    "FilterError",
    "ImageFilter",
    "ImageHit",
    "ModelMismatchError",
    "QueryError",
    "Result",
    "SearchEngine",
]

# A cosine of unit vectors is in [-1, 1] up to float rounding; a FAISS score beyond this
# slack comes from a damaged stored vector (1e38 from garbled bytes) and is dropped.
COSINE_SLACK = 1e-3


class ModelMismatchError(BundleError):
    """The loaded model is not the one that built the bundle."""


@dataclass
class Result:
    """One search hit."""

    id: int
    score: float
    path: str | None = None  # images
    caption: str | None = None  # captions
    width: int | None = None
    height: int | None = None
    cosine: float | None = None  # dual-encoder score, when reranked
    match: float | None = None  # cross-attention match score, when reranked
    best_caption: str | None = None  # images: the linked caption closest to the query
    match_probability: float | None = None  # text -> image, where the model is calibrated
    match_label: str | None = None  # 'match', 'partial' or 'weak', from the probability

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without empty fields."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def encoder_for_bundle(bundle: Bundle | Path) -> Encoder:
    """Load the model a bundle records: a built-in model when its weights match one.

    Given a bundle folder, only its manifest is read: `xmodal index` needs the model
    of a bundle whose index files are damaged, to rebuild them.
    """
    path = bundle.path if isinstance(bundle, Bundle) else Path(bundle)
    identity = bundle.identity if isinstance(bundle, Bundle) else read_manifest(path).identity
    for builtin, folder in BUILTIN_MODELS.items():
        weights = folder / WEIGHTS_FILE
        if weights.is_file() and identity.sha256 == sha256_file(weights):
            return Encoder(load_model(builtin))
    pretrained = identity.pretrained
    name = identity.name
    if pretrained and pretrained.startswith(LOCAL_DIR):
        return Encoder(load_model(pretrained))
    if pretrained is None:
        raise ModelError(f"bundle {path} was built with random weights of {name}; nothing to load")
    return Encoder(load_model(name, pretrained))


def _below(head: list[Result], tail: list[Result]) -> list[Result]:
    """Candidates past the reranked ones, in dual order, scored below all of them.

    Reranked scores (match logit + w * cosine) and cosines are on different scales; the
    tail keeps its cosine in ``cosine`` and gets a floor score (as ALBEF gives
    non-candidates) so that ``score`` stays the ranking order.
    """
    if not tail:
        return []
    floor = min((r.score for r in head), default=0.0) - 1.0
    top = tail[0].score
    return [replace(r, cosine=r.score, score=floor - (top - r.score)) for r in tail]


def cosines(scores: np.ndarray, ids: np.ndarray) -> list[tuple[int, float]]:
    """(id, cosine) of one FAISS result row: padding (-1) and impossible scores (not
    finite, or beyond [-1, 1] by more than rounding) dropped, the rest clamped to [-1, 1]."""
    out = []
    for s, i in zip(scores, ids, strict=True):
        score = float(s)
        if i < 0 or not math.isfinite(score) or abs(score) > 1.0 + COSINE_SLACK:
            continue
        out.append((int(i), min(1.0, max(-1.0, score))))
    return out


def check_k(k: int) -> int:
    """k must be 1..MAX_K."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise QueryError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    return k


def check_offset(offset: int, k: int) -> int:
    """Results to skip: 0.. so that ``offset + k`` stays within MAX_K (one ranking's depth)."""
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise QueryError(f"offset must be a whole number from 0, got {offset!r}")
    if offset + k > MAX_K:
        raise QueryError(
            f"only the first {MAX_K} results of a search are served: offset + k is {offset + k}"
        )
    return offset


def check_text(q: str) -> str:
    """A non-empty query of at most MAX_QUERY_CHARS characters."""
    if not isinstance(q, str) or not q.strip():
        raise QueryError("the query text is empty")
    if len(q) > MAX_QUERY_CHARS:
        raise QueryError(f"the query text is longer than {MAX_QUERY_CHARS} characters")
    return " ".join(q.split())


class SearchEngine:
    """Searches one bundle with the model that built it."""

    def __init__(
        self,
        bundle_path: str | Path,
        encoder: Encoder | None = None,
        db_url: str | None = None,
        rerank: bool | None = None,
    ) -> None:
        """Open a bundle; ``rerank`` False skips loading the model's reranker.

        A reranker next to the model that cannot score its features (trained over other
        weights, damaged files) is left out with a warning; ``rerank_problem`` says why.
        """
        self.db_url = db_url
        self.bundle = Bundle(Path(bundle_path), db_url)
        self.encoder = encoder or encoder_for_bundle(self.bundle)
        built, loaded = self.bundle.identity, self.encoder.identity
        if not built.matches(loaded):
            raise ModelMismatchError(
                f"bundle {self.bundle.path} was built with {built.name} "
                f"(weights sha256 {str(built.sha256)[:12]}, dim {built.embed_dim}), but the "
                f"loaded model is {loaded.name} (sha256 {str(loaded.sha256)[:12]}, dim "
                f"{loaded.embed_dim}); their embeddings are not comparable"
            )
        scorer, self.rerank_problem = (None, None)
        if rerank is not False:
            scorer, self.rerank_problem = open_scorer(self.encoder)
        if self.rerank_problem:
            # Dual-encoder search still works: disable the add-on rather than refuse.
            log.warning("reranking disabled: %s", self.rerank_problem)
        self.reranker = Reranker(self.bundle, self.encoder, scorer) if scorer else None
        weight = self.reranker.w if self.reranker else None
        self.calibration = find_calibration(self.bundle.path, self.encoder, weight)

    def published_stamp(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of the bundle's manifest file: unchanged means nothing new
        was published (None when it cannot be seen)."""
        return manifest_stamp(self.bundle.path)

    def refresh(self) -> bool:
        """Switch to a newer generation that `xmodal index` published since opening.

        Requests in flight keep the bundle object they started with; later ones get the
        new one. The old bundle's connection pool is closed at once: connections that
        requests in flight hold stay usable and are discarded when given back, so none
        linger until garbage collection. Returns True when it switched, False when there
        is nothing new; raises BundleError / CatalogError (and ModelMismatchError) when
        the newest generation cannot be served, leaving the open one in service.
        """
        generation = read_manifest(self.bundle.path).generation
        if generation == self.bundle.manifest.generation:
            return False
        fresh = Bundle(self.bundle.path, self.db_url)
        if not fresh.identity.matches(self.encoder.identity):
            fresh.close()
            raise ModelMismatchError(f"generation {generation} was built by another model")
        old, self.bundle = self.bundle, fresh
        if self.reranker is not None:
            self.reranker.bundle = fresh
        old.close()
        return True

    # ------------------------------------------------------------------ queries

    def embed_text(self, q: str) -> np.ndarray:
        """[D] query embedding (override point for caching)."""
        return self.encoder.encode_texts([check_text(q)])[0]

    def embed_image(self, image: Image.Image) -> np.ndarray:
        """[D] embedding of a decoded image."""
        return self.encoder.encode_images([image])[0]

    @property
    def image_space(self) -> str:
        """The index kind image -> image search uses: the image tower's own space where
        the model has one ("visual"), else the joint space ("images")."""
        return "visual" if self.bundle.manifest.dim("visual") else "images"

    def search_vector(
        self,
        kind: str,
        vector: np.ndarray,
        k: int = DEFAULT_K,
        min_score: float | None = None,
        exclude: Sequence[int] = (),
        offset: int = 0,
        filters: ImageFilter | None = None,
    ) -> list[Result]:
        """Nearest ``kind`` ('images', 'captions' or 'visual': images in the image tower's
        own space) to a query vector, stale ids dropped; the ``offset``-th onwards.

        ``filters`` restrict image results inside the FAISS search (k come back whenever
        k indexed images pass)."""
        check_k(k)
        check_offset(offset, k)
        # Ask for a few more than k: -1 padding, stale rows and exclusions are dropped.
        want = offset + k + len(exclude) + 8
        scores, ids = self.bundle.search(kind, vector[None, :], want, self._allowed(kind, filters))
        pairs = [
            (int(i), c)
            for i, c in cosines(scores[0], ids[0])
            if int(i) not in exclude and (min_score is None or c >= min_score)
        ]
        if kind in ("images", "visual"):
            facts = self.bundle.images([i for i, _ in pairs])
            results = [
                Result(i, s, path=facts[i].path, width=facts[i].width, height=facts[i].height)
                for i, s in pairs
                if i in facts
            ]
        else:
            facts_c = self.bundle.captions([i for i, _ in pairs])
            results = [Result(i, s, caption=facts_c[i].text) for i, s in pairs if i in facts_c]
        return results[offset : offset + k]

    def _allowed(self, kind: str, filters: ImageFilter | None) -> np.ndarray | None:
        """The image ids a filter lets through (None: no filter)."""
        if filters is None or not filters.active:
            return None
        if kind == "captions":
            raise QueryError("filters apply to image results only, not to captions")
        try:
            return self.bundle.filter_ids(filters)
        except FilterError as exc:
            raise QueryError(str(exc)) from exc

    def with_captions(self, results: list[Result], vector: np.ndarray | None) -> list[Result]:
        """Image results with ``best_caption``: of each image's linked captions, the one
        closest to ``vector`` (a joint-space query), or its first when there is none."""
        linked = self.bundle.captions_of_images([r.id for r in results])
        ids = [c.id for hits in linked.values() for c in hits]
        closeness: dict[int, float] = {}
        if vector is not None and ids:
            scores = self.bundle.vectors("captions", ids) @ vector
            closeness = dict(zip(ids, scores.tolist(), strict=True))
        out = []
        for r in results:
            hits = linked.get(r.id) or []
            best = max(hits, key=lambda c: closeness.get(c.id, 0.0)) if hits else None
            out.append(replace(r, best_caption=best.text) if best else r)
        return out

    def _reranking(self, rerank: bool | None, rerank_k: int) -> bool:
        if rerank and self.reranker is None:
            name = self.encoder.identity.name
            if self.rerank_problem:
                raise QueryError(f"model {name} has no usable reranker: {self.rerank_problem}")
            raise QueryError(f"model {name} has no reranker")
        if not isinstance(rerank_k, int) or not 1 <= rerank_k <= MAX_RERANK_K:
            raise QueryError(f"rerank_k must be an integer from 1 to {MAX_RERANK_K}")
        return self.reranker is not None and rerank is not False

    def text_query(self, q: str) -> TextQuery:
        """What a text query needs: its embedding, with its token features when the
        reranker reads them."""
        q = check_text(q)
        if self.reranker is not None and self.reranker.needs_text_features:
            return self.reranker.text_query(q)
        return TextQuery(self.encoder.encode_texts([q])[0])

    def text_to_images(
        self,
        q: str,
        k: int = DEFAULT_K,
        min_score: float | None = None,
        rerank: bool | None = None,
        rerank_k: int = DEFAULT_RERANK_K,
        query: TextQuery | None = None,
        offset: int = 0,
        filters: ImageFilter | None = None,
    ) -> list[Result]:
        """Images best matching a text; reranked by default when the model has a reranker.

        ``min_score`` filters on the dual-encoder cosine. ``query`` is a precomputed
        ``text_query(q)`` (the web app caches them). ``offset`` skips that many results of
        the same ranking (the next page). ``filters`` restrict which images may come back.
        """
        check_k(k)
        check_offset(offset, k)
        use = self._reranking(rerank, rerank_k)
        if query is None:
            query = self.text_query(q)
        if not use:
            results = self.search_vector(
                "images", query.vector, k, min_score, offset=offset, filters=filters
            )
            results = with_probabilities(results, self.calibration, reranked=False)
            return self.with_captions(results, query.vector)
        # Every page reranks the same top rerank_k, so pages join into one ranking.
        depth = max(offset + k, rerank_k)
        cands = self.search_vector("images", query.vector, depth, min_score, filters=filters)
        head = self.reranker.images_for_text(check_text(q), query, cands[:rerank_k])
        ranking = with_probabilities(
            head + _below(head, cands[rerank_k:]), self.calibration, reranked=True
        )
        return self.with_captions(ranking[offset : offset + k], query.vector)

    def text_to_captions(
        self, q: str, k: int = DEFAULT_K, min_score: float | None = None, offset: int = 0
    ) -> list[Result]:
        """Captions closest to a text (dual encoder only: text-text similarity)."""
        return self.search_vector("captions", self.embed_text(q), k, min_score, offset=offset)

    def image_to_images(
        self,
        image: Image.Image,
        k: int = DEFAULT_K,
        min_score: float | None = None,
        offset: int = 0,
        filters: ImageFilter | None = None,
    ) -> list[Result]:
        """Images most similar to an image, in the image tower's own space where the model
        has one (visual similarity), else in the joint space; ``filters`` as for text."""
        x = self.encoder.preprocess_image(image)[None]
        joint, visual = self.encoder.encode_image_spaces(x)
        space = self.image_space
        vector = (visual if space == "visual" and visual is not None else joint)[0]
        results = self.search_vector(space, vector, k, min_score, offset=offset, filters=filters)
        return self.with_captions(results, joint[0])

    def image_to_captions(
        self,
        image: Image.Image,
        k: int = DEFAULT_K,
        min_score: float | None = None,
        rerank: bool | None = None,
        rerank_k: int = DEFAULT_RERANK_K,
        offset: int = 0,
    ) -> list[Result]:
        """Captions best describing an image; reranked by default when possible."""
        check_k(k)
        check_offset(offset, k)
        use = self._reranking(rerank, rerank_k)
        if not use or not self.encoder.has_image_tokens:
            vector = self.embed_image(image)
            return self.search_vector("captions", vector, k, min_score, offset=offset)
        emb, tokens = self.encoder.image_tokens(self.encoder.preprocess_image(image)[None])
        cands = self.search_vector("captions", emb[0], max(offset + k, rerank_k), min_score)
        head = self.reranker.captions_for_image(tokens[0], cands[:rerank_k])
        return (head + _below(head, cands[rerank_k:]))[offset : offset + k]

    def similar_images(self, image_id: int, k: int = DEFAULT_K, offset: int = 0) -> list[Result]:
        """'More like this': neighbours of an indexed image, itself excluded."""
        space = self.image_space
        vector = self.bundle.vectors(space, [image_id])[0]
        if not vector.any():
            return []
        results = self.search_vector(space, vector, k, exclude=(image_id,), offset=offset)
        return self.with_captions(results, self.bundle.vectors("images", [image_id])[0])

    def close(self) -> None:
        """Release catalog connections."""
        self.bundle.close()
