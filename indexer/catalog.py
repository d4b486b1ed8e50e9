"""The catalog: SQLAlchemy 2.x models of every image seen, every caption, every run.

A SQLite file inside the bundle by default (WAL), or any SQLAlchemy URL (PostgreSQL).
Catalog ids are FAISS ids. Vectors are stored with their rows, committed in the same
transaction, so the catalog is the durable truth: the FAISS files are derived from it
and can always be rebuilt without re-encoding anything.

Schema changes are migrations (``MIGRATIONS``): a new catalog is created at the
current version; an older one is upgraded step by step; a newer one is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from xmodal.crossmodal.errors import XmodalError

SCHEMA_VERSION = 5

INDEXED, FAILED, EXCLUDED = "indexed", "failed", "excluded"
# A file that disappeared: its vector leaves the FAISS index at the next publication,
# then the row is purged. Until then the published index may still hold its id.
REMOVED = "removed"

# Meta keys naming the bundle a catalog belongs to (its manifest's ``bundle_id``) and
# where that bundle was last written from: `--db` pointing at another bundle's catalog
# is refused instead of mixing two collections.
BUNDLE_ID_KEY = "bundle_id"
BUNDLE_PATH_KEY = "bundle_path"
SQLITE_MEMORY = ("", ":memory:")  # SQLite database names that mean "in memory"


class CatalogError(XmodalError):
    """The catalog cannot be opened or is from an incompatible version."""


def utcnow() -> datetime:
    """Timezone-aware now (stored as naive UTC for portability across backends)."""
    return datetime.now(UTC).replace(tzinfo=None)


def path_to_bytes(path: str) -> bytes:
    """The exact OS bytes of a path (non-UTF-8 names survive the round trip)."""
    return os.fsencode(path)


def display_path(raw: bytes) -> str:
    """A printable form of a path's bytes (undecodable bytes replaced)."""
    return raw.decode("utf-8", "replace")


class Base(DeclarativeBase):
    """Declarative base of the catalog models."""


class Meta(Base):
    """Key/value facts about the catalog itself (schema version, owning bundle)."""

    __tablename__ = "xmodal_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Root(Base):
    """A folder the user indexes."""

    __tablename__ = "roots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[bytes] = mapped_column(LargeBinary, unique=True)  # absolute, resolved
    added_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def display(self) -> str:
        """Printable path."""
        return display_path(self.path)


class ImageRow(Base):
    """A file the indexer saw under a root, with its fate: indexed, failed or excluded."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("root_id", "relpath", name="uq_images_root_path"),
        Index("ix_images_hash", "content_hash"),
        Index("ix_images_status", "status"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    root_id: Mapped[int] = mapped_column(ForeignKey("roots.id", ondelete="CASCADE"))
    relpath: Mapped[bytes] = mapped_column(LargeBinary)  # exact bytes, relative to the root
    display: Mapped[str] = mapped_column(Text)  # printable relative path
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    # When the photo was taken (EXIF DateTimeOriginal, else DateTime, as UTC wall-clock),
    # else the file's mtime: what search filters by date compare (ns since the epoch).
    taken_ns: Mapped[int | None] = mapped_column(BigInteger)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    vector: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32, the embedding
    # float32, the image tower's own space (image -> similar images), for models that have
    # one besides the joint space (the photo model); None for the rest.
    visual: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The file's content (so its vector) changed under the same id: the published index
    # still holds the old vector until the next publication replaces it.
    vector_pending: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("FALSE")
    )
    run_id: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    root: Mapped[Root] = relationship()


class CaptionRow(Base):
    """A distinct caption text (exact duplicates are collapsed)."""

    __tablename__ = "captions"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    text_hash: Mapped[str] = mapped_column(String(64), unique=True)
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)  # file:line where it was first seen
    vector: Mapped[bytes | None] = mapped_column(LargeBinary)
    run_id: Mapped[int | None] = mapped_column(Integer)


class CaptionLink(Base):
    """A caption describes an image of the bundle."""

    __tablename__ = "caption_images"
    caption_id: Mapped[int] = mapped_column(
        ForeignKey("captions.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class RunRow(Base):
    """One `xmodal index` invocation and what it did."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(16), default="running")
    report: Mapped[str] = mapped_column(Text, default="{}")  # JSON: counts, problems


class TokenData:
    """Columns of a cached [length, width] float16 token matrix (see indexer/tokens.py)."""

    length: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ImageTokens(TokenData, Base):
    """Cached patch tokens of an indexed image, for the reranker (float16)."""

    __tablename__ = "image_tokens"
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )


class CaptionTokens(TokenData, Base):
    """Cached token features of a caption (real tokens only), for the reranker."""

    __tablename__ = "caption_tokens"
    caption_id: Mapped[int] = mapped_column(
        ForeignKey("captions.id", ondelete="CASCADE"), primary_key=True
    )


# --------------------------------------------------------------------------- migrations


# version -> step that upgrades a catalog from version-1 to version. A new catalog is
# created from the models and stamped with SCHEMA_VERSION; only older ones run steps.
def _v2_token_caches(conn: Connection) -> None:
    """v2: token caches for the cross-attention reranker."""
    ImageTokens.__table__.create(conn)
    CaptionTokens.__table__.create(conn)


def _v3_vector_pending(conn: Connection) -> None:
    """v3: mark vectors replaced in place; every indexed row starts marked, because
    catalogs before v3 did not replace a modified file's vector in the published index."""
    conn.execute(
        text("ALTER TABLE images ADD COLUMN vector_pending BOOLEAN NOT NULL DEFAULT FALSE")
    )
    conn.execute(text("UPDATE images SET vector_pending = TRUE WHERE vector IS NOT NULL"))


def _v4_visual_space(conn: Connection) -> None:
    """v4: the image tower's own vectors, for models with a second space."""
    blob = LargeBinary().compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE images ADD COLUMN visual {blob}"))


def _v5_taken(conn: Connection) -> None:
    """v5: the date an image was taken, for search filters; existing rows get their mtime
    until the indexer reads their EXIF again (a re-index of changed files, or a new one)."""
    conn.execute(text("ALTER TABLE images ADD COLUMN taken_ns BIGINT"))
    conn.execute(text("UPDATE images SET taken_ns = mtime_ns"))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    2: _v2_token_caches,
    3: _v3_vector_pending,
    4: _v4_visual_space,
    5: _v5_taken,
}


# Where each FAISS index's vectors live in the catalog: kind -> (table, column).
VECTOR_COLUMNS: dict[str, tuple[type, Any]] = {
    "images": (ImageRow, ImageRow.vector),
    "captions": (CaptionRow, CaptionRow.vector),
    "visual": (ImageRow, ImageRow.visual),
}


def _get_version(conn: Connection) -> int | None:
    if not inspect(conn).has_table(Meta.__tablename__):
        return None
    row = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).first()
    return int(row[0]) if row else None


def upgrade(engine: Engine) -> int:
    """Bring an existing catalog to this version (readers do this on open); returns it.

    Unlike ``migrate`` it never creates a schema: a database without one is an error.
    """
    with engine.connect() as conn:
        version = _get_version(conn)
    if version is None:
        raise CatalogError(f"{public_url(str(engine.url))} holds no xmodal catalog")
    if version == SCHEMA_VERSION:
        return version
    try:
        return migrate(engine)
    except SQLAlchemyError as exc:
        raise CatalogError(
            f"catalog schema v{version} needs upgrading to v{SCHEMA_VERSION}, which failed "
            f"({exc.__class__.__name__}: {exc.orig if hasattr(exc, 'orig') else exc}); "
            "open it once with write access (`xmodal verify` or `xmodal index`)"
        ) from exc


def migrate(engine: Engine) -> int:
    """Create or upgrade the schema; returns the version now in force."""
    with engine.begin() as conn:
        version = _get_version(conn)
        if version is None:
            if inspect(conn).has_table(ImageRow.__tablename__):
                raise CatalogError("catalog has xmodal tables but no schema version")
            Base.metadata.create_all(conn)
            conn.execute(
                Meta.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION))
            )
            return SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"catalog schema v{version} is newer than this xmodal understands "
                f"(v{SCHEMA_VERSION}); upgrade xmodal"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[step](conn)
            conn.execute(
                Meta.__table__.update().where(Meta.key == "schema_version").values(value=str(step))
            )
        return SCHEMA_VERSION


def catalog_owner(engine: Engine) -> tuple[str | None, str | None]:
    """(bundle id, bundle path) recorded in the catalog; (None, None) before any."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(Meta.__tablename__):
            return None, None
        rows = dict(
            conn.execute(
                select(Meta.key, Meta.value).where(Meta.key.in_([BUNDLE_ID_KEY, BUNDLE_PATH_KEY]))
            ).all()
        )
    return rows.get(BUNDLE_ID_KEY), rows.get(BUNDLE_PATH_KEY)


def set_catalog_owner(engine: Engine, bundle_id: str, bundle_path: str) -> None:
    """Record which bundle the catalog belongs to (an existing different id is kept:
    callers check ownership first)."""
    with engine.begin() as conn:
        have = dict(conn.execute(select(Meta.key, Meta.value)).all())
        for key, value in ((BUNDLE_ID_KEY, bundle_id), (BUNDLE_PATH_KEY, bundle_path)):
            if key not in have:
                conn.execute(Meta.__table__.insert().values(key=key, value=value))
            elif key == BUNDLE_PATH_KEY and have[key] != value:  # the bundle moved
                conn.execute(Meta.__table__.update().where(Meta.key == key).values(value=value))


INTEGRITY_LINES = 5  # problems `PRAGMA integrity_check` is asked to list at most


def db_error_text(exc: BaseException) -> str:
    """One line saying what the database driver reported (no SQL, no parameters)."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0] if lines else 'no details'}"


def integrity_problems(engine: Engine) -> list[str]:
    """What SQLite's own integrity check finds wrong with the file (none: [])."""
    if engine.dialect.name != "sqlite":
        return []
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(f"PRAGMA integrity_check({INTEGRITY_LINES})")).all()
    except SQLAlchemyError as exc:
        return [db_error_text(exc)]
    # One row may hold several lines ("*** in database main ***" first): one per finding.
    found = [
        line.strip()
        for r in rows
        for line in str(r[0]).splitlines()
        if line.strip() and not line.startswith("***")
    ]
    return [] if found == ["ok"] else found


def sqlite_url(path: Path) -> str:
    """SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{Path(path).resolve()}"


def normalize_url(url: str) -> str:
    """The catalog URL as it is stored and used: a SQLite file's path made absolute.

    An in-memory SQLite catalog (``sqlite://``, ``sqlite:///:memory:``, ``mode=memory``)
    is refused: it vanishes with the process while the manifest would point at it, and
    a relative path would name another file from another working directory.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        # Only the scheme is shown: an unparsable URL may still hold a password.
        scheme = str(url).split("://", 1)[0][:40]
        raise CatalogError(
            f"not a database URL: {scheme}://... (expected sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST/DB)"
        ) from exc
    if parsed.get_backend_name() != "sqlite":
        return url
    database = parsed.database or ""
    in_memory = database in SQLITE_MEMORY or ":memory:" in database
    if in_memory or parsed.query.get("mode") == "memory":
        raise CatalogError(
            f"{public_url(url)} is an in-memory database, gone when the process exits; "
            "give a file (sqlite:///PATH) or a server URL"
        )
    if database.startswith("file:"):  # a SQLite URI: the caller spelled out what they want
        return url
    path = Path(database).expanduser()
    if path.is_absolute():
        return url
    return parsed.set(database=str(path.resolve())).render_as_string(hide_password=False)


def public_url(url: str) -> str:
    """The URL without its password, safe to store in a manifest or print."""
    parsed = make_url(url)
    if not parsed.password:
        return url
    # URL.set(password=None) keeps the old password; _replace drops it.
    return parsed._replace(password=None).render_as_string(hide_password=False)


def open_engine(url: str, create: bool = True) -> Engine:
    """An engine for the catalog, with SQLite set to WAL and foreign keys on."""
    url = normalize_url(url)
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database:
        db = Path(parsed.database)
        if not create and not db.is_file():
            raise CatalogError(f"catalog not found: {db}")
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(
            url,
            connect_args={"timeout": 30} if is_sqlite else {},
            pool_pre_ping=not is_sqlite,
        )
    except Exception as exc:
        raise CatalogError(f"cannot open catalog {public_url(url)}: {db_error_text(exc)}") from exc
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process; only power loss may drop
            # the last commits, which the next run redoes.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        raise CatalogError(
            f"cannot connect to catalog {public_url(url)}: {db_error_text(exc)}"
        ) from exc
    return engine
