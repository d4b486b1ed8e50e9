"""``xmodal calibrate``: fit a model's match probabilities on a validation pairs file.

Each caption is a query, as at search time: the dual encoder's top ``rerank_k`` images
are its candidates, scored by cosine and, where the model has a reranker, by
``match logit + w * cosine``. A candidate is a true match when one of its own captions
is the query's text (so class-level captions shared by several images count for each).
Where a query set lies beside the pairs file (``queries-val.jsonl`` beside
``val.jsonl``), its queries join them, a candidate true where the query set lists it
as relevant: the probabilities then hold for short, partial queries too.
Platt scaling (``crossmodal.calibration``) is fitted to those (score, truth) pairs,
with Platt's smoothed targets; the expected calibration error is reported on the
fitting data and, given a second pairs file, on it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from xmodal.crossmodal.calibration import Calibration, Platt, expected_calibration_error
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import DataError
from xmodal.crossmodal.pairs import PairSet, read_pairs
from xmodal.crossmodal.scoring import MatchScorer, fusion_weight
from xmodal.search.evaluate import read_queries
from xmodal.search.limits import DEFAULT_RERANK_K
from xmodal.search.rerank import load_scorer

from .queries import queries_beside
from .rerank_eval import Features, pair_logits
from .rerank_features import features_for, text_features

# Captions used as queries at most (sampled with the seed): 32 candidates each.
DEFAULT_MAX_QUERIES = 1000
NEWTON_STEPS = 100
# A Gaussian prior on the standardised slope: a finite fit where matches and
# mismatches do not overlap at all (there the likelihood alone runs to a step).
SLOPE_PRIOR = 1.0


@dataclass
class Samples:
    """(score, truth) of every candidate of every query."""

    cosine: np.ndarray  # [Q * k]
    reranked: np.ndarray | None  # [Q * k] match + w * cosine, when a scorer is given
    truth: np.ndarray  # [Q * k] bool
    queries: int


def fit_platt(scores: np.ndarray, truth: np.ndarray) -> Platt:
    """Platt scaling: the logistic fit ``sigmoid(a * s + b)`` of truth on score, to
    Platt's targets ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)) by Newton's method.

    DataError when there are no true or no false samples, or when higher scores do not
    mean more matches (a slope that is not above 0).
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(truth, bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        raise DataError(f"calibration needs true and false matches: {pos} true, {neg} false")
    target = np.where(y, (pos + 1) / (pos + 2), 1 / (neg + 2))
    mu, sd = s.mean(), s.std() or 1.0
    x = (s - mu) / sd  # standardised: Newton starts from (0, the prior's logit)

    def loss(a: float, b: float) -> float:
        z = a * x + b  # cross-entropy to the targets, log(1 + e^z) written stably
        return float(np.sum(np.logaddexp(0.0, z) - target * z) + 0.5 * SLOPE_PRIOR * a * a)

    a, b = 0.0, float(np.log((pos + 1) / (neg + 1)))
    current = loss(a, b)
    for _ in range(NEWTON_STEPS):
        p = 0.5 * (1.0 + np.tanh(0.5 * (a * x + b)))
        w = p * (1 - p)
        grad = np.array([np.dot(x, p - target) + SLOPE_PRIOR * a, np.sum(p - target)])
        hess = np.array([[np.dot(w, x * x) + SLOPE_PRIOR, np.dot(w, x)], [np.dot(w, x), w.sum()]])
        step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        scale = 1.0  # backtracking: a full Newton step can overshoot where classes barely mix
        while scale > 1e-8 and loss(a - scale * step[0], b - scale * step[1]) > current:
            scale /= 2
        a, b = a - scale * step[0], b - scale * step[1]
        previous, current = current, loss(a, b)
        if previous - current < 1e-9 * max(1.0, abs(current)):
            break
    if not a > 0:
        raise DataError("higher scores do not mean more true matches here: nothing to calibrate")
    return Platt(float(a / sd), float(b - a * mu / sd))


def candidate_samples(
    encoder: Encoder,
    pairs: PairSet,
    scorer: MatchScorer | None,
    rerank_k: int = DEFAULT_RERANK_K,
    max_queries: int | None = DEFAULT_MAX_QUERIES,
    seed: int = 0,
) -> Samples:
    """Every caption's (or ``max_queries`` sampled captions') top ``rerank_k`` images,
    with their scores and whether each truly matches."""
    feats, caps_of, pairs = features_for(encoder, pairs, None, None, seed)
    texts = [" ".join(c.lower().split()) for c in pairs.captions]
    own = [{texts[c] for c in caps} for caps in caps_of]
    rows = list(range(len(texts)))
    if max_queries is not None and len(rows) > max_queries:
        rows = sorted(random.Random(seed).sample(rows, max_queries))
    k = min(rerank_k, len(feats.image_emb))
    cand, cos, fused = _scored_candidates(feats, np.asarray(rows), scorer, k)
    truth = np.array(
        [[texts[r] in own[j] for j in row] for r, row in zip(rows, cand.tolist(), strict=True)]
    )
    samples = Samples(cos.ravel(), _ravel(fused), truth.ravel(), len(rows))
    queries = queries_beside(pairs.source)
    if queries is None:
        return samples
    return _joined(samples, query_samples(feats, pairs, queries, encoder, scorer, k))


def _ravel(fused: np.ndarray | None) -> np.ndarray | None:
    return None if fused is None else fused.ravel()


def _scored_candidates(
    feats: Features, rows: np.ndarray, scorer: MatchScorer | None, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """For the texts ``rows`` of ``feats``: their top ``k`` images [Q, k], cosines
    [Q, k] and, with a scorer, search's fused score (match + w * cosine) [Q, k]."""
    sims = feats.text_emb[rows] @ feats.image_emb.T  # [Q, N]
    cand = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [Q, k]
    cos = np.take_along_axis(sims, cand, axis=1)  # [Q, k]
    if scorer is None:
        return cand, cos, None
    logits = pair_logits(scorer, feats, np.repeat(rows, k), cand.ravel(), desc="calibrating")
    return cand, cos, logits.reshape(cos.shape) + fusion_weight(scorer) * cos


def query_samples(
    feats: Features,
    pairs: PairSet,
    path: Path,
    encoder: Encoder,
    scorer: MatchScorer | None,
    k: int,
) -> Samples:
    """The top ``k`` images of each query of a query set, true where relevant: short,
    partial queries get probabilities as well as full captions."""
    queries = read_queries(path, pairs)
    q_emb, q_tok, q_mask = text_features(encoder, queries.texts, desc="calibration queries")
    owner = np.full(len(q_emb), -1)  # a query is no image's own caption
    qf = Features(feats.image_emb, feats.image_tokens, q_emb, q_tok, q_mask, owner, queries.texts)
    cand, cos, fused = _scored_candidates(qf, np.arange(len(q_emb)), scorer, k)
    relevant = [set(r) for r in queries.relevant]
    truth = np.array([[j in relevant[r] for j in row] for r, row in enumerate(cand.tolist())])
    return Samples(cos.ravel(), _ravel(fused), truth.ravel(), len(queries.texts))


def _joined(a: Samples, b: Samples) -> Samples:
    reranked = None
    if a.reranked is not None and b.reranked is not None:
        reranked = np.concatenate([a.reranked, b.reranked])
    return Samples(
        np.concatenate([a.cosine, b.cosine]),
        reranked,
        np.concatenate([a.truth, b.truth]),
        a.queries + b.queries,
    )


def _name(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _report(cal: Calibration, samples: Samples) -> dict[str, Any]:
    out: dict[str, Any] = {
        "queries": samples.queries,
        "candidates": len(samples.truth),
        "true_matches": int(samples.truth.sum()),
        "ece_cosine": round(
            expected_calibration_error(cal.cosine.many(samples.cosine), samples.truth), 4
        ),
    }
    if cal.reranked is not None and samples.reranked is not None:
        probs = cal.reranked.many(samples.reranked)
        out["ece_reranked"] = round(expected_calibration_error(probs, samples.truth), 4)
    return out


def fit_calibration(
    encoder: Encoder,
    pairs_path: str | Path,
    check_path: str | Path | None = None,
    rerank_k: int = DEFAULT_RERANK_K,
    max_queries: int | None = DEFAULT_MAX_QUERIES,
    seed: int = 0,
) -> Calibration:
    """Fit the encoder's calibration (and its reranker's, where it has one) on a pairs
    file; ``fitted_on`` records the data, counts, ECE and, with ``check_path``, the ECE
    on that second file."""
    started = time.time()
    scorer = load_scorer(encoder)
    samples = candidate_samples(
        encoder, read_pairs(pairs_path), scorer, rerank_k, max_queries, seed
    )
    cal = Calibration(
        sha256=str(encoder.identity.sha256),
        cosine=fit_platt(samples.cosine, samples.truth),
        reranked=None if samples.reranked is None else fit_platt(samples.reranked, samples.truth),
        fusion_weight=None if scorer is None else fusion_weight(scorer),
    )
    fitted: dict[str, Any] = {
        "pairs": str(pairs_path),
        "query_set": _name(queries_beside(pairs_path)),
        "rerank_k": rerank_k,
        "seed": seed,
        **_report(cal, samples),
    }
    if check_path is not None:
        check = candidate_samples(
            encoder, read_pairs(check_path), scorer, rerank_k, max_queries, seed
        )
        fitted["check"] = {
            "pairs": str(check_path),
            "query_set": _name(queries_beside(check_path)),
            **_report(cal, check),
        }
    fitted["seconds"] = round(time.time() - started, 1)
    return replace(cal, fitted_on=fitted)
