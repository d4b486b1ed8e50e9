"""The seam between search and the cross-attention scorers that re-score its candidates.

Two scorers implement it: the project's ``CrossModalReranker`` (text token features
attend to image patch tokens) and ``CocaScorer`` (CoCa's caption likelihood, which reads
the raw text). Search and evaluation call only what ``MatchScorer`` names, so either
can stand behind a bundle without the caller asking which one it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class MatchScorer(Protocol):
    """Scores (text, image) pairs; the final ranking score is ``match + w * cosine``."""

    @property
    def kind(self) -> str:
        """What reranks, as search reports it ('cross-attention', 'coca')."""
        ...

    @property
    def fusion_weight(self) -> float:
        """w in ``match + w * cosine``."""
        ...

    @property
    def needs_text_features(self) -> bool:
        """True: scores the text tower's token features; False: scores the raw text."""
        ...

    @property
    def uses_token_cache(self) -> bool:
        """Whether the bundle's cached image tokens are this scorer's image input."""
        ...

    def match_scores(
        self,
        texts: Sequence[str],
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        image_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Match scores [B] of B (text, image) pairs.

        ``texts`` are the B raw texts (read when ``needs_text_features`` is False);
        ``text_tokens`` [B, L, Dt] and ``text_mask`` [B, L] their token features (read
        when it is True); ``image_tokens`` [B, P, Di], or [1, P, Di] for one image
        shared by every text.
        """
        ...


def fusion_weight(scorer: MatchScorer) -> float:
    """w of a scorer, as a float (a config read from JSON may hold an int)."""
    return float(scorer.fusion_weight)


__all__ = ["MatchScorer", "fusion_weight"]
