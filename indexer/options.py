"""What `xmodal index` is asked to do: the run's options and their defaults, defined once.

Its own module, free of torch and FAISS, so the command line reads the defaults for its
flags without loading the indexer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ENGINES = ("local", "ray")  # where images are decoded and encoded (``indexer.engine``)
RAY_LOCAL = "local"  # --ray-address: start a Ray instance on this machine for the run


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
    max_index_memory: int | None = None  # bytes each FAISS index may take (None: no budget)
    allow_empty_roots: bool = False
    progress: bool = True
    cache_tokens: bool = False  # keep token features for the cross-attention reranker
    token_cache_mb: int = 4096  # bound on the token caches; beyond it tokens are recomputed
    engine: str = "local"  # one of ENGINES
    # Ray engine only: "local" (a Ray instance started for the run, bound to 127.0.0.1),
    # "auto" (the running cluster), a head's host:port, or ray://host:port (Ray Client).
    ray_address: str = RAY_LOCAL
    gpus_per_worker: float = 0.0  # GPUs each encoder actor holds (0: CPU actors)
    decode_workers: int | None = None  # concurrent decode tasks (None: from the cluster)
    encode_workers: int | None = None  # encoder actors (None: from the cluster)
