"""The reranker's token cache in the catalog: row encoding and a size budget.

Token features (float16) of indexed images and captions let the cross-attention
reranker score candidates without re-running the encoder. The cache is bounded;
items beyond the bound are recomputed at query time instead.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from .catalog import CaptionTokens, ImageTokens


def token_fields(tokens: np.ndarray) -> dict[str, Any]:
    """Column values of a token row for [L, W] features."""
    t = np.ascontiguousarray(tokens, dtype=np.float16)
    return {"length": int(t.shape[0]), "width": int(t.shape[1]), "data": t.tobytes()}


def tokens_of(row: Any) -> np.ndarray:
    """[L, W] float16 features of a token row."""
    return np.frombuffer(row.data, np.float16).reshape(row.length, row.width)


class TokenBudget:
    """Bytes the token caches may still grow by, shared by images and captions."""

    def __init__(self, engine: Engine, limit_mb: int, counts: Counter) -> None:
        self.limit = limit_mb * 2**20
        self.counts = counts
        with Session(engine) as s:
            self.used = sum(
                s.execute(select(func.coalesce(func.sum(func.length(t.data)), 0))).scalar() or 0
                for t in (ImageTokens, CaptionTokens)
            )

    def take(self, tokens: np.ndarray) -> bool:
        """Reserve room for these tokens; False (and counted) when over the bound."""
        size = tokens.size * 2
        if self.used + size > self.limit:
            self.counts["tokens_not_cached"] += 1
            return False
        self.used += size
        return True
