"""Match probabilities: a search score turned into how likely a result truly matches.

A calibration holds Platt fits, ``p = sigmoid(a * score + b)``, made on a validation
pairs file by ``xmodal calibrate`` (``xmodal.training.calibrate``): one of the
dual-encoder cosine, and one of the reranked score (``match logit + w * cosine``) where
the model has a reranker. Each is increasing in its score (``a > 0``), so probabilities
keep the ranking order. Labels are bands of the probability, defined here once.

The file (``calibration.json``) sits in the model's folder or in a bundle; it records
the weights it was fitted on (sha256) and the reranker's fusion weight, and a search
with other weights or another weight ignores it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

CALIBRATION_FILE = "calibration.json"
FORMAT = 1
# Lower bounds of the labels on the match probability; below the last: "weak".
LABEL_BANDS: tuple[tuple[str, float], ...] = (("match", 0.5), ("partial", 0.15))
WEAK = "weak"
# Equal-width probability bins of the expected calibration error.
ECE_BINS = 10


@dataclass(frozen=True)
class Platt:
    """``p = sigmoid(a * score + b)``, increasing in the score (``a > 0``)."""

    a: float
    b: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.a) and math.isfinite(self.b)) or self.a <= 0:
            raise DataError(f"a calibration needs a finite slope above 0, got a={self.a!r}")

    def __call__(self, score: float) -> float:
        """The probability of one score."""
        z = self.a * score + self.b
        # Written both ways so that neither side overflows exp.
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))

    def many(self, scores: np.ndarray) -> np.ndarray:
        """Probabilities of an array of scores."""
        z = self.a * np.asarray(scores, np.float64) + self.b
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow


@dataclass(frozen=True)
class Calibration:
    """Score -> match probability for one model's text -> image search."""

    sha256: str  # the encoder weights it was fitted on
    cosine: Platt  # dual-encoder search
    reranked: Platt | None = None  # reranked search: score = match + w * cosine
    fusion_weight: float | None = None  # w the reranked fit assumes
    fitted_on: dict[str, Any] = field(default_factory=dict)  # data, counts, ECE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        doc = asdict(self)
        return {"format": FORMAT, **doc}

    @classmethod
    def from_dict(cls, doc: Any, source: str = "calibration") -> Calibration:
        """Parse ``to_dict``'s output; DataError naming ``source`` when malformed."""
        try:
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
            reranked = doc.get("reranked")
            weight = doc.get("fusion_weight")
            return cls(
                sha256=str(doc["sha256"]),
                cosine=Platt(float(doc["cosine"]["a"]), float(doc["cosine"]["b"])),
                reranked=None
                if reranked is None
                else Platt(float(reranked["a"]), float(reranked["b"])),
                fusion_weight=None if weight is None else float(weight),
                fitted_on=dict(doc.get("fitted_on") or {}),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source} is not a valid calibration ({exc})") from exc

    def save(self, path: str | Path) -> Path:
        """Write as JSON; returns the path."""
        out = Path(path)
        out.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return out


def read_calibration(path: str | Path) -> Calibration:
    """A calibration file; DataError naming it when unreadable or malformed."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is unreadable ({exc.__class__.__name__}: {exc})") from exc
    return Calibration.from_dict(doc, str(path))


def match_label(probability: float) -> str:
    """'match', 'partial' or 'weak': the band a match probability falls in."""
    for label, low in LABEL_BANDS:
        if probability >= low:
            return label
    return WEAK


def expected_calibration_error(
    probabilities: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    bins: int = ECE_BINS,
) -> float:
    """ECE: over equal-width probability bins, the share of predictions in a bin times
    the gap between its mean probability and its share of true matches.

    A probability of exactly 1 falls in the last bin; an empty input is an error.
    """
    p = np.asarray(probabilities, np.float64)
    y = np.asarray(labels, np.float64)
    if p.shape != y.shape or p.ndim != 1 or not len(p):
        raise DataError("ECE needs as many labels as probabilities, at least one")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(p[inside].mean() - y[inside].mean())
    return float(total)


__all__ = [
    "CALIBRATION_FILE",
    "ECE_BINS",
    "LABEL_BANDS",
    "WEAK",
    "Calibration",
    "Platt",
    "expected_calibration_error",
    "match_label",
    "read_calibration",
]
