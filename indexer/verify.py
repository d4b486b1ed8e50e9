"""`xmodal verify`: check that a bundle's parts agree with each other.

Each check is a function registered with what it checks, in the words `xmodal verify
--help` uses; ``CHECKS`` lists those words, in the order ``verify_bundle`` runs them.
Verify reads what every reader (search, info, serve) reads, through the same functions,
so a bundle that verifies does not crash one; it never raises for a broken bundle, it
reports.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from xmodal.crossmodal.loading import ModelIdentity

from . import ann
from .bundle import (
    KINDS,
    BundleError,
    IndexInfo,
    Manifest,
    catalog_url,
    check_catalog_owner,
    index_file_intact,
    load_index,
    read_manifest,
)
from .catalog import (
    INDEXED,
    REMOVED,
    VECTOR_COLUMNS,
    CaptionRow,
    CaptionTokens,
    CatalogError,
    ImageRow,
    ImageTokens,
    RunRow,
    db_error_text,
    integrity_problems,
    open_engine,
    upgrade,
)
from .publish import pending_ids, stored_vectors
from .stores import StoreError, open_store

VECTOR_SAMPLE = 256  # published rows whose vectors are looked up in the index
NORM_TOLERANCE = 1e-3  # |norm - 1| allowed of a stored unit vector (float32 rounding)
CATALOG_CHUNK = 5000  # catalog vectors read at a time

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class VerifyReport:
    """Findings of a verification; ``ok`` when there are no problems."""

    problems: list[str] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.problems


def _sample(ids: np.ndarray | list[int], n: int = 5) -> str:
    return ", ".join(str(int(i)) for i in ids[:n]) + (" ..." if len(ids) > n else "")


def bad_vectors(ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Ids whose vector is not finite or not of unit length."""
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(vectors).all(axis=1)
        norms = np.linalg.norm(np.where(np.isfinite(vectors), vectors, 0.0), axis=1)
    return ids[~finite | (np.abs(norms - 1.0) > NORM_TOLERANCE)]


@dataclass(frozen=True)
class Check:
    """One check verify makes: the function, and what it checks in the words of
    `xmodal verify --help`."""

    description: str
    function: Callable[..., Any]


REGISTRY: list[Check] = []  # every check, in the order verify makes them


def _check(description: str) -> Callable[[_F], _F]:
    """Register the decorated function as the check ``description`` says."""

    def register(function: _F) -> _F:
        REGISTRY.append(Check(description, function))
        return function

    return register


@dataclass
class _Verification:
    """One bundle under verification: what the catalog checks read, the report they fill."""

    bundle: Path
    manifest: Manifest
    engine: Engine
    db_url: str | None
    report: VerifyReport

    def problem(self, text: str) -> None:
        """Record a problem."""
        self.report.problems.append(text)


@dataclass
class _KindRows:
    """One kind's catalog rows, as the index checks compare them with its index file."""

    kind: str  # 'images', 'captions' or 'visual'
    row: type  # ImageRow or CaptionRow
    column: Any  # the vector column of ``row`` this kind's index is built from
    dim: int  # the dimension of the kind's space
    all_ids: np.ndarray  # every row
    must: np.ndarray  # rows the published index must hold
    may: np.ndarray  # rows it may hold while a later run is unfinished
    pending: np.ndarray  # rows with a vector added or changed after publication
    no_vector: int  # indexed rows without a vector (images only)
    bad_dim: int  # vectors of another size than ``dim``


def verify_bundle(
    bundle: Path, db_url: str | None = None, model: ModelIdentity | None = None
) -> VerifyReport:
    """Run every check of ``CHECKS``; never raises for a broken bundle, reports instead."""
    report = VerifyReport()
    manifest = _check_manifest(bundle, report)
    if manifest is None:
        return report
    _check_model(manifest, model, report)
    try:
        engine = open_engine(catalog_url(bundle, manifest.catalog_url, db_url), create=False)
    except CatalogError as exc:
        report.problems.append(f"catalog: {exc}")
        return report
    try:
        _verify_catalog(_Verification(Path(bundle), manifest, engine, db_url, report))
    except (SQLAlchemyError, CatalogError) as exc:
        # Whatever the integrity check did not see (a server gone mid-way, a garbled row).
        text = db_error_text(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
        report.problems.append(f"catalog cannot be read: {text}")
    finally:
        engine.dispose()
    return report


def _verify_catalog(v: _Verification) -> None:
    """The checks that read the catalog, in order; a damaged catalog, or another bundle's,
    stops them (every later comparison would fail or be noise)."""
    if not _check_integrity(v) or not _check_catalog(v):
        return
    for kind in KINDS:
        if v.manifest.dim(kind):  # "visual" only for models with a second space
            _verify_kind(v, _kind_rows(v, kind))
    with Session(v.engine) as s:
        _check_tokens(v, s)
        _check_counts(v, s)
        _check_runs(v, s)


def _verify_kind(v: _Verification, rows: _KindRows) -> None:
    """The checks of one kind's vectors and index file, in order."""
    _check_catalog_vectors(v, rows)
    info = v.manifest.indexes.get(rows.kind, IndexInfo())
    if info.store:
        _check_store(v, rows, info)
        return
    index = _check_index_file(v, rows, info)
    if index is None:
        return  # nothing loaded to compare with
    _check_index_vectors(v, rows.kind, info, index)
    faiss_ids = np.sort(ann.index_ids(index))
    _check_index_ids(v, rows, info, faiss_ids)
    _check_index_sample(v, rows, info, index, faiss_ids)
    not_yet = np.setdiff1d(rows.pending, faiss_ids)
    if len(not_yet):
        v.report.facts[f"{rows.kind}_pending"] = len(not_yet)
    v.report.facts[f"{rows.kind}_ids"] = len(faiss_ids)


# ---------------------------------------------------------------------- the checks


@_check(
    "the manifest is UTF-8 JSON and every field has its type and range "
    "(model identity, index entries, search parameters, counts)"
)
def _check_manifest(bundle: Path, report: VerifyReport) -> Manifest | None:
    """Read the manifest as every reader does; None (a problem recorded) when it cannot be."""
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        report.problems.append(str(exc))
        return None
    report.facts["generation"] = manifest.generation
    report.facts["model"] = manifest.model
    return manifest


@_check("the model given with --model/--pretrained is the one that built the bundle")
def _check_model(manifest: Manifest, model: ModelIdentity | None, report: VerifyReport) -> None:
    """The loaded model's identity against the manifest's (nothing to check without one)."""
    if model is not None and not model.matches(manifest.identity):
        report.problems.append(
            f"bundle was built with {manifest.identity.name} (sha256 "
            f"{str(manifest.identity.sha256)[:12]}), not the loaded {model.name} "
            f"(sha256 {str(model.sha256)[:12]})"
        )


@_check("SQLite's integrity check finds no damaged page in the catalog file")
def _check_integrity(v: _Verification) -> bool:
    """False when the catalog file is damaged: every later query could fail or read garbage."""
    damaged = integrity_problems(v.engine)
    if damaged:
        v.problem(
            f"catalog file is damaged (SQLite integrity check: {'; '.join(damaged)}); "
            "restore it from a backup, or re-index into a new bundle"
        )
        return False
    return True


@_check(
    "the catalog opens, its schema version is known, and it belongs to this bundle "
    "(same bundle id as the manifest)"
)
def _check_catalog(v: _Verification) -> bool:
    """Schema and owner (``verify_bundle`` opened the catalog, or reported why it could not).

    An older catalog is upgraded, as readers do, and is no problem. False when the
    catalog is another bundle's, or its schema unknown.
    """
    try:
        upgrade(v.engine)
        check_catalog_owner(v.bundle, v.manifest, v.engine, v.db_url)
    except (CatalogError, BundleError) as exc:
        v.problem(f"catalog: {exc}")
        return False
    return True


def _kind_rows(v: _Verification, kind: str) -> _KindRows:
    """Read one kind's rows: which ids the published index must hold, and may hold."""
    published = v.manifest.published_run
    row, column = VECTOR_COLUMNS[kind]
    dim = v.manifest.dim(kind) or 0
    with Session(v.engine) as s:
        status = ImageRow.status if row is ImageRow else None
        cols = [row.id, row.run_id, column.is_not(None)]
        rows = s.execute(select(*cols, status) if status is not None else select(*cols)).all()
        bad_dim = s.execute(
            select(func.count())
            .select_from(row)
            .where(column.is_not(None), func.length(column) != dim * 4)
        ).scalar()
    live = [r for r in rows if r[2] and (status is None or r[3] == INDEXED)]
    # Rows the published index must hold, and rows it may still hold while a later run
    # is unfinished (added, changed or removed after publication).
    must = np.array([r[0] for r in live if (r[1] or 0) <= published], dtype=np.int64)
    must_set = set(must.tolist())
    may = np.array(
        [
            r[0]
            for r in rows
            if (r[1] or 0) > published
            or r[0] in must_set
            or (status is not None and r[3] == REMOVED)
        ],
        dtype=np.int64,
    )
    return _KindRows(
        kind=kind,
        row=row,
        column=column,
        dim=dim,
        all_ids=np.array([r[0] for r in rows], dtype=np.int64),
        must=must,
        may=may,
        pending=np.array([r[0] for r in live if (r[1] or 0) > published], dtype=np.int64),
        no_vector=sum(1 for r in rows if r[3] == INDEXED and not r[2]) if status is not None else 0,
        bad_dim=bad_dim or 0,
    )


@_check(
    "every vector in the catalog has the model's dimension, is finite and of unit "
    "length, and every indexed image has one"
)
def _check_catalog_vectors(v: _Verification, rows: _KindRows) -> None:
    """The catalog's own vectors: the source every index file is rebuilt from."""
    if rows.no_vector:
        v.problem(f"{rows.no_vector} indexed images have no {rows.kind} vector")
    if rows.bad_dim:
        v.problem(f"{rows.bad_dim} {rows.kind} vectors are not {rows.dim}-dimensional")
    wrong = [
        i
        for ids, vectors in _catalog_vectors(v.engine, rows.row, rows.column, rows.dim)
        for i in bad_vectors(ids, vectors)
    ]
    if wrong:
        v.problem(
            f"{rows.kind}: {len(wrong)} vectors in the catalog are not finite unit vectors "
            f"({_sample(wrong)}); re-index those files"
        )


@_check(
    "each index file named by the manifest exists, loads, has the sha256 recorded at "
    "publication, holds the stated count and the model's dimension, and takes its "
    "search parameters (nprobe)"
)
def _check_index_file(v: _Verification, rows: _KindRows, info: IndexInfo) -> Any | None:
    """The kind's index, loaded as readers load it; None when there is none to compare."""
    if not info.file:
        if len(rows.must):
            v.problem(
                f"{rows.kind}: the catalog holds {len(rows.must)} published vectors but the "
                "manifest names no index file"
            )
        return None
    if (v.bundle / info.file).is_file() and not index_file_intact(v.bundle, info):
        v.problem(
            f"{info.file}: its bytes differ from the sha256 recorded at publication "
            "(the file was damaged); re-run `xmodal index` to rebuild it from the catalog"
        )
    try:
        index = load_index(v.bundle, info, check_sha256=False)  # as readers do: count, nprobe
    except BundleError as exc:
        v.problem(str(exc))
        return None
    if index.d != rows.dim:
        v.problem(f"{info.file}: dimension {index.d}, model has {rows.dim}")
        return None
    return index


@_check("every vector in the index files is finite and of unit length")
def _check_index_vectors(v: _Verification, kind: str, info: IndexInfo, index: Any) -> None:
    """Every stored vector finite and of unit length (a garbled one scores 1e38); an index
    that stores coded vectors (IVF-PQ) is noted as unchecked."""
    if not ann.stores_exact_vectors(index):
        v.report.facts[f"{kind}_vectors_unchecked"] = f"{info.factory} stores coded vectors"
        return
    wrong = [i for ids, vs in ann.stored_vector_chunks(index) for i in bad_vectors(ids, vs)]
    if wrong:
        v.problem(
            f"{kind}: {len(wrong)} vectors in {info.file} are not finite unit vectors "
            f"({_sample(wrong)}); re-run `xmodal index` to rebuild it from the catalog"
        )


@_check(
    "FAISS ids and catalog ids (indexed rows with vectors) are the same set, without duplicates"
)
def _check_index_ids(
    v: _Verification, rows: _KindRows, info: IndexInfo, faiss_ids: np.ndarray
) -> None:
    """Ids of the index file or store (sorted) against the catalog's: none unknown, none
    stale (allowing what an unfinished later run changed), none missing, none twice."""
    where = info.file or info.store
    hint = "; re-run `xmodal index` to re-sync the store" if info.store else ""
    if len(np.unique(faiss_ids)) != len(faiss_ids):
        v.problem(f"{where}: duplicate ids")
    unknown = np.setdiff1d(faiss_ids, rows.all_ids)
    stale = np.setdiff1d(np.setdiff1d(faiss_ids, rows.may), unknown)
    missing = np.setdiff1d(rows.must, faiss_ids)
    if len(unknown):
        v.problem(
            f"{rows.kind}: {len(unknown)} ids in {where} have no catalog row "
            f"({_sample(unknown)}){hint}"
        )
    if len(stale):
        v.problem(
            f"{rows.kind}: {len(stale)} ids in {where} are not indexed rows "
            f"({_sample(stale)}){hint}"
        )
    if len(missing):
        v.problem(
            f"{rows.kind}: {len(missing)} indexed catalog rows are missing from "
            f"{where} ({_sample(missing)}){hint}"
        )


@_check(
    "each vector store the manifest names (Milvus, pgvector) answers, holds the catalog's "
    "ids (checked as FAISS ids are) and, on a sample, the catalog's own vectors"
)
def _check_store(v: _Verification, rows: _KindRows, info: IndexInfo) -> None:
    """A database store in place of an index file: reachable, same ids as the catalog,
    and a seeded sample of its vectors equal to the catalog's."""
    assert info.store is not None
    repair = "re-run `xmodal index` (it re-syncs the store from the catalog)"
    try:
        store = open_store(info.store, rows.dim)
    except StoreError as exc:
        v.problem(f"{rows.kind}: {exc}; start the store, then {repair}")
        return
    try:
        ids = store.ids()
        _check_index_ids(v, rows, info, ids)
        check = np.setdiff1d(np.intersect1d(rows.must, ids), pending_ids(v.engine, rows.kind))
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(check, min(VECTOR_SAMPLE, len(check)), replace=False))
        held = store.fetch(sample)
        want = stored_vectors(v.engine, rows.kind, sample, rows.dim)
        other = [
            int(i)
            for i, w in zip(sample, want, strict=True)
            if int(i) not in held or not np.allclose(held[int(i)], w, atol=1e-5)
        ]
        if other:
            v.problem(
                f"{rows.kind}: {info.store} holds other vectors than the catalog for "
                f"{len(other)} of {len(sample)} sampled ids ({_sample(other)}); {repair}"
            )
    except StoreError as exc:
        v.problem(f"{rows.kind}: {exc}; {repair}")
        return
    finally:
        store.close()
    v.report.facts[f"{rows.kind}_ids"] = len(ids)
    v.report.facts[f"{rows.kind}_store"] = info.store


@_check("on a sample, exact indexes hold the catalog's own vectors")
def _check_index_sample(
    v: _Verification, rows: _KindRows, info: IndexInfo, index: Any, faiss_ids: np.ndarray
) -> None:
    """Same ids are not enough: a file modified in place keeps its ids. A seeded sample of
    published ids is looked up in an exact (Flat) index and compared with the catalog."""
    if not info.factory.endswith("Flat") or not len(faiss_ids):
        return
    marked = pending_ids(v.engine, rows.kind)  # not yet replaced: may differ
    check = np.setdiff1d(np.intersect1d(rows.must, faiss_ids), marked)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(check, min(VECTOR_SAMPLE, len(check)), replace=False))
    other = ann.holds_own_vectors(
        index, sample, stored_vectors(v.engine, rows.kind, sample, rows.dim)
    )
    if len(other):
        v.problem(
            f"{rows.kind}: {info.file} holds other vectors than the catalog for "
            f"{len(other)} of {len(sample)} sampled ids ({_sample(other)}); "
            "re-run `xmodal index` to republish"
        )


@_check("token caches have one width per kind, rows of the right size, and only indexed owners")
def _check_tokens(v: _Verification, s: Session) -> None:
    """Token caches: only for indexed rows, one width per kind, rows of the right size."""
    for kind, table, key, owner in (
        ("image", ImageTokens, ImageTokens.image_id, ImageRow),
        ("caption", CaptionTokens, CaptionTokens.caption_id, CaptionRow),
    ):
        q = select(func.count(), func.count(func.distinct(table.width))).select_from(table)
        total, widths = s.execute(q).one()
        if widths > 1:
            v.problem(f"{kind} token cache mixes token widths")
        bad_size = s.execute(
            select(func.count())
            .select_from(table)
            .where(func.length(table.data) != table.length * table.width * 2)
        ).scalar()
        if bad_size:
            v.problem(f"{bad_size} {kind} token rows have the wrong size")
        if owner is ImageRow:
            orphans = s.execute(
                select(func.count())
                .select_from(table)
                .join(ImageRow, ImageRow.id == key)
                .where(ImageRow.status != INDEXED, ImageRow.status != REMOVED)
            ).scalar()
            if orphans:
                v.problem(f"{orphans} cached image tokens belong to non-indexed rows")
        if total:
            v.report.facts[f"{kind}_tokens_cached"] = total


@_check("the manifest's counts match the catalog's")
def _check_counts(v: _Verification, s: Session) -> None:
    """Manifest counts against the catalog's, unless an interrupted run left rows that
    are not published yet (noted as a fact)."""
    published = v.manifest.published_run
    indexed = s.execute(
        select(func.count()).select_from(ImageRow).where(ImageRow.status == INDEXED)
    ).scalar()
    unpublished = s.execute(
        select(func.count()).select_from(ImageRow).where(ImageRow.run_id > published)
    ).scalar()
    counts = v.manifest.counts
    if unpublished:
        v.report.facts["unpublished_rows"] = unpublished  # a run was interrupted
    elif counts and counts.get("images_indexed") != indexed:
        v.problem(
            f"manifest counts {counts.get('images_indexed')} indexed images, the catalog {indexed}"
        )


@_check("every run's stored report is JSON; unfinished runs and stray index files are noted")
def _check_runs(v: _Verification, s: Session) -> None:
    """Runs' reports readable (`xmodal info` shows the last one); unfinished runs, and
    index files no manifest names (left by a killed run, removed by the next), as facts."""
    unreadable = []
    for run_id, text in s.execute(select(RunRow.id, RunRow.report)).all():
        try:
            json.loads(text or "{}")
        except (json.JSONDecodeError, TypeError):
            unreadable.append(run_id)
    if unreadable:
        v.problem(f"{len(unreadable)} runs have an unreadable report ({_sample(unreadable)})")
    running = s.execute(
        select(func.count()).select_from(RunRow).where(RunRow.status == "running")
    ).scalar()
    if running:
        v.report.facts["unfinished_runs"] = running
    named = {info.file for info in v.manifest.indexes.values() if info.file}
    stray = [p.name for p in v.bundle.glob("*.faiss") if p.name not in named]
    if stray:
        v.report.facts["stray_index_files"] = stray


def _catalog_vectors(
    engine: Engine, row: type, column: Any, dim: int
) -> Iterator[tuple[np.ndarray, Any]]:
    """(ids, [n, dim] vectors) of the catalog's rows with a vector of the right size."""
    last = -1
    while True:
        with Session(engine) as s:
            rows = s.execute(
                select(row.id, column)
                .where(column.is_not(None), func.length(column) == dim * 4, row.id > last)
                .order_by(row.id)
                .limit(CATALOG_CHUNK)
            ).all()
        if not rows:
            return
        last = rows[-1][0]
        ids = np.array([r[0] for r in rows], np.int64)
        yield ids, np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim)


# Every check verify makes, in order (shown by `xmodal verify --help`; a test keeps them
# in step): the descriptions of the registered check functions.
CHECKS = tuple(check.description for check in REGISTRY)
