"""HTML pages: text search, search by image, image detail, status.

Text search is a plain GET form (works without JavaScript). Search by image is a
POST form with a CSRF token that keeps the upload and redirects to its results' own URL;
JavaScript only adds drag-and-drop, paste and "load more" in place, over the same
forms and links. Every value from users or files goes through Jinja's autoescaping.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from xmodal.crossmodal.errors import XmodalError
from xmodal.crossmodal.images import ImageDecodeError
from xmodal.search.engine import MAX_K, ImageFilter, QueryError
from xmodal.search.matching import good_match

from . import MAX_CATALOG_ID
from .api import (
    FILTER_PARAMS,
    BadParameter,
    error_status,
    filter_params,
    float_param,
    http_error_message,
    int_param,
    k_param,
    next_offset,
    offset_param,
    read_upload,
)
from .security import check_csrf
from .service import NotServable
from .service import current_service as service
from .uploads import UploadExpired

bp = Blueprint("pages", __name__)

# What the pages call their fields, for errors shown next to them in people's words.
FIELD_LABELS = {
    "k": "Results",
    "min_score": "Min similarity",
    "offset": "The result to start from",
    "folder": "Folder",
    "type": "Type",
    "taken_after": "Taken from",
    "taken_before": "Taken before",
    "min_width": "Min width",
}
IMAGE_PAGE_CAPTIONS = 10  # captions the search-by-image page shows at most
DETAIL_SIMILAR = 12  # "more like this" images on an image's page


@bp.get("/")
def search() -> tuple[str, int] | str:
    """The text search page (and its results when q is given)."""
    q = request.args.get("q", "")
    rerank = None
    if service().can_rerank:
        # The form sends a hidden rerank=0 and, when ticked, the checkbox's rerank=1;
        # a link without the parameter gets the default: on.
        values = request.args.getlist("rerank")
        rerank = "1" in values if values else True
    ctx: dict = {
        "rerank": rerank,
        "q": q,
        "k": request.args.get("k", ""),
        "min_score": request.args.get("min_score", ""),
        "field_errors": {},
        # The filter row: what was asked, and the types it offers.
        "filters": {name: request.args.get(name, "") for name in FILTER_PARAMS},
        "filter_types": ImageFilter.known_types(),
    }
    # Collapsed (a phone's first screen stays short) unless a filter is set.
    ctx["filters_open"] = any(ctx["filters"].values())
    if not q.strip():
        return render_template("search.html", results=None, **ctx)
    try:
        k = k_param()
        offset = offset_param(k)
        results = service().text_to_images(
            q, k, float_param("min_score"), rerank, offset=offset, filters=filter_params()
        )
    except BadParameter as exc:
        if exc.param in FIELD_LABELS:
            ctx["field_errors"] = {exc.param: f"{FIELD_LABELS[exc.param]} {exc.problem}."}
            return render_template("search.html", results=None, **ctx), 400
        return render_template("search.html", results=None, error=str(exc), **ctx), 400
    except QueryError as exc:
        return render_template("search.html", results=None, error=str(exc), **ctx), 400
    more = next_offset(offset, k, results)
    # "Load more" is a plain link to the next page; app.js appends it in place instead.
    next_url = None
    if more is not None:
        args = {key: ctx[key] for key in ("q", "k", "min_score") if ctx[key] != ""}
        args.update({key: value for key, value in ctx["filters"].items() if value})
        if rerank is not None:
            args["rerank"] = int(rerank)
        next_url = url_for("pages.search", **args, offset=more)
    return render_template(
        "search.html",
        results=results,
        offset=offset,
        next_url=next_url,
        good_match=good_match(results),
        **ctx,
    )


@bp.route("/image", methods=["GET", "POST"])
def image_search() -> tuple[str, int] | str | Response:
    """Search by image. POST (picker, drag-and-drop or paste) stores the upload under an
    opaque id and redirects to ``GET /image?id=...``, which shows the results: a reload
    or a shared link works until the id expires."""
    if request.method == "POST":
        return _store_upload()
    key = request.args.get("id", "")
    indexed = request.args.get("image_id", "")
    if not key and not indexed:
        return render_template("image.html", captions=None, images=None)
    try:
        if indexed:  # "search with this image" for an indexed image: its URL is stable
            stored = service().indexed_query(int_param("image_id", 0, 1, MAX_CATALOG_ID))
            args = {"image_id": indexed}
        else:
            stored = service().uploads.get(key)
            args = {"id": key}
        k = k_param()
        offset = offset_param(k)
        coffset = int_param("coffset", 0, 0, MAX_K - IMAGE_PAGE_CAPTIONS)
        image = stored.image()
        captions = service().image_query(image, "captions", IMAGE_PAGE_CAPTIONS, offset=coffset)
        images = service().image_query(image, "images", k, offset=offset)
    except (UploadExpired, NotServable) as exc:
        return render_template("image.html", captions=None, images=None, error=str(exc)), 404
    except (BadParameter, QueryError) as exc:
        return render_template("image.html", captions=None, images=None, error=str(exc)), 400
    if request.args.get("k"):
        args["k"] = k
    more_images = next_offset(offset, k, images)
    more_captions = next_offset(coffset, IMAGE_PAGE_CAPTIONS, captions)
    return render_template(
        "image.html",
        captions=captions,
        images=images,
        filename=stored.filename,
        query_url=url_for("pages.query_image", key=key)
        if key and not indexed
        else url_for("api.image_thumbnail", image_id=int(indexed)),
        offset=offset,
        coffset=coffset,
        next_url=None
        if more_images is None
        else url_for("pages.image_search", **args, offset=more_images),
        next_captions_url=None
        if more_captions is None
        else url_for("pages.image_search", **args, coffset=more_captions),
    )


def _store_upload() -> tuple[str, int] | Response:
    """Decode and keep a posted image, then send the browser to its results."""
    check_csrf()
    upload = request.files.get("image")
    try:
        if upload is None or (not upload.filename and not upload.content_length):
            raise BadParameter("choose an image to search with")
        data = read_upload(upload)
        k = k_param()
        image = service().decode_upload(data)
    except (BadParameter, ImageDecodeError) as exc:
        return render_template("image.html", captions=None, images=None, error=str(exc)), 400
    except RequestEntityTooLarge as exc:
        message = http_error_message(exc)
        return render_template("image.html", captions=None, images=None, error=message), 413
    key = service().uploads.put(image, upload.filename or "upload")
    args = {"k": k} if request.form.get("k") else {}
    return redirect(url_for("pages.image_search", id=key, **args), code=303)


@bp.get("/image/query/<key>")
def query_image(key: str) -> Response:
    """The image a stored search by image searched with."""
    try:
        stored = service().uploads.get(key)
    except UploadExpired as exc:
        return Response(str(exc), status=404, mimetype="text/plain")
    response = Response(stored.png, mimetype="image/png")
    max_age = int(current_app.config["UPLOAD_STORE_TTL_S"])
    response.headers["Cache-Control"] = f"private, max-age={max_age}"
    return response


@bp.get("/images/<id:image_id>")
def detail(image_id: int) -> tuple[str, int] | str:
    """One image: the picture, its path and metadata, captions, more like this."""
    try:
        info = service().image_details(image_id)
    except NotServable as exc:
        return render_template("error.html", code=404, message=str(exc)), 404
    similar = service().similar(image_id, DETAIL_SIMILAR)
    # Back to the results this came from, when they were ours (no open redirect elsewhere).
    back = request.referrer or ""
    ours = back.startswith(request.host_url) and urlsplit(back).path in ("/", "/image")
    return render_template(
        "detail.html", info=info, similar=similar, back_url=back if ours else None
    )


@bp.get("/favicon.ico")
def favicon() -> Response:
    """The icon browsers ask for by this name (pages link the same SVG)."""
    response = current_app.send_static_file("favicon.svg")
    response.mimetype = "image/svg+xml"
    response.cache_control.max_age = 86400
    return response


@bp.get("/status")
def status() -> str:
    """Model, counts, index types, last run, failures."""
    return render_template("status.html", status=service().status())


def _error_page(code: int, message: str) -> tuple[Response | str, int]:
    """JSON under /api, an HTML page elsewhere."""
    if request.path.startswith("/api/") or request.path == "/api":
        return jsonify(error=message, status=code), code
    return render_template("error.html", code=code, message=message), code


@bp.app_errorhandler(HTTPException)
def http_error(exc: HTTPException) -> tuple[Response | str, int]:
    """An HTTP error (unknown route, wrong method, body too large), in the path's form."""
    return _error_page(exc.code or 500, http_error_message(exc))


@bp.app_errorhandler(XmodalError)
def xmodal_error(exc: XmodalError) -> tuple[Response | str, int]:
    """One of our errors that no route handled (a catalog that cannot be read: 503)."""
    return _error_page(error_status(exc), str(exc))
