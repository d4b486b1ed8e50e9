"""The Flask application: pages for people, a JSON API for programs.

``create_app(config)`` follows Flask's application-factory pattern. The config needs
``BUNDLE`` (the index bundle folder); optional keys are listed in ``DEFAULTS``. The
bundle and the model are loaded once per process and shared by every thread.

Upload limit: ``MAX_UPLOAD_BYTES`` counts the uploaded image file itself, so a file of
exactly that size passes and one byte more is a 413 (JSON under ``/api``). The request
body may be larger by ``UPLOAD_FORM_OVERHEAD`` (multipart headers and the other form
fields); Flask's ``MAX_CONTENT_LENGTH`` is set to that sum unless given.
"""

from __future__ import annotations

import io
import secrets
from pathlib import Path
from typing import Any

from flask import Flask, Request
from werkzeug.routing import IntegerConverter

MAX_UPLOAD_BYTES = 16 * 2**20  # the largest uploaded image file; one byte more is a 413
UPLOAD_FORM_OVERHEAD = 64 * 2**10  # room in the body for multipart headers and fields
# Upload decodes running at once: each holds up to MAX_UPLOAD_PIXELS of pixels (~70 MB).
UPLOAD_DECODE_SLOTS = 2
REFRESH_EVERY_S = 2.0  # how often requests look for a newly published generation
MAX_CATALOG_ID = 2**63 - 1  # SQLite's INTEGER PRIMARY KEY range; larger ids cannot exist

DEFAULTS: dict[str, Any] = {
    "BUNDLE": None,
    "DB_URL": None,
    "MAX_UPLOAD_BYTES": MAX_UPLOAD_BYTES,
    "MAX_CONTENT_LENGTH": None,  # the whole body; default MAX_UPLOAD_BYTES + form overhead
    "UPLOAD_DECODE_SLOTS": UPLOAD_DECODE_SLOTS,  # upload decodes running at once
    "REFRESH_EVERY_S": REFRESH_EVERY_S,  # how often requests look for a new generation
    "THUMBNAIL_DIR": None,  # default: BUNDLE/thumbnails
    "TEXT_CACHE_SIZE": 2048,
    "API_MAX_K": 200,
    "DEFAULT_K": 24,
    "SECRET_KEY": None,  # default: random per process (CSRF tokens of this process)
    "ENGINE": None,  # an already opened search.engine.SearchEngine (tests, embedding)
}


class CatalogIdConverter(IntegerConverter):
    """``<id:name>``: a catalog id, 1 to 2**63-1; anything else (too large, negative,
    non-ASCII digits) matches no route and is a 404, never an error deeper down."""

    regex = r"[0-9]{1,19}"

    def __init__(self, map: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(map, min=1, max=MAX_CATALOG_ID)


class InMemoryRequest(Request):
    """Uploads stay in memory (bounded by MAX_CONTENT_LENGTH), never in a temp file."""

    def _get_file_stream(
        self, total_content_length, content_type, filename=None, content_length=None
    ):  # type: ignore[override]
        return io.BytesIO()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app for one bundle."""
    from xmodal.search.engine import SearchEngine

    from . import api, pages, security
    from .service import SearchService

    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.from_mapping(DEFAULTS)
    app.config.update(config or {})
    if app.config["MAX_CONTENT_LENGTH"] is None:
        app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_UPLOAD_BYTES"] + UPLOAD_FORM_OVERHEAD
    app.url_map.converters["id"] = CatalogIdConverter
    if not app.config["SECRET_KEY"]:
        app.config["SECRET_KEY"] = secrets.token_hex(32)
    engine = app.config["ENGINE"]
    if engine is None:
        if not app.config["BUNDLE"]:
            raise ValueError("create_app needs BUNDLE (an index bundle folder)")
        engine = SearchEngine(Path(app.config["BUNDLE"]), db_url=app.config["DB_URL"])
    thumbs = app.config["THUMBNAIL_DIR"]
    app.extensions["xmodal"] = SearchService(
        engine,
        Path(thumbs) if thumbs else None,
        app.config["TEXT_CACHE_SIZE"],
        decode_slots=app.config["UPLOAD_DECODE_SLOTS"],
        refresh_every_s=app.config["REFRESH_EVERY_S"],
    )
    security.init_app(app)
    # A re-index while serving publishes a new generation: pick it up without a restart.
    app.before_request(lambda: app.extensions["xmodal"].maybe_refresh())
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp, url_prefix="/api")
    return app
