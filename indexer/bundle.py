"""The index bundle: the on-disk contract between the indexer and the search side.

A bundle is a folder holding

* ``manifest.json``: format version, model identity, the catalog's location, each FAISS
  index's file, factory string, search parameters and count, a generation number,
  created/updated times;
* ``images.<generation>.faiss`` and ``captions.<generation>.faiss``: FAISS indexes whose
  ids are catalog ids;
* ``catalog.sqlite`` (unless the catalog lives in another database).

Index files carry their generation in their name and are written before the manifest
that names them (temp file, fsync, ``os.replace``, fsync of the folder), so a reader
always sees a manifest and index files of the same generation, even after a kill -9
at any instant. Files of older generations are removed once a newer manifest is durable.
The search side reads bundles only through this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from crossmodal.loading import ModelIdentity

from .catalog import (
    FAILED,
    INDEXED,
    CaptionLink,
    CaptionRow,
    CaptionTokens,
    CatalogError,
    ImageRow,
    ImageTokens,
    Root,
    RunRow,
    open_engine,
    public_url,
    sqlite_url,
    upgrade,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CATALOG_FILE = "catalog.sqlite"
KINDS = ("images", "captions")


class BundleError(RuntimeError):
    """A bundle is missing, unreadable, inconsistent or built by another model."""


@dataclass
class IndexInfo:
    """One FAISS index of the bundle."""

    file: str | None = None  # relative to the bundle; None while empty
    factory: str = "IDMap2,Flat"
    metric: str = "inner_product"
    count: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {"nprobe": 16}


@dataclass
class Manifest:
    """The bundle's manifest.json."""

    model: dict[str, Any]
    catalog_url: str | None = None  # None: catalog.sqlite inside the bundle
    generation: int = 0
    published_run: int = 0  # the catalog run whose state these index files hold
    format_version: int = FORMAT_VERSION
    indexes: dict[str, IndexInfo] = field(default_factory=lambda: {k: IndexInfo() for k in KINDS})
    counts: dict[str, int] = field(default_factory=dict)
    roots: list[str] = field(default_factory=list)
    created_at: str = ""
    updated_at: str = ""

    @property
    def identity(self) -> ModelIdentity:
        """The model that built the bundle."""
        return ModelIdentity.from_dict(self.model)

    def to_json(self) -> str:
        """Serialised form."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse; raises BundleError on a malformed manifest."""
        try:
            data = json.loads(text)
            data["indexes"] = {k: IndexInfo(**v) for k, v in data["indexes"].items()}
            manifest = cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BundleError(f"malformed manifest: {exc}") from exc
        if manifest.format_version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format v{manifest.format_version} is newer than this xmodal "
                f"(v{FORMAT_VERSION}); upgrade xmodal"
            )
        return manifest


def now_iso() -> str:
    """UTC timestamp for manifests."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename + fsync of the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_index(index: faiss.Index, path: Path) -> None:
    """Serialise a FAISS index atomically (faiss.write_index overwrites in place)."""
    atomic_write_bytes(path, faiss.serialize_index(index).tobytes())


def read_index(path: Path) -> faiss.Index:
    """Load a FAISS index, naming the file when it is missing or truncated."""
    if not path.is_file():
        raise BundleError(f"index file missing: {path}")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise BundleError(f"cannot read index {path}: {str(exc).splitlines()[0]}") from exc


def read_manifest(bundle: Path) -> Manifest:
    """The manifest of the bundle at ``bundle``."""
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"not an index bundle (no {MANIFEST}): {bundle}")
    return Manifest.from_json(path.read_text(encoding="utf-8"))


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Atomically replace the manifest."""
    manifest.updated_at = now_iso()
    manifest.created_at = manifest.created_at or manifest.updated_at
    atomic_write_bytes(Path(bundle) / MANIFEST, manifest.to_json().encode("utf-8"))


def catalog_url(bundle: Path, manifest_url: str | None, override: str | None = None) -> str:
    """Where the catalog lives: an explicit URL, the manifest's, or the bundle's SQLite."""
    if override:
        return override
    if manifest_url:
        return manifest_url
    return sqlite_url(Path(bundle) / CATALOG_FILE)


def index_file_name(kind: str, generation: int) -> str:
    """File name of an index of a generation."""
    return f"{kind}.{generation:06d}.faiss"


def remove_stale_index_files(bundle: Path, manifest: Manifest) -> list[str]:
    """Delete index files that the manifest no longer names (older generations, temps)."""
    keep = {info.file for info in manifest.indexes.values() if info.file}
    removed = []
    for path in Path(bundle).iterdir():
        stale_index = path.suffix == ".faiss" and path.name not in keep
        stale_temp = path.name.startswith(".") and path.name.endswith(".tmp")
        if stale_index or stale_temp:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path.name)
    return removed


@dataclass
class ImageHit:
    """Catalog facts about an image id."""

    id: int
    path: str  # absolute, printable
    fs_path: bytes  # absolute, exact OS bytes
    root: bytes
    width: int | None
    height: int | None
    size: int
    format: str | None
    content_hash: str | None


@dataclass
class CaptionHit:
    """Catalog facts about a caption id."""

    id: int
    text: str
    source: str
    image_ids: list[int]


class Bundle:
    """A bundle opened for reading: manifest, FAISS indexes and catalog lookups.

    FAISS CPU indexes are safe to search from several threads at once; search
    parameters (nprobe) are set once here, never per request.
    """

    def __init__(self, path: Path, db_url: str | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.url = catalog_url(self.path, self.manifest.catalog_url, db_url)
        self.engine: Engine = open_engine(self.url, create=False)
        try:
            upgrade(self.engine)  # an older catalog is upgraded in place; a newer refused
        except CatalogError as exc:
            self.engine.dispose()
            raise BundleError(f"{self.path}: {exc}") from exc
        self.indexes: dict[str, faiss.Index | None] = {}
        self._lock = threading.Lock()
        for kind in KINDS:
            info = self.manifest.indexes.get(kind, IndexInfo())
            self.indexes[kind] = self._load(kind, info)

    def _load(self, kind: str, info: IndexInfo) -> faiss.Index | None:
        if not info.file:
            return None
        index = read_index(self.path / info.file)
        if index.ntotal != info.count:
            raise BundleError(
                f"{info.file} holds {index.ntotal} vectors but the manifest says "
                f"{info.count}; run `xmodal verify --bundle {self.path}`"
            )
        nprobe = info.params.get("nprobe")
        if nprobe:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
        return index

    @property
    def identity(self) -> ModelIdentity:
        """The model the bundle was built with."""
        return self.manifest.identity

    def public_catalog_url(self) -> str:
        """Catalog URL without password."""
        return public_url(self.url)

    def search(self, kind: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search: (scores [Q, k], ids [Q, k]); empty index gives -1 ids."""
        index = self.indexes.get(kind)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if index is None or index.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        return index.search(q, min(k, index.ntotal))

    def vectors(self, kind: str, ids: list[int]) -> np.ndarray:
        """Stored vectors of catalog ids (for 'more like this'); missing ids give zeros."""
        model = ImageRow if kind == "images" else CaptionRow
        dim = self.identity.embed_dim
        out = np.zeros((len(ids), dim), np.float32)
        with Session(self.engine) as s:
            rows = dict(s.execute(select(model.id, model.vector).where(model.id.in_(ids))).all())
        for i, id_ in enumerate(ids):
            blob = rows.get(id_)
            if blob is not None:
                out[i] = np.frombuffer(blob, np.float32)
        return out

    def tokens(self, kind: str, ids: list[int]) -> dict[int, np.ndarray]:
        """Cached reranker token features ([L, W] float16) of images or captions by id.

        Ids without cached tokens are absent: the caller recomputes them.
        """
        if not ids:
            return {}
        table = ImageTokens if kind == "images" else CaptionTokens
        key = table.image_id if kind == "images" else table.caption_id
        with Session(self.engine) as s:
            rows = s.execute(
                select(key, table.length, table.width, table.data).where(key.in_(ids))
            ).all()
        return {int(r[0]): np.frombuffer(r[3], np.float16).reshape(r[1], r[2]) for r in rows}

    def images(self, ids: list[int]) -> dict[int, ImageHit]:
        """Catalog facts of indexed images by id; ids not indexed (stale) are absent."""
        if not ids:
            return {}
        with Session(self.engine) as s:
            q = (
                select(ImageRow, Root.path)
                .join(Root, Root.id == ImageRow.root_id)
                .where(ImageRow.id.in_(ids), ImageRow.status == INDEXED)
            )
            out = {}
            for row, root in s.execute(q).all():
                fs_path = os.path.join(root, row.relpath)
                out[row.id] = ImageHit(
                    id=row.id,
                    path=fs_path.decode("utf-8", "replace"),
                    fs_path=fs_path,
                    root=root,
                    width=row.width,
                    height=row.height,
                    size=row.size,
                    format=row.format,
                    content_hash=row.content_hash,
                )
            return out

    def captions(self, ids: list[int]) -> dict[int, CaptionHit]:
        """Caption texts (and linked image ids) by id."""
        if not ids:
            return {}
        with Session(self.engine) as s:
            rows = s.execute(
                select(CaptionRow.id, CaptionRow.text, CaptionRow.source).where(
                    CaptionRow.id.in_(ids)
                )
            ).all()
            links: dict[int, list[int]] = {}
            for cid, iid in s.execute(
                select(CaptionLink.caption_id, CaptionLink.image_id).where(
                    CaptionLink.caption_id.in_(ids)
                )
            ).all():
                links.setdefault(cid, []).append(iid)
        return {r.id: CaptionHit(r.id, r.text, r.source, links.get(r.id, [])) for r in rows}

    def captions_of_image(self, image_id: int, limit: int = 50) -> list[CaptionHit]:
        """Captions linked to an image."""
        with Session(self.engine) as s:
            rows = s.execute(
                select(CaptionRow.id, CaptionRow.text, CaptionRow.source)
                .join(CaptionLink, CaptionLink.caption_id == CaptionRow.id)
                .where(CaptionLink.image_id == image_id)
                .order_by(CaptionRow.id)
                .limit(limit)
            ).all()
        return [CaptionHit(r.id, r.text, r.source, [image_id]) for r in rows]

    def failures(self, limit: int | None = 20) -> list[dict[str, str]]:
        """Files that failed to index, with their reasons (most recent first)."""
        with Session(self.engine) as s:
            q = (
                select(Root.path, ImageRow.relpath, ImageRow.reason)
                .join(Root, Root.id == ImageRow.root_id)
                .where(ImageRow.status == FAILED)
                .order_by(ImageRow.id.desc())
            )
            if limit is not None:
                q = q.limit(limit)
            return [
                {"path": os.path.join(root, rel).decode("utf-8", "replace"), "reason": reason or ""}
                for root, rel, reason in s.execute(q).all()
            ]

    def roots(self) -> list[bytes]:
        """Absolute paths (bytes) of the indexed roots."""
        with Session(self.engine) as s:
            return [r for (r,) in s.execute(select(Root.path)).all()]

    def last_run(self) -> dict[str, Any] | None:
        """The latest indexing run and its report."""
        with Session(self.engine) as s:
            run = s.execute(select(RunRow).order_by(RunRow.id.desc()).limit(1)).scalar()
            if run is None:
                return None
            return {
                "id": run.id,
                "status": run.status,
                "started_at": run.started_at.isoformat(),
                "finished_at": run.finished_at.isoformat() if run.finished_at else None,
                "report": json.loads(run.report or "{}"),
            }

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()
