"""Milvus as a VectorStore, through pymilvus's MilvusClient: a server
(``milvus://host:19530/collection``) or a Milvus Lite file
(``milvus-lite:///abs/file.db/collection``, the embedded Milvus, one process at a time).

One collection per kind: an INT64 primary key ``id`` (the catalog id) and a FLOAT_VECTOR
``vector``, inner-product metric, Strong consistency so a search right after publication
sees it. Milvus Lite searches exactly (FLAT); a server builds HNSW (M 16, efConstruction
200, ef = max(k, EF_SEARCH)), or the index the URL names (``?index=FLAT``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from .base import CONNECT_TIMEOUT_S, StoreError, pad, public_store_url, split_milvus_path

EF_SEARCH = 128  # HNSW candidate list at query time (raised to k when k is larger)
INSERT_BATCH = 5000  # rows sent per insert call (gRPC messages stay well under 64 MB)
FILTER_IDS_MAX = 100_000  # allowed ids written into one filter expression
ID_RANGE = 10_000  # ids asked per listing query (under Milvus's 16384-row query window)
LITE_LOGGER = "milvus_lite.server_manager"  # logs a traceback of its own on a failed start
# Milvus Lite's in-process gRPC server logs a traceback for each call it does not implement
# (AllocTimestamp, which pymilvus tries first and then does without).
GRPC_SERVER_LOGGER = "grpc._server"


@contextlib.contextmanager
def _quiet_lite() -> Iterator[None]:
    """Milvus Lite's failed start is reported as one StoreError, not also as its traceback."""
    logger = logging.getLogger(LITE_LOGGER)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _error(url: str, exc: BaseException, doing: str) -> StoreError:
    text = str(getattr(exc, "message", "") or exc).strip().splitlines()
    reason = text[0] if text else type(exc).__name__
    return StoreError(f"vector store {public_store_url(url)} {doing} failed: {reason}")


class MilvusStore:
    """One kind's Milvus collection."""

    def __init__(self, url: str, dim: int, create: bool = False) -> None:
        try:
            from pymilvus import DataType, MilvusClient
        except ImportError as exc:
            raise StoreError(
                "the Milvus store needs pymilvus (pip install 'xmodal[milvus]')"
            ) from exc
        self.url = public_store_url(url)
        self.dim = dim
        parts = urlsplit(url)
        prefix, self.collection = split_milvus_path(parts.scheme, parts.path)
        options = dict(parse_qsl(parts.query))
        self.lite = parts.scheme == "milvus-lite"
        self.index_type = options.get("index", "FLAT" if self.lite else "HNSW").upper()
        if not self.collection:
            raise StoreError(f"vector store {self.url} names no collection")
        try:
            if self.lite:
                if not prefix.endswith(".db"):
                    raise StoreError(
                        f"vector store {self.url}: a Milvus Lite URL names a .db file, "
                        "milvus-lite:///abs/path.db/collection"
                    )
                with _quiet_lite():
                    self.client = MilvusClient(prefix)
                logging.getLogger(GRPC_SERVER_LOGGER).setLevel(logging.CRITICAL)
            else:
                token = f"{parts.username}:{parts.password}" if parts.username else ""
                self.client = MilvusClient(
                    uri=f"http://{parts.hostname}:{parts.port or 19530}",
                    token=token,
                    timeout=CONNECT_TIMEOUT_S,
                )
            exists = self.client.has_collection(self.collection)
            if not exists and not create:
                raise StoreError(
                    f"vector store {self.url}: collection {self.collection} is missing"
                )
            if not exists:
                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("id", DataType.INT64, is_primary=True)
                schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
                params = self.client.prepare_index_params()
                extra = {"M": 16, "efConstruction": 200} if self.index_type == "HNSW" else {}
                params.add_index(
                    field_name="vector", index_type=self.index_type, metric_type="IP", params=extra
                )
                self.client.create_collection(
                    self.collection, schema=schema, index_params=params, consistency_level="Strong"
                )
            self.client.load_collection(self.collection)
        except StoreError:
            raise
        except Exception as exc:  # pymilvus raises its own, grpc's and OSError
            raise _error(url, exc, "open") from exc

    def _call(self, doing: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _error(self.url, exc, doing) from exc

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors under ids."""
        vectors = np.asarray(vectors, np.float32)
        for start in range(0, len(ids), INSERT_BATCH):
            rows = [
                {"id": int(i), "vector": v.tolist()}
                for i, v in zip(
                    ids[start : start + INSERT_BATCH],
                    vectors[start : start + INSERT_BATCH],
                    strict=True,
                )
            ]
            self._call("insert", self.client.insert, self.collection, rows)

    def remove(self, ids: np.ndarray) -> None:
        """Delete ids."""
        for start in range(0, len(ids), INSERT_BATCH):
            chunk = [int(i) for i in ids[start : start + INSERT_BATCH]]
            self._call("delete", self.client.delete, self.collection, ids=chunk)

    def flush(self) -> None:
        """Seal what was inserted (Milvus Lite searches unsealed rows about 50x slower)."""
        self._call("flush", self.client.flush, self.collection)

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product search (Milvus's IP distance is the score), padded to k."""
        q = np.ascontiguousarray(queries, np.float32)
        # Bounded staleness (Milvus's default) for queries: publication flushed before
        # the manifest named the collection; Strong would wait on every query.
        kwargs: dict[str, Any] = {
            "limit": min(k, 16384),
            "output_fields": ["id"],
            "consistency_level": "Bounded",
        }
        if self.index_type == "HNSW":
            kwargs["search_params"] = {"metric_type": "IP", "params": {"ef": max(k, EF_SEARCH)}}
        if allowed_ids is not None:
            if len(allowed_ids) == 0:
                return pad([[]] * len(q), [[]] * len(q), k)
            if len(allowed_ids) > FILTER_IDS_MAX:
                raise StoreError(
                    f"vector store {self.url}: a filter passing {len(allowed_ids)} images is "
                    f"more than Milvus takes in one expression ({FILTER_IDS_MAX})"
                )
            kwargs["filter"] = f"id in [{','.join(str(int(i)) for i in allowed_ids)}]"
        hits = self._call("search", self.client.search, self.collection, data=q.tolist(), **kwargs)
        scores = [[h["distance"] for h in row] for row in hits]
        ids = [[h["id"] for h in row] for row in hits]
        return pad(scores, ids, k)

    def ids(self) -> np.ndarray:
        """Every id held, ascending: read by id ranges (a query returns at most 16384 rows;
        catalog ids are dense, so ranges stop soon after the count is reached)."""
        total = self.count
        out: list[int] = []
        start = 0
        while len(out) < total:
            rows = self._call(
                "id listing",
                self.client.query,
                self.collection,
                filter=f"id >= {start} and id < {start + ID_RANGE}",
                output_fields=["id"],
                limit=ID_RANGE,
            )
            out.extend(int(r["id"]) for r in rows)
            start += ID_RANGE
        return np.array(sorted(out), np.int64)

    def fetch(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """Stored vectors of the held ids among ``ids``."""
        if len(ids) == 0:
            return {}
        rows = self._call(
            "get",
            self.client.get,
            self.collection,
            ids=[int(i) for i in ids],
            output_fields=["vector"],
        )
        return {int(r["id"]): np.asarray(r["vector"], np.float32) for r in rows}

    @property
    def count(self) -> int:
        """How many vectors are held (counted by a Strong-consistency query)."""
        rows = self._call(
            "count", self.client.query, self.collection, filter="", output_fields=["count(*)"]
        )
        return int(rows[0]["count(*)"])

    def describe(self) -> dict[str, Any]:
        """Manifest fields."""
        return {"store": self.url, "factory": f"milvus {self.index_type}"}

    def close(self) -> None:
        """Close the client."""
        self.client.close()
