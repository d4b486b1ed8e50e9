"""Second stage of search: re-score the dual encoder's top-k with cross-attention.

Two scorers stand behind the ``MatchScorer`` protocol (``crossmodal.scoring``): the
project's CrossModalReranker (shipped next to the model in ``<model folder>/reranker/``)
and, for CoCa encoders, CoCa's caption likelihood. The final score is
``match score + w * cosine``; candidates beyond the reranked top-k keep their dual order
after them. Candidates' token features come from the bundle's token cache, or are
recomputed (image decoded again, caption re-encoded) when not cached.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from xmodal.crossmodal.coca_scorer import CocaScorer, is_coca
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.images import ImageDecodeError, decode_image
from xmodal.crossmodal.loading import LOCAL_DIR
from xmodal.crossmodal.reranker import CONFIG_FILE, CrossModalReranker, pad_tokens
from xmodal.crossmodal.scoring import MatchScorer, fusion_weight
from xmodal.indexer.bundle import Bundle

from .limits import QueryError
from .query import TextQuery

log = logging.getLogger(__name__)

# Identity fields a reranker records of the encoder it was trained over and that must be
# the loaded encoder's (its path may differ: the same weights live in several folders).
IDENTITY_FIELDS = ("name", "sha256", "embed_dim")
# What loading a damaged reranker folder raises (safetensors' own error included).
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)


def model_folder(encoder: Encoder) -> Path | None:
    """The folder a ``local-dir:`` encoder was loaded from (None for tags and files)."""
    pretrained = encoder.identity.pretrained or ""
    return Path(pretrained.removeprefix(LOCAL_DIR)) if pretrained.startswith(LOCAL_DIR) else None


def _folder(encoder: Encoder) -> Path | None:
    """``<model folder>/reranker`` when the encoder came from a folder that has one."""
    model = model_folder(encoder)
    if model is None:
        return None
    folder = model / "reranker"
    return folder if (folder / CONFIG_FILE).is_file() else None


def reranker_mismatch(encoder: Encoder, folder: Path) -> str | None:
    """Why the reranker in ``folder`` cannot score this encoder's features (None: it can).

    Its config records the identity of the encoder it was trained over
    (``xmodal train-reranker``); token features of other weights are another language.
    A reranker that records none (older ones) is taken as it is.
    """
    try:
        doc = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{folder / CONFIG_FILE} is unreadable ({exc.__class__.__name__})"
    trained = doc.get("encoder") if isinstance(doc, dict) else None
    if trained is None:
        return None
    if not isinstance(trained, dict):
        return f"{folder / CONFIG_FILE} records no valid encoder identity"
    loaded = encoder.identity.to_dict()
    for key in IDENTITY_FIELDS:
        if key in trained and trained[key] != loaded[key]:
            shown = {k: str(v)[:12] if k == "sha256" else v for k, v in trained.items()}
            return (
                f"the reranker in {folder} was trained over encoder {shown.get('name')} "
                f"(sha256 {shown.get('sha256')}, dim {shown.get('embed_dim')}), not the loaded "
                f"{loaded['name']} (sha256 {str(loaded['sha256'])[:12]}, dim "
                f"{loaded['embed_dim']})"
            )
    return None


def reranker_folder(encoder: Encoder) -> Path | None:
    """``<model folder>/reranker`` when the encoder was loaded from a folder that has one
    trained over these weights; a reranker of other weights is skipped with a warning."""
    folder = _folder(encoder)
    if folder is None:
        return None
    problem = reranker_mismatch(encoder, folder)
    if problem:
        log.warning("reranking disabled: %s", problem)
        return None
    return folder


def open_scorer(encoder: Encoder) -> tuple[MatchScorer | None, str | None]:
    """(scorer, None); (None, None) when the model has no reranker; (None, why) when
    the one next to it cannot be used (trained over other weights, damaged files)."""
    if is_coca(encoder):
        return CocaScorer(encoder), None
    folder = _folder(encoder)
    if folder is None:
        return None, None
    problem = reranker_mismatch(encoder, folder)
    if problem:
        return None, problem
    try:
        model, _ = CrossModalReranker.load(folder)
    except LOAD_ERRORS as exc:
        first = str(exc).strip().splitlines()
        return None, f"the reranker in {folder} cannot be loaded ({first[0] if first else exc!r})"
    return model, None


def load_scorer(encoder: Encoder) -> MatchScorer | None:
    """The cross-attention scorer that goes with this encoder, if there is a usable one
    (an unusable one is reported as a warning and left out: search stays dual-encoder)."""
    scorer, problem = open_scorer(encoder)
    if problem:
        log.warning("reranking disabled: %s", problem)
    return scorer


class Reranker:
    """Re-scores search candidates of one bundle."""

    def __init__(self, bundle: Bundle, encoder: Encoder, scorer: MatchScorer) -> None:
        self.bundle = bundle
        self.encoder = encoder
        self.scorer = scorer
        self.w = fusion_weight(scorer)

    @property
    def name(self) -> str:
        """What reranks: 'cross-attention' or 'coca'."""
        return self.scorer.kind

    @property
    def needs_text_features(self) -> bool:
        """Whether a text query must bring its token features (else its raw text is read)."""
        return self.scorer.needs_text_features

    # ------------------------------------------------------------------ features

    def image_tokens(self, ids: list[int]) -> dict[int, torch.Tensor]:
        """Patch tokens of indexed images: cached, else recomputed from the file."""
        cached = self.bundle.tokens("images", ids) if self.scorer.uses_token_cache else {}
        out = {i: torch.from_numpy(t.astype(np.float32)) for i, t in cached.items()}
        missing = [i for i in ids if i not in out]
        if missing:
            hits = self.bundle.images(missing)
            batch, order = [], []
            for i in missing:
                hit = hits.get(i)
                if hit is None or not os.path.isfile(hit.fs_path):
                    continue
                try:
                    image = decode_image(os.fsdecode(hit.fs_path))  # a path, not bytes
                    batch.append(self.encoder.preprocess_image(image))
                    order.append(i)
                except (OSError, ImageDecodeError):
                    continue
            if batch:
                _, toks = self.encoder.image_tokens(torch.stack(batch))
                out.update(zip(order, toks, strict=True))
        return out

    def caption_tokens(self, ids: list[int], texts: dict[int, str]) -> dict[int, torch.Tensor]:
        """Token features of captions: cached, else re-encoded."""
        out = {
            i: torch.from_numpy(t.astype(np.float32))
            for i, t in self.bundle.tokens("captions", ids).items()
        }
        missing = [i for i in ids if i not in out and i in texts]
        if missing:
            _, toks, mask = self.encoder.text_tokens([texts[i] for i in missing])
            out.update((i, t[m]) for i, t, m in zip(missing, toks, mask, strict=True))
        return out

    def text_query(self, q: str) -> TextQuery:
        """Embedding and token features of a query text, from one text-tower pass."""
        emb, tok, mask = self.encoder.text_tokens([q])
        return TextQuery(emb[0], tok[0], mask[0])

    # ------------------------------------------------------------------ reranking

    @torch.inference_mode()
    def _score(
        self,
        texts: list[str],
        text_tok: torch.Tensor | None,
        mask: torch.Tensor | None,
        image_tok: torch.Tensor,
    ) -> np.ndarray:
        return self.scorer.match_scores(texts, text_tok, mask, image_tok).float().numpy()

    def _merge(self, candidates: list, order_scores: dict[int, tuple[float, float]]) -> list:
        scored = [
            replace(r, score=order_scores[r.id][0], cosine=r.score, match=order_scores[r.id][1])
            for r in candidates
            if r.id in order_scores
        ]
        scored.sort(key=lambda r: -r.score)
        rest = [replace(r, cosine=r.score) for r in candidates if r.id not in order_scores]
        return scored + rest

    def images_for_text(self, q: str, query: TextQuery, candidates: list) -> list:
        """Re-score image candidates of a text query; returns them re-ordered."""
        if not candidates:
            return candidates
        toks = self.image_tokens([r.id for r in candidates])
        ids = [r.id for r in candidates if r.id in toks]
        if not ids:
            return candidates
        image_tok = torch.stack([toks[i] for i in ids])  # [K, P, Di]
        k = len(ids)
        q_tok = q_mask = None
        if self.needs_text_features:
            if query.tokens is None or query.mask is None:
                raise QueryError("this reranker needs the query's token features: none given")
            q_tok, q_mask = query.tokens[None].expand(k, -1, -1), query.mask[None].expand(k, -1)
        logits = self._score([q] * k, q_tok, q_mask, image_tok)
        cos = {r.id: r.score for r in candidates}
        fused = {
            i: (float(lg + self.w * cos[i]), float(lg)) for i, lg in zip(ids, logits, strict=True)
        }
        return self._merge(candidates, fused)

    def captions_for_image(self, image_tok: torch.Tensor, candidates: list) -> list:
        """Re-score caption candidates of an image query ([P, Di] tokens)."""
        if not candidates:
            return candidates
        texts = {r.id: r.caption for r in candidates}
        ids = [r.id for r in candidates]
        text_tok = mask = None
        if self.needs_text_features:
            toks = self.caption_tokens(ids, texts)
            ids = [i for i in ids if i in toks]
            text_tok, mask = pad_tokens([toks[i] for i in ids])
        # One image for every caption: a scorer computes its side once where it can.
        logits = self._score([texts[i] for i in ids], text_tok, mask, image_tok[None])
        cos = {r.id: r.score for r in candidates}
        fused = {
            i: (float(lg + self.w * cos[i]), float(lg)) for i, lg in zip(ids, logits, strict=True)
        }
        return self._merge(candidates, fused)
