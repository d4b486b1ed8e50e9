"""Bundle and catalog integrity (issue 16): whose catalog, which database, damaged
manifests, catalogs and index files, and a reranker of other weights."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from image_fixtures import scene
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlite_fixtures import checkpoint, garble, garble_table_page, page_size
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.reranker import CrossModalReranker, RerankerConfig
from xmodal.indexer.bundle import Bundle, BundleError, read_manifest
from xmodal.indexer.catalog import CatalogError, ImageTokens, Meta, open_engine, sqlite_url
from xmodal.indexer.pipeline import IndexOptions, IndexRunError, run_index
from xmodal.indexer.verify import verify_bundle
from xmodal.search.engine import QueryError, SearchEngine

from xmodal.cli import main

N_IMAGES = 6
N_CAPTIONS = 12


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path) -> Encoder:
    return Encoder.load("xmodal-tiny", str(tiny_checkpoint))


def _photos(folder: Path, offset: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(N_IMAGES):
        scene(offset + i, 24).save(folder / f"{offset + i}.png")
    return folder


def _captions(path: Path) -> Path:
    path.write_text("".join(f"caption {i} of some shapes\n" for i in range(N_CAPTIONS)))
    return path


def _index(enc: Encoder, bundle: Path, *roots: Path, captions=(), **kw):
    opts = IndexOptions(
        bundle=bundle, roots=list(roots), captions=list(captions), workers=0, progress=False, **kw
    )
    return run_index(enc, opts)


def _built(enc: Encoder, tmp: Path, name: str = "a", offset: int = 0) -> Path:
    bundle = tmp / name / "bundle"
    _index(enc, bundle, _photos(tmp / name / "photos", offset), captions=[_captions(tmp / "c.txt")])
    return bundle


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_line_error(result) -> str:
    """The CLI failed with one message line and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _dump(db: Path) -> list[str]:
    """A SQLite catalog's content as SQL statements."""
    with sqlite3.connect(db) as conn:
        return list(conn.iterdump())


# ----------------------------------------------------------------- item 2: whose catalog


def test_db_of_another_bundle_is_refused_everywhere(tiny: Encoder, tmp_path: Path) -> None:
    a = _built(tiny, tmp_path, "a")
    b = _built(tiny, tmp_path, "b", offset=100)
    b_db = sqlite_url(b / "catalog.sqlite")
    before = _dump(b / "catalog.sqlite")
    with pytest.raises(IndexRunError, match="belongs to another bundle"):
        _index(tiny, a, tmp_path / "a" / "photos", db_url=b_db)
    assert read_manifest(a).bundle_id != read_manifest(b).bundle_id
    with pytest.raises(BundleError, match=r"belongs to another bundle \(id [0-9a-f]{32}"):
        SearchEngine(a, tiny, db_url=b_db)
    report = verify_bundle(a, b_db)
    assert any("belongs to another bundle" in p for p in report.problems), report.problems
    line = _one_line_error(_cli("search", "shapes", "--bundle", str(a), "--db", b_db))
    assert str(a) in line and read_manifest(b).bundle_id in line
    _one_line_error(_cli("index", str(tmp_path / "a" / "photos"), "--bundle", str(a), "--db", b_db))
    assert _dump(b / "catalog.sqlite") == before  # nothing was written into B's catalog
    assert verify_bundle(a).ok and verify_bundle(b).ok


def test_bundle_without_an_id_adopts_one_and_refuses_a_foreign_db(
    tiny: Encoder, tmp_path: Path
) -> None:
    a = _built(tiny, tmp_path, "a")
    b = _built(tiny, tmp_path, "b", offset=100)
    for bundle in (a, b):  # as bundles from before ids were written
        doc = json.loads((bundle / "manifest.json").read_text())
        doc.pop("bundle_id", None)
        (bundle / "manifest.json").write_text(json.dumps(doc))
        engine = open_engine(sqlite_url(bundle / "catalog.sqlite"))
        with engine.begin() as conn:
            conn.execute(Meta.__table__.delete().where(Meta.key != "schema_version"))
        engine.dispose()
    old = Bundle(a)  # readers take it as it is
    assert len(old.images(list(range(1, 10)))) == N_IMAGES
    old.close()
    # Without ids to compare, an explicit --db must be the catalog the manifest names.
    with pytest.raises(BundleError, match="keeps its catalog at"):
        Bundle(a, sqlite_url(b / "catalog.sqlite"))
    with pytest.raises(IndexRunError, match="keeps its catalog at"):
        _index(tiny, a, tmp_path / "a" / "photos", db_url=sqlite_url(b / "catalog.sqlite"))
    from xmodal.indexer.catalog import BUNDLE_ID_KEY

    # The next run records an id in both; the bundle's own URL spelled out is accepted.
    _index(tiny, a, tmp_path / "a" / "photos", db_url=sqlite_url(a / "catalog.sqlite"))
    bundle_id = read_manifest(a).bundle_id
    assert bundle_id and re.fullmatch(r"[0-9a-f]{32}", bundle_id)
    engine = open_engine(sqlite_url(a / "catalog.sqlite"))
    with engine.connect() as conn:
        stored = conn.execute(select(Meta.value).where(Meta.key == BUNDLE_ID_KEY)).scalar()
    engine.dispose()
    assert stored == bundle_id
    assert verify_bundle(a).ok


def test_new_bundle_over_a_catalog_in_use_is_refused(tiny: Encoder, tmp_path: Path) -> None:
    a = _built(tiny, tmp_path, "a")
    a_db = sqlite_url(a / "catalog.sqlite")
    with pytest.raises(IndexRunError, match=f"belongs to the bundle {re.escape(str(a))}"):
        _index(tiny, tmp_path / "new", _photos(tmp_path / "more", 50), db_url=a_db)
    assert not (tmp_path / "new" / "manifest.json").exists()
    # Its bundle folder gone, the catalog (the durable truth) can be given a new one.
    checkpoint(a / "catalog.sqlite")
    shutil.move(a / "catalog.sqlite", tmp_path / "kept.sqlite")
    shutil.rmtree(a)
    kept = sqlite_url(tmp_path / "kept.sqlite")
    _index(tiny, tmp_path / "new", tmp_path / "a" / "photos", db_url=kept)
    assert verify_bundle(tmp_path / "new").ok


# ------------------------------------------------------- item 4: which database it names


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_catalog_is_refused(tiny: Encoder, tmp_path: Path, url: str) -> None:
    photos = _photos(tmp_path / "photos")
    with pytest.raises(CatalogError, match="in-memory"):
        _index(tiny, tmp_path / "bundle", photos, db_url=url)
    assert not (tmp_path / "bundle" / "manifest.json").exists()  # nothing published
    other = str(tmp_path / "b2")
    line = _one_line_error(_cli("index", str(photos), "--bundle", other, "--db", url))
    assert "in-memory" in line
    assert not (tmp_path / "b2" / "manifest.json").exists()


def test_relative_sqlite_url_is_stored_absolute(
    tiny: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _index(tiny, tmp_path / "bundle", _photos(tmp_path / "photos"), db_url="sqlite:///rel.db")
    stored = read_manifest(tmp_path / "bundle").catalog_url
    assert stored == f"sqlite:///{(work / 'rel.db').resolve()}"
    monkeypatch.chdir(tmp_path)  # another folder: the same catalog is found
    engine = SearchEngine(tmp_path / "bundle", tiny)
    assert len(engine.text_to_images("shapes", k=10)) == N_IMAGES
    engine.close()
    assert not (tmp_path / "rel.db").exists()
    assert verify_bundle(tmp_path / "bundle").ok


# ---------------------------------------------------- item 6: damaged manifests, catalogs


def _set(doc: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[key]
    doc[last] = value


MANIFEST_DAMAGE = [
    ("indexes", [], "indexes must be an object"),
    ("model.embed_dim", "abc", "model.embed_dim must be an integer"),
    ("generation", "x", "generation must be an integer"),
    ("generation", -1, "generation must be an integer >= 0"),
    ("published_run", True, "published_run must be an integer"),
    ("indexes.images.params", {"nprobe": 16}, "nprobe is set but 'IDMap2,Flat'"),
    ("indexes.images.count", "6", "indexes.images.count must be an integer"),
    ("indexes.images.file", "../../etc/passwd", "must be a file name inside the bundle"),
    ("model", "xmodal-tiny", "model must be an object"),
    ("model.name", None, "model.name must be a non-empty string"),
    ("counts", [1], "counts must be an object"),
    ("roots", "/photos", "roots must be a list"),
    ("catalog_url", 5, "catalog_url must be a non-empty string or null"),
    ("indexes.images.metric", "l2", "metric must be one of inner_product"),
]


@pytest.mark.parametrize(("field", "value", "message"), MANIFEST_DAMAGE)
def test_manifest_fields_are_validated(
    tiny: Encoder, tmp_path: Path, field: str, value, message: str
) -> None:
    bundle = tmp_path / "bundle"
    _index(tiny, bundle, _photos(tmp_path / "photos"))
    doc = json.loads((bundle / "manifest.json").read_text())
    _set(doc, field, value)
    (bundle / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=re.escape(message)):
        read_manifest(bundle)
    report = verify_bundle(bundle)
    assert not report.ok and message in report.problems[0], report.problems
    assert message in _one_line_error(_cli("search", "shapes", "--bundle", str(bundle)))
    assert message in _one_line_error(_cli("info", "--bundle", str(bundle)))


def test_manifest_of_undecodable_bytes(tiny: Encoder, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    _index(tiny, bundle, _photos(tmp_path / "photos"))
    raw = (bundle / "manifest.json").read_bytes()
    (bundle / "manifest.json").write_bytes(raw.replace(b'"xmodal-tiny"', b'"xmodal-\xff\xfe"'))
    with pytest.raises(BundleError, match="not UTF-8"):
        read_manifest(bundle)
    assert "not UTF-8" in verify_bundle(bundle).problems[0]
    assert "not UTF-8" in _one_line_error(_cli("info", "--bundle", str(bundle)))
    _one_line_error(_cli("index", str(tmp_path / "photos"), "--bundle", str(bundle)))


def test_garbled_catalog_page_gives_one_line_errors(tiny: Encoder, tmp_path: Path) -> None:
    bundle = _built(tiny, tmp_path)
    db = bundle / "catalog.sqlite"
    checkpoint(db)
    # The images table's page: readers open the bundle, then fail at the lookup.
    garble_table_page(db, "images")
    line = _one_line_error(_cli("search", "shapes", "--bundle", str(bundle)))
    assert "cannot be read" in line and "malformed" in line
    with pytest.raises(CatalogError, match="cannot be read"):
        SearchEngine(bundle, tiny).text_to_images("shapes")
    report = verify_bundle(bundle)
    assert any("catalog file is damaged" in p for p in report.problems), report.problems
    assert all("\n" not in p for p in report.problems)
    out = _cli("verify", "--bundle", str(bundle))
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "PROBLEM: catalog file is damaged" in out.output
    # The runs' page: `xmodal info` shows the last run.
    garble_table_page(db, "runs", seed=1)
    assert "cannot be read" in _one_line_error(_cli("info", "--bundle", str(bundle)))


def test_garbled_meta_page_fails_serve_start_up_in_one_line(tiny: Encoder, tmp_path: Path) -> None:
    from xmodal.web import create_app

    bundle = _built(tiny, tmp_path)
    db = bundle / "catalog.sqlite"
    checkpoint(db)
    # The schema-version table, read when a reader opens the bundle.
    garble_table_page(db, "xmodal_meta")
    with pytest.raises((BundleError, CatalogError)) as caught:
        create_app({"BUNDLE": bundle, "TESTING": True})
    assert "\n" not in str(caught.value)
    assert not verify_bundle(bundle).ok


def test_garbled_catalog_tail_is_reported_by_verify(tiny: Encoder, tmp_path: Path) -> None:
    bundle = _built(tiny, tmp_path)
    db = bundle / "catalog.sqlite"
    checkpoint(db)
    size = page_size(db)
    garble(db, os.path.getsize(db) - size, size)  # the whole last page
    report = verify_bundle(bundle)
    assert any("catalog file is damaged" in p for p in report.problems), report.problems
    out = _cli("verify", "--bundle", str(bundle), "--json")
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert isinstance(out.exception, SystemExit)
    assert json.loads(out.output)["ok"] is False


# ------------------------------------------------------------ item 7: garbled vectors


def _vector_offset(index_file: Path, vector: np.ndarray) -> int:
    data = index_file.read_bytes()
    at = data.find(np.ascontiguousarray(vector, np.float32).tobytes())
    assert at >= 0
    return at


def _overwrite_vector(bundle: Path, kind: str, id_: int, new: np.ndarray) -> None:
    """Write ``new`` over the vector of ``id_`` inside the bundle's index file."""
    b = Bundle(bundle)
    vector = b.vectors(kind, [id_])[0]
    b.close()
    path = bundle / read_manifest(bundle).indexes[kind].file
    at = _vector_offset(path, vector)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(np.ascontiguousarray(new, np.float32).tobytes())


def test_garbled_caption_vectors_are_caught(tiny: Encoder, tmp_path: Path) -> None:
    bundle = _built(tiny, tmp_path)
    _overwrite_vector(bundle, "captions", 3, np.full(tiny.dim, 3e38, np.float32))
    report = verify_bundle(bundle)
    assert any("not finite unit vectors" in p and "(3)" in p for p in report.problems), (
        report.problems
    )
    with pytest.raises(BundleError, match="is damaged"):
        Bundle(bundle)
    _one_line_error(_cli("search", "--image", str(tmp_path / "a/photos/0.png"), "--bundle",
                         str(bundle), "--target", "captions"))  # fmt: skip
    # The next run (with the model the manifest names, as `xmodal index` finds it)
    # rebuilds the damaged index from the catalog's vectors.
    from xmodal.search.engine import encoder_for_bundle

    _index(encoder_for_bundle(bundle), bundle, tmp_path / "a" / "photos")
    assert verify_bundle(bundle).ok
    engine = SearchEngine(bundle, tiny)
    from PIL import Image

    hits = engine.image_to_captions(Image.open(tmp_path / "a/photos/0.png"), k=N_CAPTIONS)
    assert len(hits) == N_CAPTIONS and all(-1.0 <= h.score <= 1.0 for h in hits)
    engine.close()


def test_scores_stay_cosines_even_without_a_checksum(tiny: Encoder, tmp_path: Path) -> None:
    bundle = _built(tiny, tmp_path)
    doc = json.loads((bundle / "manifest.json").read_text())
    for info in doc["indexes"].values():  # as bundles published before checksums
        info.pop("sha256", None)
    (bundle / "manifest.json").write_text(json.dumps(doc))
    b = Bundle(bundle)
    query = b.vectors("images", [1])[0]
    b.close()
    # Image 2 now holds image 1's direction times 1e37: an inner product of 1e37.
    _overwrite_vector(bundle, "images", 2, query * 1e37)
    engine = SearchEngine(bundle, tiny)
    hits = engine.similar_images(1, k=N_IMAGES)
    assert hits and all(-1.0 <= h.score <= 1.0 for h in hits)
    assert 2 not in [h.id for h in hits]  # an impossible score is dropped, not clamped
    engine.close()
    report = verify_bundle(bundle)
    assert any("not finite unit vectors" in p and "(2)" in p for p in report.problems)


# ------------------------------------------------------- item 9: reranker of other weights


@pytest.fixture
def foreign_reranker_model(tiny_local_dir: Path, tmp_path: Path) -> Path:
    """The tiny model folder with a reranker trained (recorded) over other weights."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_local_dir, folder)
    identity = Encoder.load(f"local-dir:{folder}").identity.to_dict()
    reranker = CrossModalReranker(
        RerankerConfig(text_width=32, image_width=32, width=16, layers=1, heads=2)
    )
    reranker.save(folder / "reranker", {"encoder": {**identity, "sha256": "0" * 64}})
    return folder


def test_reranker_of_other_weights_is_disabled_with_a_warning(
    foreign_reranker_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from xmodal.web import create_app

    model = f"local-dir:{foreign_reranker_model}"
    photos = _photos(tmp_path / "photos")
    bundle = tmp_path / "bundle"
    caplog.set_level(logging.WARNING)
    out = _cli("index", str(photos), "--bundle", str(bundle), "--pretrained", model,
               "--workers", "0", "--json")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "reranking disabled" in caplog.text and "trained over" in caplog.text
    b = Bundle(bundle)  # no token cache for a reranker that will never run
    with Session(b.engine) as s:
        assert s.execute(select(func.count()).select_from(ImageTokens)).scalar() == 0
    b.close()
    caplog.clear()
    engine = SearchEngine(bundle)
    assert engine.reranker is None and "trained over" in (engine.rerank_problem or "")
    assert "reranking disabled" in caplog.text
    assert len(engine.text_to_images("shapes", k=3)) == 3
    with pytest.raises(QueryError, match=r"no usable reranker: .*trained over"):
        engine.text_to_images("shapes", rerank=True)
    app = create_app({"ENGINE": engine, "TESTING": True})  # serve starts, without reranking
    assert app.extensions["xmodal"].can_rerank is False
    assert app.test_client().get("/api/search?q=shapes").status_code == 200
    engine.close()
    out = _cli("search", "shapes", "--bundle", str(bundle), "--json")
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.output.splitlines()[-1])["results"]) == N_IMAGES
    assert "trained over" in _one_line_error(
        _cli("search", "shapes", "--bundle", str(bundle), "--rerank")
    )


# ------------------------------------------------------------------- verify's own help


def test_verify_help_lists_every_check() -> None:
    from xmodal.indexer.verify import CHECKS

    out = _cli("verify", "--help")
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    places = []
    for check in CHECKS:
        assert " ".join(check.split()) in text, check
        places.append(text.index(" ".join(check.split())))
    assert places == sorted(places), "the help lists the checks out of the order they run"
