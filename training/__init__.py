"""Training and the demo-corpus generator, apart from the runtime model layer.

As ``open_clip_train`` stands apart from ``open_clip``: what indexing and search need at
run time (loading, encoder, reranker, scorers, metrics) lives in ``xmodal.crossmodal``;
what only training, tuning and the demo corpus need lives here.

Imports flow one way: ``xmodal.training`` may import ``xmodal.crossmodal`` and
``xmodal.search``; the CLI (``xmodal``), ``bench/`` and ``tests/`` import
``xmodal.training``; no runtime package (crossmodal, indexer, search, web) imports it.
"""
