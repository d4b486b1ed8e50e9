"""One error root and every limit in one place (issue 17): each project exception is an
XmodalError, the CLI prints one of them as one line, the web app answers a catalog that
cannot be read with a JSON 503, and the OpenAPI document states the limits the routes
really enforce."""

from __future__ import annotations

import importlib
import inspect
import io
from pathlib import Path

import pytest
from click.testing import CliRunner
from image_fixtures import scene
from sqlite_fixtures import checkpoint, garble_table_page
from test_layering import FOLDERS as PACKAGES
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import XmodalError
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.search.engine import SearchEngine
from xmodal.search.limits import DEFAULT_RERANK_K, MAX_QUERY_CHARS, MAX_RERANK_K
from xmodal.web import DEFAULTS, MAX_CATALOG_ID, create_app
from xmodal.web.service import SearchService

from xmodal.cli import main

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 6
DEFAULT_K = 3  # the app's k default here (fewer than the images: the count shows it)
MAX_UPLOAD = 50_000  # the app's upload limit here (a small one, to send it exactly)


def _project_exceptions() -> list[type[BaseException]]:
    """Every public exception class defined in one of our modules."""
    found = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.stem == "__main__":
                continue
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            module = importlib.import_module(name)
            for attr, obj in vars(module).items():
                if (
                    inspect.isclass(obj)
                    and issubclass(obj, BaseException)
                    and obj.__module__ == name
                    and not attr.startswith("_")
                ):
                    found.append(obj)
    return found


def test_every_project_exception_is_an_xmodal_error() -> None:
    classes = _project_exceptions()
    names = {cls.__name__ for cls in classes}
    # The ones the issue counts, at least: a walk that finds none proves nothing.
    assert {"ModelError", "BundleError", "CatalogError", "QueryError", "NotServable"} <= names
    assert len(classes) >= 17, sorted(names)
    assert [c.__name__ for c in classes if not issubclass(c, XmodalError)] == []
    # Nothing of ours shares SQLAlchemy's name (sqlalchemy.exc.IntegrityError).
    assert "IntegrityError" not in names


# ---------------------------------------------------------------- a small real bundle


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path) -> Encoder:
    return Encoder.load("xmodal-tiny", str(tiny_checkpoint))


def _bundle(enc: Encoder, where: Path) -> Path:
    photos = where / "photos"
    photos.mkdir(parents=True)
    for i in range(N_IMAGES):
        scene(i, 24).save(photos / f"{i}.png")
    captions = where / "captions.txt"
    captions.write_text("".join(f"caption {i} of some shapes\n" for i in range(8)))
    bundle = where / "bundle"
    opts = IndexOptions(
        bundle=bundle, roots=[photos], captions=[captions], workers=0, progress=False
    )
    run_index(enc, opts)
    return bundle


@pytest.fixture(scope="module")
def app(tiny: Encoder, tmp_path_factory: pytest.TempPathFactory):
    bundle = _bundle(tiny, tmp_path_factory.mktemp("limits"))
    return create_app(
        {
            "ENGINE": SearchEngine(bundle, tiny),
            "TESTING": True,
            "DEFAULT_K": DEFAULT_K,
            "MAX_UPLOAD_BYTES": MAX_UPLOAD,
            "THUMBNAIL_DIR": tmp_path_factory.mktemp("thumbs"),
        }
    )


@pytest.fixture
def client(app):
    return app.test_client()


def _png(size: int | None = None) -> bytes:
    buf = io.BytesIO()
    scene(1, 32).save(buf, "PNG")
    data = buf.getvalue()
    # Bytes after the PNG's end are ignored by decoders: a valid image of any size.
    return data if size is None else data + b"\0" * (size - len(data))


def _params(doc: dict, path: str, method: str) -> dict[str, dict]:
    """The schema of each parameter of a route (query parameters or form fields)."""
    op = doc["paths"][path][method]
    out = {p["name"]: p["schema"] for p in op.get("parameters", [])}
    body = op.get("requestBody", {}).get("content", {}).get("multipart/form-data")
    if body:
        out.update(body["schema"]["properties"])
    return out


# ------------------------------------------------ the OpenAPI limits are the enforced ones


def test_openapi_limits_are_the_routes_limits(app, client) -> None:
    doc = client.get("/api/openapi.json").get_json()
    text = _params(doc, "/api/search", "get")
    image = _params(doc, "/api/search/image", "post")
    similar = _params(doc, "/api/images/{image_id}/similar", "get")
    # From the one place each is defined: the app's settings and the engine's limits.
    for params in (text, image, similar):
        assert params["k"]["minimum"] == 1
        assert params["k"]["maximum"] == app.config["API_MAX_K"] == DEFAULTS["API_MAX_K"]
        assert params["k"]["default"] == DEFAULT_K
    for params in (text, image):
        assert params["rerank_k"]["minimum"] == 1
        assert params["rerank_k"]["maximum"] == MAX_RERANK_K
        assert params["rerank_k"]["default"] == DEFAULT_RERANK_K
    assert text["q"]["maxLength"] == MAX_QUERY_CHARS and text["q"]["minLength"] == 1
    assert image["image"]["maxLength"] == MAX_UPLOAD
    assert similar["image_id"]["maximum"] == MAX_CATALOG_ID
    # The defaults the routes fall back on are the documented ones.
    for fn in (SearchEngine.text_to_images, SearchService.text_to_images):
        assert inspect.signature(fn).parameters["rerank_k"].default == DEFAULT_RERANK_K

    def search(**params):
        return client.get("/api/search", query_string={"q": "shapes", **params})

    def by_image(data: bytes | None = None, **fields):
        form = {"image": (io.BytesIO(data or _png()), "q.png"), **fields}
        return client.post("/api/search/image", data=form)

    hit = search(k=1).get_json()["results"][0]["id"]

    def like(**params):
        return client.get(f"/api/images/{hit}/similar", query_string=params)

    assert len(search().get_json()["results"]) == text["k"]["default"]
    assert len(by_image().get_json()["results"]) == image["k"]["default"]
    for route, schema in ((search, text), (by_image, image), (like, similar)):
        top = schema["k"]["maximum"]
        assert route(k=top).status_code == 200, route
        assert route(k=top + 1).status_code == 400, route
        assert route(k=schema["k"]["minimum"] - 1).status_code == 400, route
    for route, schema in ((search, text), (by_image, image)):
        top = schema["rerank_k"]["maximum"]
        assert route(rerank_k=top).status_code == 200, route
        assert route(rerank_k=top + 1).status_code == 400, route
        assert route(rerank_k=schema["rerank_k"]["minimum"] - 1).status_code == 400, route
    longest = text["q"]["maxLength"]
    assert client.get("/api/search", query_string={"q": "x" * longest}).status_code == 200
    r = client.get("/api/search", query_string={"q": "x" * (longest + 1)})
    assert r.status_code == 400 and str(longest) in r.get_json()["error"]
    cap = image["image"]["maxLength"]
    assert by_image(_png(cap)).status_code == 200  # exactly the limit passes
    assert by_image(_png(cap + 1)).status_code == 413
    assert client.get(f"/api/images/{similar['image_id']['maximum'] + 1}").status_code == 404


def test_pages_take_k_as_the_api_does(app, client) -> None:
    top = app.config["API_MAX_K"]
    assert client.get("/", query_string={"q": "shapes", "k": top}).status_code == 200
    assert client.get("/", query_string={"q": "shapes", "k": top + 1}).status_code == 400


# ------------------------------------------------------------ the CLI: one line, no trace


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_cli_prints_an_xmodal_error_as_one_line(tiny: Encoder, tmp_path: Path) -> None:
    bundle = _bundle(tiny, tmp_path)
    runner = CliRunner()
    long_query = "x" * (MAX_QUERY_CHARS + 1)
    line = _one_line_error(runner.invoke(main, ["search", long_query, "--bundle", str(bundle)]))
    assert f"longer than {MAX_QUERY_CHARS} characters" in line
    # A malformed manifest, with a control character that must not break the line.
    (bundle / "manifest.json").write_text('{"format_version": 1,\n\x1b[2J')
    for command in (["info"], ["search", "shapes"], ["verify"]):
        result = runner.invoke(main, [*command, "--bundle", str(bundle)])
        if command == ["verify"]:  # verify lists problems itself, one per line
            assert result.exit_code == 1 and "Traceback" not in result.output
            continue
        assert "malformed manifest" in _one_line_error(result)
        assert "\x1b" not in result.output


# ------------------------------------------------- a catalog that cannot be read: JSON 503


def test_unreadable_catalog_at_query_time_is_a_json_503(tiny: Encoder, tmp_path: Path) -> None:
    bundle = _bundle(tiny, tmp_path)
    db = bundle / "catalog.sqlite"
    checkpoint(db)  # the WAL into the file: its damage is what is read
    app = create_app({"ENGINE": SearchEngine(bundle, tiny), "TESTING": True})
    client = app.test_client()
    garble_table_page(db, "images")  # after the app opened the bundle
    r = client.get("/api/search", query_string={"q": "shapes"})
    assert r.status_code == 503 and r.is_json, r.data[:200]
    doc = r.get_json()
    assert doc["status"] == 503 and "cannot be read" in doc["error"]
    assert "\n" not in doc["error"]
    r = client.get("/api/images/1")
    assert r.status_code == 503 and r.is_json
    page = client.get("/", query_string={"q": "shapes"})
    assert page.status_code == 503 and page.mimetype == "text/html"
    assert b"cannot be read" in page.data
