"""Search filters (issue 20, part 5): the date taken in the catalog (EXIF, else mtime;
older catalogs upgraded), filters pushed down into the FAISS search (exactly k results
when k pass), and the same filters in the API, the OpenAPI document and the CLI."""

from __future__ import annotations

import io
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from image_fixtures import jpeg_bytes, scene
from PIL import Image
from sqlalchemy import select, text
from sqlalchemy.orm import Session
from xmodal.crossmodal.encoder import Encoder
from xmodal.indexer.bundle import Bundle
from xmodal.indexer.catalog import SCHEMA_VERSION, ImageRow, Meta, migrate, open_engine, sqlite_url
from xmodal.indexer.filters import search_within
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.search.engine import FilterError, ImageFilter, QueryError, SearchEngine

from xmodal.cli import main

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


# ------------------------------------------------------------------ filtered search

N = 200  # images: 2 in "rare/" (1%), half PNG, half 32 px wide, half taken before 2021


def _collection(root: Path) -> Path:
    (root / "rare").mkdir(parents=True)
    (root / "rarely").mkdir()  # a sibling whose name starts like it: never "in" rare/
    for i in range(N):
        img = scene(i, 32 if i % 4 < 2 else 24)
        folder = root / "rare" if i < 2 else root / "rarely" if i < 6 else root
        path = folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}"
        if i % 2:
            img.save(path)
        else:
            path.write_bytes(jpeg_bytes(img))
        when = _ns(datetime(2020 if i < N // 2 else 2022, 6, 1, tzinfo=UTC))
        os.utime(path, ns=(when, when))
    return root


@pytest.fixture(scope="module", params=["IDMap2,Flat", "IVF8,Flat"])
def filtered(request, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """(engine, photos root) over N images, searched exactly and through an IVF index
    (the indexer's type above 50k vectors) with nprobe 1: filters must probe further."""
    enc = Encoder.load("xmodal-tiny", str(tiny_checkpoint))
    tmp = tmp_path_factory.mktemp("filters")
    photos = _collection(tmp / "photos")
    run_index(enc, IndexOptions(bundle=tmp / "bundle", roots=[photos], workers=0, progress=False))
    engine = SearchEngine(tmp / "bundle", enc)
    if request.param.startswith("IVF"):
        flat = engine.bundle.indexes["images"]
        ids = faiss.vector_to_array(flat.id_map).astype(np.int64)
        x = np.vstack([flat.reconstruct(int(i)) for i in ids])
        ivf = faiss.index_factory(x.shape[1], request.param, faiss.METRIC_INNER_PRODUCT)
        ivf.train(x)
        ivf.add_with_ids(x, ids)
        ivf.nprobe = 1
        engine.bundle.indexes["images"] = ivf
    yield engine, photos
    engine.close()


def _names(results) -> list[str]:
    return [Path(r.path).name for r in results]


def test_one_percent_filter_returns_exactly_k(filtered) -> None:
    engine, photos = filtered
    rare = ImageFilter(folder="rare")
    got = engine.text_to_images("anything", k=2, filters=rare)
    assert sorted(_names(got)) == ["000.jpg", "001.png"]
    # The passing ids are kept for the next page (and the same filter again).
    assert engine.bundle.filter_ids(rare) is engine.bundle.filter_ids(ImageFilter(folder="rare/"))
    assert all(Path(r.path).parent == photos / "rare" for r in got)
    # Fewer pass than asked: all of them, no padding, nothing from outside.
    assert len(engine.text_to_images("anything", k=10, filters=rare)) == 2
    # The same folder by its absolute path; and a trailing slash changes nothing.
    assert (
        len(engine.text_to_images("x", k=10, filters=ImageFilter(folder=str(photos / "rare")))) == 2
    )
    assert len(engine.text_to_images("x", k=10, filters=ImageFilter(folder="rare/"))) == 2
    assert len(engine.text_to_images("x", k=10, filters=ImageFilter(folder="rarely"))) == 4


def test_fifty_percent_filter_returns_exactly_k(filtered) -> None:
    engine, _ = filtered
    for flt, check in (
        (ImageFilter(types=("png",)), lambda r: r.path.endswith(".png")),
        (ImageFilter(min_width=32), lambda r: r.width == 32),
        (ImageFilter(taken_before=datetime(2021, 1, 1)), lambda r: int(Path(r.path).stem) < N // 2),
        (ImageFilter(taken_after="2021-01-01"), lambda r: int(Path(r.path).stem) >= N // 2),
    ):
        got = engine.text_to_images("anything", k=80, filters=flt)
        assert len(got) == 80 and all(check(r) for r in got), flt
        # Exact search: the ranking is the unfiltered one with the others taken out.
        if isinstance(engine.bundle.indexes["images"], faiss.IndexIVF):
            continue
        everything = engine.text_to_images("anything", k=N)
        assert [r.id for r in got] == [r.id for r in everything if check(r)][:80]
    both = ImageFilter(types=("jpeg", "png"), min_width=32, taken_before="2021-01-01")
    assert len(engine.text_to_images("anything", k=N, filters=both)) == N // 4
    none = ImageFilter(folder="no/such/folder")
    assert engine.text_to_images("anything", k=5, filters=none) == []
    # Image -> images takes the same filters.
    image = Image.open(next(p for p in (filtered[1] / "rare").iterdir()))
    assert len(engine.image_to_images(image, k=2, filters=ImageFilter(folder="rare"))) == 2
    with pytest.raises(QueryError, match="not inside an indexed folder"):
        engine.text_to_images("x", filters=ImageFilter(folder="/elsewhere"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"type": "psd"}, "unknown image type 'psd'"),
        ({"min_width": "0"}, "min_width must be a whole number of pixels from 1 to"),
        ({"min_width": "wide"}, "min_width must be a whole number"),
        ({"taken_after": "last week"}, "taken_after must be a date like 2019-07-14"),
        ({"taken_after": "2021-01-01", "taken_before": "2020-01-01"}, "must be earlier than"),
        ({"folder": "../etc"}, "folder must lie inside an indexed folder"),
    ],
)
def test_bad_filter_values_are_refused_in_one_line(kwargs, message) -> None:
    with pytest.raises(FilterError, match=message) as err:
        ImageFilter.parse(**kwargs)
    assert "\n" not in str(err.value)


def test_parse_reads_request_strings() -> None:
    flt = ImageFilter.parse(type="JPG, png", taken_after="2019-07-14", min_width="640")
    assert flt.types == ("JPEG", "PNG") and flt.min_width == 640 and flt.active
    assert flt.to_dict() == {
        "type": ["jpeg", "png"],
        "taken_after": "2019-07-14T00:00:00+00:00",
        "min_width": 640,
    }
    assert not ImageFilter.parse(folder="", type="", taken_after="").active


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF64,Flat", "HNSW16"])
def test_search_within_finds_k_at_one_and_fifty_percent(factory: str) -> None:
    """At the FAISS level, 10k vectors: k whenever k pass, and the exact top k for the
    exact index."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10_000, 16)).astype(np.float32)
    faiss.normalize_L2(x)
    ids = np.arange(10_000, dtype=np.int64) * 7 + 3
    index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    if not isinstance(index, faiss.IndexIVF | faiss.IndexIDMap2):
        index = faiss.IndexIDMap2(index)
    index.train(x)
    index.add_with_ids(x, ids)
    if factory.startswith("IVF"):
        faiss.extract_index_ivf(index).nprobe = 1
    q = x[:5]
    for share in (0.01, 0.5):
        allowed = np.sort(rng.choice(ids, int(len(ids) * share), replace=False))
        scores, got = search_within(index, q, 50, allowed)
        assert got.shape == (5, 50) and (got >= 0).all()
        assert np.isin(got, allowed).all()
        if factory == "IDMap2,Flat":
            exact = (x[(allowed - 3) // 7] @ q.T).T
            assert np.allclose(np.sort(exact, axis=1)[:, ::-1][:, :50], scores, atol=1e-5)


# ------------------------------------------------------------------ API, OpenAPI, CLI


def _client(engine: SearchEngine, tmp_path: Path):
    from xmodal.web import create_app

    app = create_app({"ENGINE": engine, "TESTING": True, "THUMBNAIL_DIR": tmp_path / "thumbs"})
    return app.test_client()


def test_api_filters_text_and_image_search(filtered, tmp_path: Path) -> None:
    engine, photos = filtered
    client = _client(engine, tmp_path)
    r = client.get("/api/search", query_string={"q": "x", "k": 2, "folder": "rare"})
    doc = r.get_json()
    assert r.status_code == 200 and len(doc["results"]) == 2, doc
    assert doc["filters"] == {"folder": "rare"}
    assert {Path(h["path"]).parent for h in doc["results"]} == {photos / "rare"}
    query = {"q": "x", "k": 50, "type": "png", "min_width": "32", "taken_before": "2021-01-01"}
    doc = client.get("/api/search", query_string=query).get_json()
    assert len(doc["results"]) == N // 8 and all(h["width"] == 32 for h in doc["results"])
    assert doc["filters"]["type"] == ["png"] and doc["filters"]["min_width"] == 32
    # Unfiltered: no filters in force.
    assert client.get("/api/search", query_string={"q": "x"}).get_json()["filters"] == {}
    # Search by image, the filters as form fields beside the upload.
    data = (photos / "rare" / "001.png").read_bytes()
    r = client.post(
        "/api/search/image",
        data={"image": (io.BytesIO(data), "q.png"), "k": "5", "taken_after": "2021-06-01"},
    )
    doc = r.get_json()
    assert r.status_code == 200 and len(doc["results"]) == 5, doc
    assert all(int(Path(h["path"]).stem) >= N // 2 for h in doc["results"])


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"type": "psd"}, "unknown image type 'psd'"),
        ({"min_width": "-3"}, "min_width must be a whole number of pixels"),
        ({"taken_before": "yesterday"}, "taken_before must be a date like"),
        ({"folder": "/not/indexed"}, "is not inside an indexed folder"),
    ],
)
def test_api_refuses_bad_filters_with_a_400(filtered, tmp_path: Path, query, message) -> None:
    client = _client(filtered[0], tmp_path)
    r = client.get("/api/search", query_string={"q": "x", **query})
    assert r.status_code == 400 and message in r.get_json()["error"], r.get_json()


def test_api_refuses_filters_on_captions(filtered, tmp_path: Path) -> None:
    engine, photos = filtered
    client = _client(engine, tmp_path)
    data = (photos / "rare" / "001.png").read_bytes()
    r = client.post(
        "/api/search/image",
        data={"image": (io.BytesIO(data), "q.png"), "target": "captions", "folder": "rare"},
    )
    assert r.status_code == 400 and "image results only" in r.get_json()["error"]


def test_openapi_documents_the_filters(filtered, tmp_path: Path) -> None:
    doc = _client(filtered[0], tmp_path).get("/api/openapi.json").get_json()
    names = {p["name"] for p in doc["paths"]["/api/search"]["get"]["parameters"]}
    assert {"folder", "type", "taken_after", "taken_before", "min_width"} <= names
    form = doc["paths"]["/api/search/image"]["post"]["requestBody"]["content"]
    props = form["multipart/form-data"]["schema"]["properties"]
    assert {"folder", "type", "taken_after", "taken_before", "min_width"} <= set(props)
    assert "jpeg" in props["type"]["description"]
    assert "filters" in doc["components"]["schemas"]["Results"]["properties"]


def test_cli_search_filters(filtered) -> None:
    bundle = filtered[0].bundle.path
    runner = CliRunner()
    base = ["search", "anything", "--bundle", str(bundle), "--json", "-k", "5"]
    out = runner.invoke(main, [*base, "--folder", "rare"])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.output)["results"]) == 2
    out = runner.invoke(
        main, [*base, "--type", "jpg", "--after", "2021-01-01", "--min-width", "32"]
    )
    hits = json.loads(out.output)["results"]
    assert len(hits) == 5 and all(h["path"].endswith(".jpg") and h["width"] == 32 for h in hits)
    out = runner.invoke(main, [*base, "--before", "2021-01-01", "--after", "2022-01-01"])
    assert out.exit_code == 2 and "Invalid value for --before" in out.output, out.output
    out = runner.invoke(main, [*base, "--type", "psd"])
    assert out.exit_code == 2 and "must be one of" in out.output, out.output


def test_search_page_filter_row(filtered, tmp_path: Path) -> None:
    client = _client(filtered[0], tmp_path)
    page = client.get("/", query_string={"q": "x"}).get_data(as_text=True)
    assert '<details class="filters">' in page and 'name="folder"' in page  # collapsed
    page = client.get("/", query_string={"q": "x", "k": 24, "folder": "rare"})
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and html.count("/thumbnail") == 2
    assert '<details class="filters" open>' in html and 'value="rare"' in html
    # "Load more" keeps the filters.
    html = client.get("/", query_string={"q": "x", "k": 2, "type": "png"}).get_data(as_text=True)
    assert re.search(r'id="more" href="[^"]*type=png', html), html
    # A bad value is said next to its field, in the page's words.
    page = client.get("/", query_string={"q": "x", "min_width": "0"})
    html = page.get_data(as_text=True)
    assert page.status_code == 400 and 'id="min_width-error"' in html
    assert "Min width must be a whole number of pixels" in html
