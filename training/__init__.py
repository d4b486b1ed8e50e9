"""Training and the demo-corpus generator, apart from the runtime model layer.

As ``open_clip_train`` stands apart from ``open_clip``: what indexing and search need at
run time (loading, encoder, reranker, scorers, metrics) lives in ``xmodal.crossmodal``;
what only training, tuning and the demo corpus need lives here.

Imports flow one way: ``xmodal.training`` may import ``xmodal.crossmodal`` and
``xmodal.search``; the CLI (``xmodal``), ``bench/`` and ``tests/`` import
``xmodal.training``; no runtime package (crossmodal, indexer, search, web) imports it.

Names load on first use (``xmodal.crossmodal.lazy``).
"""

from xmodal.crossmodal.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "TrainConfig": "config",
        "RerankTrainConfig": "config",
        "train_model": "train",
        "train_reranker": "rerank_train",
        "CorpusSpec": "corpus",
        "write_corpus": "corpus",
        "evaluate_reranked": "evaluate",
        "build_photo_set": "photo_set",
        "build_photo_model": "photo_model",
        "fit_calibration": "calibrate",
        "DEFAULT_MAX_QUERIES": "calibrate",
    },
)
