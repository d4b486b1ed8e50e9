"""The cross-attention reranker: text tokens attend to image patch tokens, one match logit.

The seed article's ``CrossModalTransformer`` made real: N pre-norm blocks, each
self-attention over the text tokens, cross-attention from the text tokens to the
image's patch tokens, and a feed-forward layer, all with residuals; an image-text
matching (ITM) head reads a learned [CLS] token prepended to the text. Padding tokens
are masked out of every attention, so they cannot change the score.

Dual encoders embed image and text separately and cannot bind "red" to "circle" or
"left of" to the right objects; attending from each word to the image patches can.
The final ranking score fuses both: ``score = match_logit + fusion_weight * cosine``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_FILE = "reranker_config.json"
WEIGHTS_FILE = "reranker.safetensors"


@dataclass
class RerankerConfig:
    """Shapes of the reranker (recorded next to its weights)."""

    text_width: int = 384  # width of the text tower's token features (MiniLM: 384)
    image_width: int = 192  # width of the image tower's patch tokens
    width: int = 256  # fusion width
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    text_self_attention: bool = True
    image_positions: int = 0  # >0: learned position embeddings for that many image tokens
    fusion_weight: float = 1.0  # w in: score = match logit + w * cosine (tuned on val)


class Block(nn.Module):
    """Pre-norm: text self-attention, text -> image cross-attention, feed-forward."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        w = cfg.width
        self.self_attn = (
            nn.MultiheadAttention(w, cfg.heads, dropout=cfg.dropout, batch_first=True)
            if cfg.text_self_attention
            else None
        )
        self.ln_self = nn.LayerNorm(w)
        self.ln_cross = nn.LayerNorm(w)
        self.cross_attn = nn.MultiheadAttention(w, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.ln_mlp = nn.LayerNorm(w)
        hidden = int(w * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(w, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, w)
        )

    def image_kv(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of images: img [U, P, W] -> k, v [U, H, P, W/H].

        They depend on the image only, so a batch computes them once per distinct
        image (an image query's k captions share one image).
        """
        u, p, w = img.shape
        a = self.cross_attn
        kv = F.linear(img, a.in_proj_weight[w:], a.in_proj_bias[w:])  # [U, P, 2W]
        k, v = kv.view(u, p, 2, a.num_heads, w // a.num_heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self, x: torch.Tensor, pad: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # x: [B, T, W] text (+CLS); pad: [B, T] True on padding; k, v: [B, H, P, W/H]
        if self.self_attn is not None:
            h = self.ln_self(x)
            x = x + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        b, t, w = x.shape
        a = self.cross_attn
        q = F.linear(self.ln_cross(x), a.in_proj_weight[:w], a.in_proj_bias[:w])  # [B, T, W]
        q = q.view(b, t, a.num_heads, w // a.num_heads).transpose(1, 2)  # [B, H, T, W/H]
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.dropout if self.training else 0.0)
        x = x + a.out_proj(o.transpose(1, 2).reshape(b, t, w))  # [B, T, W]
        return x + self.mlp(self.ln_mlp(x))


class CrossModalReranker(nn.Module):
    """Scores (text, image) pairs from token features: one match logit per pair.

    A ``MatchScorer`` (``crossmodal.scoring``): search calls ``match_scores``.
    """

    kind = "cross-attention"
    needs_text_features = True  # reads the text tower's token features
    uses_token_cache = True  # the indexer caches the image tokens it reads

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Encoder features come with their own scales: normalise before projecting.
        self.text_in = nn.Sequential(
            nn.LayerNorm(cfg.text_width), nn.Linear(cfg.text_width, cfg.width)
        )
        self.image_in = nn.Sequential(
            nn.LayerNorm(cfg.image_width), nn.Linear(cfg.image_width, cfg.width)
        )
        self.ln_image = nn.LayerNorm(cfg.width)
        # Image tokens come in grid order (ViT patches, a ConvNet's feature-map cells): a
        # learned embedding per position makes "left of" and "above" explicit instead of
        # relying on what position the image tower kept.
        self.image_pos = (
            nn.Parameter(torch.zeros(1, cfg.image_positions, cfg.width))
            if cfg.image_positions
            else None
        )
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_out = nn.LayerNorm(cfg.width)
        self.itm = nn.Linear(cfg.width, 1)
        nn.init.normal_(self.cls, std=0.02)
        if self.image_pos is not None:
            nn.init.normal_(self.image_pos, std=0.02)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Match logits [B] of pairs (text b, image ``image_index[b]``).

        text [B, L, Dt], text_mask [B, L] (True = real token), image [U, P, Di]; without
        ``image_index`` pair b takes image b (U = B). The image side is computed once
        per image in ``image``, however many pairs share it.
        """
        b = text.shape[0]
        if image_index is None and image.shape[0] not in (1, b):
            raise ValueError(f"{image.shape[0]} images for {b} texts need an image_index")
        return self.score_texts(text, text_mask, self.image_keys_values(image), image_index)

    def image_keys_values(self, image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's cross-attention keys and values of images [U, P, Di], as
        ([U, H, P, W/H], [U, H, P, W/H]): all of the compute that depends on the image
        alone, so that pairs sharing an image (in search or in a training step) share it.
        """
        img = self.image_in(image)  # [U, P, W]
        if self.image_pos is not None and img.shape[1] == self.image_pos.shape[1]:
            img = img + self.image_pos
        img = self.ln_image(img)
        return [block.image_kv(img) for block in self.blocks]

    def score_texts(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]],
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Match logits [B] of texts [B, L, Dt] against images from
        ``image_keys_values`` (U of them): pair b takes image ``image_index[b]``, or image b
        (U = B), or the one image (U = 1)."""
        b = text.shape[0]
        x = self.text_in(text)  # [B, L, W]
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)  # [B, 1+L, W]
        pad = torch.cat(
            [torch.zeros(b, 1, dtype=torch.bool, device=text.device), ~text_mask.bool()], dim=1
        )  # [B, 1+L]
        for block, (k, v) in zip(self.blocks, image_kv, strict=True):
            if image_index is not None:
                k, v = k[image_index], v[image_index]  # [B, H, P, W/H]
            elif k.shape[0] != b:  # one image, B texts: a view, not B copies
                k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
            x = block(x, pad, k, v)
        return self.itm(self.ln_out(x[:, 0])).squeeze(-1)  # [B]

    @property
    def fusion_weight(self) -> float:
        """w in: score = match logit + w * cosine (kept in the config, tuned on val)."""
        return self.cfg.fusion_weight

    def match_scores(
        self,
        texts: Sequence[str],
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        image_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Match logits [B] from token features (``MatchScorer``); ``texts`` are unused."""
        if text_tokens is None or text_mask is None:
            raise ValueError("the cross-attention reranker scores token features: none given")
        return self(text_tokens, text_mask, image_tokens)

    def fuse(self, logits: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
        """Final ranking score of pairs: match logit + w * dual-encoder cosine."""
        return logits + self.cfg.fusion_weight * cosine

    # ------------------------------------------------------------------ files

    def save(self, folder: Path, extra: dict | None = None) -> None:
        """Write weights and config (plus ``extra`` facts, e.g. the encoder identity)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        doc = {"config": asdict(self.cfg), **(extra or {})}
        (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> tuple[CrossModalReranker, dict]:
        """(reranker in eval mode, the config file's other facts)."""
        from safetensors.torch import load_file

        doc = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        model = cls(RerankerConfig(**doc.pop("config")))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, doc


def pad_tokens(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length [Li, D] token sequences -> ([B, Lmax, D], mask [B, Lmax])."""
    longest = max(s.shape[0] for s in seqs)
    dim = seqs[0].shape[1]
    out = torch.zeros(len(seqs), longest, dim, dtype=seqs[0].dtype)
    mask = torch.zeros(len(seqs), longest, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return out, mask


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, balance: bool = False) -> torch.Tensor:
    """Binary image-text matching loss (1 = matched pair).

    With ``balance`` the positives are weighted so both classes count equally.
    """
    labels = labels.float()
    weight = None
    if balance:
        pos = labels.sum().clamp(min=1.0)
        weight = torch.where(labels > 0, (len(labels) - pos) / pos, torch.ones_like(labels))
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weight)
