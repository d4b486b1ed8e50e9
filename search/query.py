"""A text query encoded once, as search, reranking and the web app's cache pass it on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TextQuery:
    """A query text's embedding, and its token features when the reranker reads them.

    ``tokens`` and ``mask`` come from the same text-tower pass as ``vector``; they are
    None when no reranker needs them (no reranker, or one that reads the raw text).
    """

    vector: np.ndarray  # [D] unit vector
    tokens: torch.Tensor | None = None  # [L, Dt] token features
    mask: torch.Tensor | None = None  # [L] True on real tokens

    @property
    def has_tokens(self) -> bool:
        """Whether the token features are there (a cross-attention reranker needs them)."""
        return self.tokens is not None and self.mask is not None
