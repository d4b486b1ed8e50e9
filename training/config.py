"""The settings of a training run, one dataclass per trainer: the one place their
defaults are defined (the CLI's options take theirs from these fields).

Plain dataclasses, no torch: the CLI reads them before any command runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.search.limits import DEFAULT_RERANK_K


@dataclass
class TrainConfig:
    """Everything one contrastive training run depends on (recorded in metrics.json)."""

    pairs: str
    out: str
    val: str | None = None
    model: str | None = None  # an open_clip / xmodal config name
    config: str | None = None  # or a JSON model config file
    pretrained: str | None = None  # initial weights: tag, file or local-dir:
    lock_text: bool = False
    lock_image: bool = False
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    seed: int = 0
    device: str = "auto"
    workers: int = 2  # image decoding threads while loading the data
    limit_images: int | None = None


@dataclass
class RerankTrainConfig:
    """Everything a reranker training run depends on (recorded in metrics.json)."""

    pairs: str
    out: str
    val: str | None = None
    model: str | None = None  # dual encoder (default: the built-in model)
    pretrained: str | None = None
    images: int | None = 12_000  # training images used (features are held in memory)
    captions_per_image: int = 2
    epochs: int = 28
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    width: int = 128
    layers: int = 2
    heads: int = 4
    rerank_k: int = DEFAULT_RERANK_K  # candidates re-scored when tuning w on val
    val_images: int | None = 1000
    # A step's pairs run in this many groups of similar caption length, each padded
    # only to its own longest (one-object captions are far shorter than three-object
    # ones): same logits, less compute.
    length_groups: int = 4
    counterfactual: bool = True  # twins of demo-corpus images (others have none)
    # Weight of a listwise loss beside ITM: each caption's image against the images
    # shown with it, each image's caption against its negative captions (the
    # reranker README's v5 and v6 sections compare weights).
    listwise: float = 1.0
    # On a demo corpus: train for partial truth (rerank_partial): queries sampled from
    # what is true of each scene as positives, negatives only where a text is false.
    partial_truth: bool = True
    # Queries that choose the fusion weight (mAP@100); default: queries-val.jsonl
    # beside --val when it is there.
    val_queries: str | None = None
    # What chooses the fusion weight: "queries" (val queries' mAP@100 among the weights
    # near the best val R@1; R@1 alone where there are no queries) or "recall" (v7's).
    fusion_by: str = "queries"
    seed: int = 0


__all__ = ["RerankTrainConfig", "TrainConfig"]
