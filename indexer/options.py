"""What `xmodal index` is asked to do: the run's options and their defaults, defined once.

Its own module, free of torch and FAISS, so the command line reads the defaults for its
flags without loading the indexer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class IndexOptions:
    """What `xmodal index` was asked to do."""

    bundle: Path
    roots: list[Path] = field(default_factory=list)
    captions: list[Path] = field(default_factory=list)
    db_url: str | None = None
    batch_size: int = 64
    workers: int = 2
    timeout_s: float = 30.0
    index_factory: str | None = None  # None: chosen by collection size
    vector_store: str | None = None  # None: where the bundle keeps them (FAISS files at first)
    allow_empty_roots: bool = False
    progress: bool = True
    cache_tokens: bool = False  # keep token features for the cross-attention reranker
    token_cache_mb: int = 4096  # bound on the token caches; beyond it tokens are recomputed
