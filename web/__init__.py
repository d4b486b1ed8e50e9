"""The Flask application: pages for people, a JSON API for programs.

``create_app(config)`` follows Flask's application-factory pattern. The config needs
``BUNDLE`` (the index bundle folder); optional keys are listed in ``DEFAULTS``. The
bundle and the model are loaded once per process and shared by every thread.
"""

from __future__ import annotations

import io
import secrets
from pathlib import Path
from typing import Any

from flask import Flask, Request

DEFAULTS: dict[str, Any] = {
    "BUNDLE": None,
    "DB_URL": None,
    "MAX_CONTENT_LENGTH": 16 * 1024 * 1024,  # uploads above this get 413
    "THUMBNAIL_DIR": None,  # default: BUNDLE/thumbnails
    "TEXT_CACHE_SIZE": 2048,
    "API_MAX_K": 200,
    "DEFAULT_K": 24,
    "SECRET_KEY": None,  # default: random per process (CSRF tokens of this process)
    "ENGINE": None,  # an already opened search.engine.SearchEngine (tests, embedding)
}


class InMemoryRequest(Request):
    """Uploads stay in memory (bounded by MAX_CONTENT_LENGTH), never in a temp file."""

    def _get_file_stream(
        self, total_content_length, content_type, filename=None, content_length=None
    ):  # type: ignore[override]
        return io.BytesIO()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app for one bundle."""
    from search.engine import SearchEngine

    from . import api, pages, security
    from .service import SearchService

    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.from_mapping(DEFAULTS)
    app.config.update(config or {})
    if not app.config["SECRET_KEY"]:
        app.config["SECRET_KEY"] = secrets.token_hex(32)
    engine = app.config["ENGINE"]
    if engine is None:
        if not app.config["BUNDLE"]:
            raise ValueError("create_app needs BUNDLE (an index bundle folder)")
        engine = SearchEngine(Path(app.config["BUNDLE"]), db_url=app.config["DB_URL"])
    thumbs = app.config["THUMBNAIL_DIR"]
    app.extensions["xmodal"] = SearchService(
        engine, Path(thumbs) if thumbs else None, app.config["TEXT_CACHE_SIZE"]
    )
    security.init_app(app)
    # A re-index while serving publishes a new generation: pick it up without a restart.
    app.before_request(lambda: app.extensions["xmodal"].maybe_refresh())
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp, url_prefix="/api")
    return app
