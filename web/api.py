"""The JSON API (`/api`): search both ways, image facts and files, stats, health.

Every bad parameter is a 400 with a message naming it; unknown ids (and numbers no
catalog id can be) are 404; uploads over the size limit are 413; a bundle or catalog
that cannot be read (a damaged page, a lost database server) is a 503; errors are JSON
objects ``{"error": "...", "status": N}``. HEAD answers every GET route, without the body.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, send_file
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from xmodal.crossmodal.errors import XmodalError
from xmodal.crossmodal.images import ImageDecodeError
from xmodal.search.engine import (
    DEFAULT_RERANK_K,
    MAX_K,
    MAX_RERANK_K,
    BundleError,
    CatalogError,
    FilterError,
    ImageFilter,
    QueryError,
)
from xmodal.search.matching import good_match

from .openapi import openapi_document
from .service import NotServable
from .service import current_service as service

bp = Blueprint("api", __name__)
log = logging.getLogger(__name__)


class BadParameter(XmodalError):
    """A request parameter is missing or invalid.

    The message names the parameter (for programs); ``param`` and ``problem`` ("must be a
    whole number from 1 to 200") let a page say it next to its field, in its own words.
    """

    def __init__(self, message: str, param: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.param = param
        self.problem = problem


def int_param(name: str, default: int, low: int, high: int) -> int:
    """An integer parameter within [low, high]."""
    raw = request.values.get(name)
    if raw is None or raw == "":
        return default
    problem = f"must be a whole number from {low} to {high}"
    try:
        value = int(raw)
    except ValueError:
        raise BadParameter(f"{name} {problem}, got {raw[:40]!r}", name, problem) from None
    if not low <= value <= high:
        raise BadParameter(f"{name} {problem}, got {value}", name, problem)
    return value


def float_param(name: str) -> float | None:
    """An optional finite number."""
    raw = request.values.get(name)
    if raw is None or raw == "":
        return None
    problem = "must be a number, such as 0.25"
    try:
        value = float(raw)
    except ValueError:
        raise BadParameter(f"{name} {problem}, got {raw[:40]!r}", name, problem) from None
    if not math.isfinite(value):
        raise BadParameter(f"{name} must be a finite number", name, problem)
    return value


def choice_param(name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of a few values."""
    value = request.values.get(name) or default
    if value not in choices:
        raise BadParameter(f"{name} must be one of {', '.join(choices)}, got {value[:40]!r}")
    return value


def rerank_params() -> tuple[bool | None, int]:
    """(rerank, rerank_k): rerank=1/0 (default: on when the model has a reranker)."""
    raw = request.values.get("rerank")
    rerank: bool | None = None
    if raw not in (None, ""):
        if raw.lower() not in ("1", "0", "true", "false", "on", "off"):
            raise BadParameter(f"rerank must be 1 or 0, got {raw[:40]!r}")
        rerank = raw.lower() in ("1", "true", "on")
    if rerank and not service().can_rerank:
        raise BadParameter("this model has no reranker")
    return rerank, int_param("rerank_k", DEFAULT_RERANK_K, 1, MAX_RERANK_K)


# The filter parameters, as the API, the page and the OpenAPI document name them.
FILTER_PARAMS = ("folder", "type", "taken_after", "taken_before", "min_width")


def filter_params() -> ImageFilter:
    """The search filters of a request (folder=, type=, taken_after=, taken_before=,
    min_width=); none given: a filter that lets everything through."""
    try:
        return ImageFilter.parse(**{name: request.values.get(name) for name in FILTER_PARAMS})
    except FilterError as exc:
        raise BadParameter(str(exc), exc.param, exc.problem) from None


def k_param() -> int:
    """Number of results wanted (pages and API alike): 1 to the app's API_MAX_K."""
    return int_param("k", current_app.config["DEFAULT_K"], 1, current_app.config["API_MAX_K"])


def offset_param(k: int) -> int:
    """Results to skip (the next page): 0 up to what keeps offset + k within search's MAX_K."""
    return int_param("offset", 0, 0, MAX_K - k)


def next_offset(offset: int, k: int, results: list) -> int | None:
    """The offset of the next page, or None when this page is the last one."""
    following = offset + len(results)
    return following if len(results) == k and following + 1 <= MAX_K else None


def upload_limit_message(max_upload_bytes: int) -> str:
    """What a 413 says, here and from the HTTP server in front (web/server.py)."""
    return (
        f"the upload is larger than the {max_upload_bytes / 2**20:g} MiB limit "
        f"({max_upload_bytes:,} bytes for the image file)"
    )


def read_upload(upload: FileStorage) -> bytes:
    """The uploaded file's bytes: 400 when empty, 413 above MAX_UPLOAD_BYTES."""
    cap = current_app.config["MAX_UPLOAD_BYTES"]
    data = upload.read(cap + 1)
    if not data:
        raise BadParameter("the uploaded image is empty")
    if len(data) > cap:
        raise RequestEntityTooLarge(upload_limit_message(cap))
    return data


def http_error_message(exc: HTTPException) -> str:
    """The message of an HTTP error; a body over Flask's cap names the upload limit."""
    if isinstance(exc, RequestEntityTooLarge) and exc.description == type(exc).description:
        return upload_limit_message(current_app.config["MAX_UPLOAD_BYTES"])
    return exc.description or exc.name


def error(status: int, message: str) -> tuple[Response, int]:
    """A JSON error response."""
    return jsonify(error=message, status=status), status


def error_status(exc: XmodalError) -> int:
    """The HTTP status of one of our errors: 400 for a bad request, 404 for an id with
    nothing to serve, 503 for a bundle or catalog that cannot be read now, else 500.
    Server-side failures (5xx) are logged: the operator has something to repair."""
    if isinstance(exc, BadParameter | QueryError | ImageDecodeError):
        return 400
    if isinstance(exc, NotServable):
        return 404
    status = 503 if isinstance(exc, BundleError | CatalogError) else 500
    log.error("%s %r: %s", request.method, request.path, exc)
    return status


@bp.errorhandler(XmodalError)
def _ours(exc: XmodalError) -> tuple[Response, int]:
    return error(error_status(exc), str(exc))


@bp.errorhandler(HTTPException)
def _http(exc: HTTPException) -> tuple[Response, int]:
    return error(exc.code or 500, http_error_message(exc))


def results_json(
    query: Any, results: list, offset: int = 0, k: int | None = None, **extra: Any
) -> Response:
    """The result envelope shared by the search routes; ``next_offset`` asks for the next
    page (null on the last)."""
    more = next_offset(offset, k, results) if k is not None else None
    return jsonify(
        query=query,
        offset=offset,
        next_offset=more,
        **extra,
        results=[r.to_dict() for r in results],
    )


@bp.get("/search")
def search_text() -> Response:
    """Text to images."""
    q = request.args.get("q", "")
    k = k_param()
    offset = offset_param(k)
    min_score = float_param("min_score")
    rerank, rerank_k = rerank_params()
    filters = filter_params()
    results = service().text_to_images(q, k, min_score, rerank, rerank_k, offset, filters)
    # Whether the best result matches well (null: the model is not calibrated).
    return results_json(
        q, results, offset, k, good_match=good_match(results), filters=filters.to_dict()
    )


@bp.post("/search/image")
def search_image() -> Response:
    """Uploaded image to images or captions."""
    upload = request.files.get("image")
    if upload is None:
        raise BadParameter("send the image as the multipart form field 'image'")
    target = choice_param("target", "images", ("images", "captions"))
    k = k_param()
    offset = offset_param(k)
    min_score = float_param("min_score")
    rerank, rerank_k = rerank_params()
    filters = filter_params()
    if filters.active and target == "captions":
        raise BadParameter("filters apply to image results only, not to captions", "target")
    data = read_upload(upload)
    results = service().image_query(
        data, target, k, min_score, rerank, rerank_k, offset, filters=filters
    )
    query = {"image": upload.filename or "upload", "target": target}
    return results_json(query, results, offset, k, filters=filters.to_dict())


@bp.get("/images/<id:image_id>")
def image_info(image_id: int) -> Response:
    """An image's path, metadata and linked captions."""
    return jsonify(service().image_details(image_id))


@bp.get("/images/<id:image_id>/similar")
def image_similar(image_id: int) -> Response:
    """'More like this': images nearest to an indexed image."""
    service().image(image_id)
    k = k_param()
    offset = offset_param(k)
    return results_json({"image_id": image_id}, service().similar(image_id, k, offset), offset, k)


@bp.get("/images/<id:image_id>/thumbnail")
def image_thumbnail(image_id: int) -> Response:
    """A small WebP of the image (cached on disk)."""
    response = send_file(service().thumbnail(image_id), mimetype="image/webp", max_age=86400)
    return response


_MIMETYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "MPO": "image/jpeg",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
}


@bp.get("/images/<id:image_id>/file")
def image_file(image_id: int) -> Response:
    """The original file, by catalog id only, and only from inside the indexed folders."""
    path, hit = service().safe_path(image_id)
    mimetype = _MIMETYPES.get(hit.format or "", "application/octet-stream")
    st = os.stat(path)
    # Werkzeug's own ETag encodes the path as UTF-8, which undecodable names cannot be.
    etag = f"{st.st_mtime}-{st.st_size}-{zlib.adler32(os.fsencode(path)) & 0xFFFFFFFF}"
    return send_file(
        path,
        mimetype=mimetype,
        conditional=True,
        etag=etag,
        max_age=3600,
        download_name=download_name(path, image_id),
    )


def download_name(path: str, image_id: int) -> str:
    """The file name for Content-Disposition: control characters (a newline would be an
    invalid header) and undecodable bytes (surrogates) become '_'."""
    name = "".join(ch if ch.isprintable() else "_" for ch in os.path.basename(path))
    return name.strip() or f"image-{image_id}"


@bp.get("/stats")
def stats() -> Response:
    """Model, counts, index types, last run, failures."""
    return jsonify(service().status())


@bp.get("/health")
def health() -> Response:
    """Liveness: the bundle is open and the model loaded."""
    svc = service()
    return jsonify(
        status="ok",
        generation=svc.bundle.manifest.generation,
        model=svc.engine.encoder.identity.name,
        reranker=svc.engine.reranker.name if svc.can_rerank else None,
        refresh_problem=svc.refresh_problem,
    )


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 description of this API."""
    cfg = current_app.config
    return jsonify(openapi_document(cfg["API_MAX_K"], cfg["DEFAULT_K"], cfg["MAX_UPLOAD_BYTES"]))
