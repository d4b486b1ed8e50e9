"""The Flask app through its test client: every route, every bad input, the safety rules."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
from image_fixtures import bomb_png, scene
from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session
from xmodal.crossmodal.encoder import Encoder
from xmodal.indexer.catalog import ImageRow
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.search.engine import SearchEngine
from xmodal.web import create_app


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def app(demo_bundle, default_encoder: Encoder, tmp_path_factory):
    engine = SearchEngine(demo_bundle[1], default_encoder)
    return create_app(
        {
            "ENGINE": engine,
            "TESTING": True,
            "MAX_CONTENT_LENGTH": 1024 * 1024,
            "THUMBNAIL_DIR": tmp_path_factory.mktemp("thumbs"),
        }
    )


@pytest.fixture
def client(app):
    return app.test_client()


def first_image(root: Path) -> Path:
    return sorted((root / "images" / "test").glob("*.png"))[0]


def test_text_search_api(client) -> None:
    r = client.get("/api/search", query_string={"q": "a large red circle", "k": 5})
    assert r.status_code == 200 and r.is_json
    doc = r.get_json()
    assert doc["query"] == "a large red circle" and len(doc["results"]) == 5
    assert {"id", "score", "path"} <= set(doc["results"][0])
    # The shipped shapes calibration labels every result, numbers in ranking order.
    probs = [h["match_probability"] for h in doc["results"]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    assert {h["match_label"] for h in doc["results"]} <= {"match", "partial", "weak"}
    assert doc["good_match"] is (doc["results"][0]["match_label"] == "match")
    nonsense = client.get("/api/search", query_string={"q": "a photo of a dog on the beach"})
    assert nonsense.get_json()["good_match"] is False
    assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert r.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "params",
    [
        {"q": "x", "k": "0"},
        {"q": "x", "k": "1000000"},
        {"q": "x", "k": "ten"},
        {"q": "x", "k": "1.5"},
        {"q": ""},
        {"q": "   "},
        {},
        {"q": "x" * 100_000},
        {"q": "x", "min_score": "high"},
        {"q": "x", "min_score": "nan"},
        {"q": "x", "min_score": "inf"},
    ],
)
def test_bad_text_parameters_are_400(client, params) -> None:
    r = client.get("/api/search", query_string=params)
    assert r.status_code == 400
    assert r.is_json and r.get_json()["error"]


def test_image_search_api_both_targets(client, demo_bundle) -> None:
    data = first_image(demo_bundle[0]).read_bytes()
    r = client.post("/api/search/image", data={"image": (io.BytesIO(data), "q.png"), "k": "3"})
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert results[0]["path"].endswith("test_000000.png") and results[0]["score"] > 0.99
    r = client.post(
        "/api/search/image",
        data={"image": (io.BytesIO(data), "q.png"), "target": "captions", "k": "4"},
    )
    own = {
        row["caption"]
        for row in map(json.loads, (demo_bundle[0] / "test.jsonl").read_text().splitlines())
        if row["image"].endswith("test_000000.png")
    }
    assert r.get_json()["results"][0]["caption"] in own


@pytest.mark.parametrize(
    ("data", "status"),
    [
        ({}, 400),
        ({"image": (io.BytesIO(b""), "empty.png")}, 400),
        ({"image": (io.BytesIO(b"not an image at all"), "x.png")}, 400),
        ({"image": (io.BytesIO(bomb_png()), "bomb.png")}, 400),
        ({"image": (io.BytesIO(b"%PDF-1.4 fake"), "doc.pdf")}, 400),
        ({"image": (io.BytesIO(b"\x00" * (2 * 1024 * 1024)), "big.png")}, 413),
    ],
)
def test_bad_uploads(client, data, status) -> None:
    r = client.post("/api/search/image", data=data)
    assert r.status_code == status
    assert r.is_json and r.get_json()["error"]


def test_bad_image_parameters(client) -> None:
    png = png_bytes(scene(1, 32))
    for extra in ({"target": "videos"}, {"k": "0"}, {"k": "x"}):
        r = client.post("/api/search/image", data={"image": (io.BytesIO(png), "a.png"), **extra})
        assert r.status_code == 400, extra


def test_image_routes(client, app) -> None:
    hit = client.get("/api/search?q=a+blue+star&k=1").get_json()["results"][0]
    info = client.get(f"/api/images/{hit['id']}").get_json()
    assert info["path"] == hit["path"] and info["width"] == 128 and info["captions"]
    thumb = client.get(f"/api/images/{hit['id']}/thumbnail")
    assert thumb.status_code == 200 and thumb.mimetype == "image/webp"
    cached = list(Path(app.config["THUMBNAIL_DIR"]).rglob("*.webp"))
    assert len(cached) >= 1
    before = cached[0].stat().st_mtime_ns
    client.get(f"/api/images/{hit['id']}/thumbnail")
    assert cached[0].stat().st_mtime_ns == before  # made once, then served from disk
    f = client.get(f"/api/images/{hit['id']}/file")
    assert f.status_code == 200 and f.mimetype == "image/png"
    assert f.data == Path(hit["path"]).read_bytes()
    similar = client.get(f"/api/images/{hit['id']}/similar?k=4").get_json()["results"]
    assert len(similar) == 4 and hit["id"] not in {r["id"] for r in similar}
    for route in ("", "/thumbnail", "/file", "/similar"):
        r = client.get(f"/api/images/999999{route}")
        assert r.status_code == 404 and r.is_json
    assert client.get("/api/images/-1").status_code == 404
    assert client.get("/api/images/abc").status_code == 404


def test_stats_health_and_unknown_routes(client) -> None:
    stats = client.get("/api/stats").get_json()
    assert stats["counts"]["images_indexed"] == 60 and stats["model"]["name"]
    assert client.get("/api/health").get_json()["status"] == "ok"
    r = client.get("/api/nothing-here")
    assert r.status_code == 404 and r.is_json
    assert client.post("/api/search").status_code == 405


def test_openapi_describes_every_api_route(client, app) -> None:
    doc = client.get("/api/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    routed = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api"):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routed.add((path, method.lower()))
    assert documented == routed


def test_pages_render_and_escape(client) -> None:
    home = client.get("/")
    assert home.status_code == 200 and b'name="q"' in home.data
    r = client.get("/", query_string={"q": "<script>alert(1)</script> red circle"})
    assert r.status_code == 200
    assert b"<script>alert(1)" not in r.data and b"&lt;script&gt;alert(1)" in r.data
    assert r.data.count(b"/thumbnail") == 24
    assert client.get("/", query_string={"q": "x", "k": "0"}).status_code == 400
    assert client.get("/status").status_code == 200
    assert client.get("/images/999999").status_code == 404
    page = client.get("/images/1")
    assert page.status_code == 200 and b"More like this" in page.data


def test_upload_form_needs_its_csrf_token(client, demo_bundle) -> None:
    data = first_image(demo_bundle[0]).read_bytes()
    r = client.post("/image", data={"image": (io.BytesIO(data), "q.png")})
    assert r.status_code == 400
    form = client.get("/image").data.decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    r = client.post("/image", data={"image": (io.BytesIO(data), "q.png"), "csrf_token": token})
    assert r.status_code == 303 and r.headers["Location"].startswith("/image?id=")
    r = client.get(r.headers["Location"])
    assert r.status_code == 200 and b"Captions for q.png" in r.data
    r = client.post("/image", data={"image": (io.BytesIO(b"junk"), "q.png"), "csrf_token": token})
    assert r.status_code == 400 and b"not an image" in r.data


def test_random_inputs_never_give_5xx(client) -> None:
    rng = random.Random(0)
    junk = ["", " ", "-1", "0", "1e309", "NaN", "%00", "\u202e", "😀" * 300, "'\"<>&", "9" * 40]
    for _ in range(150):
        params = {key: rng.choice(junk) for key in rng.sample(["q", "k", "min_score", "target"], 3)}
        assert client.get("/api/search", query_string=params).status_code < 500, params
        assert client.get("/", query_string=params).status_code < 500, params
        r = client.post(
            "/api/search/image",
            data={"image": (io.BytesIO(rng.randbytes(rng.randint(0, 300))), "r.bin"), **params},
        )
        assert r.status_code < 500, params


@pytest.fixture(scope="module")
def hostile(tiny_checkpoint: Path, tmp_path_factory):
    """A tiny-model bundle with HTML in a file name and a caption, and a file that later
    becomes a symlink leading out of the indexed folder."""
    root = tmp_path_factory.mktemp("hostile")
    photos = root / "photos"
    photos.mkdir()
    evil_name = '<img src=x onerror="alert(1)">.png'
    scene(1, 32).save(photos / evil_name)
    scene(2, 32).save(photos / "plain.png")
    scene(3, 32).save(photos / "swapped.png")
    (root / "caps.jsonl").write_text(
        json.dumps({"image": f"photos/{evil_name}", "caption": '<script>alert("x")</script>'})
        + "\n"
    )
    enc = Encoder.load("xmodal-tiny", str(tiny_checkpoint))
    run_index(
        enc,
        IndexOptions(
            bundle=root / "bundle",
            roots=[photos],
            captions=[root / "caps.jsonl"],
            workers=0,
            progress=False,
        ),
    )
    app = create_app(
        {
            "ENGINE": SearchEngine(root / "bundle", enc),
            "TESTING": True,
            "THUMBNAIL_DIR": root / "thumbs",
        }
    )
    return root, app


def test_file_names_and_captions_are_escaped(hostile) -> None:
    _, app = hostile
    client = app.test_client()
    results = client.get("/api/search?q=anything&k=10").get_json()["results"]
    evil = next(r for r in results if "onerror" in r["path"])
    page = client.get(f"/images/{evil['id']}").data
    assert b'<img src=x onerror="alert(1)">' not in page
    assert b"&lt;img src=x onerror=" in page
    assert b'<script>alert("x")</script>' not in page
    assert b"&lt;script&gt;alert(" in page
    grid = client.get("/?q=anything").data
    assert b'onerror="alert(1)"' not in grid


def test_nothing_outside_the_indexed_folders_is_served(hostile) -> None:
    root, app = hostile
    client = app.test_client()
    results = client.get("/api/search?q=anything&k=10").get_json()["results"]
    by_name = {os.path.basename(r["path"]): r["id"] for r in results}
    # A file replaced by a symlink that leads out of the root after indexing.
    outside = root / "outside.png"
    shutil.copy(root / "photos" / "swapped.png", outside)
    (root / "photos" / "swapped.png").unlink()
    (root / "photos" / "swapped.png").symlink_to(outside)
    for route in ("/file", "/thumbnail"):
        r = client.get(f"/api/images/{by_name['swapped.png']}{route}")
        assert r.status_code == 404 and "outside" in r.get_json()["error"]
    # A catalog path that climbs out of the root.
    engine = app.extensions["xmodal"].bundle.engine
    with Session(engine) as s, s.begin():
        s.execute(
            update(ImageRow)
            .where(ImageRow.id == by_name["plain.png"])
            .values(relpath=b"../../../../etc/hostname")
        )
    assert client.get(f"/api/images/{by_name['plain.png']}/file").status_code == 404


def test_a_new_generation_is_served_without_restart(tiny_checkpoint: Path, tmp_path: Path):
    enc = Encoder.load("xmodal-tiny", str(tiny_checkpoint))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        scene(i, 32).save(photos / f"{i}.png")
    opts = IndexOptions(bundle=tmp_path / "b", roots=[photos], workers=0, progress=False)
    run_index(enc, opts)
    app = create_app({"ENGINE": SearchEngine(tmp_path / "b", enc), "TESTING": True})
    client = app.test_client()
    assert len(client.get("/api/search?q=x&k=10").get_json()["results"]) == 2
    for i in range(2, 5):
        scene(i, 32).save(photos / f"{i}.png")
    run_index(enc, opts)  # a re-index while serving
    old = app.config["ENGINE"].bundle
    assert old.engine.pool.checkedin() >= 1  # the first search's pooled connection
    app.extensions["xmodal"].maybe_refresh(every_s=0)
    assert len(client.get("/api/search?q=x&k=10").get_json()["results"]) == 5
    assert client.get("/api/health").get_json()["generation"] == 2
    assert old.engine.pool.checkedin() == 0  # the old generation's pool was closed
    run_index(enc, opts)  # nothing changed: nothing to reload
    app.extensions["xmodal"].maybe_refresh(every_s=0)
    assert client.get("/api/health").get_json()["generation"] == 2


@pytest.mark.parametrize("rerank", ["0", "1"])
def test_pages_join_into_one_ranking(client, rerank) -> None:
    def page(k: int, offset: int) -> dict:
        q = {"q": "a small green star", "k": k, "offset": offset, "rerank": rerank}
        r = client.get("/api/search", query_string=q)
        assert r.status_code == 200, r.get_json()
        return r.get_json()

    whole = page(30, 0)
    first, second, third = page(10, 0), page(10, 10), page(10, 20)
    joined = [x["id"] for d in (first, second, third) for x in d["results"]]
    assert joined == [x["id"] for x in whole["results"]]
    assert (first["offset"], first["next_offset"], second["next_offset"]) == (0, 10, 20)
    last = page(10, 55)  # the bundle holds 60 images
    assert len(last["results"]) == 5 and last["next_offset"] is None
    assert page(10, 60)["results"] == []


def test_similar_images_pages(client, demo_bundle) -> None:
    image_id = client.get("/api/search", query_string={"q": "a red circle", "k": 1}).get_json()[
        "results"
    ][0]["id"]
    url = f"/api/images/{image_id}/similar"
    whole = client.get(url, query_string={"k": 8}).get_json()["results"]
    tail = client.get(url, query_string={"k": 4, "offset": 4}).get_json()
    assert [x["id"] for x in tail["results"]] == [x["id"] for x in whole[4:]]
    assert tail["next_offset"] == 8


@pytest.mark.parametrize("offset", ["-1", "two", "1.5", "991"])
def test_bad_offsets_are_400(client, offset) -> None:
    r = client.get("/api/search", query_string={"q": "a star", "k": 10, "offset": offset})
    assert r.status_code == 400 and "offset" in r.get_json()["error"]


def test_load_more_is_a_link_without_javascript(client) -> None:
    first = client.get("/", query_string={"q": "a blue heart", "rerank": "0"})
    html = first.get_data(as_text=True)
    assert html.count('class="card"') == 24
    link = html.split('id="more" href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    assert "offset=24" in link and "rerank=0" in link
    second = client.get(link).get_data(as_text=True)
    assert "from result 25" in second and second.count('class="card"') == 24
    third = client.get(link.replace("offset=24", "offset=48")).get_data(as_text=True)
    assert third.count('class="card"') == 12 and 'id="more"' not in third


def test_cards_carry_the_linked_caption_closest_to_the_query(client, demo_bundle) -> None:
    doc = client.get("/api/search", query_string={"q": "a large red circle", "k": 6}).get_json()
    root = demo_bundle[0]
    captions: dict[str, list[str]] = {}
    for line in (root / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        captions.setdefault(row["image"].rsplit("/", 1)[-1], []).append(row["caption"])
    for r in doc["results"]:
        # one of the image's own captions, never another image's
        assert r["best_caption"] in captions[r["path"].rsplit("/", 1)[-1]]
    html = client.get("/", query_string={"q": "a large red circle", "k": 6}).get_data(as_text=True)
    first = doc["results"][0]
    assert f'alt="{first["best_caption"]}"' in html  # the alt text is the caption
    assert first["path"].rsplit("/", 1)[-1] not in html  # file names stay in the detail view


def test_detail_page_shows_the_path_inside_its_root(client, demo_bundle) -> None:
    doc = client.get("/api/search", query_string={"q": "a star", "k": 1}).get_json()
    hit = doc["results"][0]
    info = client.get(f"/api/images/{hit['id']}").get_json()
    assert info["relpath"] == hit["path"].rsplit("/", 1)[-1]
    html = client.get(f"/images/{hit['id']}").get_data(as_text=True)
    assert info["relpath"] in html and str(demo_bundle[0]) not in html


def _upload(client, data: bytes, name: str = "q.png", **form) -> str:
    page = client.get("/image").data.decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    fields = {"image": (io.BytesIO(data), name), "csrf_token": token, **form}
    r = client.post("/image", data=fields)
    assert r.status_code == 303, r.data[:300]
    return r.headers["Location"]


def test_search_by_image_has_a_url_that_reloads(client, demo_bundle) -> None:
    data = first_image(demo_bundle[0]).read_bytes()
    url = _upload(client, data, k="6")
    first, again = client.get(url), client.get(url)
    assert first.status_code == again.status_code == 200
    assert first.data == again.data  # a reload (or a shared link) shows the same results
    html = first.get_data(as_text=True)
    assert html.count('class="card"') == 6 and "Captions for q.png" in html
    query_src = re.search(r'<figure class="query"><img src="([^"]+)"', html).group(1)
    shown = client.get(query_src)
    assert shown.status_code == 200 and shown.mimetype == "image/png"
    assert Image.open(io.BytesIO(shown.data)).size == Image.open(io.BytesIO(data)).size
    # the next page of images and of captions
    more = re.search(r'id="more" href="([^"]+)"', html).group(1).replace("&amp;", "&")
    assert "offset=6" in more and client.get(more).get_data(as_text=True).count('class="card"') == 6
    # another client with the link sees the same; an unknown id says it expired
    key = url.split("id=", 1)[1].split("&", 1)[0]
    assert len(key) >= 22
    r = client.get("/image", query_string={"id": "x" * 22})
    assert r.status_code == 404 and b"expired" in r.data
    assert client.get("/image/query/" + "x" * 22).status_code == 404


def test_upload_store_is_bounded_in_count_bytes_and_age() -> None:
    from xmodal.web.uploads import UploadExpired, UploadStore

    img = Image.new("RGB", (2000, 1000), (10, 200, 30))
    store = UploadStore(max_count=3, max_bytes=10**9, ttl_s=3600)
    keys = [store.put(img, f"{i}.png") for i in range(5)]
    assert len(store) == 3 and len(set(keys)) == 5
    with pytest.raises(UploadExpired):
        store.get(keys[0])  # the oldest went first
    stored = store.get(keys[4])
    assert stored.filename == "4.png" and min(stored.image().size) == 512  # kept small
    one = len(stored.png)
    by_bytes = UploadStore(max_count=100, max_bytes=2 * one, ttl_s=3600)
    for i in range(4):
        by_bytes.put(img, f"{i}.png")
    assert len(by_bytes) == 2 and by_bytes.bytes <= 2 * one
    aged = UploadStore(max_count=100, max_bytes=10**9, ttl_s=0.0)
    key = aged.put(img, "old.png")
    with pytest.raises(UploadExpired):
        aged.get(key)


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"k": "0"}, "k", "Results must be a whole number from 1 to 200."),
        ({"k": "lots"}, "k", "Results must be a whole number from 1 to 200."),
        ({"min_score": "high"}, "min_score", "Min similarity must be a number, such as 0.25."),
    ],
)
def test_page_errors_are_next_to_their_field_in_plain_words(client, params, field, words):
    r = client.get("/", query_string={"q": "a red circle", **params})
    html = r.get_data(as_text=True)
    assert r.status_code == 400 and words in html
    assert f'id="{field}-error"' in html and f'aria-describedby="{field}-error"' in html
    assert "k must" not in html and "min_score" not in html.split('id="' + field + '-error"')[1]


def test_every_page_has_a_heading_and_a_favicon(client, demo_bundle) -> None:
    hit = client.get("/api/search", query_string={"q": "a star", "k": 1}).get_json()["results"][0]
    for url in ("/", "/?q=a+star", "/image", f"/images/{hit['id']}", "/status", "/nowhere"):
        assert "<h1" in client.get(url).get_data(as_text=True), url
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.mimetype == "image/svg+xml"
