"""The web server under hostile input: odd file names, ids no catalog can hold, a broken
manifest while serving, decompression-heavy uploads, exact upload limits, slow clients
and HEAD requests. The limits are checked against the real server (`xmodal serve`, i.e.
waitress), since Flask's test client does not show what waitress answers itself."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import socket
import struct
import threading
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_fixtures import scene
from PIL import Image
from server_fixtures import running_server
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.images import ImageDecodeError
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.search.engine import SearchEngine
from xmodal.web import create_app

CAP = 1024 * 1024  # the upload limit these tests serve with (--max-upload-mb 1)
NEWLINE_NAME = b"two\nlines.png"
UNDECODABLE_NAME = b"caf\xe9-\xff.png"  # Latin-1 bytes: not UTF-8


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_size(total: int) -> bytes:
    """A valid PNG of exactly ``total`` bytes (a private chunk pads it)."""
    small = _png(scene(5, 32))
    pad = total - len(small) - 12
    assert pad >= 0
    # After the IHDR chunk (8-byte signature + 25-byte IHDR), before the pixels.
    return small[:33] + _chunk(b"prVt", b"\x00" * pad) + small[33:]


def sparse_png(width: int = 9000, height: int = 9000) -> bytes:
    """A 1-bit PNG declaring width x height that compresses to about 10 KB."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def multipart(data: bytes, name: str = "q.png") -> tuple[bytes, str]:
    boundary = "xmodalrobustboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def tiny_encoder(tiny_checkpoint: Path) -> Encoder:
    return Encoder.load("xmodal-tiny", str(tiny_checkpoint))


def _photos(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(3):
        scene(i, 32).save(folder / f"{i}.png")
    for i, name in enumerate((NEWLINE_NAME, UNDECODABLE_NAME)):
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(_png(scene(10 + i, 32)))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Encoder) -> Path:
    """A tiny-model bundle of five images, two with awkward names."""
    root = tmp_path_factory.mktemp("robust-web")
    _photos(root / "photos")
    opts = IndexOptions(bundle=root / "bundle", roots=[root / "photos"], workers=0, progress=False)
    report = run_index(tiny_encoder, opts)
    assert report.counts["indexed"] == 5
    return root / "bundle"


@pytest.fixture(scope="module")
def app(bundle: Path, tiny_encoder: Encoder, tmp_path_factory: pytest.TempPathFactory):
    return create_app(
        {
            "ENGINE": SearchEngine(bundle, tiny_encoder),
            "TESTING": True,
            "MAX_UPLOAD_BYTES": CAP,
            "THUMBNAIL_DIR": tmp_path_factory.mktemp("robust-thumbs"),
        }
    )


@pytest.fixture
def client(app):
    return app.test_client()


def _ids_by_name(client) -> dict[str, int]:
    """Printable file name (undecodable bytes shown as U+FFFD) -> id."""
    results = client.get("/api/search?q=anything&k=10").get_json()["results"]
    return {os.path.basename(r["path"]): r["id"] for r in results}


# ---------------------------------------------------------------- item 5: names and ids


@pytest.mark.parametrize("name", [NEWLINE_NAME, UNDECODABLE_NAME])
def test_files_with_newline_or_undecodable_names_are_served(client, bundle, name) -> None:
    shown = name.decode("utf-8", "replace")
    ids = _ids_by_name(client)
    assert shown in ids, sorted(ids)
    image_id = ids[shown]
    r = client.get(f"/api/images/{image_id}/file")
    assert r.status_code == 200, r.data[:200]
    assert r.data == (bundle.parent / "photos" / os.fsdecode(name)).read_bytes()
    disposition = r.headers.get("Content-Disposition", "")
    assert "\n" not in disposition and "\r" not in disposition
    assert client.head(f"/api/images/{image_id}/file").status_code == 200
    assert client.get(f"/api/images/{image_id}/thumbnail").status_code == 200
    assert client.get(f"/images/{image_id}").status_code == 200
    assert client.get(f"/api/images/{image_id}").get_json()["id"] == image_id


ID_ROUTES = ["/images/{}", "/api/images/{}", "/api/images/{}/thumbnail"]
ID_ROUTES += ["/api/images/{}/file", "/api/images/{}/similar"]
BAD_IDS = [str(2**63), str(2**64), str(2**63 - 1), "-1", "0", "9" * 5000, "\u0663", "1e3"]


@pytest.mark.parametrize("route", ID_ROUTES)
def test_ids_no_catalog_can_hold_are_404(client, route) -> None:
    for bad in BAD_IDS:
        r = client.get(route.format(bad))
        assert r.status_code == 404, (route, bad[:30], r.status_code)
        if route.startswith("/api/"):
            assert r.is_json and r.get_json()["error"], (route, bad[:30])


# ---------------------------------------------------------------- item 8: broken manifest


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(".manifest.test.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_broken_manifest_keeps_the_last_good_generation(
    tmp_path: Path, tiny_encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        scene(i, 32).save(photos / f"{i}.png")
    opts = IndexOptions(bundle=tmp_path / "b", roots=[photos], workers=0, progress=False)
    run_index(tiny_encoder, opts)
    engine = SearchEngine(tmp_path / "b", tiny_encoder)
    app = create_app({"ENGINE": engine, "TESTING": True, "REFRESH_EVERY_S": 0})
    client = app.test_client()
    service = app.extensions["xmodal"]
    manifest = tmp_path / "b" / "manifest.json"
    good = json.loads(manifest.read_text())
    missing_index = dict(good, generation=good["generation"] + 1)
    missing_index["indexes"] = {
        kind: dict(info, file=f"{kind}.999999.faiss") if info.get("file") else info
        for kind, info in good["indexes"].items()
    }
    broken = {
        "non-UTF-8 bytes": b"\xff\xfe\x00{not json",
        "truncated JSON": manifest.read_bytes()[:40],
        "an index file that is missing": json.dumps(missing_index).encode(),
    }
    caplog.set_level(logging.WARNING)
    for what, data in broken.items():
        caplog.clear()
        _atomic_write(manifest, data)
        logged = []
        for _ in range(3):
            service.maybe_refresh(every_s=0)  # what every request runs first
            r = client.get("/api/search?q=x&k=10")
            assert r.status_code == 200, what
            assert len(r.get_json()["results"]) == 2, what
            health = client.get("/api/health").get_json()
            assert health["generation"] == 1, what
            logged.append([rec.getMessage() for rec in caplog.records if rec.levelno >= 30])
        assert health["refresh_problem"] and "keeping generation 1" in health["refresh_problem"]
        assert logged[0] and logged[0] == logged[-1], (what, logged)  # once, not per request
        ours = [rec for rec in caplog.records if rec.name == "xmodal.web.service"]
        assert len(ours) == 1 and "keeping generation 1" in ours[0].getMessage(), what
        assert "\n" not in ours[0].getMessage()
    # The indexer publishes a good generation again: it is picked up, the problem clears.
    _atomic_write(manifest, json.dumps(good).encode())
    scene(7, 32).save(photos / "7.png")
    run_index(tiny_encoder, opts)
    service.maybe_refresh(every_s=0)
    health = client.get("/api/health").get_json()
    assert health["generation"] == 2 and health["refresh_problem"] is None
    assert len(client.get("/api/search?q=x&k=10").get_json()["results"]) == 3


# ---------------------------------------------------------------- item 15: heavy uploads


def test_an_upload_declaring_huge_dimensions_is_refused_before_decoding(client) -> None:
    data = sparse_png()
    assert len(data) < 20_000
    r = client.post("/api/search/image", data={"image": (io.BytesIO(data), "bomb.png")})
    assert r.status_code == 400
    assert "9000x9000" in r.get_json()["error"] and "too large" in r.get_json()["error"]


def test_uploads_are_decoded_small() -> None:
    from xmodal.crossmodal.images import decode_upload

    big = Image.new("RGB", (3000, 2000), (200, 30, 30))
    for progressive in (False, True):
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=80, progressive=progressive)
        if progressive:
            # Progressive JPEG holds full-size coefficients whatever the draft: refused
            # above the full-decode bound, decoded small below it.
            with pytest.raises(ImageDecodeError, match="3000x2000"):
                decode_upload(buf.getvalue(), max_full_pixels=5_000_000)
        img = decode_upload(buf.getvalue(), side=256)
        assert 256 <= min(img.size) < 1000, (progressive, img.size)
        assert abs(img.size[0] / img.size[1] - 1.5) < 0.02
    small = decode_upload(_png(scene(1, 64)))
    assert small.size == (64, 64)


# ---------------------------------------------------------------- item 16 / 18: Flask side


def test_upload_limit_counts_the_file_exactly(client) -> None:
    exact = png_of_size(CAP)
    r = client.post("/api/search/image", data={"image": (io.BytesIO(exact), "q.png"), "k": "2"})
    assert r.status_code == 200, r.get_json()
    over = png_of_size(CAP + 1)
    r = client.post("/api/search/image", data={"image": (io.BytesIO(over), "q.png")})
    assert r.status_code == 413 and "1 MiB" in r.get_json()["error"]


def test_head_answers_every_get_route_like_get(client, app) -> None:
    image_id = next(iter(_ids_by_name(client).values()))
    values = {"image_id": image_id, "filename": "app.js", "key": "x" * 22}
    urls = app.url_map.bind("localhost")
    checked = 0
    for rule in app.url_map.iter_rules():
        if "GET" not in rule.methods:
            continue
        url = urls.build(rule.endpoint, {arg: values[arg] for arg in rule.arguments})
        got, head = client.get(url), client.head(url)
        assert head.status_code == got.status_code, (url, head.status_code, got.status_code)
        assert head.data == b"", url
        checked += 1
    assert checked >= 10
    assert client.head("/image").status_code == 200


# ---------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[tuple[str, int]]:
    """`xmodal serve` with its default connection limits and a 1 MiB upload limit."""
    with running_server(bundle) as address:
        yield address


def _post(server: tuple[str, int], body: bytes, content_type: str, **headers: str):
    conn = http.client.HTTPConnection(*server, timeout=60)
    try:
        conn.request(
            "POST",
            "/api/search/image",
            body=body,
            headers={"Content-Type": content_type, **headers},
        )
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.read()
    finally:
        conn.close()


def test_real_server_upload_limit_is_exact(server) -> None:
    status, kind, data = _post(server, *multipart(png_of_size(CAP)))
    assert status == 200, data[:300]
    assert json.loads(data)["results"]
    status, kind, data = _post(server, *multipart(png_of_size(CAP + 1)))
    assert status == 413 and kind == "application/json", data[:300]
    assert "1 MiB" in json.loads(data)["error"]


@pytest.mark.parametrize("size", [6 * 2**20, 24 * 2**20])
def test_real_server_answers_json_413_to_any_large_body(server, size) -> None:
    status, kind, data = _post(server, *multipart(b"\x00" * size))
    assert status == 413 and kind == "application/json", (status, kind, data[:200])
    assert "1 MiB" in json.loads(data)["error"]


def test_real_server_answers_413_before_the_body_when_asked_to(server) -> None:
    with socket.create_connection(server, timeout=30) as s:
        s.sendall(
            b"POST /api/search/image HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head, reply[:300]
    assert "1 MiB" in json.loads(body)["error"]


def test_real_server_keeps_answering_with_120_half_sent_requests(server) -> None:
    idle = []
    try:
        for _ in range(120):
            s = socket.create_connection(server, timeout=10)
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: slow")  # never finished
            idle.append(s)
        url = "http://{}:{}/api/health".format(*server)
        with urllib.request.urlopen(url, timeout=15) as r:
            assert json.load(r)["status"] == "ok"
    finally:
        for s in idle:
            s.close()


def test_silent_connections_are_closed(app) -> None:
    """What --channel-timeout sets, on waitress in a thread (no second model process)."""
    from waitress import wasyncore
    from xmodal.web.server import make_server

    server = make_server(
        app,
        host="127.0.0.1",
        port=0,
        threads=1,
        connection_limit=20,
        channel_timeout_s=1,
        cleanup_interval_s=1,
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=30) as s:
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: slow")
            assert s.recv(1024) == b""  # closed by the server, within the timeout above
    finally:
        server.task_dispatcher.shutdown()
        wasyncore.close_all(server._map)
        thread.join(10)


def test_serve_states_its_limits() -> None:
    from click.testing import CliRunner

    from xmodal.cli import main

    text = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    for option in ("--connection-limit", "--channel-timeout", "--max-upload-mb"):
        assert option in text
    assert "default: 500" in text and "default: 30" in text
