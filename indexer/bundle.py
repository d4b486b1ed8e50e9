"""The index bundle: the on-disk contract between the indexer and the search side.

A bundle is a folder holding

* ``manifest.json``: format version, the bundle's id, model identity, the catalog's
  location, each FAISS index's file, factory string, search parameters, count and
  sha256, a generation number, created/updated times; every field is validated on read
  (``Manifest.from_json``), a bad one is a one-line BundleError naming it;
* ``images.<generation>.faiss`` and ``captions.<generation>.faiss``: FAISS indexes whose
  ids are catalog ids;
* ``catalog.sqlite`` (unless the catalog lives in another database).

Index files carry their generation in their name and are written before the manifest
that names them (temp file, fsync, ``os.replace``, fsync of the folder), so a reader
always sees a manifest and index files of the same generation, even after a kill -9
at any instant. Files of older generations are removed once a newer manifest is durable.
Readers check each file's sha256 against the manifest on open, so a garbled vector is
refused instead of scoring 1e38. The catalog records the bundle's id too: a catalog of
another bundle (an explicit ``--db``) is refused (``check_catalog_owner``).
The search side reads bundles only through this module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import Connection, Engine, and_, func, or_, select, true
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from xmodal.crossmodal.errors import XmodalError
from xmodal.crossmodal.loading import ModelIdentity

from .catalog import (
    FAILED,
    INDEXED,
    VECTOR_COLUMNS,
    CaptionLink,
    CaptionRow,
    CaptionTokens,
    CatalogError,
    ImageRow,
    ImageTokens,
    Root,
    RunRow,
    catalog_owner,
    db_error_text,
    normalize_url,
    open_engine,
    public_url,
    sqlite_url,
    upgrade,
)

# ImageFilter and FilterError are offered to the search side from here (it reads
# bundles only through this module).
from .compressed import is_compressed, rerank_shortlist
from .filters import FilterError, ImageFilter, search_within
from .stores import FAISS as FAISS_STORE
from .stores import StoreError, VectorStore, open_store, store_kind

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CATALOG_FILE = "catalog.sqlite"
# The FAISS indexes of a bundle: images and captions in the model's joint space, and
# "visual", images in the image tower's own space (image -> similar images) for models
# that have one (the photo model); its entry stays empty for the rest.
KINDS = ("images", "captions", "visual")
FILTER_CACHE = 16  # filters whose passing ids a bundle keeps (at most 8 bytes an image each)


class BundleError(XmodalError):
    """A bundle is missing, unreadable, inconsistent or built by another model."""


METRICS = ("inner_product",)  # unit vectors: inner product is the cosine
# Index fields the manifest may set at load: nprobe; for a compressed (PQ) index the
# shortlist factor reranked exactly, and what publication measured (tuned recall, bytes).
SEARCH_PARAMS = ("nprobe", "k_factor", "tuned_recall", "estimated_bytes")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
BUNDLE_ID_HEX = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
HASH_CHUNK = 1 << 20  # bytes read at a time when hashing an index file


@dataclass
class IndexInfo:
    """One FAISS index of the bundle."""

    file: str | None = None  # relative to the bundle; None while empty
    factory: str = "IDMap2,Flat"
    metric: str = "inner_product"
    count: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {"nprobe": 16}
    sha256: str | None = None  # of the file's bytes, recorded at publication
    # A database store holding this kind's vectors instead of a file (see indexer.stores):
    # its URL without password. None (absent from the JSON): FAISS files, as before stores.
    store: str | None = None


def is_ivf_factory(factory: str) -> bool:
    """Whether a FAISS factory string builds an inverted-file index (which has nprobe)."""
    return any(part.strip().upper().startswith("IVF") for part in factory.split(","))


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
    # Random id the bundle's catalog records too (see indexer.catalog.BUNDLE_ID_KEY);
    # None in bundles written before ids, which adopt one at their next run.
    bundle_id: str | None = None

    @property
    def identity(self) -> ModelIdentity:
        """The model that built the bundle."""
        return ModelIdentity.from_dict(self.model)

    def dim(self, kind: str) -> int | None:
        """Vector size of an index kind; None for "visual" when the model has no such space."""
        identity = self.identity
        return identity.visual_dim if kind == "visual" else identity.embed_dim

    def to_json(self) -> str:
        """Serialised form (an index entry without a store has no ``store`` key, so FAISS
        bundles are written exactly as before stores existed)."""
        data = asdict(self)
        for entry in data["indexes"].values():
            if entry.get("store") is None:
                entry.pop("store", None)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate every field; raises BundleError naming the first bad one."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise BundleError(f"malformed manifest: not JSON ({exc})") from exc
        return _parse_manifest(data)


class _Malformed(ValueError):
    """A manifest field of the wrong type or out of range (becomes a BundleError)."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(value: Any, name: str, minimum: int) -> int:
    # bool is an int subclass: `true` is not a generation.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _Malformed(f"{name} must be an integer >= {minimum}, got {_short(value)}")
    return value


def _text(value: Any, name: str, optional: bool = False, pattern: re.Pattern | None = None) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        kind = "a non-empty string" + (" or null" if optional else "")
        raise _Malformed(f"{name} must be {kind}, got {_short(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise _Malformed(f"{name} is not a valid value: {_short(value)}")
    return value


def _stamp(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"{name} must be a timestamp string, got {_short(value)}")
    return value


def _object(value: Any, name: str, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{name} must be an object, got {_short(value)}")
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise _Malformed(f"{name} has unknown fields: {', '.join(unknown)}")
    return value


_MODEL_FIELDS = ("name", "pretrained", "sha256", "embed_dim", "visual_dim")


def _parse_model(value: Any) -> dict[str, Any]:
    d = _object(value, "model", _MODEL_FIELDS)
    for key in ("name", "embed_dim"):
        if key not in d:
            raise _Malformed(f"model.{key} is missing")
    return {
        "name": _text(d["name"], "model.name"),
        "pretrained": _text(d.get("pretrained"), "model.pretrained", optional=True),
        "sha256": _text(d.get("sha256"), "model.sha256", optional=True, pattern=SHA256_HEX),
        "embed_dim": _integer(d["embed_dim"], "model.embed_dim", 1),
        **(
            {"visual_dim": _integer(d["visual_dim"], "model.visual_dim", 1)}
            if d.get("visual_dim") is not None
            else {}
        ),
    }


def _parse_index(kind: str, value: Any) -> IndexInfo:
    where = f"indexes.{kind}"
    d = _object(value, where, tuple(f.name for f in fields(IndexInfo)))
    info = IndexInfo()
    info.file = _text(d.get("file"), f"{where}.file", optional=True)
    if info.file is not None and (
        Path(info.file).name != info.file or info.file in (".", "..") or "\\" in info.file
    ):
        raise _Malformed(f"{where}.file must be a file name inside the bundle: {info.file!r}")
    info.factory = _text(d.get("factory", info.factory), f"{where}.factory")
    info.metric = _text(d.get("metric", info.metric), f"{where}.metric")
    if info.metric not in METRICS:
        raise _Malformed(f"{where}.metric must be one of {', '.join(METRICS)}: {info.metric!r}")
    info.count = _integer(d.get("count", 0), f"{where}.count", 0)
    info.store = _text(d.get("store"), f"{where}.store", optional=True)
    if info.store is not None:
        if info.file is not None:
            raise _Malformed(f"{where} names both a file and a vector store")
        try:
            if store_kind(info.store) == FAISS_STORE:
                raise _Malformed(f"{where}.store names no database store: {info.store!r}")
        except StoreError as exc:
            raise _Malformed(f"{where}.store: {exc}") from exc
    elif info.file is None and info.count:
        raise _Malformed(f"{where} counts {info.count} vectors but names no file")
    params = _object(d.get("params", {}), f"{where}.params", SEARCH_PARAMS)
    nprobe = params.get("nprobe")
    if nprobe is not None:
        _integer(nprobe, f"{where}.params.nprobe", 1)
        if not is_ivf_factory(info.factory):
            raise _Malformed(
                f"{where}.params.nprobe is set but {info.factory!r} has no inverted lists"
            )
    if params.get("k_factor") is not None:
        _integer(params["k_factor"], f"{where}.params.k_factor", 1)
    info.params = dict(params)
    info.sha256 = _text(d.get("sha256"), f"{where}.sha256", optional=True, pattern=SHA256_HEX)
    return info


_MANIFEST_FIELDS = tuple(f.name for f in fields(Manifest))


def _parse_manifest(data: Any) -> Manifest:
    """A Manifest from parsed JSON, every field checked (one-line BundleError otherwise)."""
    try:
        if not isinstance(data, dict):
            raise _Malformed(f"the manifest must be a JSON object, got {type(data).__name__}")
        version = _integer(data.get("format_version", FORMAT_VERSION), "format_version", 1)
        if version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format v{version} is newer than this xmodal (v{FORMAT_VERSION}); "
                "upgrade xmodal"
            )
        _object(data, "the manifest", _MANIFEST_FIELDS)
        if "model" not in data:
            raise _Malformed("model is missing")
        raw_indexes = _object(data.get("indexes", {}), "indexes", KINDS)
        counts = data.get("counts", {})
        if not isinstance(counts, dict):
            raise _Malformed(f"counts must be an object, got {_short(counts)}")
        roots = data.get("roots", [])
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise _Malformed(f"roots must be a list of strings, got {_short(roots)}")
        return Manifest(
            model=_parse_model(data["model"]),
            catalog_url=_text(data.get("catalog_url"), "catalog_url", optional=True),
            generation=_integer(data.get("generation", 0), "generation", 0),
            published_run=_integer(data.get("published_run", 0), "published_run", 0),
            format_version=version,
            # Every kind is present (an empty one unnamed) so readers need no default.
            indexes={k: _parse_index(k, raw_indexes.get(k, {})) for k in KINDS},
            counts={str(k): _integer(v, f"counts.{k}", 0) for k, v in counts.items()},
            roots=list(roots),
            created_at=_stamp(data.get("created_at", ""), "created_at"),
            updated_at=_stamp(data.get("updated_at", ""), "updated_at"),
            bundle_id=_text(
                data.get("bundle_id"), "bundle_id", optional=True, pattern=BUNDLE_ID_HEX
            ),
        )
    except _Malformed as exc:
        raise BundleError(f"malformed manifest: {exc}") from exc


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


def write_index(index: faiss.Index, path: Path) -> str:
    """Serialise a FAISS index atomically (faiss.write_index overwrites in place);
    returns the sha256 of the bytes written, for the manifest."""
    data = faiss.serialize_index(index).tobytes()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_index(path: Path) -> faiss.Index:
    """Load a FAISS index, naming the file when it is missing or truncated."""
    if not path.is_file():
        raise BundleError(f"index file missing: {path}")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise BundleError(f"cannot read index {path}: {str(exc).splitlines()[0]}") from exc


def index_file_intact(bundle: Path, info: IndexInfo) -> bool:
    """Whether an index file still has the bytes the manifest recorded (True when the
    manifest predates checksums: nothing to compare with)."""
    if not info.file or not info.sha256:
        return True
    try:
        return file_sha256(Path(bundle) / info.file) == info.sha256
    except OSError:
        return False


def load_index(bundle: Path, info: IndexInfo, check_sha256: bool = True) -> faiss.Index | None:
    """An index of the manifest, checked as every reader needs it: the file has the
    recorded bytes (no garbled vector), holds the stated count, and takes its search
    parameters. None when the manifest names no file (an empty index).

    ``check_sha256`` False skips the bytes check (verify reports it on its own, then
    looks inside the file for what is wrong)."""
    if not info.file:
        return None
    path = Path(bundle) / info.file
    if check_sha256 and path.is_file() and not index_file_intact(bundle, info):
        raise BundleError(
            f"{path} is damaged: its sha256 differs from the manifest's; "
            f"re-run `xmodal index --bundle {bundle}` to rebuild it from the catalog"
        )
    index = read_index(path)
    if index.ntotal != info.count:
        raise BundleError(
            f"{info.file} holds {index.ntotal} vectors but the manifest says "
            f"{info.count}; run `xmodal verify --bundle {bundle}`"
        )
    nprobe = info.params.get("nprobe")
    if nprobe:
        try:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
        except RuntimeError as exc:
            raise BundleError(
                f"{info.file}: the manifest sets nprobe {nprobe}, but the index "
                f"({type(index).__name__}) has no inverted lists"
            ) from exc
    return index


def read_manifest(bundle: Path) -> Manifest:
    """The manifest of the bundle at ``bundle``, validated (BundleError naming the file)."""
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"not an index bundle (no {MANIFEST}): {bundle}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: malformed manifest: not UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return Manifest.from_json(text)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from exc


def manifest_stamp(bundle: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime_ns) of the manifest file, None when it cannot be seen: every
    publication replaces the file, so an unchanged stamp means nothing new."""
    try:
        st = os.stat(Path(bundle) / MANIFEST)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Atomically replace the manifest."""
    manifest.updated_at = now_iso()
    manifest.created_at = manifest.created_at or manifest.updated_at
    atomic_write_bytes(Path(bundle) / MANIFEST, manifest.to_json().encode("utf-8"))


def catalog_url(bundle: Path, manifest_url: str | None, override: str | None = None) -> str:
    """Where the catalog lives: an explicit URL, the manifest's, or the bundle's SQLite
    (SQLite paths absolute; an in-memory catalog is a CatalogError)."""
    return normalize_url(override or manifest_url or sqlite_url(Path(bundle) / CATALOG_FILE))


def new_bundle_id() -> str:
    """A random id for a new bundle (recorded in its manifest and its catalog)."""
    return uuid.uuid4().hex


def check_catalog_owner(
    bundle: Path, manifest: Manifest, engine: Engine, override: str | None = None
) -> None:
    """Refuse a catalog that belongs to another bundle (BundleError naming both).

    The catalog and the manifest record the same bundle id. Where either predates ids
    (an old bundle, adopted at its next run), an explicit ``override`` URL must be the
    one the manifest names (the bundle's own SQLite file when it names none).
    """
    owner, owner_path = catalog_owner(engine)
    mine = manifest.bundle_id
    shown = public_url(engine.url.render_as_string(hide_password=False))
    if mine and owner and mine != owner:
        where = f" at {owner_path}" if owner_path else ""
        raise BundleError(
            f"catalog {shown} belongs to another bundle (id {owner}{where}), not to "
            f"{bundle} (id {mine}); give this bundle's own --db, or none"
        )
    if override and not (mine and owner):
        expected = catalog_url(bundle, manifest.catalog_url)
        if public_url(expected) != public_url(normalize_url(override)):
            raise BundleError(
                f"bundle {bundle} keeps its catalog at {public_url(expected)}, not {shown}"
            )


def catalog_read(fn: Callable) -> Callable:
    """A Bundle lookup whose database errors (a damaged page, a lost server) become one
    CatalogError naming the catalog, instead of a driver traceback."""

    @functools.wraps(fn)
    def wrapper(self: Bundle, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except SQLAlchemyError as exc:
            raise CatalogError(
                f"catalog {self.public_catalog_url()} cannot be read ({db_error_text(exc)}); "
                f"run `xmodal verify --bundle {self.path}`"
            ) from exc

    return wrapper


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


def _run_report(text: str | None) -> dict[str, Any]:
    """A run's stored report; a garbled one is shown as such (verify reports it)."""
    try:
        report = json.loads(text or "{}")
    except (json.JSONDecodeError, TypeError):
        return {"error": "the stored report is not readable JSON"}
    return report if isinstance(report, dict) else {"error": "the stored report is not an object"}


@dataclass
class ImageHit:
    """Catalog facts about an image id."""

    id: int
    path: str  # absolute, printable
    fs_path: bytes  # absolute, exact OS bytes
    root: bytes
    relpath: str  # inside its indexed root, printable: what people are shown
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
            check_catalog_owner(self.path, self.manifest, self.engine, db_url)
            self.indexes: dict[str, faiss.Index | None] = {
                kind: load_index(self.path, self.manifest.indexes.get(kind, IndexInfo()))
                for kind in KINDS
            }
            self.stores: dict[str, VectorStore] = {}  # kinds whose vectors live in a database
            for kind, info in self.manifest.indexes.items():
                if info.store and (dim := self.manifest.dim(kind)):
                    self.stores[kind] = open_store(info.store, dim)
        except (CatalogError, StoreError) as exc:
            self.close()
            raise BundleError(f"{self.path}: {exc}") from exc
        except SQLAlchemyError as exc:  # e.g. a damaged page: "database disk image is malformed"
            self.engine.dispose()
            raise BundleError(
                f"{self.path}: catalog {public_url(self.url)} cannot be read "
                f"({db_error_text(exc)}); run `xmodal verify --bundle {self.path}`"
            ) from exc
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._filter_cache: OrderedDict[ImageFilter, np.ndarray] = OrderedDict()

    @property
    def identity(self) -> ModelIdentity:
        """The model the bundle was built with."""
        return self.manifest.identity

    def public_catalog_url(self) -> str:
        """Catalog URL without password."""
        return public_url(self.url)

    def search(
        self, kind: str, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search: (scores [Q, k], ids [Q, k]); empty index gives -1 ids.

        ``allowed`` (catalog ids, from ``filter_ids``) restricts the search to them inside
        FAISS, so k come back whenever k of them are indexed. A kind kept in a database
        store (Milvus, pgvector) is searched there, padded the same way."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        store = self.stores.get(kind)
        if store is not None:
            return store.search(q, k, allowed)
        index = self.indexes.get(kind)
        if index is None or index.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        info = self.manifest.indexes[kind]
        k_factor = int(info.params.get("k_factor", 1)) if is_compressed(info.factory) else 1
        # A compressed index's codes are lossy: a k x k_factor shortlist from FAISS, then
        # exact scores from the catalog's stored vectors give the top k.
        wanted = min(k * k_factor, index.ntotal)
        if allowed is not None:
            found = search_within(index, q, wanted, allowed)
        else:
            found = index.search(q, wanted)
        if k_factor == 1:
            return found
        return rerank_shortlist(
            q, found[1], min(k, index.ntotal), lambda ids: self.vectors(kind, ids.tolist())
        )

    def filter_ids(self, flt: ImageFilter) -> np.ndarray:
        """Ids of the indexed images that pass a filter (int64, ascending), in one query.

        The last few filters' ids are kept (``FILTER_CACHE`` of them, per generation: a
        bundle object serves one), so the next page of a filtered search does not ask
        the catalog again; ids that left the catalog since are dropped by the result
        lookup, as stale FAISS ids are."""
        with self._lock:
            cached = self._filter_cache.get(flt)
            if cached is not None:
                self._filter_cache.move_to_end(flt)
                return cached
        ids = self._query_filter_ids(flt)
        with self._lock:
            self._filter_cache[flt] = ids
            while len(self._filter_cache) > FILTER_CACHE:
                self._filter_cache.popitem(last=False)
        return ids

    @catalog_read
    def _query_filter_ids(self, flt: ImageFilter) -> np.ndarray:
        q = select(ImageRow.id).where(ImageRow.status == INDEXED)
        with self.engine.connect() as s:
            if flt.folder is not None:
                q = q.where(self._folder_clause(s, flt.folder))
            if flt.types:
                q = q.where(ImageRow.format.in_(flt.types))
            after, before = flt.taken_range_ns()
            if after is not None:
                q = q.where(ImageRow.taken_ns >= after)
            if before is not None:
                q = q.where(ImageRow.taken_ns < before)
            if flt.min_width is not None:
                q = q.where(ImageRow.width >= flt.min_width)
            rows = s.execute(q.order_by(ImageRow.id)).all()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    @staticmethod
    def _folder_clause(s: Connection, folder: str) -> Any:
        """Rows under a folder: relative to any indexed root, or an absolute path inside
        one; a whole path component ("trips" holds "trips/a.jpg", not "trips2/a.jpg")."""

        def under(rel: str) -> Any:
            if not rel:
                return true()
            prefix = rel + "/"
            return func.substr(ImageRow.display, 1, len(prefix)) == prefix

        if not folder.startswith("/"):
            return under(folder)
        wanted = os.path.normpath(folder)
        clauses = []
        for root_id, root in s.execute(select(Root.id, Root.path)).all():
            top = os.path.normpath(root.decode("utf-8", "replace"))
            if wanted == top or wanted.startswith(top.rstrip("/") + "/"):
                rel = wanted[len(top) :].strip("/")
                clauses.append(and_(ImageRow.root_id == root_id, under(rel)))
        if not clauses:
            raise FilterError(f"folder {folder[:200]!r} is not inside an indexed folder")
        return or_(*clauses)

    @catalog_read
    def vectors(self, kind: str, ids: list[int]) -> np.ndarray:
        """Stored vectors of catalog ids (for 'more like this'); missing ids give zeros."""
        model, column = VECTOR_COLUMNS[kind]
        dim = self.manifest.dim(kind) or 0
        out = np.zeros((len(ids), dim), np.float32)
        with Session(self.engine) as s:
            rows = dict(s.execute(select(model.id, column).where(model.id.in_(ids))).all())
        for i, id_ in enumerate(ids):
            blob = rows.get(id_)
            if blob is not None:
                out[i] = np.frombuffer(blob, np.float32)
        return out

    @catalog_read
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

    @catalog_read
    def image_kinds(self) -> list[tuple[str | None, int | None, int | None, int]]:
        """(format, width, height, count) of the indexed images, most common first."""
        with Session(self.engine) as s:
            rows = s.execute(
                select(ImageRow.format, ImageRow.width, ImageRow.height, func.count())
                .where(ImageRow.status == INDEXED)
                .group_by(ImageRow.format, ImageRow.width, ImageRow.height)
                .order_by(func.count().desc())
            ).all()
        return [(f, w, h, int(n)) for f, w, h, n in rows]

    @catalog_read
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
                    relpath=row.relpath.decode("utf-8", "replace"),
                    width=row.width,
                    height=row.height,
                    size=row.size,
                    format=row.format,
                    content_hash=row.content_hash,
                )
            return out

    @catalog_read
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

    @catalog_read
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

    @catalog_read
    def captions_of_images(
        self, image_ids: list[int], limit: int = 50
    ) -> dict[int, list[CaptionHit]]:
        """Captions linked to each of several images (at most ``limit`` each, by id)."""
        out: dict[int, list[CaptionHit]] = {i: [] for i in image_ids}
        if not image_ids:
            return out
        with Session(self.engine) as s:
            rows = s.execute(
                select(CaptionLink.image_id, CaptionRow.id, CaptionRow.text, CaptionRow.source)
                .join(CaptionLink, CaptionLink.caption_id == CaptionRow.id)
                .where(CaptionLink.image_id.in_(image_ids))
                .order_by(CaptionLink.image_id, CaptionRow.id)
            ).all()
        for image_id, cid, text, source in rows:
            if len(out[image_id]) < limit:
                out[image_id].append(CaptionHit(cid, text, source, [image_id]))
        return out

    @catalog_read
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

    @catalog_read
    def roots(self) -> list[bytes]:
        """Absolute paths (bytes) of the indexed roots."""
        with Session(self.engine) as s:
            return [r for (r,) in s.execute(select(Root.path)).all()]

    @catalog_read
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
                "report": _run_report(run.report),
            }

    def close(self) -> None:
        """Release the database connections (catalog and vector stores)."""
        for store in getattr(self, "stores", {}).values():
            with contextlib.suppress(StoreError):
                store.close()
        self.engine.dispose()
