"""HTML pages: text search, search by image, image detail, status.

Text search is a plain GET form (works without JavaScript). Search by image is a
POST form with a CSRF token; JavaScript only adds drag-and-drop and paste, which fill
the same form. Every value from users or files goes through Jinja's autoescaping.
"""

from __future__ import annotations

from flask import Blueprint, Response, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from xmodal.crossmodal.images import ImageDecodeError
from xmodal.search.engine import QueryError

from .api import BadParameter, float_param, http_error_message, int_param, read_upload
from .security import check_csrf
from .service import NotServable
from .service import current_service as service

bp = Blueprint("pages", __name__)


def _k() -> int:
    from flask import current_app

    return int_param("k", current_app.config["DEFAULT_K"], 1, current_app.config["API_MAX_K"])


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
    }
    if not q.strip():
        return render_template("search.html", results=None, **ctx)
    try:
        results = service().text_to_images(q, _k(), float_param("min_score"), rerank)
    except (BadParameter, QueryError) as exc:
        return render_template("search.html", results=None, error=str(exc), **ctx), 400
    return render_template("search.html", results=results, **ctx)


@bp.route("/image", methods=["GET", "POST"])
def image_search() -> tuple[str, int] | str:
    """Search by image: upload by picker, drag-and-drop or paste."""
    if request.method != "POST":  # GET, and HEAD (the same without the body)
        return render_template("image.html", captions=None, images=None)
    check_csrf()
    upload = request.files.get("image")
    try:
        if upload is None or (not upload.filename and not upload.content_length):
            raise BadParameter("choose an image to search with")
        data = read_upload(upload)
        k = _k()
        image = service().decode_upload(data)  # once, for both searches
        captions = service().image_query(image, "captions", min(k, 10))
        images = service().image_query(image, "images", k)
    except (BadParameter, ImageDecodeError) as exc:
        return render_template("image.html", captions=None, images=None, error=str(exc)), 400
    except RequestEntityTooLarge as exc:
        message = http_error_message(exc)
        return render_template("image.html", captions=None, images=None, error=message), 413
    return render_template(
        "image.html", captions=captions, images=images, filename=upload.filename or "upload"
    )


@bp.get("/images/<id:image_id>")
def detail(image_id: int) -> tuple[str, int] | str:
    """One image: the picture, its path and metadata, captions, more like this."""
    try:
        info = service().image_details(image_id)
    except NotServable as exc:
        return render_template("error.html", code=404, message=str(exc)), 404
    similar = service().similar(image_id, 12)
    return render_template("detail.html", info=info, similar=similar)


@bp.get("/status")
def status() -> str:
    """Model, counts, index types, last run, failures."""
    return render_template("status.html", status=service().status())


@bp.app_errorhandler(HTTPException)
def http_error(exc: HTTPException) -> Response | tuple:
    """JSON under /api, an HTML page elsewhere."""
    from flask import jsonify

    code = exc.code or 500
    message = http_error_message(exc)
    if request.path.startswith("/api/") or request.path == "/api":
        return jsonify(error=message, status=code), code
    return render_template("error.html", code=code, message=message), code
