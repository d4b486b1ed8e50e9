"""`xmodal verify`: check that a bundle's parts agree with each other.

Checks: the manifest parses; each index file named by it exists, loads and holds the
count it states; FAISS ids and catalog ids (indexed rows with vectors) are the same
set, for images and captions; on a sample, the index holds the catalog's vectors
themselves (exact indexes); every stored vector has the model's dimension; the
catalog's counts match the manifest's; no run is left half-done; optionally the
model the caller loaded is the one that built the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from crossmodal.loading import ModelIdentity

from . import ann
from .bundle import BundleError, catalog_url, read_index, read_manifest
from .catalog import (
    INDEXED,
    REMOVED,
    CaptionRow,
    CaptionTokens,
    ImageRow,
    ImageTokens,
    RunRow,
    open_engine,
    upgrade,
)
from .publish import pending_ids, stored_vectors


@dataclass
class VerifyReport:
    """Findings of a verification; ``ok`` when there are no problems."""

    problems: list[str] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.problems


VECTOR_SAMPLE = 256  # published rows whose vectors are looked up in the index


def _sample(ids: np.ndarray, n: int = 5) -> str:
    return ", ".join(str(int(i)) for i in ids[:n]) + (" ..." if len(ids) > n else "")


def verify_bundle(
    bundle: Path, db_url: str | None = None, model: ModelIdentity | None = None
) -> VerifyReport:
    """Run every check; never raises for a broken bundle, reports instead."""
    report = VerifyReport()
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        report.problems.append(str(exc))
        return report
    report.facts["generation"] = manifest.generation
    report.facts["model"] = manifest.model
    dim = int(manifest.model.get("embed_dim", 0))
    if model is not None and not model.matches(manifest.identity):
        report.problems.append(
            f"bundle was built with {manifest.identity.name} (sha256 "
            f"{str(manifest.identity.sha256)[:12]}), not the loaded {model.name} "
            f"(sha256 {str(model.sha256)[:12]})"
        )
    try:
        engine = open_engine(catalog_url(bundle, manifest.catalog_url, db_url), create=False)
        upgrade(engine)  # like readers: an older catalog is upgraded, none is an error
    except Exception as exc:
        report.problems.append(f"catalog: {exc}")
        return report
    published = manifest.published_run
    with Session(engine) as s:
        for kind, row in (("images", ImageRow), ("captions", CaptionRow)):
            status = ImageRow.status if row is ImageRow else None
            cols = [row.id, row.run_id, row.vector.is_not(None)]
            rows = s.execute(select(*cols, status) if status is not None else select(*cols)).all()
            all_ids = np.array([r[0] for r in rows], dtype=np.int64)
            live = [r for r in rows if r[2] and (status is None or r[3] == INDEXED)]
            # Rows the published index must hold, and rows it may still hold while a
            # later run is unfinished (added, changed or removed after publication).
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
            bad_dim = s.execute(
                select(func.count())
                .select_from(row)
                .where(row.vector.is_not(None), func.length(row.vector) != dim * 4)
            ).scalar()
            if bad_dim:
                report.problems.append(f"{bad_dim} {kind} vectors are not {dim}-dimensional")
            info = manifest.indexes.get(kind)
            if info is None or not info.file:
                if len(must):
                    report.problems.append(
                        f"{kind}: the catalog holds {len(must)} published vectors but the "
                        "manifest names no index file"
                    )
                continue
            try:
                index = read_index(Path(bundle) / info.file)
            except BundleError as exc:
                report.problems.append(str(exc))
                continue
            if index.ntotal != info.count:
                report.problems.append(
                    f"{info.file}: {index.ntotal} vectors, manifest says {info.count}"
                )
            if index.d != dim:
                report.problems.append(f"{info.file}: dimension {index.d}, model has {dim}")
            faiss_ids = np.sort(ann.index_ids(index))
            if len(np.unique(faiss_ids)) != len(faiss_ids):
                report.problems.append(f"{info.file}: duplicate ids")
            unknown = np.setdiff1d(faiss_ids, all_ids)
            stale = np.setdiff1d(np.setdiff1d(faiss_ids, may), unknown)
            missing = np.setdiff1d(must, faiss_ids)
            if len(unknown):
                report.problems.append(
                    f"{kind}: {len(unknown)} ids in {info.file} have no catalog row "
                    f"({_sample(unknown)})"
                )
            if len(stale):
                report.problems.append(
                    f"{kind}: {len(stale)} ids in {info.file} are not indexed rows "
                    f"({_sample(stale)})"
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
                wrong = ann.holds_own_vectors(
                    index, sample, stored_vectors(engine, row, sample, dim)
                )
                if len(wrong):
                    report.problems.append(
                        f"{kind}: {info.file} holds other vectors than the catalog for "
                        f"{len(wrong)} of {len(sample)} sampled ids ({_sample(wrong)}); "
                        "re-run `xmodal index` to republish"
                    )
            not_yet = np.setdiff1d(pending, faiss_ids)
            if len(not_yet):
                report.facts[f"{kind}_pending"] = len(not_yet)
            report.facts[f"{kind}_ids"] = len(faiss_ids)
        # Token caches: only for indexed rows, one width per kind.
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
                    report.problems.append(
                        f"{orphans} cached image tokens belong to non-indexed rows"
                    )
            if total:
                report.facts[f"{kind}_tokens_cached"] = total
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
        running = s.execute(
            select(func.count()).select_from(RunRow).where(RunRow.status == "running")
        ).scalar()
        if running:
            report.facts["unfinished_runs"] = running
    named = {info.file for info in manifest.indexes.values() if info.file}
    stray = [p.name for p in Path(bundle).glob("*.faiss") if p.name not in named]
    if stray:
        report.facts["stray_index_files"] = stray  # left by a killed run; removed next run
    engine.dispose()
    return report
