"""The built-in models, shipped inside the wheel as package data (``xmodal.models``).

Each folder is an open_clip ``local-dir:`` model (config, weights, metrics, README),
optionally with a ``reranker/`` folder; read them through ``importlib.resources``.
"""
