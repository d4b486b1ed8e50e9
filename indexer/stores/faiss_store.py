"""FAISS as a VectorStore: an in-memory index (the bundle's files hold it between runs).

The bundle's own FAISS path (generation files, factory choice, nprobe tuning) stays in
``publish`` and ``Bundle.search``; this wrapper gives benchmarks and tools the same
interface over a FAISS index as over the database stores.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from .. import ann
from ..filters import search_within
from .base import FAISS


class FaissStore:
    """A FAISS index under catalog ids (``IDMap2,Flat`` unless another is given)."""

    def __init__(self, dim: int, factory: str = "IDMap2,Flat", index: Any = None) -> None:
        self.url = FAISS
        self.factory = factory
        self.index: faiss.Index = index if index is not None else ann.build(factory, dim)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store vectors under ids."""
        ann.add(self.index, np.asarray(ids, np.int64), vectors)

    def remove(self, ids: np.ndarray) -> None:
        """Drop ids."""
        ann.remove(self.index, np.asarray(ids, np.int64))

    def flush(self) -> None:
        """Nothing to do: FAISS searches what it was given at once."""

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product search, padded to k with -1 ids."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.index.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if allowed_ids is not None:
            return search_within(self.index, q, k, allowed_ids)
        return self.index.search(q, k)

    def ids(self) -> np.ndarray:
        """Every id held, ascending."""
        return np.sort(ann.index_ids(self.index))

    def fetch(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """Stored vectors of the held ids among ``ids``."""
        held = set(ann.index_ids(self.index).tolist())
        return {int(i): self.index.reconstruct(int(i)) for i in ids if int(i) in held}

    @property
    def count(self) -> int:
        """How many vectors are held."""
        return int(self.index.ntotal)

    def describe(self) -> dict[str, Any]:
        """Manifest fields."""
        return {"store": FAISS, "factory": self.factory}

    def close(self) -> None:
        """Nothing to release."""
