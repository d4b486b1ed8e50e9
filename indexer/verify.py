"""`xmodal verify`: check that a bundle's parts agree with each other.

``CHECKS`` lists every check, in the words `xmodal verify --help` uses. Verify reads
what every reader (search, info, serve) reads, through the same functions, so a bundle
that verifies does not crash one; it never raises for a broken bundle, it reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from xmodal.crossmodal.loading import ModelIdentity

from . import ann
from .bundle import (
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

# Every check verify makes (shown by `xmodal verify --help`; a test keeps them in step).
CHECKS = (
    "the manifest is UTF-8 JSON and every field has its type and range "
    "(model identity, index entries, search parameters, counts)",
    "the model given with --model/--pretrained is the one that built the bundle",
    "the catalog opens, its schema version is known, and it belongs to this bundle "
    "(same bundle id as the manifest)",
    "SQLite's integrity check finds no damaged page in the catalog file",
    "each index file named by the manifest exists, loads, has the sha256 recorded at "
    "publication, holds the stated count and the model's dimension, and takes its "
    "search parameters (nprobe)",
    "every vector in the index files is finite and of unit length",
    "FAISS ids and catalog ids (indexed rows with vectors) are the same set, without duplicates",
    "on a sample, exact indexes hold the catalog's own vectors",
    "every vector in the catalog has the model's dimension, is finite and of unit "
    "length, and every indexed image has one",
    "token caches have one width per kind, rows of the right size, and only indexed owners",
    "the manifest's counts match the catalog's",
    "every run's stored report is JSON; unfinished runs and stray index files are noted",
)

VECTOR_SAMPLE = 256  # published rows whose vectors are looked up in the index
NORM_TOLERANCE = 1e-3  # |norm - 1| allowed of a stored unit vector (float32 rounding)
CATALOG_CHUNK = 5000  # catalog vectors read at a time


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


def verify_bundle(
    bundle: Path, db_url: str | None = None, model: ModelIdentity | None = None
) -> VerifyReport:
    """Run every check of ``CHECKS``; never raises for a broken bundle, reports instead."""
    report = VerifyReport()
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        report.problems.append(str(exc))
        return report
    report.facts["generation"] = manifest.generation
    report.facts["model"] = manifest.model
    if model is not None and not model.matches(manifest.identity):
        report.problems.append(
            f"bundle was built with {manifest.identity.name} (sha256 "
            f"{str(manifest.identity.sha256)[:12]}), not the loaded {model.name} "
            f"(sha256 {str(model.sha256)[:12]})"
        )
    try:
        engine = open_engine(catalog_url(bundle, manifest.catalog_url, db_url), create=False)
    except CatalogError as exc:
        report.problems.append(f"catalog: {exc}")
        return report
    try:
        _verify_catalog(Path(bundle), manifest, engine, db_url, report)
    except (SQLAlchemyError, CatalogError) as exc:
        # Whatever the integrity check did not see (a server gone mid-way, a garbled row).
        text = db_error_text(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
        report.problems.append(f"catalog cannot be read: {text}")
    finally:
        engine.dispose()
    return report


def _verify_catalog(
    bundle: Path, manifest: Manifest, engine: Engine, db_url: str | None, report: VerifyReport
) -> None:
    damaged = integrity_problems(engine)
    if damaged:
        report.problems.append(
            f"catalog file is damaged (SQLite integrity check: {'; '.join(damaged)}); "
            "restore it from a backup, or re-index into a new bundle"
        )
        return  # every later query could fail or read garbage
    try:
        upgrade(engine)  # like readers: an older catalog is upgraded, none is an error
        check_catalog_owner(bundle, manifest, engine, db_url)
    except (CatalogError, BundleError) as exc:
        report.problems.append(f"catalog: {exc}")
        return  # another bundle's catalog: every comparison below would be noise
    dim = manifest.identity.embed_dim
    for kind, row in (("images", ImageRow), ("captions", CaptionRow)):
        _verify_kind(bundle, manifest, engine, kind, row, dim, report)
    with Session(engine) as s:
        _verify_tokens(s, report)
        _verify_counts(s, manifest, report)
    named = {info.file for info in manifest.indexes.values() if info.file}
    stray = [p.name for p in bundle.glob("*.faiss") if p.name not in named]
    if stray:
        report.facts["stray_index_files"] = stray  # left by a killed run; removed next run


def _catalog_vectors(engine: Engine, row: type, dim: int) -> Iterator[tuple[np.ndarray, Any]]:
    """(ids, [n, dim] vectors) of the catalog's rows with a vector of the right size."""
    last = -1
    while True:
        with Session(engine) as s:
            rows = s.execute(
                select(row.id, row.vector)
                .where(row.vector.is_not(None), func.length(row.vector) == dim * 4, row.id > last)
                .order_by(row.id)
                .limit(CATALOG_CHUNK)
            ).all()
        if not rows:
            return
        last = rows[-1][0]
        ids = np.array([r[0] for r in rows], np.int64)
        yield ids, np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim)


def _verify_kind(
    bundle: Path,
    manifest: Manifest,
    engine: Engine,
    kind: str,
    row: type,
    dim: int,
    report: VerifyReport,
) -> None:
    published = manifest.published_run
    with Session(engine) as s:
        status = ImageRow.status if row is ImageRow else None
        cols = [row.id, row.run_id, row.vector.is_not(None)]
        rows = s.execute(select(*cols, status) if status is not None else select(*cols)).all()
        bad_dim = s.execute(
            select(func.count())
            .select_from(row)
            .where(row.vector.is_not(None), func.length(row.vector) != dim * 4)
        ).scalar()
    all_ids = np.array([r[0] for r in rows], dtype=np.int64)
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
    pending = np.array([r[0] for r in live if (r[1] or 0) > published], dtype=np.int64)
    if row is ImageRow:
        no_vector = sum(1 for r in rows if r[3] == INDEXED and not r[2])
        if no_vector:
            report.problems.append(f"{no_vector} indexed images have no vector")
    if bad_dim:
        report.problems.append(f"{bad_dim} {kind} vectors are not {dim}-dimensional")
    wrong = [i for ids, v in _catalog_vectors(engine, row, dim) for i in bad_vectors(ids, v)]
    if wrong:
        report.problems.append(
            f"{kind}: {len(wrong)} vectors in the catalog are not finite unit vectors "
            f"({_sample(wrong)}); re-index those files"
        )
    info = manifest.indexes.get(kind, IndexInfo())
    if not info.file:
        if len(must):
            report.problems.append(
                f"{kind}: the catalog holds {len(must)} published vectors but the "
                "manifest names no index file"
            )
        return
    if (bundle / info.file).is_file() and not index_file_intact(bundle, info):
        report.problems.append(
            f"{info.file}: its bytes differ from the sha256 recorded at publication "
            "(the file was damaged); re-run `xmodal index` to rebuild it from the catalog"
        )
    try:
        index = load_index(bundle, info, check_sha256=False)  # as readers do: count, nprobe
    except BundleError as exc:
        report.problems.append(str(exc))
        return
    if index.d != dim:
        report.problems.append(f"{info.file}: dimension {index.d}, model has {dim}")
        return
    _verify_index_vectors(index, kind, info, report)
    faiss_ids = np.sort(ann.index_ids(index))
    if len(np.unique(faiss_ids)) != len(faiss_ids):
        report.problems.append(f"{info.file}: duplicate ids")
    unknown = np.setdiff1d(faiss_ids, all_ids)
    stale = np.setdiff1d(np.setdiff1d(faiss_ids, may), unknown)
    missing = np.setdiff1d(must, faiss_ids)
    if len(unknown):
        report.problems.append(
            f"{kind}: {len(unknown)} ids in {info.file} have no catalog row ({_sample(unknown)})"
        )
    if len(stale):
        report.problems.append(
            f"{kind}: {len(stale)} ids in {info.file} are not indexed rows ({_sample(stale)})"
        )
    if len(missing):
        report.problems.append(
            f"{kind}: {len(missing)} indexed catalog rows are missing from "
            f"{info.file} ({_sample(missing)})"
        )
    if info.factory.endswith("Flat") and len(faiss_ids):
        # Same ids are not enough: a file modified in place keeps its id.
        marked = pending_ids(engine, row)  # not yet replaced: may differ
        check = np.setdiff1d(np.intersect1d(must, faiss_ids), marked)
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(check, min(VECTOR_SAMPLE, len(check)), replace=False))
        other = ann.holds_own_vectors(index, sample, stored_vectors(engine, row, sample, dim))
        if len(other):
            report.problems.append(
                f"{kind}: {info.file} holds other vectors than the catalog for "
                f"{len(other)} of {len(sample)} sampled ids ({_sample(other)}); "
                "re-run `xmodal index` to republish"
            )
    not_yet = np.setdiff1d(pending, faiss_ids)
    if len(not_yet):
        report.facts[f"{kind}_pending"] = len(not_yet)
    report.facts[f"{kind}_ids"] = len(faiss_ids)


def _verify_index_vectors(index: Any, kind: str, info: IndexInfo, report: VerifyReport) -> None:
    """Every stored vector finite and of unit length (a garbled one scores 1e38)."""
    if not ann.stores_exact_vectors(index):
        report.facts[f"{kind}_vectors_unchecked"] = f"{info.factory} stores coded vectors"
        return
    wrong = [i for ids, v in ann.stored_vector_chunks(index) for i in bad_vectors(ids, v)]
    if wrong:
        report.problems.append(
            f"{kind}: {len(wrong)} vectors in {info.file} are not finite unit vectors "
            f"({_sample(wrong)}); re-run `xmodal index` to rebuild it from the catalog"
        )


def _verify_tokens(s: Session, report: VerifyReport) -> None:
    """Token caches: only for indexed rows, one width per kind, rows of the right size."""
    for kind, table, key, owner in (
        ("image", ImageTokens, ImageTokens.image_id, ImageRow),
        ("caption", CaptionTokens, CaptionTokens.caption_id, CaptionRow),
    ):
        q = select(func.count(), func.count(func.distinct(table.width))).select_from(table)
        total, widths = s.execute(q).one()
        if widths > 1:
            report.problems.append(f"{kind} token cache mixes token widths")
        bad_size = s.execute(
            select(func.count())
            .select_from(table)
            .where(func.length(table.data) != table.length * table.width * 2)
        ).scalar()
        if bad_size:
            report.problems.append(f"{bad_size} {kind} token rows have the wrong size")
        if owner is ImageRow:
            orphans = s.execute(
                select(func.count())
                .select_from(table)
                .join(ImageRow, ImageRow.id == key)
                .where(ImageRow.status != INDEXED, ImageRow.status != REMOVED)
            ).scalar()
            if orphans:
                report.problems.append(f"{orphans} cached image tokens belong to non-indexed rows")
        if total:
            report.facts[f"{kind}_tokens_cached"] = total


def _verify_counts(s: Session, manifest: Manifest, report: VerifyReport) -> None:
    """Manifest counts against the catalog's; runs' reports readable; unfinished runs."""
    published = manifest.published_run
    indexed = s.execute(
        select(func.count()).select_from(ImageRow).where(ImageRow.status == INDEXED)
    ).scalar()
    unpublished = s.execute(
        select(func.count()).select_from(ImageRow).where(ImageRow.run_id > published)
    ).scalar()
    if unpublished:
        report.facts["unpublished_rows"] = unpublished  # a run was interrupted
    elif manifest.counts and manifest.counts.get("images_indexed") != indexed:
        report.problems.append(
            f"manifest counts {manifest.counts.get('images_indexed')} indexed images, "
            f"the catalog {indexed}"
        )
    unreadable = []
    for run_id, text in s.execute(select(RunRow.id, RunRow.report)).all():
        try:
            json.loads(text or "{}")  # `xmodal info` shows the last one
        except (json.JSONDecodeError, TypeError):
            unreadable.append(run_id)
    if unreadable:
        report.problems.append(
            f"{len(unreadable)} runs have an unreadable report ({_sample(unreadable)})"
        )
    running = s.execute(
        select(func.count()).select_from(RunRow).where(RunRow.status == "running")
    ).scalar()
    if running:
        report.facts["unfinished_runs"] = running
