"""FAISS index choice, building and incremental sync from the catalog's vectors.

The index type follows the collection size: exact search (``IDMap2,Flat``) below
``EXACT_LIMIT`` vectors, an inverted file (``IVF{nlist},Flat``, nlist about 4 sqrt(N))
above it, or any FAISS factory string the user gives. IVF is chosen over HNSW for
large collections because it supports removing ids, so re-indexing a changed folder
updates the index in place. ``nprobe`` is tuned at build time on a sample of the
collection's own vectors until recall@10 against exact search reaches the target,
and recorded in the manifest (search sets it once at load).

Some index types cannot remove ids (HNSW has no ``remove_ids``). They are accepted: when
a run has ids to remove (deleted files, or files modified in place), publication
rebuilds such an index from the catalog's stored vectors (no re-encoding; cost: the
index build, about 3.4k vectors/s for HNSW32 on 2 cores) instead of removing in place,
and the run report counts it (``images_index_rebuilt``). A factory the user chose
that ``choose_factory`` never picks (HNSW, PQ, ...) is kept by later runs that do not
name one (``keep_factory``), instead of falling back to the size-based choice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import faiss
import numpy as np
from xmodal.crossmodal.errors import XmodalError

EXACT_LIMIT = 50_000
TARGET_RECALL = 0.97  # tuning target (leave-one-out on stored vectors); the bar is 0.95
TUNE_QUERIES = 200  # stored vectors asked for their neighbours when tuning nprobe
METRIC = faiss.METRIC_INNER_PRODUCT  # unit vectors: inner product = cosine


class IndexTypeError(XmodalError):
    """A FAISS factory string that cannot be built, or an index type that cannot do what
    is asked of it (list its ids, give its vectors back exactly)."""


def choose_factory(n: int) -> str:
    """Factory string for a collection of ``n`` vectors."""
    if n < EXACT_LIMIT:
        return "IDMap2,Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    return f"IVF{nlist},Flat"


def keep_factory(published: str | None, n: int) -> str:
    """The factory a run that names none uses: the published one when the user chose it.

    Factories ``choose_factory`` produces (``IDMap2,Flat``, ``IVF{n},Flat``) follow the
    collection's size; any other was asked for by name and stays until another is named.
    """
    auto = choose_factory(n)
    if published and published != "IDMap2,Flat" and not re.fullmatch(r"IVF\d+,Flat", published):
        return published
    return auto


def supports_remove(index: faiss.Index) -> bool:
    """Whether ``index`` can remove ids in place (HNSW, for one, cannot)."""
    try:
        remove(index, np.array([-1], np.int64))  # no stored id is -1: removes nothing
    except RuntimeError:
        return False
    return True


def training_size(factory: str, n: int) -> int:
    """How many vectors to train an index on: 50 per IVF list (FAISS wants 39+)."""
    # "IVF4096" or "IVF4096_HNSW32" (an HNSW coarse quantizer): the list count either way.
    nlist = next((int(m[1]) for p in factory.split(",") if (m := re.match(r"IVF(\d+)", p))), 0)
    return min(n, max(50 * nlist, 10_000)) if nlist else min(n, 100_000)


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def build(factory: str, dim: int, train_vectors: np.ndarray | None = None) -> faiss.Index:
    """An empty index of ``factory`` (trained on ``train_vectors`` when it needs training).

    Indexes without native ids are wrapped in IDMap2 so catalog ids are kept.
    """
    try:
        index = faiss.index_factory(dim, factory, METRIC)
    except RuntimeError as exc:
        raise IndexTypeError(f"bad FAISS factory string {factory!r}: {exc}") from exc
    if not index.is_trained:
        if train_vectors is None or len(train_vectors) == 0:
            raise IndexTypeError(f"index {factory!r} needs training vectors")
        index.train(np.ascontiguousarray(train_vectors, dtype=np.float32))
    if _is_ivf(index):
        ivf = faiss.extract_index_ivf(index)
        # A hash table from id to list position: remove_ids and reconstruct by id.
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    elif not isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        index = faiss.IndexIDMap2(index)
    return index


def index_ids(index: faiss.Index) -> np.ndarray:
    """All ids stored in an index (int64)."""
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    if _is_ivf(index):
        ivf = faiss.extract_index_ivf(index)
        invlists = ivf.invlists
        parts = []
        for list_no in range(ivf.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(list_no, ptr)
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    raise IndexTypeError(f"cannot list the ids of a {type(index).__name__}")


def remove(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ids; returns how many were removed."""
    if len(ids) == 0:
        return 0
    ids = np.ascontiguousarray(ids, np.int64)
    if _is_ivf(index):  # IVF's hash-table direct map takes only an explicit id array
        return int(index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))))
    return int(index.remove_ids(faiss.IDSelectorBatch(ids)))


def add(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add vectors under catalog ids."""
    if len(ids):
        index.add_with_ids(
            np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64)
        )


def holds_own_vectors(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Ids among ``ids`` whose ``vectors`` the index does not hold (exhaustive search).

    Only for indexes that store vectors exactly (``...Flat``): each vector must find
    its own id among its nearest neighbours at inner product ~1 (copies of one file
    share a vector, hence a few neighbours rather than one).
    """
    ivf = faiss.extract_index_ivf(index) if _is_ivf(index) else None
    saved = ivf.nprobe if ivf is not None else None
    if ivf is not None:
        ivf.nprobe = ivf.nlist
    try:
        scores, found = index.search(
            np.ascontiguousarray(vectors, np.float32), min(8, index.ntotal)
        )
    finally:
        if ivf is not None:
            ivf.nprobe = saved
    ok = ((found == ids[:, None]) & (scores > 0.999)).any(axis=1)
    return ids[~ok]


def recall_at_10(index: faiss.Index, exact: faiss.Index, queries: np.ndarray) -> float:
    """Mean overlap of the top 10 with exact search's top 10."""
    k = min(10, exact.ntotal)
    _, approx = index.search(queries, k)
    _, truth = exact.search(queries, k)
    return float(np.mean([len(set(a) & set(t)) / k for a, t in zip(approx, truth, strict=True)]))


def tune_nprobe(
    index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, target: float = TARGET_RECALL
) -> int | None:
    """Smallest power-of-two nprobe reaching ``target`` recall@10; None for non-IVF indexes.

    Queries are up to TUNE_QUERIES of the given stored vectors (``ids`` are their ids), each
    asking for its 10 nearest other vectors ("more like this"), so queries lie on the
    collection's own manifold. The reference is the same index probing every list,
    which for IVF-Flat is exact search over everything indexed.
    """
    if not _is_ivf(index) or index.ntotal == 0:
        return None
    rng = np.random.default_rng(0)
    pick = rng.choice(len(vectors), size=min(TUNE_QUERIES, len(vectors)), replace=False)
    queries = np.ascontiguousarray(vectors[pick], np.float32)
    own = np.asarray(ids)[pick]
    k = min(10, index.ntotal - 1)
    if k < 1:
        return 1
    ivf = faiss.extract_index_ivf(index)

    def neighbours() -> list[set[int]]:
        # Top k other than the query itself, best first.
        _, found = index.search(queries, k + 1)
        return [
            set([int(i) for i in row if i >= 0 and i != o][:k])
            for row, o in zip(found, own, strict=True)
        ]

    ivf.nprobe = ivf.nlist
    truth = neighbours()
    nprobe = 1
    while nprobe < ivf.nlist:
        ivf.nprobe = nprobe
        got = neighbours()
        recall = np.mean([len(g & t) / max(len(t), 1) for g, t in zip(got, truth, strict=True)])
        if recall >= target:
            return nprobe
        nprobe *= 2
    ivf.nprobe = ivf.nlist
    return ivf.nlist


VECTOR_CHUNK = 10_000  # vectors read at a time when checking every stored vector


def _exact_storage(index: faiss.Index) -> faiss.Index | None:
    """The part of ``index`` that holds raw float32 vectors; None for coded ones (PQ, SQ)."""
    inner = index
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexFlat | faiss.IndexHNSWFlat):
        return inner
    if _is_ivf(index):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        return ivf if isinstance(ivf, faiss.IndexIVFFlat) else None
    return None


def stores_exact_vectors(index: faiss.Index) -> bool:
    """Whether ``stored_vector_chunks`` can read the index's vectors back exactly."""
    return _exact_storage(index) is not None


def stored_vector_chunks(
    index: faiss.Index, chunk: int = VECTOR_CHUNK
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every (ids [n], vectors [n, d]) the index holds, a chunk at a time, as stored.

    For flat, HNSW-flat and IVF-flat indexes (``stores_exact_vectors``); others raise
    IndexTypeError. Nothing is decoded or searched: a garbled vector comes back as it is.
    """
    storage = _exact_storage(index)
    if storage is None:
        raise IndexTypeError(f"a {type(index).__name__} does not store its vectors exactly")
    d = index.d
    if isinstance(storage, faiss.IndexIVFFlat):
        invlists = storage.invlists
        for list_no in range(storage.nlist):
            size = invlists.list_size(list_no)
            if not size:
                continue
            ids_ptr = invlists.get_ids(list_no)
            codes_ptr = invlists.get_codes(list_no)
            try:
                ids = faiss.rev_swig_ptr(ids_ptr, size).astype(np.int64)
                codes = faiss.rev_swig_ptr(codes_ptr, size * invlists.code_size).copy()
            finally:
                invlists.release_ids(list_no, ids_ptr)
                invlists.release_codes(list_no, codes_ptr)
            yield ids, codes.view(np.float32).reshape(size, d)
        return
    ids_all = index_ids(index) if storage is not index else np.arange(index.ntotal)
    for start in range(0, storage.ntotal, chunk):
        n = min(chunk, storage.ntotal - start)
        yield ids_all[start : start + n], storage.reconstruct_n(start, n)
