"""A small convolutional image tower, registered with timm so open_clip configs can name it.

Why: a ViT trained from scratch on a few minutes of CPU reads colours, sizes and
positions but hardly shapes (objects of 11-19 pixels in 8 x 8 patches: the built-in
ViT names a lone object's shape for 0.37 of val images, zero-shot). Convolutions
bring the locality prior that shape needs: supervised on the demo corpus's 2,745
single-object training images, this network reaches 0.85 shape accuracy where the
same-sized ViT is at 0.17 after the same 168 steps (see the reranker README).

An open_clip config uses it as a timm tower::

    "vision_cfg": {"image_size": 64, "timm_model_name": "xmodal_convnet",
                   "timm_pool": "avg", "timm_proj": "linear"}

Its last feature map is the token grid the reranker attends to: a 64-pixel image
gives 8 x 8 = 64 tokens of ``channels[-1]`` features, like the ViT's patch tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
import torch.nn as nn
from timm.models import register_model

MODEL_NAME = "xmodal_convnet"


@dataclass
class ConvNetConfig:
    """Shapes of the network: a stride-2 stem, then one 3x3 conv stage per channel count,
    each stage after the first starting with a 2x2 max-pool."""

    channels: tuple[int, ...] = field(default=(32, 64, 128, 192))
    in_chans: int = 3

    @property
    def reduction(self) -> int:
        """Input pixels per feature-map cell along each side (64 px -> 8 x 8 cells)."""
        return 2 ** (len(self.channels) - 1)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ConvNet(nn.Module):
    """The timm model interface open_clip's ``TimmModel`` uses: ``forward_features``
    (the feature map), ``forward_head`` (pooled), ``reset_classifier``, ``num_features``.
    """

    def __init__(self, cfg: ConvNetConfig | None = None, num_classes: int = 0) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ConvNetConfig()
        c = cfg.channels
        layers: list[nn.Module] = [_conv_bn_relu(cfg.in_chans, c[0], 2)]
        for i, (cin, cout) in enumerate(pairwise(c)):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers.append(_conv_bn_relu(cin, cout, 1))
        self.features = nn.Sequential(*layers)
        self.num_features = c[-1]
        self.default_cfg: dict[str, Any] = {"pool_size": None, "num_classes": num_classes}
        self.pretrained_cfg = self.default_cfg
        self.global_pool = "avg"
        self.fc: nn.Module = nn.Linear(c[-1], num_classes) if num_classes else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (0: none, the pooled features are the output)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"{MODEL_NAME} pools by 'avg' or not at all, not {global_pool!r}")
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> feature map [B, C, H / r, W / r] (r = ``cfg.reduction``)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map [B, C, h, w] -> pooled [B, C] (or the classifier's logits)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # [B, C]
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def xmodal_convnet(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    """timm entry point (``timm.create_model("xmodal_convnet")``); trained by xmodal only."""
    if pretrained:
        raise ValueError(f"{MODEL_NAME} has no pretrained weights: train it with `xmodal train`")
    for unused in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(unused, None)
    channels = tuple(kwargs.pop("channels", ConvNetConfig().channels))
    cfg = ConvNetConfig(channels=channels, in_chans=kwargs.pop("in_chans", 3))
    num_classes = kwargs.pop("num_classes", 0)
    global_pool = kwargs.pop("global_pool", None)
    kwargs.pop("drop_path_rate", None)  # no stochastic depth in a plain conv stack
    if kwargs:
        raise TypeError(f"{MODEL_NAME}: unexpected arguments {sorted(kwargs)}")
    net = ConvNet(cfg, num_classes=num_classes)
    if global_pool is not None:  # TimmModel passes it when the trunk's head is the projection
        net.reset_classifier(num_classes, global_pool)
    return net
