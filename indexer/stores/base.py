"""The vector store interface every backend implements, and the URLs that name stores.

A store holds one kind's vectors (images, captions or visual) under catalog ids. The
catalog stays the source of truth: publication syncs a store with it (``add`` and
``remove``), verify compares ``ids()`` (and a sample of ``fetch``) with it, and search
asks ``search``. Results are padded to ``k`` with id -1 and score -inf, as FAISS pads,
and readers drop the padding.

URLs (the manifest records each kind's, without its password):

* ``faiss`` (or no URL): index files inside the bundle, the default;
* ``milvus://host:19530/collection`` a Milvus server, ``milvus-lite:///abs/file.db/collection``
  the embedded Milvus Lite file (one process at a time);
* ``postgresql+psycopg://user@host/db?table=name`` PostgreSQL with pgvector.

Each kind gets its own collection or table: the given name plus ``_<kind>``; without a
name, ``xmodal_<bundle id>``.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from xmodal.crossmodal.errors import XmodalError

FAISS = "faiss"
MILVUS_SCHEMES = ("milvus", "milvus-lite")
PG_SCHEMES = ("postgresql", "postgresql+psycopg", "postgres")
CONNECT_TIMEOUT_S = 5  # a store that does not answer within this is reported down
NAME_PREFIX = "xmodal_"  # collection/table names when the URL names none


class StoreError(XmodalError):
    """A vector store that is unreachable, misnamed or refuses an operation."""


class VectorStore(Protocol):
    """One kind's vectors under catalog ids, wherever they live."""

    url: str  # where it is, without password (what the manifest records)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store vectors under ids (ids not yet in the store)."""

    def remove(self, ids: np.ndarray) -> None:
        """Drop ids (absent ones are ignored)."""

    def flush(self) -> None:
        """Make what was added searchable at full speed (Milvus seals its segments,
        pgvector builds the HNSW index a bulk load deferred); publication calls it."""

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]) by inner product, best first, padded with -1 ids."""

    def ids(self) -> np.ndarray:
        """Every id held (int64, ascending)."""

    def fetch(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """Stored vectors of those ids that are held."""

    @property
    def count(self) -> int:
        """How many vectors are held."""

    def describe(self) -> dict[str, Any]:
        """What the manifest records: ``store`` (public URL) and ``factory`` (index type)."""

    def close(self) -> None:
        """Release connections."""


def store_kind(url: str | None) -> str:
    """The store kind a URL names: 'faiss', 'milvus' or 'pgvector' (StoreError otherwise)."""
    if not url or url == FAISS:
        return FAISS
    head = urlsplit(url).scheme.lower()
    if head in MILVUS_SCHEMES:
        return "milvus"
    if head in PG_SCHEMES:
        return "pgvector"
    raise StoreError(
        f"unknown vector store {public_store_url(url)!r}: use faiss, milvus://host:port/name, "
        "milvus-lite:///path.db/name or postgresql+psycopg://user@host/db"
    )


def public_store_url(url: str) -> str:
    """The URL without its password, safe to store in a manifest or print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = (parts.username or "") + "@" + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def pad(scores: list[list[float]], ids: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-query results as FAISS-shaped arrays, padded with -inf / -1."""
    out_s = np.full((len(ids), k), -np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    for q, (row_s, row_i) in enumerate(zip(scores, ids, strict=True)):
        n = min(k, len(row_i))
        out_s[q, :n] = row_s[:n]
        out_i[q, :n] = row_i[:n]
    return out_s, out_i


def _check_name(name: str, url: str) -> str:
    if (
        not name
        or not (name[0].isalpha() or name[0] == "_")
        or not name.replace("_", "a").isalnum()
    ):
        raise StoreError(
            f"vector store {public_store_url(url)}: {name!r} is not a valid collection/table "
            "name (letters, digits and underscores, not starting with a digit)"
        )
    return name


def kind_store_url(base: str, kind: str, bundle_id: str | None) -> str:
    """The URL of one kind's collection or table under a ``--vector-store`` URL."""
    which = store_kind(base)
    if which == FAISS:
        return FAISS
    default = NAME_PREFIX + (bundle_id or "bundle")
    parts = urlsplit(base)
    if which == "pgvector":
        query = dict(parse_qsl(parts.query))
        query["table"] = _check_name(f"{query.get('table') or default}_{kind}", base)
        return urlunsplit(parts._replace(query=urlencode(query)))
    path, name = split_milvus_path(parts.scheme, parts.path)
    name = _check_name(f"{name or default}_{kind}", base)
    # Built by hand: urlunsplit drops the empty host of milvus-lite:///abs/path.
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{path}/{name}{query}"


def split_milvus_path(head: str, path: str) -> tuple[str, str]:
    """(prefix, collection) of a Milvus URL's path: for Lite the prefix is the .db file."""
    path = path.rstrip("/")
    if head == "milvus-lite":
        if path.endswith(".db"):
            return path, ""
        prefix, _, name = path.rpartition("/")
        return prefix, name
    return "", path.strip("/")
