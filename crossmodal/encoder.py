"""The dual encoder every other part uses: one class over any open_clip model.

It gives L2-normalised float32 embeddings for batches of images and strings (no
gradients), the token-level features the reranker reads (image patch tokens; text
tokens with their padding mask), and the model's identity for bundle manifests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from PIL import Image

from .loading import LoadedModel, ModelIdentity, load_model
from .threads import PASS_SIZE, configure_threads, ensure_threads_configured


class Encoder:
    """Embeds images and texts with one open_clip model, on the CPU unless told otherwise."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu") -> None:
        ensure_threads_configured()  # a deliberate count, even for library users
        self.loaded = loaded
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        # A tower that can fold its batch norms for inference (the photo model's) does so.
        fuse = getattr(getattr(self.model.visual, "trunk", None), "fuse_for_inference", None)
        if fuse is not None:
            fuse()
        # Convolutions run 1.3-2.9x faster on oneDNN in the channels-last layout (the
        # photo and shapes towers; bench/README.md); a ViT's outputs and speed are unchanged.
        self.model.visual.to(memory_format=torch.channels_last)
        self.identity: ModelIdentity = loaded.identity
        self.preprocess = loaded.preprocess
        self.tokenizer = loaded.tokenizer
        visual = self.model.visual
        # Ask the ViT for its patch tokens once, here, rather than flipping the flag per
        # call (not thread-safe): the pooled embedding comes out of the same pass.
        vit_tokens = hasattr(visual, "output_tokens") and hasattr(visual, "_pool")
        if vit_tokens:
            visual.output_tokens = True
        # A timm tower (open_clip's TimmModel): its trunk's feature map is the token grid.
        trunk = getattr(visual, "trunk", None)
        self.timm_tokens = all(
            hasattr(trunk, a) for a in ("forward_features", "forward_head")
        ) and hasattr(visual, "head")
        self.has_image_tokens = vit_tokens or self.timm_tokens
        self.text_tower = getattr(self.model, "text", None)
        self.hf_text = self.text_tower is not None and hasattr(self.text_tower, "pooler")
        if self.hf_text:
            self.text_tower.output_tokens = True
            self.pad_id = int(self.text_tower.config.pad_token_id or 0)
        else:
            self.pad_id = 0  # open_clip's SimpleTokenizer pads with 0
        # A built-in CLIP tower with a causal mask, pooled at the end token: a position sees
        # only those before it, so trailing padding changes nothing and can be cut (a short
        # query on a 77-token context is mostly padding).
        self.trim_text = (
            self.text_tower is None
            and getattr(self.model, "attn_mask", None) is not None
            and getattr(self.model, "text_pool_type", None) == "argmax"
        )

    @classmethod
    def load(cls, name: str | None = None, pretrained: str | None = None) -> Encoder:
        """Load a model (see ``crossmodal.loading.load_model``) and wrap it."""
        return cls(load_model(name, pretrained))

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.identity.embed_dim

    @property
    def visual_dim(self) -> int | None:
        """Size of the image tower's own feature space (image -> similar images), where the
        model has one besides the joint space; None otherwise."""
        return self.identity.visual_dim

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the image tower takes."""
        size = getattr(self.model.visual, "image_size", 224)
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def pass_size(self) -> int:
        """Images per inference pass on one thread: what the image tower declares
        (``inference_pass``), else ``threads.PASS_SIZE``."""
        trunk = getattr(self.model.visual, "trunk", None)
        return int(getattr(trunk, "inference_pass", None) or PASS_SIZE)

    def describe(self) -> dict[str, Any]:
        """Identity plus shapes, for ``xmodal info`` and benchmarks."""
        return {
            **self.identity.to_dict(),
            "image_size": list(self.image_size),
            "image_tokens": self.has_image_tokens,
        }

    # ------------------------------------------------------------------ images

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> [3, H, W] float tensor ready for the image tower."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.preprocess(image)

    def _visual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        visual = self.model.visual
        if self.timm_tokens:
            # TimmModel.forward is head(trunk(x)); split the trunk to keep its feature map.
            fmap = visual.trunk.forward_features(x.to(self.device))  # [B, C, h, w] or [B, N, C]
            pooled = visual.head(visual.trunk.forward_head(fmap))  # [B, D]
            tokens = fmap.flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap  # [B, h*w, C]
            return pooled, tokens
        out = visual(x.to(self.device))
        if isinstance(out, tuple):
            return out[0], out[1]
        return out, None

    @torch.inference_mode()
    def encode_image_tensors(self, x: torch.Tensor) -> np.ndarray:
        """[B, 3, H, W] preprocessed batch -> [B, D] float32, unit L2 norm."""
        pooled, _ = self._visual(x)
        return F.normalize(pooled.float(), dim=-1).cpu().numpy()

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """PIL images -> [N, D] float32, unit L2 norm."""
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess_image(im) for im in images[i : i + batch_size]])
            out.append(self.encode_image_tensors(batch))
        return np.concatenate(out)

    @torch.inference_mode()
    def encode_image_spaces(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """[B, 3, H, W] preprocessed batch -> (joint [B, D], visual [B, Dv] or None), both
        float32 with unit L2 norm, from one pass of the image tower."""
        if self.visual_dim is None:
            return self.encode_image_tensors(x), None
        trunk = self.model.visual.trunk
        fmap = trunk.forward_features(x.to(self.device))  # [B, C, h, w]
        joint = self.model.visual.head(trunk.forward_head(fmap))  # [B, D]
        visual = trunk.visual_features(fmap)  # [B, Dv]
        return (
            F.normalize(joint.float(), dim=-1).cpu().numpy(),
            F.normalize(visual.float(), dim=-1).cpu().numpy(),
        )

    @torch.inference_mode()
    def image_tokens(self, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Preprocessed [B, 3, H, W] -> (embeddings [B, D], patch tokens [B, P, Wv]).

        Tokens are the image tower's last layer after its final norm, unprojected (a
        ViT's patch tokens; a timm tower's last feature map, one token per cell).
        """
        if not self.has_image_tokens:
            raise NotImplementedError(
                f"model {self.identity.name}'s image tower gives no patch tokens"
            )
        pooled, tokens = self._visual(x)
        return F.normalize(pooled.float(), dim=-1).cpu().numpy(), tokens.float()

    # ------------------------------------------------------------------ texts

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> [B, L] token ids, trailing all-padding columns trimmed where that is exact
        (HF towers, which mask padding; causal CLIP towers pooled at the end token)."""
        ids = self.tokenizer(list(texts))
        if (self.hf_text or self.trim_text) and ids.shape[0] > 0:
            # HF towers mask padding themselves, so the columns past the longest text are
            # pure cost (a 64-token context vs ~20-token captions: 3x the work).
            longest = int((ids != self.pad_id).sum(dim=1).max())
            ids = ids[:, : max(longest, 1)]
        return ids

    def _text_forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids -> (projected pooled [B, D], token features [B, L, Wt])."""
        ids = ids.to(self.device)
        if self.hf_text:
            pooled, tokens = self.text_tower(ids)
            return pooled, tokens
        m = self.model
        if hasattr(m, "text") and m.text is not None:  # CustomTextCLIP with an open_clip tower
            m.text.output_tokens = True
            pooled, tokens = m.text(ids)
            return pooled, tokens
        # Built-in CLIP: encode_text drops the token features, so run its steps here once
        # and pool from them (calling encode_text as well ran the transformer twice).
        cast = m.transformer.get_cast_dtype()
        n = ids.shape[1]  # <= the context length once trailing padding is trimmed
        x = m.token_embedding(ids).to(cast) + m.positional_embedding[:n].to(cast)
        mask = m.attn_mask[:n, :n] if m.attn_mask is not None else None
        x = m.transformer(x, attn_mask=mask)
        tokens = m.ln_final(x)  # [B, L, W]
        pooled = text_global_pool(
            tokens, ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None)
        )  # [B, W]
        if m.text_projection is not None:
            proj = m.text_projection
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return pooled, tokens  # [B, D], [B, L, W]

    def _sorted_batches(self, texts: Sequence[str], batch_size: int) -> list[list[int]]:
        # Similar lengths together: less padding per batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Strings -> [N, D] float32, unit L2 norm (order preserved)."""
        out = np.zeros((len(texts), self.dim), np.float32)
        for idx in self._sorted_batches(texts, batch_size):
            pooled, _ = self._text_forward(self.tokenize([texts[i] for i in idx]))
            out[idx] = F.normalize(pooled.float(), dim=-1).cpu().numpy()
        return out

    @torch.inference_mode()
    def text_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Strings -> (embeddings [B, D], token features [B, L, Wt], mask [B, L] bool).

        ``mask`` is True on real tokens and False on padding.
        """
        ids = self.tokenize(texts)
        pooled, tokens = self._text_forward(ids)
        mask = (ids != self.pad_id).to(tokens.device)
        if not self.hf_text:
            # SimpleTokenizer pads with 0 after the end token; keep every real token.
            mask = ids != 0
        return F.normalize(pooled.float(), dim=-1).cpu().numpy(), tokens.float(), mask


def load_encoder(name: str | None = None, pretrained: str | None = None) -> Encoder:
    """Shorthand for ``Encoder.load``."""
    return Encoder.load(name, pretrained)


__all__ = ["Encoder", "ModelIdentity", "configure_threads", "load_encoder"]
