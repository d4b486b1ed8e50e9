"""`xmodal index`: the orchestrator from folders and caption files to a consistent bundle.

0. Take the bundle's writer lock (``lock``): one indexing run per bundle at a time.
1. Open (or create) the bundle and its catalog; refuse a bundle of another model.
2. Walk each root; compare every file with the catalog: unchanged files (same size and
   mtime) cost nothing; changed ones are hashed first when the content may be known
   (a touch, a rename or move, a copy), whose vectors are then reused; the rest are
   decoded and encoded in batches by the run's engine (``engine``: decode worker processes
   and inference streams here, or a Ray Data pipeline, ``ray_engine``) while this
   thread goes on routing files.
3. Commit every batch to the catalog (rows with their vectors) as it completes, while
   the next one is encoded, so a killed run loses at most two batches and the next run
   resumes from there.
4. Read caption files, collapse duplicates, encode new captions, link them to images.
5. Sync the FAISS indexes with the catalog and write a new generation (index files
   first, then the manifest that names them).

Every file seen ends indexed, unchanged, failed (with its reason) or excluded.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import case, delete, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from tqdm import tqdm
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import XmodalError

from .bundle import (
    BundleError,
    Manifest,
    catalog_url,
    check_catalog_owner,
    new_bundle_id,
    read_manifest,
    write_manifest,
)
from .caption_index import CaptionFileError, index_captions
from .catalog import (
    EXCLUDED,
    FAILED,
    INDEXED,
    REMOVED,
    CatalogError,
    ImageRow,
    ImageTokens,
    Root,
    RunRow,
    catalog_owner,
    db_error_text,
    migrate,
    normalize_url,
    open_engine,
    public_url,
    set_catalog_owner,
    utcnow,
)
from .decode import Decoded, Job
from .engine import ImageEngine, LocalEngine, Pending
from .lock import BundleLock, LockHeld
from .options import IndexOptions
from .publish import PublishError, publish
from .sources import CANDIDATE, Entry, walk
from .tokens import TokenBudget, token_fields, tokens_of


class IndexRunError(XmodalError):
    """The run itself cannot proceed (bad root, wrong model, unreachable catalog)."""


@dataclass
class RunReport:
    """What a run did; seen = indexed + unchanged + failed + excluded."""

    run_id: int = 0
    counts: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    problems: list[str] = field(default_factory=list)  # caption rows, folders
    seconds: float = 0.0
    generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored with the run)."""
        return {
            "counts": dict(self.counts),
            "failures": [{"path": p, "reason": r} for p, r in self.failures],
            "problems": self.problems,
            "seconds": round(self.seconds, 2),
            "generation": self.generation,
        }


def _vector_bytes(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype=np.float32).tobytes()


def _taken_after_touch(mtime_ns: int) -> Any:
    """The date taken of a row whose file's mtime changes (same bytes): an EXIF date
    stays, one that was the old mtime becomes the new one (SQL, the row's old values)."""
    return case((ImageRow.taken_ns == ImageRow.mtime_ns, mtime_ns), else_=ImageRow.taken_ns)


def _held_by(rel: bytes, unreadable: set[bytes]) -> bytes | None:
    """The unreadable entry (``rel`` itself or a folder above it) that hides ``rel``."""
    if not unreadable:
        return None
    if b"." in unreadable:  # the root itself could not be listed
        return b"."
    parts = rel.split(b"/")
    for n in range(1, len(parts) + 1):
        prefix = b"/".join(parts[:n])
        if prefix in unreadable:
            return prefix
    return None


@dataclass
class _RootPass:
    """One root's pass through a run: what the scan and the catalog say of its files,
    and what hashing, decoding and encoding them gathers."""

    root_id: int
    known: dict[bytes, Any]  # relpath -> light catalog row
    vanished: dict[bytes, Any]  # rows whose file is gone (not hidden by an unreadable one)
    vanished_by_hash: dict[str, Any]  # indexed vanished rows by content: a rename reuses one
    vanished_sizes: set[int]  # a file of such a size may be one of them: hashed first
    kept_under: Counter  # unreadable entry -> how many rows it hides (kept as they were)
    by_key: dict[bytes, Entry] = field(default_factory=dict)  # queued files by job key
    hash_jobs: list[Job] = field(default_factory=list)  # content may be known: hash first
    full_jobs: list[Job] = field(default_factory=list)  # decode at once
    stored_hashes: set[str] = field(default_factory=set)  # of indexed rows, any root
    renamed_from: set[bytes] = field(default_factory=set)  # old paths a rename reused
    pending: list[tuple[Entry, Decoded]] = field(default_factory=list)  # awaiting a batch
    # The batch being encoded by the engine, committed when the next one is submitted.
    in_flight: tuple[list[tuple[Entry, Decoded]], Pending] | None = None
    bar: Any = None  # the progress bar while decoding


class Indexer:
    """One indexing run over a bundle."""

    def __init__(self, encoder: Encoder, opts: IndexOptions) -> None:
        self.encoder = encoder
        self.opts = opts
        self.bundle = Path(opts.bundle)
        self.report = RunReport()
        self.manifest: Manifest | None = None
        self.budget: TokenBudget | None = None  # set when token features are cached
        self.images: ImageEngine | None = None  # decodes and encodes while images are indexed

    # ------------------------------------------------------------------ setup

    def _open(self) -> None:
        self.bundle.mkdir(parents=True, exist_ok=True)
        if (self.bundle / "manifest.json").exists():
            self.manifest = read_manifest(self.bundle)
            built = self.manifest.identity
            if not built.matches(self.encoder.identity):
                raise IndexRunError(
                    f"bundle {self.bundle} was built with {built.name} "
                    f"({built.pretrained}, sha256 {str(built.sha256)[:12]}); the loaded "
                    f"model is {self.encoder.identity.name} "
                    f"(sha256 {str(self.encoder.identity.sha256)[:12]}). "
                    "Index into a new bundle, or load the bundle's model."
                )
        # Absolute (a relative SQLite path names another file from another folder);
        # an in-memory catalog is refused: it would vanish with this process.
        db_url = normalize_url(self.opts.db_url) if self.opts.db_url else None
        url = catalog_url(self.bundle, self.manifest.catalog_url if self.manifest else None, db_url)
        self.engine = open_engine(url)
        try:
            owner = self._claim_catalog(url, db_url)
        except (IndexRunError, CatalogError, SQLAlchemyError) as exc:
            self.engine.dispose()
            if isinstance(exc, SQLAlchemyError):  # e.g. a damaged page
                raise IndexRunError(
                    f"catalog {public_url(url)} cannot be read ({db_error_text(exc)}); "
                    f"run `xmodal verify --bundle {self.bundle}`"
                ) from exc
            raise
        if self.opts.cache_tokens:
            self.budget = TokenBudget(self.engine, self.opts.token_cache_mb, self.report.counts)
        if self.manifest is None:
            # A new bundle is valid (empty) from its first instant: a run killed before
            # its first publication leaves a bundle that verifies and resumes. Over a
            # catalog whose bundle folder is gone, it takes that catalog's id (recovery).
            self.manifest = Manifest(
                model=self.encoder.identity.to_dict(),
                catalog_url=public_url(db_url) if db_url else None,
                bundle_id=owner or new_bundle_id(),
            )
            write_manifest(self.bundle, self.manifest)
        elif self.manifest.bundle_id is None:  # a bundle from before ids adopts one now
            self.manifest.bundle_id = owner or new_bundle_id()
            write_manifest(self.bundle, self.manifest)
        set_catalog_owner(self.engine, self.manifest.bundle_id, str(self.bundle.resolve()))

    def _claim_catalog(self, url: str, db_url: str | None) -> str | None:
        """Refuse another bundle's catalog before writing anything, then bring the schema
        up to date; returns the bundle id the catalog records (None before ids)."""
        owner, owner_path = catalog_owner(self.engine)
        if self.manifest is not None:
            try:  # --db naming another bundle's catalog
                check_catalog_owner(self.bundle, self.manifest, self.engine, db_url)
            except BundleError as exc:
                raise IndexRunError(str(exc)) from exc
        elif owner and owner_path and Path(owner_path) != self.bundle.resolve():
            other = Path(owner_path)
            with contextlib.suppress(BundleError):
                if read_manifest(other).bundle_id == owner:  # that bundle still uses it
                    raise IndexRunError(
                        f"catalog {public_url(url)} belongs to the bundle {other} (id {owner}); "
                        "index into that bundle, or give the new bundle a catalog of its own"
                    )
        migrate(self.engine)
        return owner

    def _start_run(self) -> None:
        with Session(self.engine) as s, s.begin():
            # A previous run killed mid-way stays 'running' forever otherwise.
            s.execute(
                update(RunRow)
                .where(RunRow.status == "running")
                .values(status="interrupted", finished_at=utcnow())
            )
            run = RunRow(status="running")
            s.add(run)
            s.flush()
            self.report.run_id = run.id

    def _finish_run(self, status: str) -> None:
        record = (
            update(RunRow)
            .where(RunRow.id == self.report.run_id)
            .values(status=status, finished_at=utcnow(), report=json.dumps(self.report.to_dict()))
        )
        if status != "interrupted":
            with Session(self.engine) as s, s.begin():
                s.execute(record)
            return
        # A Ctrl+C can cut a catalog call short and leave its connection holding SQLite's
        # write lock until the process exits: record the interruption if the catalog lets
        # us at once, else leave it to the next run (which marks 'running' runs interrupted).
        self.engine.dispose()
        with contextlib.suppress(SQLAlchemyError), Session(self.engine) as s, s.begin():
            if self.engine.dialect.name == "sqlite":
                s.execute(text("PRAGMA busy_timeout = 1000"))
            s.execute(record)

    # ------------------------------------------------------------------ images

    def _root_rows(self, s: Session, root: bytes) -> Root:
        row = s.execute(select(Root).where(Root.path == root)).scalar()
        if row is None:
            row = Root(path=root)
            s.add(row)
            s.flush()
        return row

    def _check_root(self, root: Path) -> bytes:
        if not root.exists():
            raise IndexRunError(f"folder not found: {root} (is the drive mounted?)")
        if not root.is_dir():
            raise IndexRunError(f"not a folder: {root}")
        resolved = os.fsencode(root.resolve())
        # A root we cannot list or enter is like an unmounted drive: walking it would see
        # nothing (or only failures) and the run would publish it emptied. The run fails
        # before touching anything, so every indexed file of it is kept.
        try:
            os.stat(os.path.join(resolved, b"."))  # entering needs the folder's x bit
            with os.scandir(resolved):  # listing needs its r bit
                pass
        except OSError as exc:
            raise IndexRunError(
                f"cannot read folder {root}: {exc.strerror or exc}; nothing was changed "
                "(its indexed files are kept); fix its permissions and re-run"
            ) from exc
        return resolved

    def index_images(self) -> None:
        """Walk every root and bring the catalog up to date with it."""
        roots = [self._check_root(Path(r)) for r in self.opts.roots]
        skip = [os.fsencode(self.bundle.resolve())]
        with Session(self.engine) as s, s.begin():
            root_ids = {r: self._root_rows(s, r).id for r in roots}
        with self._image_engine() as self.images:
            for root in roots:
                self._index_root(root, root_ids[root], roots, skip)
        if self.images.replaced:
            self.report.counts["workers_replaced"] += self.images.replaced

    def _image_engine(self) -> ImageEngine:
        """The engine the options name; it starts nothing until there is work."""
        with_tokens = self.budget is not None
        if self.opts.engine == "ray":
            from .ray_engine import RayEngine

            return RayEngine(self.encoder, self.opts, with_tokens)
        return LocalEngine(self.encoder, self.opts, with_tokens)

    def _index_root(self, root: bytes, root_id: int, roots: list[bytes], skip: list[bytes]) -> None:
        """One root, step by step: scan, compare with the catalog, record what the scan
        decides, hash / decode / encode the rest, mark what vanished as removed."""
        known = self._known_rows(root_id)
        entries = self._scan(root, roots, skip, known)
        work = self._compare(root, root_id, known, entries)
        self._triage(work, entries)
        self._process(work)
        self._mark_removed(work)

    def _known_rows(self, root_id: int) -> dict[bytes, Any]:
        """The catalog's rows of a root by relative path, light (no vector blobs: a
        100k-file root would otherwise load 100 MB)."""
        with Session(self.engine) as s:
            return {
                r.relpath: r
                for r in s.execute(
                    select(
                        ImageRow.id,
                        ImageRow.relpath,
                        ImageRow.size,
                        ImageRow.mtime_ns,
                        ImageRow.status,
                        ImageRow.reason,
                        ImageRow.content_hash,
                        ImageRow.vector.is_not(None).label("has_vector"),
                    ).where(ImageRow.root_id == root_id)
                ).all()
            }

    def _scan(
        self, root: bytes, roots: list[bytes], skip: list[bytes], known: dict[bytes, Any]
    ) -> list[Entry]:
        """Every entry under the root; files indexed with the same size and mtime are not
        probed further (their entries say so)."""
        indexed_as_is = {
            r.relpath: (r.size, r.mtime_ns) for r in known.values() if r.status == INDEXED
        }
        return list(
            walk(root, roots, skip, lambda rel, size, mt: indexed_as_is.get(rel) == (size, mt))
        )

    def _compare(
        self, root: bytes, root_id: int, known: dict[bytes, Any], entries: list[Entry]
    ) -> _RootPass:
        """Which catalog rows vanished, and which are only hidden by what could not be read.

        Refuses (IndexRunError) a root that is empty while the catalog holds files of it:
        an unmounted drive is not a deletion.
        """
        present = {e.relpath for e in entries}
        # What could not be read (a folder not listable, a file not stat-able) is a
        # failure of this run, never a deletion: its rows, and those under it, are kept.
        unreadable = {e.relpath for e in entries if e.unreadable}
        held = {rel: _held_by(rel, unreadable) for rel in known if rel not in present}
        held = {rel: by for rel, by in held.items() if by is not None}
        if not entries and known and not self.opts.allow_empty_roots:
            raise IndexRunError(
                f"{root.decode(errors='replace')} is empty but the catalog holds {len(known)} "
                "files from it; if it is unmounted, mount it. To really drop them, "
                "re-run with --allow-empty."
            )
        vanished = {
            rel: row for rel, row in known.items() if rel not in present and rel not in held
        }
        if kept := sum(1 for rel in held if known[rel].status == INDEXED):
            self.report.counts["kept_unreadable"] += kept
        return _RootPass(
            root_id=root_id,
            known=known,
            vanished=vanished,
            # Vectors of vanished files, by content: a rename or move reuses them.
            vanished_by_hash={
                r.content_hash: r
                for r in vanished.values()
                if r.status == INDEXED and r.content_hash
            },
            vanished_sizes={r.size for r in vanished.values()},
            kept_under=Counter(held.values()),
        )

    def _triage(self, work: _RootPass, entries: list[Entry]) -> None:
        """Record what the scan alone decides (not an image, unchanged); queue the rest to
        be hashed (when its content may be known) or decoded."""
        with Session(self.engine) as s, s.begin():
            for e in entries:
                self.report.counts["seen"] += 1
                row = work.known.get(e.relpath)
                if e.kind != CANDIDATE:
                    self._record_not_candidate(s, work, e, row)
                elif row is not None and (row.size, row.mtime_ns) == (e.size, e.mtime_ns):
                    self._record_unchanged(s, e, row)
                else:
                    self._queue(work, e, row)

    def _record_not_candidate(self, s: Session, work: _RootPass, e: Entry, row: Any) -> None:
        """An excluded entry, or one that failed at the scan (unreadable, not a file)."""
        status = EXCLUDED if e.kind == "excluded" else FAILED
        self.report.counts[status] += 1
        if status == FAILED:
            reason = e.reason or ""
            if n := work.kept_under[e.relpath]:
                reason += f"; {n} files under it are kept as they were"
            elif e.unreadable and row is not None and row.status == INDEXED:
                reason += "; kept as indexed before"
            self.report.failures.append((e.path.decode(errors="replace"), reason))
        if e.unreadable and row is not None:
            return  # the row (and vector) stays as it was: nothing was read
        same = row is not None and (row.status, row.reason, row.size, row.mtime_ns) == (
            status,
            e.reason,
            e.size,
            e.mtime_ns,
        )
        if not same:
            self._upsert(s, work.root_id, e, row, status=status, reason=e.reason)

    def _record_unchanged(self, s: Session, e: Entry, row: Any) -> None:
        """Same size and mtime as the catalog's row: its outcome stands."""
        status = row.status
        if status == REMOVED:  # back after an interrupted run marked it gone
            status = INDEXED if row.has_vector else FAILED
            s.execute(update(ImageRow).where(ImageRow.id == row.id).values(status=status))
        if status == FAILED:
            self.report.counts[FAILED] += 1
            self.report.failures.append((e.path.decode(errors="replace"), row.reason))
        else:
            self.report.counts["unchanged"] += 1

    def _queue(self, work: _RootPass, e: Entry, row: Any) -> None:
        """A new or changed file: hashed first when its bytes may be known already (same
        size as its row, or as a vanished file), else decoded at once."""
        work.by_key[e.relpath] = e
        may_be_known = (row is not None and row.size == e.size) or e.size in work.vanished_sizes
        job = Job(e.relpath, e.path, hash_only=may_be_known)
        (work.hash_jobs if may_be_known else work.full_jobs).append(job)

    def _mark_removed(self, work: _RootPass) -> None:
        """What is still vanished (not reused by a rename) is marked removed: its id leaves
        the FAISS index at publication, then the row is purged."""
        gone = [r.id for rel, r in work.vanished.items() if rel not in work.renamed_from]
        with Session(self.engine) as s, s.begin():
            for i in range(0, len(gone), 500):
                s.execute(
                    update(ImageRow)
                    .where(ImageRow.id.in_(gone[i : i + 500]))
                    .values(status=REMOVED, run_id=self.report.run_id)
                )
        self.report.counts["removed"] += len(gone)

    def _upsert(
        self,
        s: Session,
        root_id: int,
        e: Entry,
        row: Any,
        status: str,
        reason: str | None = None,
        decoded: Decoded | None = None,
        vector: bytes | None = None,
        tokens: np.ndarray | None = None,
        visual: bytes | None = None,
    ) -> int:
        # The facts of the bytes actually read, when a worker read them (the file may
        # have been replaced since the scan); else the scan's.
        read = decoded is not None and decoded.size is not None
        values: dict[str, Any] = {
            "size": decoded.size if read else e.size,
            "mtime_ns": decoded.mtime_ns if read else e.mtime_ns,
            "status": status,
            "reason": reason,
            "run_id": self.report.run_id,
            "display": e.display,
            "vector": vector,
            "visual": visual,
            "format": (decoded.format if decoded else None) or e.format,
        }
        # Date taken: the EXIF date when the bytes carry one, else the file's mtime.
        values["taken_ns"] = (decoded.taken_ns if decoded else None) or values["mtime_ns"]
        if decoded is not None:
            values.update(
                content_hash=decoded.content_hash, width=decoded.width, height=decoded.height
            )
        if row is None:
            new = ImageRow(root_id=root_id, relpath=e.relpath, **values)
            s.add(new)
            s.flush()
            image_id = new.id
        else:
            image_id = row.id
            # Same id, new content: publication must replace the vector it holds.
            values["vector_pending"] = vector is not None
            s.execute(update(ImageRow).where(ImageRow.id == image_id).values(**values))
            # Old tokens describe the old content.
            s.execute(delete(ImageTokens).where(ImageTokens.image_id == image_id))
        if tokens is not None and self.budget is not None and self.budget.take(tokens):
            s.add(ImageTokens(image_id=image_id, **token_fields(tokens)))
        return image_id

    # ------------------------------------------------------------------ decoding

    def _process(self, work: _RootPass) -> None:
        """Hash / decode the queued files on the engine and route each result to its
        outcome; hashed files that turn out new are decoded in a second pass."""
        total = len(work.hash_jobs) + len(work.full_jobs)
        if total == 0:
            return
        assert self.images is not None
        work.stored_hashes = self._stored_hashes()
        work.bar = tqdm(
            total=total, desc="images", unit="img", disable=not self.opts.progress, smoothing=0.1
        )
        retry: list[Job] = []
        for d in self.images.run(work.hash_jobs):
            self._handle(work, d, retry)
        for d in self.images.run(work.full_jobs + retry):
            self._handle(work, d, [])
        self._encode_pending(work)
        self._commit_in_flight(work)
        work.bar.close()

    def _stored_hashes(self) -> set[str]:
        """Content hashes of every indexed row (any root): a copy of one reuses its vector."""
        with Session(self.engine) as s:
            return {
                h
                for (h,) in s.execute(
                    select(ImageRow.content_hash).where(ImageRow.status == INDEXED)
                ).all()
            }

    def _handle(self, work: _RootPass, d: Decoded, retry: list[Job]) -> None:
        """Route one hashed or decoded file to its outcome; a hashed file whose content is
        new after all goes to ``retry``, to be decoded."""
        e = work.by_key[d.key]
        row = work.known.get(e.relpath)
        if d.error and d.unreadable and row is not None:
            self._keep_unreadable(e, d)
        elif d.error:
            self._record_decode_failure(work, e, row, d)
        elif row is not None and row.status == INDEXED and row.content_hash == d.content_hash:
            self._touched(e, row, d)
        elif row is None and d.content_hash in work.vanished_by_hash:
            self._moved(work, e, work.vanished_by_hash.pop(d.content_hash), d)
        elif d.content_hash in work.stored_hashes and self._reuse_copy(work.root_id, e, row, d):
            pass  # a copy of indexed bytes: indexed with the stored vector
        elif d.pixels is None and d.encoded is None:  # hashed only, new content: decode it
            retry.append(Job(d.key, e.path))
            return
        else:
            work.pending.append((e, d))  # encoded with its batch
        work.bar.update()
        if len(work.pending) >= self.opts.batch_size:
            self._encode_pending(work)

    def _keep_unreadable(self, e: Entry, d: Decoded) -> None:
        """Seen at the scan, unreadable now: a failure of this run, not new content; its
        row stays as it was."""
        self.report.counts[FAILED] += 1
        self.report.failures.append((e.path.decode(errors="replace"), f"{d.error}; kept as it was"))

    def _record_decode_failure(self, work: _RootPass, e: Entry, row: Any, d: Decoded) -> None:
        """The file could not be decoded (or read, when new): recorded failed, with why."""
        with Session(self.engine) as s, s.begin():
            self._upsert(s, work.root_id, e, row, FAILED, reason=d.error, decoded=d)
        self.report.counts[FAILED] += 1
        self.report.failures.append((e.path.decode(errors="replace"), d.error))

    def _touched(self, e: Entry, row: Any, d: Decoded) -> None:
        """Same bytes as its indexed row (a touch): only the size and mtime are updated."""
        with Session(self.engine) as s, s.begin():
            s.execute(
                update(ImageRow)
                .where(ImageRow.id == row.id)
                .values(
                    size=d.size if d.size is not None else e.size,
                    mtime_ns=d.mtime_ns if d.mtime_ns is not None else e.mtime_ns,
                    taken_ns=_taken_after_touch(
                        d.mtime_ns if d.mtime_ns is not None else e.mtime_ns
                    ),
                    run_id=self.report.run_id,
                )
            )
        self.report.counts["unchanged"] += 1

    def _moved(self, work: _RootPass, e: Entry, moved: Any, d: Decoded) -> None:
        """A rename or move: the vanished row (its id is the FAISS id) takes the new path."""
        with Session(self.engine) as s, s.begin():
            s.execute(
                update(ImageRow)
                .where(ImageRow.id == moved.id)
                .values(
                    relpath=e.relpath,
                    display=e.display,
                    size=d.size if d.size is not None else e.size,
                    mtime_ns=d.mtime_ns if d.mtime_ns is not None else e.mtime_ns,
                    taken_ns=_taken_after_touch(
                        d.mtime_ns if d.mtime_ns is not None else e.mtime_ns
                    ),
                    run_id=self.report.run_id,
                )
            )
        work.renamed_from.add(moved.relpath)
        self.report.counts["unchanged"] += 1
        self.report.counts["renamed"] += 1

    def _reuse_copy(self, root_id: int, e: Entry, row: Any, d: Decoded) -> bool:
        """Index a copy of already indexed bytes with the stored vector (no encoding);
        False when no indexed row holds those bytes any more."""
        with Session(self.engine) as s, s.begin():
            src = s.execute(
                select(ImageRow)
                .where(ImageRow.content_hash == d.content_hash, ImageRow.status == INDEXED)
                .limit(1)
            ).scalar()
            if src is None:
                return False
            copy = Decoded(
                d.key,
                d.content_hash,
                None,
                src.width,
                src.height,
                src.format,
                size=d.size,
                mtime_ns=d.mtime_ns,
                # Same bytes, same EXIF: its date taken, unless that was the source's mtime.
                taken_ns=src.taken_ns if src.taken_ns != src.mtime_ns else None,
            )
            cached = s.get(ImageTokens, src.id)
            tokens = tokens_of(cached) if cached is not None else None
            self._upsert(
                s,
                root_id,
                e,
                row,
                INDEXED,
                decoded=copy,
                vector=src.vector,
                tokens=tokens,
                visual=src.visual,
            )
        self.report.counts[INDEXED] += 1
        self.report.counts["reused"] += 1
        return True

    def _encode_pending(self, work: _RootPass) -> None:
        """Submit the decoded files waiting in ``work.pending`` to the engine as one batch,
        then commit the batch encoded before it: the catalog writes overlap inference."""
        assert self.images is not None
        batch, work.pending = work.pending, []
        submitted = None
        if batch:
            submitted = (batch, self.images.submit([d for _, d in batch]))
        self._commit_in_flight(work)
        work.in_flight = submitted

    def _commit_in_flight(self, work: _RootPass) -> None:
        """Wait for the batch on the engine, if any, and commit its rows (with vectors,
        and token features when they are cached) together."""
        if work.in_flight is None:
            return
        batch, passes = work.in_flight
        work.in_flight = None
        vectors, tokens, visual = passes.result()
        n = len(batch)
        token_rows = list(tokens) if tokens is not None else [None] * n
        visual_rows = [_vector_bytes(u) for u in visual] if visual is not None else [None] * n
        with Session(self.engine) as s, s.begin():
            for (e, d), v, t, u in zip(batch, vectors, token_rows, visual_rows, strict=True):
                d.pixels = d.encoded = None  # encoded: the catalog holds what is kept
                self._upsert(
                    s,
                    work.root_id,
                    e,
                    work.known.get(e.relpath),
                    INDEXED,
                    decoded=d,
                    vector=_vector_bytes(v),
                    tokens=t,
                    visual=u,
                )
        self.report.counts[INDEXED] += n

    # ------------------------------------------------------------------ run

    def _writer_lock(self) -> BundleLock:
        """Take the bundle's writer lock (and its PostgreSQL catalog's) before anything else.

        The catalog URL is found as ``_open`` finds it; a manifest that cannot be read is
        left for ``_open`` to report.
        """
        try:
            self.bundle.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IndexRunError(
                f"cannot create bundle {self.bundle}: {exc.strerror or exc}"
            ) from exc
        manifest_url = None
        if (self.bundle / "manifest.json").exists():
            with contextlib.suppress(BundleError):
                manifest_url = read_manifest(self.bundle).catalog_url
        url = catalog_url(self.bundle, manifest_url, self.opts.db_url)
        try:
            return BundleLock(self.bundle, url).acquire()
        except LockHeld as exc:
            raise IndexRunError(
                f"{exc}; wait for that run to finish (readers need no lock)"
            ) from None
        except OSError as exc:  # e.g. a read-only bundle folder
            raise IndexRunError(
                f"cannot lock bundle {self.bundle} for writing: {exc.strerror or exc}"
            ) from exc

    def run(self) -> RunReport:
        """Do the whole run; the report is also stored with the run in the catalog.

        The run holds the bundle's writer lock throughout: a second writer is refused
        with an IndexRunError naming the holder's pid, before it touches the catalog.
        """
        started = time.time()
        with self._writer_lock():
            return self._run_locked(started)

    def _run_locked(self, started: float) -> RunReport:
        self._open()
        try:
            self._start_run()
            status = "failed"
            try:
                self._index_and_publish()
                status = "completed"
            except (CaptionFileError, PublishError) as exc:
                raise IndexRunError(str(exc)) from exc
            except KeyboardInterrupt:
                status = "interrupted"
                raise
            finally:
                self.report.seconds = time.time() - started
                self._finish_run(status)
        finally:
            # Closes the pool (SQLite then folds its WAL back): a run leaves no connection.
            self.engine.dispose()
        return self.report

    def _index_and_publish(self) -> None:
        if self.opts.roots:
            self.index_images()
        if self.opts.captions:
            index_captions(
                self.engine,
                self.encoder,
                self.opts.captions,
                self.report.run_id,
                self.report.counts,
                self.report.problems,
                self.budget,
                self.opts.progress,
            )
        assert self.manifest is not None
        self.report.generation = publish(
            self.engine,
            self.bundle,
            self.manifest,
            self.report.run_id,
            self.opts.index_factory,
            self.report.counts,
            self.opts.vector_store,
            self.opts.max_index_memory,
        )


def run_index(encoder: Encoder, opts: IndexOptions) -> RunReport:
    """Index roots and caption files into a bundle (see module docstring)."""
    return Indexer(encoder, opts).run()


__all__ = ["IndexOptions", "IndexRunError", "RunReport", "run_index"]
