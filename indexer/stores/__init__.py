"""Where a bundle's vectors live: FAISS files (the default), Milvus, or pgvector.

``open_store(url, dim)`` opens one kind's store by the URL the manifest records
(``kind_store_url`` derives it from a ``--vector-store`` URL); see ``base`` for the
interface and the URL forms.
"""

from __future__ import annotations

from .base import (
    FAISS,
    StoreError,
    VectorStore,
    kind_store_url,
    public_store_url,
    store_kind,
)


def open_store(url: str, dim: int, create: bool = False) -> VectorStore:
    """The database store a kind URL names (``create``: make its collection/table).

    FAISS is not opened here: its index files belong to the bundle (``bundle.load_index``).
    """
    which = store_kind(url)
    if which == "milvus":
        from .milvus_store import MilvusStore

        return MilvusStore(url, dim, create)
    if which == "pgvector":
        from .pgvector_store import PgvectorStore

        return PgvectorStore(url, dim, create)
    raise StoreError("FAISS indexes are the bundle's files: open them with the bundle")


__all__ = [
    "FAISS",
    "StoreError",
    "VectorStore",
    "kind_store_url",
    "open_store",
    "public_store_url",
    "store_kind",
]
