"""How well text -> image results match: a probability and a label on each result.

The numbers come from a calibration (``crossmodal.calibration``) found in the bundle
(``<bundle>/calibration.json``, for any model) or else in the model's folder (the
built-in models ship one). A calibration fitted on other weights, or on another fusion
weight of the reranker, is not used: results then carry no probability, and search
works as before.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from xmodal.crossmodal.calibration import (
    CALIBRATION_FILE,
    LABEL_BANDS,
    Calibration,
    match_label,
    read_calibration,
)
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import DataError

from .rerank import model_folder

if TYPE_CHECKING:
    from .engine import Result

log = logging.getLogger(__name__)

# The label a result needs for the page not to say that nothing matches well.
GOOD_LABEL = LABEL_BANDS[0][0]


def calibration_paths(bundle_path: Path, encoder: Encoder) -> list[Path]:
    """Where a calibration may be, first found first used: the bundle, the model folder."""
    paths = [bundle_path / CALIBRATION_FILE]
    model = model_folder(encoder)
    if model is not None:
        paths.append(model / CALIBRATION_FILE)
    return paths


def find_calibration(
    bundle_path: Path, encoder: Encoder, fusion_weight: float | None
) -> Calibration | None:
    """The first usable calibration for this encoder (and reranker fusion weight).

    An unreadable file, or one of other weights, is skipped with a warning; a reranked
    fit of another fusion weight is dropped (the cosine fit stays).
    """
    for path in calibration_paths(bundle_path, encoder):
        if not path.is_file():
            continue
        try:
            cal = read_calibration(path)
        except DataError as exc:
            log.warning("match probabilities off: %s", exc)
            continue
        if cal.sha256 != encoder.identity.sha256:
            log.warning("match probabilities off: %s was fitted on other weights", path)
            continue
        if cal.reranked is not None and cal.fusion_weight != fusion_weight:
            log.warning(
                "%s was fitted for another fusion weight: reranked results unlabelled", path
            )
            cal = replace(cal, reranked=None)
        return cal
    return None


def with_probabilities(
    results: list[Result], calibration: Calibration | None, reranked: bool
) -> list[Result]:
    """Results with ``match_probability`` and ``match_label``, in their ranking order.

    Reranked results use the reranked fit of their fused score; results past the
    reranked top-k (no match score) use the cosine fit, capped at the lowest reranked
    probability: they rank below every reranked one, and their number says so.
    """
    if calibration is None or not results:
        return results
    if reranked and calibration.reranked is None:
        return results
    out = []
    floor = 1.0
    for r in results:
        if reranked and r.match is not None:
            p = calibration.reranked(r.score)
            floor = min(floor, p)
        else:
            cosine = r.cosine if r.cosine is not None else r.score
            p = min(calibration.cosine(cosine), floor) if reranked else calibration.cosine(cosine)
        out.append(replace(r, match_probability=round(p, 4), match_label=match_label(p)))
    return out


def good_match(results: list[Result]) -> bool | None:
    """Whether the first result matches well (None: no results, or no probability)."""
    if not results or results[0].match_probability is None:
        return None
    return results[0].match_label == GOOD_LABEL
