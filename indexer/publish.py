"""Publishing a generation: FAISS indexes synced with the catalog, then the manifest.

The catalog holds every vector; each index is brought in line with it (ids added and
removed in place while its type still fits the collection, else built anew), written
under the new generation's file name, and only then named by the manifest. A file
modified in place keeps its id: its row is marked ``vector_pending`` and its vector is
removed and added again. Rows of files that disappeared are purged once no published
index can hold their ids. A run that changed nothing publishes no new generation.

An index type that cannot remove ids (HNSW) is rebuilt from the stored vectors when ids
must leave it (see ``ann``); a later run that names no factory keeps a user-chosen one.

A kind kept in a database store (Milvus, pgvector: ``--vector-store``) is synced the
same way, in place (``sync_store``): ids gone or modified out, missing ones in, from the
catalog's vectors; the manifest then names the store instead of a file. A run that
names no store keeps the published one; naming another (``faiss`` included) fills it
from the catalog. A store that is down stops the run with a StoreError before the
manifest changes: the catalog keeps every row, and the next run re-syncs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session
from xmodal.crossmodal.errors import XmodalError

from . import ann, compressed
from .bundle import (
    KINDS,
    IndexInfo,
    Manifest,
    index_file_intact,
    index_file_name,
    read_index,
    remove_stale_index_files,
    write_index,
    write_manifest,
)
from .catalog import (
    EXCLUDED,
    FAILED,
    INDEXED,
    REMOVED,
    VECTOR_COLUMNS,
    CaptionLink,
    CaptionRow,
    ImageRow,
    Root,
)
from .stores import FAISS, kind_store_url, open_store, public_store_url


class PublishError(XmodalError):
    """An index of the requested type cannot be built."""


def stored_vectors(engine: Engine, kind: str, ids: np.ndarray, dim: int) -> np.ndarray:
    """[len(ids), dim] vectors of an index kind's catalog rows, in the order of ``ids``."""
    model, column = VECTOR_COLUMNS[kind]
    out = np.zeros((len(ids), dim), np.float32)
    pos = {int(i): n for n, i in enumerate(ids)}
    with Session(engine) as s:
        for start in range(0, len(ids), 5000):
            chunk = [int(i) for i in ids[start : start + 5000]]
            for id_, blob in s.execute(select(model.id, column).where(model.id.in_(chunk))).all():
                out[pos[id_]] = np.frombuffer(blob, np.float32)
    return out


def _ids(engine: Engine, q: Any) -> np.ndarray:
    """Sorted ids a one-column select returns."""
    with Session(engine) as s:
        return np.array(sorted(i for (i,) in s.execute(q).all()), dtype=np.int64)


def _live_ids(engine: Engine, kind: str) -> np.ndarray:
    model, column = VECTOR_COLUMNS[kind]
    q = select(model.id).where(column.is_not(None))
    if model is ImageRow:
        q = q.where(ImageRow.status == INDEXED)
    return _ids(engine, q)


def pending_ids(engine: Engine, kind: str) -> np.ndarray:
    """Ids whose vector was replaced in place since the index took them (image kinds)."""
    if VECTOR_COLUMNS[kind][0] is not ImageRow:
        return np.zeros(0, np.int64)
    return _ids(engine, select(ImageRow.id).where(ImageRow.vector_pending))


def _build(engine: Engine, kind: str, want: np.ndarray, dim: int, factory: str) -> Any:
    """An empty index of ``factory``, trained on a sample of the catalog's vectors."""
    sample = want[
        np.random.default_rng(0).permutation(len(want))[: ann.training_size(factory, len(want))]
    ]
    train = stored_vectors(engine, kind, np.sort(sample), dim) if len(want) else None
    try:
        return ann.build(factory, dim, train)
    except (ann.IndexTypeError, RuntimeError) as exc:  # RuntimeError: FAISS's own
        raise PublishError(f"cannot build a {factory!r} index: {exc}") from exc


def sync_index(
    engine: Engine,
    bundle: Path,
    info: IndexInfo,
    kind: str,
    dim: int,
    factory: str | None,
    counts: Counter | None = None,
    budget: int | None = None,
) -> tuple[Any, str, dict[str, Any], bool]:
    """(index holding exactly the catalog's live vectors, its factory, search params,
    whether it differs from the published one).

    An index that cannot remove ids is rebuilt when ids must leave it, counted as
    ``{kind}_index_rebuilt`` in ``counts``. ``budget`` (bytes) picks the index that fits
    it (``compressed.choose_within_budget``) when no factory is named.
    """
    want = _live_ids(engine, kind)
    if budget is not None and factory is None:
        try:
            factory = compressed.choose_within_budget(len(want), dim, budget)
        except compressed.MemoryBudgetError as exc:
            raise PublishError(f"{kind}: {exc}") from exc
    # Keep the index while its type still fits; otherwise build anew (e.g. the
    # collection outgrew exact search, or an IVF's nlist no longer fits its size).
    factory = factory or ann.keep_factory(info.factory if info.file else None, len(want))
    # A damaged file (bytes differ from the manifest's sha256) is rebuilt from the catalog.
    intact = index_file_intact(bundle, info)
    published = info.file if info.factory == factory and intact else None
    rebuilt = published is None
    index = _build(engine, kind, want, dim, factory) if rebuilt else read_index(bundle / published)
    have = ann.index_ids(index)
    # Gone from the catalog, or modified in place (same id, new vector): out, then in.
    out = np.union1d(np.setdiff1d(have, want), np.intersect1d(have, pending_ids(engine, kind)))
    if len(out) and not ann.supports_remove(index):
        # HNSW and the like: rebuild from the stored vectors instead of removing.
        index = _build(engine, kind, want, dim, factory)
        have, out, rebuilt = np.zeros(0, np.int64), np.zeros(0, np.int64), True
        if counts is not None:
            counts[f"{kind}_index_rebuilt"] += 1
    ann.remove(index, out)
    missing = np.setdiff1d(want, np.setdiff1d(have, out))
    for i in range(0, len(missing), 20_000):
        ids = missing[i : i + 20_000]
        ann.add(index, ids, stored_vectors(engine, kind, ids, dim))
    params: dict[str, Any] = {}
    if index.ntotal and compressed.is_compressed(factory):
        # Tuned on the reranked search the bundle will run, against exact search over
        # the stored vectors, read once: the rerank takes its rows from the same table
        # (``want`` is sorted and the index holds exactly it).
        vectors = stored_vectors(engine, kind, want, dim)
        nprobe, recall = compressed.tune_reranked(
            index, vectors, want, lambda ids: vectors[np.searchsorted(want, ids)]
        )
        params = {
            "nprobe": nprobe,
            "k_factor": compressed.K_FACTOR,
            "tuned_recall": round(recall, 4),
            "estimated_bytes": compressed.estimate_bytes(factory, len(want), dim),
        }
    elif index.ntotal and factory.startswith("IVF"):
        # tune_nprobe's queries: the index itself is the reference, so only they are read.
        sample = np.sort(want[np.random.default_rng(0).permutation(len(want))[: ann.TUNE_QUERIES]])
        params["nprobe"] = ann.tune_nprobe(index, stored_vectors(engine, kind, sample, dim), sample)
    changed = rebuilt or bool(len(out) or len(missing)) or params != info.params
    return index, factory, params, changed


def sync_store(
    engine: Engine, url: str, kind: str, dim: int, published: IndexInfo
) -> tuple[IndexInfo, bool]:
    """Bring one kind's database store in line with the catalog; (its manifest entry,
    whether anything changed). ``url`` may carry a password; the entry does not."""
    store = open_store(url, dim, create=True)
    try:
        want = _live_ids(engine, kind)
        have = store.ids()
        out = np.union1d(np.setdiff1d(have, want), np.intersect1d(have, pending_ids(engine, kind)))
        store.remove(out)
        missing = np.setdiff1d(want, np.setdiff1d(have, out))
        for i in range(0, len(missing), 20_000):
            ids = missing[i : i + 20_000]
            store.add(ids, stored_vectors(engine, kind, ids, dim))
        if len(out) or len(missing):
            store.flush()
        described = store.describe()
        info = IndexInfo(
            file=None, factory=described["factory"], count=len(want), store=described["store"]
        )
    finally:
        store.close()
    changed = bool(len(out) or len(missing)) or (published.store, published.factory) != (
        info.store,
        info.factory,
    )
    return info, changed


def _target(manifest: Manifest, kind: str, vector_store: str | None) -> str:
    """The store a kind's vectors go to: the run's ``--vector-store``, else the published."""
    if vector_store:
        return kind_store_url(vector_store, kind, manifest.bundle_id)
    return manifest.indexes.get(kind, IndexInfo()).store or FAISS


def _summary(engine: Engine) -> tuple[dict[str, int], list[str]]:
    """(counts, roots) the manifest records."""
    with Session(engine) as s:
        status = dict(
            s.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all()
        )
        counts = {
            "images_indexed": status.get(INDEXED, 0),
            "images_failed": status.get(FAILED, 0),
            "images_excluded": status.get(EXCLUDED, 0),
            "captions": s.execute(select(func.count()).select_from(CaptionRow)).scalar() or 0,
            "caption_links": s.execute(select(func.count()).select_from(CaptionLink)).scalar() or 0,
        }
        roots = [p.decode("utf-8", "replace") for (p,) in s.execute(select(Root.path))]
    return counts, roots


def publish(
    engine: Engine,
    bundle: Path,
    manifest: Manifest,
    run_id: int,
    factory: str | None = None,
    counts: Counter | None = None,
    vector_store: str | None = None,
    max_index_memory: int | None = None,
) -> int:
    """Write the next generation (indexes, then manifest); returns its number.

    A run that changed nothing (same vectors, counts and roots) writes no index and
    keeps the current generation, so serving processes do not reload for nothing.
    ``counts`` (the run report's) gets a note of each index rebuilt to remove ids.
    ``vector_store`` (a URL, or 'faiss') moves the vectors there; None keeps the published
    store. ``max_index_memory`` (bytes) is each FAISS index's budget.
    """
    # Every kind with a space in this model ("visual" only for two-space models), all
    # built from the catalog the same way: FAISS files, or a database store in place.
    kinds = {kind: dim for kind in KINDS if (dim := manifest.dim(kind))}
    targets = {kind: _target(manifest, kind, vector_store) for kind in kinds}
    faiss_only = "--index-factory" if factory else None
    if max_index_memory is not None:
        faiss_only = faiss_only or "--max-index-memory"
    if faiss_only and any(t != FAISS for t in targets.values()):
        raise PublishError(
            f"{faiss_only} applies to FAISS indexes, not to the vector store "
            f"{public_store_url(vector_store or next(t for t in targets.values() if t != FAISS))}"
        )
    in_store: dict[str, tuple[IndexInfo, bool]] = {}
    for kind, dim in kinds.items():
        if targets[kind] != FAISS:
            in_store[kind] = sync_store(
                engine, targets[kind], kind, dim, manifest.indexes.get(kind, IndexInfo())
            )
    synced = {
        kind: sync_index(
            engine,
            bundle,
            manifest.indexes.get(kind, IndexInfo()),
            kind,
            dim,
            factory,
            counts,
            max_index_memory,
        )
        for kind, dim in kinds.items()
        if kind not in in_store
    }
    counts, roots = _summary(engine)
    changed = any(c for *_, c in synced.values()) or any(c for _, c in in_store.values())
    if changed or (counts, roots) != (manifest.counts, manifest.roots):
        generation = manifest.generation + 1
        for kind, (index, used, params, _) in synced.items():
            name = index_file_name(kind, generation)
            sha256 = write_index(index, bundle / name)
            manifest.indexes[kind] = IndexInfo(
                file=name, factory=used, count=int(index.ntotal), params=params, sha256=sha256
            )
        for kind, (info, _) in in_store.items():
            manifest.indexes[kind] = info
        manifest.counts, manifest.roots = counts, roots
        manifest.generation = generation
        manifest.published_run = run_id
        write_manifest(bundle, manifest)
        remove_stale_index_files(bundle, manifest)
    elif manifest.published_run != run_id:
        # Same generation (readers keep what they have), but this run's state is the
        # published one: verify must not take its rows for an unfinished run's.
        manifest.published_run = run_id
        write_manifest(bundle, manifest)
    with Session(engine) as s, s.begin():  # no published index can hold them now
        s.execute(delete(ImageRow).where(ImageRow.status == REMOVED))
        s.execute(update(ImageRow).where(ImageRow.vector_pending).values(vector_pending=False))
    return manifest.generation
