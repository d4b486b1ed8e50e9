"""The Flask application: pages for people, a JSON API for programs.

``create_app(config)`` (``web.app``) follows Flask's application-factory pattern. The
config needs ``BUNDLE`` (the index bundle folder); optional keys are listed in
``DEFAULTS``, the one place the web settings' defaults are defined (the CLI's ``serve``
options and the OpenAPI document read them too). The bundle and the model are loaded
once per process and shared by every thread. Importing this package is cheap (no Flask):
``create_app`` loads on first use.

Upload limit: ``MAX_UPLOAD_BYTES`` counts the uploaded image file itself, so a file of
exactly that size passes and one byte more is a 413 (JSON under ``/api``). The request
body may be larger by ``UPLOAD_FORM_OVERHEAD`` (multipart headers and the other form
fields); Flask's ``MAX_CONTENT_LENGTH`` is set to that sum unless given.
"""

from __future__ import annotations

from typing import Any

from xmodal.crossmodal.lazy import lazy_exports

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
    "API_MAX_K": 200,  # the most results a page or API request may ask (k); <= search's MAX_K
    "DEFAULT_K": 24,  # results when a request names no k
    # Uploaded image queries kept so their results have a URL (web/uploads.py):
    "UPLOAD_STORE_COUNT": 256,  # queries kept at most
    "UPLOAD_STORE_BYTES": 64 * 2**20,  # their images' total size at most (~300 KB each)
    "UPLOAD_STORE_TTL_S": 3600.0,  # how long a link to an image search keeps working
    "SECRET_KEY": None,  # default: random per process (CSRF tokens of this process)
    "ENGINE": None,  # an already opened search.engine.SearchEngine (tests, embedding)
}

_lazy, __getattr__, _ = lazy_exports(__name__, {"create_app": "app", "make_server": "server"})
__all__ = ["DEFAULTS", "MAX_UPLOAD_BYTES", *_lazy]


def __dir__() -> list[str]:
    """The module's names, ``create_app`` included before its first use."""
    return sorted({*globals(), *_lazy})
