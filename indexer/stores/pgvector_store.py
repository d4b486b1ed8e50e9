"""PostgreSQL with pgvector as a VectorStore (``postgresql+psycopg://user@host/db``).

One table per kind (``id bigint primary key, embedding vector(dim)``) with an HNSW index
on inner product (``vector_ip_ops``), as Immich keeps its CLIP vectors. pgvector's
``<#>`` is the negative inner product, so the score is its negation. A filtered search
(``WHERE id = ANY(...)``) uses the HNSW index with iterative scans where pgvector has
them (0.8+); on older pgvector, or when the index returned fewer than k of the allowed
ids, it scores the allowed rows exactly (found by primary key), so k come back whenever
k of them are stored. The password is never recorded: give it in the URL at index time,
and to readers through libpq's PGPASSWORD or ~/.pgpass.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from .base import CONNECT_TIMEOUT_S, StoreError, pad, public_store_url

EF_SEARCH = 100  # hnsw.ef_search (raised to k when k is larger; pgvector's cap is 1000)
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 64  # pgvector's defaults, named
ITERATIVE_SCAN_VERSION = (0, 8)  # pgvector that can keep scanning until a filter has k
BUILD_MEMORY = "1GB"  # maintenance_work_mem for that build (a graph in memory builds fast)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


class PgvectorStore:
    """One kind's pgvector table."""

    def __init__(self, url: str, dim: int, create: bool = False) -> None:
        try:
            import psycopg
            from pgvector.psycopg import register_vector
        except ImportError as exc:
            raise StoreError(
                "the pgvector store needs psycopg and pgvector (pip install 'xmodal[pgvector]')"
            ) from exc
        self.url = public_store_url(url)
        self.dim = dim
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.table = query.pop("table", "")
        if not self.table:
            raise StoreError(f"vector store {self.url} names no table")
        conninfo = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))
        self._lock = threading.Lock()  # one connection, one statement at a time
        self._deferred = False  # the HNSW index is dropped until flush() (a bulk load)
        self._psycopg = psycopg
        try:
            self.conn = psycopg.connect(
                conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
            )
            if create:
                self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            register_vector(self.conn)
            row = self.conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            ).fetchone()
            self.iterative = row is not None and _version(row[0]) >= ITERATIVE_SCAN_VERSION
            exists = self.conn.execute("SELECT to_regclass(%s)", (self.table,)).fetchone()[0]
            if exists is None and not create:
                raise StoreError(f"vector store {self.url}: table {self.table} is missing")
            if exists is None:
                self.conn.execute(
                    f'CREATE TABLE IF NOT EXISTS "{self.table}" '
                    f"(id bigint PRIMARY KEY, embedding vector({dim}) NOT NULL)"
                )
            if create:  # (again: a run killed during a bulk load left it without)
                self._create_index(self.conn)
        except StoreError:
            raise
        except psycopg.Error as exc:
            raise self._error(exc, "open") from exc

    def _create_index(self, conn: Any) -> None:
        conn.execute(
            f'CREATE INDEX IF NOT EXISTS "{self.table}_hnsw" ON "{self.table}" '
            f"USING hnsw (embedding vector_ip_ops) "
            f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
        )

    def _error(self, exc: BaseException, doing: str) -> StoreError:
        text = str(exc).strip().splitlines()
        reason = text[0] if text else type(exc).__name__
        return StoreError(f"vector store {self.url} {doing} failed: {reason}")

    def _run(self, doing: str, fn: Any) -> Any:
        with self._lock:
            try:
                return fn(self.conn)
            except self._psycopg.Error as exc:
                raise self._error(exc, doing) from exc

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors under ids (binary COPY, one transaction)."""
        vectors = np.asarray(vectors, np.float32)

        def copy(conn: Any) -> None:
            with conn.transaction(), conn.cursor() as cur:
                sql = f'COPY "{self.table}" (id, embedding) FROM STDIN WITH (FORMAT BINARY)'
                with cur.copy(sql) as cp:
                    cp.set_types(["int8", "vector"])
                    for i, v in zip(ids, vectors, strict=True):
                        cp.write_row((int(i), v))

        if not len(ids):
            return
        if not self._deferred and self.count == 0:
            # Inserting row by row into HNSW is slow; building it once after the load is
            # not (pgvector's advice). flush() builds it.
            drop = f'DROP INDEX IF EXISTS "{self.table}_hnsw"'
            self._run("index drop", lambda c: c.execute(drop))
            self._deferred = True
        self._run("insert", copy)

    def flush(self) -> None:
        """Build the HNSW index a bulk load deferred."""
        if not self._deferred:
            return

        def build(conn: Any) -> None:
            with conn.transaction():
                conn.execute(f"SET LOCAL maintenance_work_mem = '{BUILD_MEMORY}'")
                self._create_index(conn)

        self._run("index build", build)
        self._deferred = False

    def remove(self, ids: np.ndarray) -> None:
        """Delete ids."""
        if len(ids):
            ids_list = [int(i) for i in ids]
            self._run(
                "delete",
                lambda c: c.execute(f'DELETE FROM "{self.table}" WHERE id = ANY(%s)', (ids_list,)),
            )

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """HNSW inner-product search, padded to k; filtered as the module says."""
        q = np.asarray(queries, np.float32)
        allowed = None if allowed_ids is None else [int(i) for i in allowed_ids]
        ef = min(max(k, EF_SEARCH), 1000)
        hnsw = f'SELECT id, embedding <#> %s AS d FROM "{self.table}"'
        exact = (
            f'WITH c AS MATERIALIZED (SELECT id, embedding FROM "{self.table}" '
            "WHERE id = ANY(%s)) SELECT id, embedding <#> %s AS d FROM c ORDER BY d LIMIT %s"
        )

        def run(conn: Any) -> tuple[list, list]:
            all_s, all_i = [], []
            with conn.transaction():
                conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
                if allowed is not None and self.iterative:
                    conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
                for vec in q:
                    if allowed is None:
                        rows = conn.execute(hnsw + " ORDER BY d LIMIT %s", (vec, k)).fetchall()
                    elif self.iterative:
                        sql = hnsw + " WHERE id = ANY(%s) ORDER BY d LIMIT %s"
                        rows = conn.execute(sql, (vec, allowed, k)).fetchall()
                        if len(rows) < min(k, len(allowed)):
                            rows = conn.execute(exact, (allowed, vec, k)).fetchall()
                    else:
                        rows = conn.execute(exact, (allowed, vec, k)).fetchall()
                    all_i.append([r[0] for r in rows])
                    all_s.append([-r[1] for r in rows])
            return all_s, all_i

        if allowed is not None and not allowed:
            return pad([[]] * len(q), [[]] * len(q), k)
        scores, ids = self._run("search", run)
        return pad(scores, ids, k)

    def ids(self) -> np.ndarray:
        """Every id held, ascending."""
        rows = self._run(
            "id listing",
            lambda c: c.execute(f'SELECT id FROM "{self.table}" ORDER BY id').fetchall(),
        )
        return np.array([r[0] for r in rows], np.int64)

    def fetch(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """Stored vectors of the held ids among ``ids``."""
        wanted = [int(i) for i in ids]
        rows = self._run(
            "get",
            lambda c: c.execute(
                f'SELECT id, embedding FROM "{self.table}" WHERE id = ANY(%s)', (wanted,)
            ).fetchall(),
        )
        # pgvector-python gives numpy arrays or Vector objects, by version and format.
        return {
            int(i): np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, np.float32)
            for i, v in rows
        }

    @property
    def count(self) -> int:
        """How many vectors are held."""
        sql = f'SELECT count(*) FROM "{self.table}"'
        return int(self._run("count", lambda c: c.execute(sql).fetchone()[0]))

    def describe(self) -> dict[str, Any]:
        """Manifest fields."""
        return {"store": self.url, "factory": f"pgvector hnsw m={HNSW_M}"}

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()
