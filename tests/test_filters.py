"""Search filters (issue 20, part 5): the date taken in the catalog (EXIF, else mtime;
older catalogs upgraded), filters pushed down into the FAISS search (exactly k results
when k pass), and the same filters in the API, the OpenAPI document and the CLI."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from image_fixtures import jpeg_bytes, scene
from PIL import Image
from sqlalchemy import select, text
from sqlalchemy.orm import Session
from xmodal.crossmodal.encoder import Encoder
from xmodal.indexer.bundle import Bundle
from xmodal.indexer.catalog import SCHEMA_VERSION, ImageRow, Meta, migrate, open_engine, sqlite_url
from xmodal.indexer.pipeline import IndexOptions, run_index

TAKEN = datetime(2019, 7, 14, 10, 30, 0, tzinfo=UTC)  # the EXIF photo's date
MTIME = datetime(2022, 3, 1, 12, 0, 0, tzinfo=UTC)  # every file's mtime


def _ns(when: datetime) -> int:
    return int(when.timestamp()) * 1_000_000_000


def _exif_jpeg(path: Path, seed: int, stamp: str, original: bool = True) -> None:
    exif = Image.Exif()
    if original:
        exif.get_ifd(0x8769)[36867] = stamp  # DateTimeOriginal
    else:
        exif[306] = stamp  # DateTime
    path.write_bytes(jpeg_bytes(scene(seed, 40), exif=exif))


def _dated_folder(root: Path) -> Path:
    """A JPEG with DateTimeOriginal, one with only DateTime, a plain PNG (mtime)."""
    (root / "trips" / "2019").mkdir(parents=True)
    _exif_jpeg(root / "trips" / "2019" / "beach.jpg", 1, TAKEN.strftime("%Y:%m:%d %H:%M:%S"))
    _exif_jpeg(root / "edited.jpg", 2, "2020:01:02 03:04:05", original=False)
    scene(3, 48).save(root / "plain.png")
    for p in root.rglob("*.*"):
        os.utime(p, ns=(_ns(MTIME), _ns(MTIME)))
    return root


def _taken(bundle: Path) -> dict[str, int | None]:
    engine = open_engine(sqlite_url(bundle / "catalog.sqlite"))
    with Session(engine) as s:
        rows = dict(s.execute(select(ImageRow.display, ImageRow.taken_ns)).all())
    engine.dispose()
    return rows


def test_date_taken_is_exif_else_mtime_and_old_catalogs_upgrade(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    enc = Encoder.load("xmodal-tiny", str(tiny_checkpoint))
    photos, bundle = _dated_folder(tmp_path / "photos"), tmp_path / "bundle"
    opts = IndexOptions(bundle=bundle, roots=[photos], workers=0, progress=False)
    run_index(enc, opts)
    assert _taken(bundle) == {
        "trips/2019/beach.jpg": _ns(TAKEN),
        "edited.jpg": _ns(datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)),
        "plain.png": _ns(MTIME),
    }
    # A touch (same bytes, new mtime): the EXIF dates stay, the mtime-derived one follows.
    later = datetime(2023, 5, 5, tzinfo=UTC)
    for p in photos.rglob("*.*"):
        os.utime(p, ns=(_ns(later), _ns(later)))
    run_index(enc, opts)
    assert _taken(bundle)["plain.png"] == _ns(later)
    assert _taken(bundle)["trips/2019/beach.jpg"] == _ns(TAKEN)
    # A v4 catalog (before the date taken) is upgraded on open: rows get their mtime.
    engine = open_engine(sqlite_url(bundle / "catalog.sqlite"))
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE images DROP COLUMN taken_ns"))
        conn.execute(Meta.__table__.update().where(Meta.key == "schema_version").values(value="4"))
    engine.dispose()
    Bundle(bundle).close()
    assert set(_taken(bundle).values()) == {_ns(later)}
    engine = open_engine(sqlite_url(bundle / "catalog.sqlite"))
    assert migrate(engine) == SCHEMA_VERSION
    engine.dispose()
