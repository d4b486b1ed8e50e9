"""The application factory: ``create_app(config)``, with the request and URL classes it
installs. Flask loads here, not in ``xmodal.web`` itself, so that the CLI reads the
web settings (``xmodal.web.DEFAULTS``) for its options without importing Flask."""

from __future__ import annotations

import io
import secrets
from pathlib import Path
from typing import Any

from flask import Flask, Request
from werkzeug.routing import IntegerConverter

from . import DEFAULTS, MAX_CATALOG_ID, UPLOAD_FORM_OVERHEAD


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
    from .uploads import UploadStore

    app = Flask(__package__)  # "xmodal.web": its templates, static files and logger
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
        uploads=UploadStore(
            app.config["UPLOAD_STORE_COUNT"],
            app.config["UPLOAD_STORE_BYTES"],
            app.config["UPLOAD_STORE_TTL_S"],
        ),
    )
    security.init_app(app)
    # A re-index while serving publishes a new generation: pick it up without a restart.
    app.before_request(lambda: app.extensions["xmodal"].maybe_refresh())
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp, url_prefix="/api")
    return app


__all__ = ["create_app"]
