"""A pretrained cross-attention scorer for real photos: CoCa's caption likelihood.

open_clip's CoCa models (e.g. ``coca_ViT-B-32`` / ``laion2b_s13b_b90k``) have a
multimodal text decoder whose text tokens cross-attend to the image's tokens. The mean
log-probability of a caption's tokens given the image, log p(caption | image) / length,
is a zero-shot image-text match score that sees which words go with which regions,
which the contrastive embeddings alone do not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .encoder import Encoder


def is_coca(encoder: Encoder) -> bool:
    """True when the encoder's model has CoCa's multimodal text decoder."""
    return hasattr(encoder.model, "text_decoder")


class CocaScorer:
    """Scores (caption, image tokens) pairs with a CoCa model's decoder.

    A ``MatchScorer`` (``crossmodal.scoring``): search calls ``match_scores``.
    """

    kind = "coca"
    needs_text_features = False  # reads the raw text, tokenized by CoCa itself
    uses_token_cache = False  # the bundle's token cache is kept for the cross-attention reranker

    def __init__(self, encoder: Encoder, fusion_weight: float = 1.0) -> None:
        if not is_coca(encoder):
            raise ValueError(f"{encoder.identity.name} is not a CoCa model")
        self.encoder = encoder
        self.model = encoder.model
        self.fusion_weight = fusion_weight  # score = mean log p + w * cosine

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str], image_tokens: torch.Tensor) -> torch.Tensor:
        """texts (B strings), image_tokens [B, P, W] (CoCa's pooled image tokens) -> [B]."""
        ids = self.encoder.tokenizer(list(texts)).to(image_tokens.device)  # [B, L]
        _, token_embs = self.model._encode_text(ids)  # [B, L(+cls), W]
        labels = ids[:, 1:]  # [B, L-1]: each position predicts the next token
        token_embs = token_embs[:, : labels.shape[1]]
        logits = self.model.text_decoder(image_tokens, token_embs)  # [B, L-1, V]
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1))[..., 0]
        real = (labels != 0).float()  # padding is 0 in open_clip's tokenizer
        return (logp * real).sum(1) / real.sum(1).clamp(min=1.0)  # [B]

    def match_scores(
        self,
        texts: Sequence[str],
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        image_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Mean log p(text | image) [B] (``MatchScorer``); token features are unused.

        One image ([1, P, W]) is scored against every text.
        """
        if image_tokens.shape[0] == 1 and len(texts) != 1:
            image_tokens = image_tokens.expand(len(texts), -1, -1)
        return self(texts, image_tokens)

    def fuse(self, scores: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
        """Final ranking score."""
        return scores + self.fusion_weight * cosine
