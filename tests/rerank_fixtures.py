"""The tiny reranker training recipe the tests share (small corpus, tiny model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmodal.training.rerank_train import RerankTrainConfig


def tiny_rerank_config(
    corpus: Path, model_dir: Path, out: Path, **overrides: Any
) -> RerankTrainConfig:
    """A few seconds of reranker training over the tiny model on the small demo corpus."""
    settings: dict[str, Any] = dict(
        pairs=str(corpus / "train.jsonl"),
        out=str(out),
        model=f"local-dir:{model_dir}",
        images=96,
        epochs=4,
        batch_size=16,
        width=32,
        layers=1,
        heads=2,
        lr=2e-3,
    )
    return RerankTrainConfig(**{**settings, **overrides})
