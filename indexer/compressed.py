"""Choosing a compressed FAISS index that fits a memory budget, and searching it exactly.

``xmodal index --max-index-memory 2GB`` keeps today's index (``ann.choose_factory``) when
its estimate fits, else an IVF-PQ index following autofaiss's rules: nlist about
4 sqrt(N) rounded to a power of two (capped so k-means training stays tractable), an
HNSW coarse quantizer above ``HNSW_QUANTIZER_ABOVE`` vectors, and the largest PQ ``m``
(dim/2, dim/4, ..., 8-bit codes) whose estimate fits. PQ codes are lossy, so the ANN
search asks for ``k * K_FACTOR`` candidates and re-scores them with the exact float32
vectors the catalog stores (``search_reranked``); FAISS's IndexRefineFlat would keep
every exact vector in RAM and defeat the budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import faiss
import numpy as np
from xmodal.crossmodal.errors import XmodalError

from . import ann

K_FACTOR = 32  # candidates per wanted result re-scored exactly (16 gave 0.88 at 10M)
MAX_NLIST = 4096  # k-means on 50 x nlist training vectors stays minutes on 2 cores
MIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points per centroid
PQ_BITS = 8  # 256 centroids per sub-quantizer
PQ_MIN_TRAIN = 256 * MIN_POINTS_PER_LIST  # training points PQ needs per sub-quantizer
HNSW_QUANTIZER_ABOVE = 1_000_000  # vectors above which the coarse quantizer is HNSW32
HNSW_M = 32
ID_BYTES = 8  # int64 id stored beside each code in the inverted lists
DIRECT_MAP_BYTES = 16  # hash-table entry id -> (list, offset), per vector
IDMAP2_BYTES = 8 + 32  # IDMap2: id array + reverse hash map entry, per vector
SLACK = 1.25  # std::vector growth in inverted lists and allocator overhead

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_FACTORY = re.compile(
    r"(?:OPQ(?P<opq>\d+)(?:_\d+)?,)?IVF(?P<nlist>\d+)(?P<hnsw>_HNSW(?P<hm>\d+))?,"
    r"(?:(?P<flat>Flat)|PQ(?P<m>\d+)(?:x(?P<bits>\d+))?)"
)


class MemoryBudgetError(XmodalError):
    """A memory size that cannot be read, or a budget no index choice fits."""


def parse_memory(value: str | int) -> int:
    """Bytes in ``value``: an int, or "2GB", "512MB", "1.5G", "800k" (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise MemoryBudgetError(f"memory size must be positive, got {value!r}")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(value))
    if not match:
        raise MemoryBudgetError(
            f"bad memory size {value!r}: expected a number of bytes or e.g. 512MB, 2GB, 1.5G"
        )
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise MemoryBudgetError(f"memory size must be positive, got {value!r}")
    return size


def _hnsw_bytes(count: int, dim: int, m: int) -> int:
    # Vectors, level-0 links (2M ints) and upper levels (~M ints, rarely reached).
    return count * (dim * 4 + 3 * m * 4 + 8)


def estimate_bytes(factory: str, n: int, dim: int) -> int:
    """Conservative RAM estimate of ``factory`` holding ``n`` vectors of ``dim``.

    Knows ``Flat`` / ``IDMap2,Flat``, ``IVF{nlist}[_HNSW{M}],Flat`` and
    ``[OPQ{m},]IVF{nlist}[_HNSW{M}],PQ{m}[x8]``; other factories raise MemoryBudgetError.
    """
    if factory in ("Flat", "IDMap2,Flat"):
        return int(SLACK * n * (dim * 4 + IDMAP2_BYTES))
    match = _FACTORY.fullmatch(factory)
    if not match:
        raise MemoryBudgetError(f"cannot estimate the memory of FAISS factory {factory!r}")
    nlist = int(match["nlist"])
    centroids = nlist * dim * 4
    quantizer = _hnsw_bytes(nlist, dim, int(match["hm"])) if match["hnsw"] else centroids
    if match["flat"]:
        code, tables = dim * 4, 0
    else:
        m, bits = int(match["m"]), int(match["bits"] or PQ_BITS)
        code = math.ceil(m * bits / 8)
        tables = (1 << bits) * dim * 4  # PQ centroids: 2^bits x (dim/m) per sub-quantizer
    opq = dim * dim * 4 if match["opq"] else 0
    per_vector = code + ID_BYTES + DIRECT_MAP_BYTES
    return int(SLACK * n * per_vector) + quantizer + tables + opq


def _ivf_nlist(n: int) -> int:
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    most = max(1, n // MIN_POINTS_PER_LIST)  # enough training points per list
    while nlist > 1 and (nlist > MAX_NLIST or nlist > most):
        nlist //= 2
    return nlist


def pq_candidates(n: int, dim: int) -> list[str]:
    """IVF-PQ factories for ``n`` x ``dim``, largest codes (best recall) first."""
    nlist = _ivf_nlist(n)
    coarse = f"IVF{nlist}_HNSW{HNSW_M}" if n > HNSW_QUANTIZER_ABOVE else f"IVF{nlist}"
    out = []
    m = dim // 2
    while m >= 1:
        if dim % m == 0:
            out.append(f"{coarse},PQ{m}x{PQ_BITS}")
        m //= 2
    return out


def choose_within_budget(n: int, dim: int, budget: int) -> str:
    """Factory for ``n`` vectors of ``dim`` whose estimate fits ``budget`` bytes.

    ``ann.choose_factory(n)`` when it fits, else the IVF-PQ with the largest code that
    fits; MemoryBudgetError naming the smallest budget that would work otherwise.
    """
    plain = ann.choose_factory(n)
    if estimate_bytes(plain, n, dim) <= budget:
        return plain
    candidates = pq_candidates(n, dim)
    if n < PQ_MIN_TRAIN:
        raise MemoryBudgetError(
            f"{n} vectors need {_mb(estimate_bytes(plain, n, dim))} as {plain!r}, over the "
            f"{_mb(budget)} budget, and are too few to train a PQ index ({PQ_MIN_TRAIN} needed)"
        )
    for factory in candidates:
        if estimate_bytes(factory, n, dim) <= budget:
            return factory
    smallest = min(estimate_bytes(f, n, dim) for f in candidates)
    raise MemoryBudgetError(
        f"no index of {n} x {dim} vectors fits {_mb(budget)}: "
        f"the smallest ({candidates[-1]!r}) needs {_mb(smallest)}"
    )


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.1f} MB"


def is_compressed(factory: str | None) -> bool:
    """Whether ``factory`` stores lossy codes (PQ), so search must rerank exactly."""
    return bool(factory) and bool(re.search(r"(^|,)PQ\d", factory or ""))


def rerank_shortlist(
    queries: np.ndarray,
    found: np.ndarray,
    k: int,
    exact_vectors: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score an ANN shortlist exactly: (scores [Q, k], ids [Q, k]), best first.

    ``found`` [Q, k'] are the shortlist's ids (-1 where FAISS had none); rows with fewer
    than ``k`` candidates are padded with -inf scores and -1 ids, as FAISS pads.
    ``exact_vectors(ids)`` returns the stored float32 vectors of ``ids`` in that order.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    unique = np.unique(found[found >= 0])
    if len(unique) == 0:
        return scores, ids
    table = np.asarray(exact_vectors(unique), np.float32)  # [U, D]
    for r, (query, row) in enumerate(zip(queries, found, strict=True)):
        cand = np.unique(row[row >= 0])  # sorted: rows of ``table`` by searchsorted
        exact = table[np.searchsorted(unique, cand)] @ query  # [C]
        top = np.argsort(-exact, kind="stable")[:k]
        scores[r, : len(top)], ids[r, : len(top)] = exact[top], cand[top]
    return scores, ids


def search_reranked(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    exact_vectors: Callable[[np.ndarray], np.ndarray],
    k_factor: int = K_FACTOR,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, (scores, ids) of the top ``k`` by exact inner product, best first.

    The ANN shortlist is ``k * k_factor`` candidates; ``exact_vectors(ids)`` returns the
    stored float32 vectors of ``ids`` (rows in that order). Never contains id -1.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    _, found = index.search(queries, min(k * k_factor, max(index.ntotal, 1)))
    scores, ids = rerank_shortlist(queries, found, k, exact_vectors)
    return [(s[i >= 0], i[i >= 0]) for s, i in zip(scores, ids, strict=True)]


def tune_reranked(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    exact_vectors: Callable[[np.ndarray], np.ndarray],
    k_factor: int = K_FACTOR,
    target: float = ann.TARGET_RECALL,
    queries: np.ndarray | None = None,
) -> tuple[int, float]:
    """Smallest power-of-two nprobe whose reranked recall@10 reaches ``target``.

    ``vectors`` / ``ids`` are everything indexed (exact search over them is the truth);
    queries are ``queries`` or up to ann.TUNE_QUERIES of the stored vectors. Returns
    (nprobe, recall reached); at nprobe = nlist when the target is never reached.
    """
    vectors = np.ascontiguousarray(vectors, np.float32)
    ids = np.asarray(ids, np.int64)
    if queries is None:
        pick = np.random.default_rng(0).choice(
            len(vectors), min(ann.TUNE_QUERIES, len(vectors)), replace=False
        )
        queries = vectors[pick]
    queries = np.ascontiguousarray(queries, np.float32)
    k = min(10, len(ids))
    truth = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :k]]
    ivf = faiss.extract_index_ivf(index)
    nprobe, recall = 1, 0.0
    while True:
        ivf.nprobe = nprobe
        got = search_reranked(index, queries, k, exact_vectors, k_factor)
        recall = float(
            np.mean([len(set(g[1]) & set(t)) / k for g, t in zip(got, truth, strict=True)])
        )
        if recall >= target or nprobe >= ivf.nlist:
            return nprobe, recall
        nprobe = min(nprobe * 2, ivf.nlist)
