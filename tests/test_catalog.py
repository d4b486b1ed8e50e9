"""The catalog: schema versions, SQLite settings, and a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from image_fixtures import scene
from sqlalchemy import select, text
from sqlalchemy.orm import Session
from xmodal.crossmodal.encoder import Encoder
from xmodal.indexer.bundle import Bundle, BundleError
from xmodal.indexer.catalog import (
    SCHEMA_VERSION,
    CatalogError,
    ImageRow,
    Meta,
    migrate,
    open_engine,
    public_url,
    sqlite_url,
)
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.indexer.verify import verify_bundle
from xmodal.search.engine import SearchEngine


def test_new_catalog_is_stamped_and_a_newer_one_refused(tmp_path: Path) -> None:
    engine = open_engine(sqlite_url(tmp_path / "c.sqlite"))
    assert migrate(engine) == SCHEMA_VERSION
    assert migrate(engine) == SCHEMA_VERSION  # idempotent
    with engine.begin() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        conn.execute(
            Meta.__table__.update().where(Meta.key == "schema_version").values(value="999")
        )
    with pytest.raises(CatalogError, match="v999 is newer"):
        migrate(engine)


def test_v2_catalog_upgrades_and_republishes_vectors_it_may_hold_stale(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    enc = Encoder.load("xmodal-tiny", str(tiny_checkpoint))
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    photos.mkdir()
    for i in range(4):
        scene(i, 24).save(photos / f"{i}.png")
    opts = IndexOptions(bundle=bundle, roots=[photos], workers=0, progress=False)
    assert run_index(enc, opts).generation == 1
    engine = open_engine(sqlite_url(bundle / "catalog.sqlite"))
    with engine.begin() as conn:  # make it a v2 catalog
        conn.execute(text("ALTER TABLE images DROP COLUMN vector_pending"))
        conn.execute(text("ALTER TABLE images DROP COLUMN visual"))  # v4's
        conn.execute(text("ALTER TABLE images DROP COLUMN taken_ns"))  # v5's
        conn.execute(Meta.__table__.update().where(Meta.key == "schema_version").values(value="2"))
    # A server opening it upgrades it in place and searches as before.
    served = SearchEngine(bundle, enc)
    assert len(served.text_to_images("anything", k=10)) == 4
    served.close()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM xmodal_meta")).scalar() == str(SCHEMA_VERSION)
    assert migrate(engine) == SCHEMA_VERSION == 5
    pending = text("SELECT count(*) FROM images WHERE vector_pending")
    with engine.connect() as conn:
        assert conn.execute(pending).scalar() == 4
    # v2 left a modified file's old vector in the index: the next run replaces them all.
    again = run_index(enc, opts)
    assert (again.counts["unchanged"], again.generation) == (4, 2)
    with engine.connect() as conn:
        assert conn.execute(pending).scalar() == 0
    engine.dispose()
    assert run_index(enc, opts).generation == 2  # and then nothing is left to publish
    assert verify_bundle(bundle).ok
    # A newer catalog than this xmodal knows is refused by readers with a message.
    with engine.begin() as conn:
        conn.execute(Meta.__table__.update().where(Meta.key == "schema_version").values(value="9"))
    engine.dispose()
    with pytest.raises(BundleError, match="v9 is newer than this xmodal"):
        Bundle(bundle)
    # A catalog database without a catalog in it is reported, not given a fresh schema.
    (bundle / "catalog.sqlite").unlink()
    sqlite3.connect(bundle / "catalog.sqlite").close()
    report = verify_bundle(bundle)
    assert not report.ok
    assert any("holds no xmodal catalog" in p for p in report.problems), report.problems
    with sqlite3.connect(bundle / "catalog.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def test_password_never_reaches_the_manifest() -> None:
    assert (
        public_url("postgresql+psycopg://u:secret@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    )
    assert public_url("sqlite:///x.sqlite") == "sqlite:///x.sqlite"


def test_unreachable_database_is_named() -> None:
    with pytest.raises(CatalogError, match="cannot connect to catalog postgresql"):
        open_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_postgresql_catalog_end_to_end(pg_url: str, tiny_checkpoint: Path, tmp_path: Path):
    enc = Encoder.load("xmodal-tiny", str(tiny_checkpoint))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        scene(i, 24).save(photos / f"{i}.png")
    (photos / "broken.jpg").write_bytes(b"nope")
    bundle = tmp_path / "bundle"
    opts = IndexOptions(bundle=bundle, roots=[photos], db_url=pg_url, workers=0, progress=False)
    first = run_index(enc, opts)
    assert (first.counts["indexed"], first.counts["failed"]) == (6, 1)
    assert not (bundle / "catalog.sqlite").exists()
    (photos / "0.png").unlink()
    again = run_index(enc, opts)
    assert (again.counts["removed"], again.counts["unchanged"]) == (1, 5)
    scene(99, 24).save(photos / "1.png")  # new content under the same name (and id)
    modified = run_index(enc, opts)
    assert (modified.counts["indexed"], modified.generation) == (1, 3)
    b = Bundle(bundle, pg_url)
    with Session(b.engine) as s:
        row = s.execute(select(ImageRow).where(ImageRow.display == "1.png")).scalar_one()
    scores, ids = b.search("images", b.vectors("images", [row.id]), 1)
    assert ids[0, 0] == row.id and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    b.close()
    assert verify_bundle(bundle, pg_url).ok
    engine = SearchEngine(bundle, enc, db_url=pg_url)
    assert len(engine.text_to_images("anything", k=10)) == 5
    engine.close()
